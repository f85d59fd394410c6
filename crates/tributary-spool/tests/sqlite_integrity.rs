//! What the SQLite spool proves about itself: partial settlements and the conservation
//! totals, clocks that step, files that are damaged or not ours, and the disk reserve.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tributary_spool::clock::{Clock, ManualTime};
use tributary_spool::{
    DB_FILE, PartialSettlement, Payload, Selection, Spool, SpoolError, SqliteConfig, SqliteSpool,
};

const LONG: Duration = Duration::from_secs(600);
const HEADER: &[u8] = br#""account_id":"1","project_id":"2","revision":"3""#;

/// A payload of `visitors` visitors numbered from `first`.
fn payload(first: u64, visitors: u64) -> Payload {
    let run: Vec<String> = (first..first + visitors)
        .map(|n| format!(r#"{{"visitor_id":"v{n}","n":{n}}}"#))
        .collect();
    Payload {
        route: "us".into(),
        header: Bytes::from_static(HEADER),
        visitors: Bytes::from(run.join(",")),
        visitor_count: u32::try_from(visitors).unwrap(),
    }
}

fn manual(t: &Arc<ManualTime>) -> SqliteConfig {
    SqliteConfig {
        clock: Clock::from_source(t.clone()),
        ..SqliteConfig::default()
    }
}

async fn audit_balances(spool: &SqliteSpool) -> tributary_spool::SpoolAudit {
    let audit = spool.audit().await.unwrap();
    assert!(audit.is_balanced(), "{:?}", audit.problems);
    audit
}

#[tokio::test]
async fn partial_settlements_keep_every_visitor_accounted_for() {
    let dir = tempfile::tempdir().unwrap();
    let spool = SqliteSpool::open(dir.path(), SqliteConfig::default()).unwrap();
    spool
        .append(vec![payload(0, 10), payload(10, 10), payload(20, 10)])
        .await
        .unwrap();
    let leased = spool.lease(10, 1 << 20, LONG).await.unwrap();
    assert_eq!(leased.len(), 3);
    let parts = vec![
        // 9 delivered, one refused alone.
        PartialSettlement {
            receipt: leased[0].receipt.clone(),
            delivered_events: 9,
            dead: vec![(payload(3, 1), "upstream answered 400: bad event".into())],
            remainder: None,
            delay: Duration::ZERO,
        },
        // 5 delivered, 2 refused, 3 left for later.
        PartialSettlement {
            receipt: leased[1].receipt.clone(),
            delivered_events: 5,
            dead: vec![
                (payload(11, 1), "upstream answered 400: a".into()),
                (payload(12, 1), "upstream answered 422: b".into()),
            ],
            remainder: Some(payload(17, 3)),
            delay: Duration::ZERO,
        },
        // Nothing delivered: two refused, eight never judged.
        PartialSettlement {
            receipt: leased[2].receipt.clone(),
            delivered_events: 0,
            dead: vec![
                (payload(20, 1), "upstream answered 400: c".into()),
                (payload(21, 1), "upstream answered 400: d".into()),
            ],
            remainder: Some(payload(22, 8)),
            delay: Duration::ZERO,
        },
    ];
    spool.settle_parts(parts).await.unwrap();

    let dead = spool.dead_letters(100).await.unwrap();
    let mut ids: Vec<&str> = dead.iter().map(|d| d.id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(
        ids.len(),
        5,
        "each refused visitor is a dead letter of its own"
    );
    assert!(dead.iter().all(|d| d.payload.visitor_count == 1));
    assert!(dead.iter().all(|d| &d.payload.header[..] == HEADER));
    assert!(dead.iter().any(|d| d.reason == "upstream answered 422: b"));

    let rest = spool.lease(10, 1 << 20, LONG).await.unwrap();
    let mut counts: Vec<u32> = rest.iter().map(|l| l.payload.visitor_count).collect();
    counts.sort_unstable();
    assert_eq!(counts, [3, 8]);
    assert!(
        rest.iter().all(|l| l.attempts == 1),
        "attempts carried over"
    );

    let audit = audit_balances(&spool).await;
    let t = audit.totals;
    assert_eq!(t.events.accepted, 30);
    assert_eq!(t.events.delivered, 14);
    assert_eq!(t.events.dead, 5);
    assert_eq!(t.events.pending, 11);
    assert_eq!(t.payloads.accepted, 3);

    // Deliver the rest, retry one dead letter, purge the others: still balanced.
    let receipts: Vec<_> = rest.iter().map(|l| l.receipt.clone()).collect();
    spool.ack(&receipts).await.unwrap();
    spool
        .retry_dead_letters(Selection::Ids(vec![dead[0].id.clone()]))
        .await
        .unwrap();
    spool.purge_dead_letters(Selection::All).await.unwrap();
    let audit = audit_balances(&spool).await;
    assert_eq!(audit.totals.events.purged, 4);
    assert_eq!(audit.totals.events.pending, 1);
    assert_eq!(audit.totals.events.delivered, 25);

    // The totals survive a reopen.
    spool.close().await.unwrap();
    drop(spool);
    let spool = SqliteSpool::open(dir.path(), SqliteConfig::default()).unwrap();
    assert_eq!(audit_balances(&spool).await.totals, audit.totals);
}

#[tokio::test]
async fn a_settlement_that_does_not_add_up_is_refused_whole() {
    let dir = tempfile::tempdir().unwrap();
    let spool = SqliteSpool::open(dir.path(), SqliteConfig::default()).unwrap();
    spool.append(vec![payload(0, 4)]).await.unwrap();
    let leased = spool.lease(10, 1 << 20, LONG).await.unwrap();
    let err = spool
        .settle_parts(vec![PartialSettlement {
            receipt: leased[0].receipt.clone(),
            delivered_events: 4,
            dead: vec![(payload(0, 1), "x".into())],
            remainder: None,
            delay: Duration::ZERO,
        }])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("accounts for 5 of its 4"), "{err}");
    assert_eq!(spool.stats().await.unwrap().pending, 1);
    audit_balances(&spool).await;
}

#[tokio::test]
async fn a_wall_clock_step_while_running_moves_no_lease() {
    let t = Arc::new(ManualTime::new(1_700_000_000_000));
    let dir = tempfile::tempdir().unwrap();
    let spool = SqliteSpool::open(dir.path(), manual(&t)).unwrap();
    spool
        .append(vec![payload(0, 1), payload(1, 1)])
        .await
        .unwrap();
    let first = spool
        .lease(1, 1 << 20, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(first.len(), 1);
    let second = spool
        .lease(1, 1 << 20, Duration::from_secs(60))
        .await
        .unwrap();
    spool
        .release(&[second[0].receipt.clone()], Duration::from_secs(30))
        .await
        .unwrap();

    // NTP steps the wall clock a day forward: the lease still holds, the release still waits.
    t.step_wall(86_400_000);
    assert!(spool.lease(10, 1 << 20, LONG).await.unwrap().is_empty());
    // And a day back: nothing is hidden for a day; the release shows after its 30 s.
    t.step_wall(-2 * 86_400_000);
    t.advance(Duration::from_secs(31));
    let again = spool.lease(10, 1 << 20, LONG).await.unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].payload, payload(1, 1));
    // Retention did not count the day either.
    assert_eq!(spool.maintain().await.unwrap(), 0);
    audit_balances(&spool).await;
}

#[tokio::test]
async fn a_clock_stepped_back_between_runs_hides_nothing_for_long() {
    let t = Arc::new(ManualTime::new(1_700_000_000_000));
    let dir = tempfile::tempdir().unwrap();
    {
        let spool = SqliteSpool::open(dir.path(), manual(&t)).unwrap();
        spool.append(vec![payload(0, 1)]).await.unwrap();
        let leased = spool.lease(1, 1 << 20, LONG).await.unwrap();
        spool
            .release(&[leased[0].receipt.clone()], Duration::from_secs(5))
            .await
            .unwrap();
        spool.close().await.unwrap();
    }
    // The host comes back with its clock 6 hours behind.
    t.step_wall(-6 * 3_600_000);
    let spool = SqliteSpool::open(dir.path(), manual(&t)).unwrap();
    assert!(spool.lease(1, 1 << 20, LONG).await.unwrap().is_empty());
    t.advance(Duration::from_secs(6));
    assert_eq!(
        spool.lease(1, 1 << 20, LONG).await.unwrap().len(),
        1,
        "visible 5 s after the release, not 6 hours"
    );
    audit_balances(&spool).await;
}

#[tokio::test]
async fn a_clock_stepped_forward_between_runs_expires_only_dead_leases() {
    let t = Arc::new(ManualTime::new(1_700_000_000_000));
    let dir = tempfile::tempdir().unwrap();
    {
        let spool = SqliteSpool::open(dir.path(), manual(&t)).unwrap();
        spool.append(vec![payload(0, 1)]).await.unwrap();
        spool.lease(1, 1 << 20, LONG).await.unwrap();
        // The process dies holding the lease.
        spool.close().await.unwrap();
    }
    t.step_wall(3_600_000);
    let spool = SqliteSpool::open(dir.path(), manual(&t)).unwrap();
    let leased = spool.lease(1, 1 << 20, LONG).await.unwrap();
    assert_eq!(leased.len(), 1, "the dead holder's lease ran out");
    assert_eq!(leased[0].attempts, 1);
    // A second, live holder is not disturbed by a further step.
    t.step_wall(3_600_000);
    assert!(spool.lease(1, 1 << 20, LONG).await.unwrap().is_empty());
    audit_balances(&spool).await;
}

fn expect_damaged(dir: &Path, what: &str) -> String {
    let err = SqliteSpool::open(dir, SqliteConfig::default()).unwrap_err();
    let SpoolError::Damaged { path, .. } = &err else {
        panic!("{what}: expected Damaged, got {err}");
    };
    assert!(path.ends_with(DB_FILE), "{what}: {path}");
    err.to_string()
}

#[test]
fn a_file_that_is_not_sqlite_is_refused_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let junk = b"this is not a database, it is a shopping list\n".repeat(200);
    std::fs::write(dir.path().join(DB_FILE), &junk).unwrap();
    let msg = expect_damaged(dir.path(), "junk");
    assert!(msg.contains("not a readable SQLite database"), "{msg}");
    assert!(msg.contains("move the file aside"), "{msg}");
    assert_eq!(std::fs::read(dir.path().join(DB_FILE)).unwrap(), junk);
}

