//! The SQLite spool's shared group commits, through the public API against real files:
//! ingest and forwarding at once, every reply checked from a second connection.
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tributary_spool::{DB_FILE, Payload, Spool, SqliteConfig, SqliteSpool};

const LONG: Duration = Duration::from_secs(600);

fn payload(n: u64) -> Payload {
    Payload {
        route: "us".into(),
        header: Bytes::from_static(br#""account_id":"1","project_id":"2","revision":"3""#),
        visitors: Bytes::from(format!(r#"{{"visitor_id":"v{n}","n":{n}}}"#)),
        visitor_count: 1,
    }
}

fn number(p: &Payload) -> u64 {
    let v: serde_json::Value = serde_json::from_slice(&p.visitors).unwrap();
    v["n"].as_u64().unwrap()
}

/// Rows holding payload `n`, read through a connection of its own: only committed data.
fn rows_of(conn: &rusqlite::Connection, n: u64) -> i64 {
    conn.query_row(
        "SELECT COUNT(*) FROM payloads WHERE visitors = ?1",
        [format!(r#"{{"visitor_id":"v{n}","n":{n}}}"#).into_bytes()],
        |r| r.get(0),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_come_after_the_commit_while_ingest_and_forwarding_share_groups() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Arc::new(SqliteSpool::open(dir.path(), SqliteConfig::default()).unwrap());
    let path = dir.path().join(DB_FILE);
    let (tasks, each) = (16u64, 25u64);
    // Payloads the forwarder has had leased to it: those may be gone from the table.
    let seen = Arc::new(Mutex::new(HashSet::new()));
    let mut set = tokio::task::JoinSet::new();
    for t in 0..tasks {
        let (spool, path, seen) = (spool.clone(), path.clone(), seen.clone());
        set.spawn(async move {
            let reader = rusqlite::Connection::open(&path).unwrap();
            for i in 0..each {
                let n = t * each + i;
                spool.append(vec![payload(n)]).await.unwrap();
                // Acknowledged means committed: visible to another connection at once,
                // unless the forwarder below already leased it (and maybe acked it).
                let rows = rows_of(&reader, n);
                assert!(
                    rows == 1 || seen.lock().unwrap().contains(&n),
                    "payload {n} acknowledged but not committed"
                );
            }
        });
    }
    // The forwarder: leases, acks or releases, each checked the same way.
    let forwarder = {
        let (spool, path, seen) = (spool.clone(), path.clone(), seen.clone());
        tokio::spawn(async move {
            let reader = rusqlite::Connection::open(&path).unwrap();
            let mut acked = 0u64;
            let mut released = 0u64;
            // Every lease, release and ack the forwarder asked for.
            let mut writes = 0u64;
            while acked < tasks * each {
                let held = spool.lease(8, usize::MAX, LONG).await.unwrap();
                writes += 1;
                if held.is_empty() {
                    tokio::task::yield_now().await;
                    continue;
                }
                seen.lock()
                    .unwrap()
                    .extend(held.iter().map(|l| number(&l.payload)));
                // Give one back now and then, so releases join the groups too.
                let (back, done) = if released < 20 && held.len() > 1 {
                    held.split_at(1)
                } else {
                    held.split_at(0)
                };
                if !back.is_empty() {
                    let receipts: Vec<_> = back.iter().map(|l| l.receipt.clone()).collect();
                    spool.release(&receipts, Duration::ZERO).await.unwrap();
                    writes += 1;
                    released += 1;
                }
                let receipts: Vec<_> = done.iter().map(|l| l.receipt.clone()).collect();
                spool.ack(&receipts).await.unwrap();
                writes += 1;
                for l in done {
                    let n = number(&l.payload);
                    assert_eq!(rows_of(&reader, n), 0, "payload {n} acked but still there");
                }
                acked += receipts.len() as u64;
            }
            (acked, writes)
        })
    };
    while let Some(r) = set.join_next().await {
        r.unwrap();
    }
    let (acked, forwarder_writes) = forwarder.await.unwrap();
    assert_eq!(acked, tasks * each);

    let audit = spool.audit().await.unwrap();
    assert!(audit.is_balanced(), "{:?}", audit.problems);
    assert_eq!(audit.totals.payloads.accepted, tasks * each);
    assert_eq!(audit.totals.payloads.delivered, tasks * each);
    let c = spool.counters();
    assert_eq!(c.appends, tasks * each);
    // Writes shared commits: fewer commits than writes asked for.
    let issued = tasks * each + forwarder_writes;
    assert!(
        c.write_commits < issued,
        "{} commits for {issued} writes",
        c.write_commits
    );
    spool.close().await.unwrap();
}