#[test]
fn another_programs_database_is_refused_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(DB_FILE);
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch("CREATE TABLE orders (id INTEGER PRIMARY KEY, total REAL); INSERT INTO orders VALUES (1, 9.5);")
            .unwrap();
    }
    let msg = expect_damaged(dir.path(), "foreign");
    assert!(msg.contains("another program"), "{msg}");
    let conn = rusqlite::Connection::open(&path).unwrap();
    let n: i64 = conn
        .query_row("SELECT COUNT(*) FROM orders", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 1);
}

#[tokio::test]
async fn a_spool_from_a_newer_version_is_refused_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    {
        let spool = SqliteSpool::open(dir.path(), SqliteConfig::default()).unwrap();
        spool.append(vec![payload(0, 1)]).await.unwrap();
        spool.close().await.unwrap();
    }
    let path = dir.path().join(DB_FILE);
    rusqlite::Connection::open(&path)
        .unwrap()
        .pragma_update(None, "user_version", 99)
        .unwrap();
    let msg = expect_damaged(dir.path(), "newer");
    assert!(msg.contains("newer version"), "{msg}");
    assert!(msg.contains("format 99"), "{msg}");
}

fn cut_in_half(path: &Path) -> u64 {
    let len = std::fs::metadata(path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    len / 2
}

#[tokio::test]
async fn a_truncated_spool_is_refused_with_its_wal_or_without() {
    for keep_wal in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let copy = tempfile::tempdir().unwrap();
        let spool = SqliteSpool::open(dir.path(), SqliteConfig::default()).unwrap();
        for i in 0..200 {
            spool.append(vec![payload(i * 10, 10)]).await.unwrap();
        }
        if keep_wal {
            // Half the payloads checkpointed into the file, the rest only in the WAL; the
            // files copied as they are, the way a careless backup would.
            let conn = rusqlite::Connection::open(dir.path().join(DB_FILE)).unwrap();
            conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
                .unwrap();
            for i in 200..300 {
                spool.append(vec![payload(i * 10, 10)]).await.unwrap();
            }
            let wal = format!("{DB_FILE}-wal");
            assert!(std::fs::metadata(dir.path().join(&wal)).unwrap().len() > 0);
            std::fs::copy(dir.path().join(&wal), copy.path().join(&wal)).unwrap();
        } else {
            spool.close().await.unwrap();
        }
        std::fs::copy(dir.path().join(DB_FILE), copy.path().join(DB_FILE)).unwrap();
        drop(spool);
        let cut = cut_in_half(&copy.path().join(DB_FILE));
        let msg = expect_damaged(copy.path(), "truncated");
        assert!(msg.contains("damaged"), "{msg}");
        assert_eq!(
            std::fs::metadata(copy.path().join(DB_FILE)).unwrap().len(),
            cut,
            "the file is never changed"
        );
    }
}

#[tokio::test]
async fn the_reserve_refuses_appends_but_not_deliveries() {
    let dir = tempfile::tempdir().unwrap();
    let spool = SqliteSpool::open(dir.path(), SqliteConfig::default()).unwrap();
    spool.append(vec![payload(0, 3)]).await.unwrap();
    spool.close().await.unwrap();
    drop(spool);
    // A reserve larger than any disk: the file system is "full" for appends.
    let config = SqliteConfig {
        reserve_bytes: u64::MAX / 4,
        ..SqliteConfig::default()
    };
    let spool = SqliteSpool::open(dir.path(), config).unwrap();
    let err = spool.append(vec![payload(3, 1)]).await.unwrap_err();
    assert!(
        matches!(&err, SpoolError::Full { reason } if reason.contains("--spool-reserve-bytes")),
        "{err}"
    );
    let ready = spool.check_ready().await.unwrap_err();
    assert!(ready.to_string().contains("disk full"), "{ready}");
    // The forwarder's side still works inside the reserve.
    let leased = spool.lease(10, 1 << 20, LONG).await.unwrap();
    spool.ack(&[leased[0].receipt.clone()]).await.unwrap();
    let audit = audit_balances(&spool).await;
    assert_eq!(audit.totals.events.delivered, 3);
    assert_eq!(
        audit.totals.events.accepted, 3,
        "the refused append counted nothing"
    );
}

/// The version-1 schema, as the first release wrote it.
const V1: &str = "
CREATE TABLE payloads (id INTEGER PRIMARY KEY AUTOINCREMENT, visitor_count INTEGER NOT NULL,
    bytes INTEGER NOT NULL, appended_at INTEGER NOT NULL, visible_at INTEGER NOT NULL,
    leases INTEGER NOT NULL DEFAULT 0, leased INTEGER NOT NULL DEFAULT 0, route TEXT NOT NULL,
    header BLOB NOT NULL, visitors BLOB NOT NULL);
CREATE INDEX payloads_visible ON payloads(visible_at);
CREATE INDEX payloads_leased ON payloads(visible_at) WHERE leased = 1;
CREATE TABLE dead_letters (id INTEGER PRIMARY KEY, visitor_count INTEGER NOT NULL,
    bytes INTEGER NOT NULL, appended_at INTEGER NOT NULL, dead_at INTEGER NOT NULL,
    reason TEXT NOT NULL, route TEXT NOT NULL, header BLOB NOT NULL, visitors BLOB NOT NULL);
CREATE TABLE totals (id INTEGER PRIMARY KEY CHECK (id = 0), pending INTEGER NOT NULL,
    pending_bytes INTEGER NOT NULL, pending_events INTEGER NOT NULL, dead INTEGER NOT NULL,
    dead_bytes INTEGER NOT NULL);
INSERT INTO payloads (visitor_count, bytes, appended_at, visible_at, route, header, visitors)
    VALUES (2, 10, 1, 1, 'us', X'7B7D', '{\"a\":1},{\"b\":2}');
INSERT INTO dead_letters VALUES (7, 3, 10, 1, 2, 'old', 'us', X'7B7D', '{},{},{}');
INSERT INTO totals VALUES (0, 1, 10, 2, 1, 10);
PRAGMA user_version = 1;
";

#[tokio::test]
async fn a_version_1_spool_is_upgraded_and_balances() {
    let dir = tempfile::tempdir().unwrap();
    rusqlite::Connection::open(dir.path().join(DB_FILE))
        .unwrap()
        .execute_batch(V1)
        .unwrap();
    let spool = SqliteSpool::open(dir.path(), SqliteConfig::default()).unwrap();
    let audit = audit_balances(&spool).await;
    assert_eq!(audit.totals.events.accepted, 5);
    assert_eq!(audit.totals.events.dead, 3);
    assert_eq!(audit.totals.payloads.accepted, 2);
}
