//! The SQLite spool against real database files in temporary directories.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tributary_spool::{
    DB_FILE, Payload, Receipt, Selection, Spool, SpoolError, SqliteConfig, SqliteSpool, SyncMode,
};

const LONG: Duration = Duration::from_secs(600);

fn payload(n: u64) -> Payload {
    Payload {
        route: "us".into(),
        header: Bytes::from_static(br#""account_id":"1","project_id":"2","revision":"3""#),
        visitors: Bytes::from(format!(r#"{{"visitor_id":"v{n}","n":{n}}}"#)),
        visitor_count: 1,
    }
}

/// The `n` a test payload carries.
fn number(p: &Payload) -> u64 {
    let v: serde_json::Value = serde_json::from_slice(&p.visitors).unwrap();
    v["n"].as_u64().unwrap()
}

fn config() -> SqliteConfig {
    SqliteConfig::default()
}

/// Polls `check` until it returns `Some`, failing the test after a few seconds.
async fn wait_for<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Opens the database behind the spool's back: integrity and the running totals against a
/// full recount.
fn verify_db(dir: &Path) {
    let conn = rusqlite::Connection::open(dir.join(DB_FILE)).unwrap();
    let check: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
    let counted: (i64, i64, i64) = conn
        .query_row(
            "SELECT COUNT(*), COALESCE(SUM(bytes), 0), COALESCE(SUM(visitor_count), 0) FROM payloads",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    let dead: (i64, i64) = conn
        .query_row(
            "SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM dead_letters",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    let totals: (i64, i64, i64, i64, i64) = conn
        .query_row(
            "SELECT pending, pending_bytes, pending_events, dead, dead_bytes FROM totals",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
        )
        .unwrap();
    assert_eq!(
        totals,
        (counted.0, counted.1, counted.2, dead.0, dead.1),
        "running totals drifted from the rows"
    );
}

#[tokio::test]
async fn append_lease_ack_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let spool = SqliteSpool::open(&dir.path().join("new/spool"), config()).unwrap();
    spool
        .append(vec![payload(1), payload(2), payload(3)])
        .await
        .unwrap();
    spool.append(vec![payload(4)]).await.unwrap();
    spool.append(vec![]).await.unwrap();

    let stats = spool.stats().await.unwrap();
    assert_eq!(stats.pending, 4);
    assert_eq!(stats.pending_events, 4);
    let bytes: usize = (1..=4).map(|n| payload(n).stored_len()).sum();
    assert_eq!(stats.pending_bytes, bytes as u64);
    assert_eq!(stats.leased, 0);

    let leased = spool.lease(10, 1 << 20, LONG).await.unwrap();
    let numbers: Vec<u64> = leased.iter().map(|l| number(&l.payload)).collect();
    assert_eq!(numbers, [1, 2, 3, 4], "oldest first");
    assert!(leased.iter().all(|l| l.attempts == 0));
    assert_eq!(leased[0].payload, payload(1));
    assert!(leased[0].appended_at_ms > 0);
    assert_eq!(spool.stats().await.unwrap().leased, 4);
    assert!(
        spool.lease(10, 1 << 20, LONG).await.unwrap().is_empty(),
        "leased payloads are hidden"
    );

    let first_two: Vec<Receipt> = leased[..2].iter().map(|l| l.receipt.clone()).collect();
    spool.ack(&first_two).await.unwrap();
    // Acking again (a late duplicate) is harmless.
    spool.ack(&first_two).await.unwrap();
    let stats = spool.stats().await.unwrap();
    assert_eq!(
        (stats.pending, stats.leased, stats.pending_events),
        (2, 2, 2)
    );

    assert!(matches!(
        spool.ack(&[Receipt("garbage".into())]).await,
        Err(SpoolError::Unknown(_))
    ));
    spool.close().await.unwrap();
    verify_db(&dir.path().join("new/spool"));
}

#[tokio::test]
async fn lease_respects_counts_and_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let spool = SqliteSpool::open(dir.path(), config()).unwrap();
    spool.append((0..10).map(payload).collect()).await.unwrap();
    let one = payload(0).stored_len();
    // Smaller than one payload: still one, whatever its size.
    let got = spool.lease(10, 1, LONG).await.unwrap();
    assert_eq!(got.len(), 1);
    let got = spool.lease(10, 2 * one + 1, LONG).await.unwrap();
    assert_eq!(got.len(), 2);
    let got = spool.lease(3, usize::MAX, LONG).await.unwrap();
    assert_eq!(got.len(), 3);
    assert!(spool.lease(0, usize::MAX, LONG).await.unwrap().is_empty());
    let rest = spool.lease(100, usize::MAX, LONG).await.unwrap();
    assert_eq!(
        rest.iter().map(|l| number(&l.payload)).collect::<Vec<_>>(),
        [6, 7, 8, 9]
    );
}

#[tokio::test]
async fn expired_lease_is_handed_out_again_and_stale_receipts_are_detected() {
    let dir = tempfile::tempdir().unwrap();
    let spool = SqliteSpool::open(dir.path(), config()).unwrap();
    spool.append(vec![payload(7)]).await.unwrap();
    let short = Duration::from_millis(100);
    let first = spool.lease(10, usize::MAX, short).await.unwrap();
    assert_eq!(first.len(), 1);
    assert!(spool.lease(10, usize::MAX, short).await.unwrap().is_empty());

    let second = wait_for("the lease to run out", || async {
        let got = spool.lease(10, usize::MAX, LONG).await.unwrap();
        (!got.is_empty()).then_some(got)
    })
    .await;
    assert_eq!(second.len(), 1);
    assert_eq!(second[0].attempts, 1);
    assert_eq!(second[0].payload, payload(7));
    assert_ne!(second[0].receipt, first[0].receipt);

    // The first holder is late: its release and dead-letter must not disturb the new lease.
    spool
        .release(&[first[0].receipt.clone()], Duration::ZERO)
        .await
        .unwrap();
    spool
        .dead_letter(&[first[0].receipt.clone()], "late")
        .await
        .unwrap();
    assert!(spool.lease(10, usize::MAX, LONG).await.unwrap().is_empty());
    let stats = spool.stats().await.unwrap();
    assert_eq!((stats.pending, stats.leased, stats.dead_letters), (1, 1, 0));

    spool.ack(&[second[0].receipt.clone()]).await.unwrap();
    assert_eq!(spool.stats().await.unwrap().pending, 0);
}

#[tokio::test]
async fn release_makes_visible_after_the_delay() {
    let dir = tempfile::tempdir().unwrap();
    let spool = SqliteSpool::open(dir.path(), config()).unwrap();
    spool.append(vec![payload(1), payload(2)]).await.unwrap();
    let leased = spool.lease(10, usize::MAX, LONG).await.unwrap();
    spool
        .release(&[leased[0].receipt.clone()], Duration::from_millis(150))
        .await
        .unwrap();
    spool
        .release(&[leased[1].receipt.clone()], Duration::ZERO)
        .await
        .unwrap();
    let stats = spool.stats().await.unwrap();
    assert_eq!(
        (stats.pending, stats.leased),
        (2, 0),
        "released is not leased"
    );

    let now = spool.lease(10, usize::MAX, LONG).await.unwrap();
    assert_eq!(now.len(), 1, "only the one released without delay");
    assert_eq!(number(&now[0].payload), 2);
    assert_eq!(now[0].attempts, 1);

    let later = wait_for("the delay to pass", || async {
        let got = spool.lease(10, usize::MAX, LONG).await.unwrap();
        (!got.is_empty()).then_some(got)
    })
    .await;
    assert_eq!(number(&later[0].payload), 1);
    assert_eq!(later[0].attempts, 1);
}

#[tokio::test]
async fn dead_letters_list_retry_purge() {
    let dir = tempfile::tempdir().unwrap();
    let spool = SqliteSpool::open(dir.path(), config()).unwrap();
    spool.append((1..=4).map(payload).collect()).await.unwrap();
    let leased = spool.lease(10, usize::MAX, LONG).await.unwrap();
    let receipts: Vec<Receipt> = leased[..3].iter().map(|l| l.receipt.clone()).collect();
    spool
        .dead_letter(&receipts, "upstream answered 400: bad")
        .await
        .unwrap();
    let stats = spool.stats().await.unwrap();
    assert_eq!((stats.pending, stats.dead_letters), (1, 3));

    let dead = spool.dead_letters(10).await.unwrap();
    assert_eq!(dead.len(), 3);
    assert_eq!(
        dead.iter().map(|d| number(&d.payload)).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    assert_eq!(dead[0].payload, payload(1));
    assert_eq!(dead[0].reason, "upstream answered 400: bad");
    assert!(dead[0].dead_at_ms >= dead[0].appended_at_ms);
    assert_eq!(spool.dead_letters(2).await.unwrap().len(), 2);

    // Retry one by id: it is pending again, fresh.
    let n = spool
        .retry_dead_letters(Selection::Ids(vec![dead[1].id.clone(), "999999".into()]))
        .await
        .unwrap();
    assert_eq!(n, 1);
    let again = spool.lease(10, usize::MAX, LONG).await.unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].payload, payload(2));
    assert_eq!(again[0].attempts, 0);
    assert!(matches!(
        spool
            .retry_dead_letters(Selection::Ids(vec!["not-an-id".into()]))
            .await,
        Err(SpoolError::Unknown(_))
    ));

    // Purge one by id, then retry all (the last one).
    assert_eq!(
        spool
            .purge_dead_letters(Selection::Ids(vec![dead[0].id.clone()]))
            .await
            .unwrap(),
        1
    );
    assert_eq!(spool.retry_dead_letters(Selection::All).await.unwrap(), 1);
    let stats = spool.stats().await.unwrap();
    assert_eq!((stats.pending, stats.dead_letters), (3, 0));

    // Purge all, across several chunks.
    let spool2 = SqliteSpool::open(
        dir.path(),
        SqliteConfig {
            chunk: 2,
            ..config()
        },
    )
    .unwrap();
    let visible = spool2.lease(10, usize::MAX, LONG).await.unwrap();
    assert_eq!(visible.len(), 1, "payloads 2 and 4 are still leased");
    let receipts = vec![
        visible[0].receipt.clone(),
        again[0].receipt.clone(),
        leased[3].receipt.clone(),
    ];
    spool2.dead_letter(&receipts, "gone").await.unwrap();
    assert_eq!(spool2.stats().await.unwrap().dead_letters, 3);
    assert_eq!(spool2.purge_dead_letters(Selection::All).await.unwrap(), 3);
    let stats = spool.stats().await.unwrap();
    assert_eq!(
        (stats.pending, stats.dead_letters, stats.pending_bytes),
        (0, 0, 0)
    );
    spool.close().await.unwrap();
    spool2.close().await.unwrap();
    verify_db(dir.path());
}

#[tokio::test]
async fn full_is_all_or_nothing_and_keeps_what_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let spool = SqliteSpool::open(
        dir.path(),
        SqliteConfig {
            max_payloads: 5,
            ..config()
        },
    )
    .unwrap();
    spool.append((0..3).map(payload).collect()).await.unwrap();
    let err = spool
        .append((3..6).map(payload).collect())
        .await
        .unwrap_err();
    assert!(matches!(err, SpoolError::Full { .. }), "{err}");
    assert_eq!(
        spool.stats().await.unwrap().pending,
        3,
        "nothing of the refused append"
    );
    spool.append((3..5).map(payload).collect()).await.unwrap();
    assert!(matches!(
        spool.append(vec![payload(5)]).await,
        Err(SpoolError::Full { .. })
    ));
    // Dead letters count: moving one aside does not make room.
    let one = spool.lease(1, usize::MAX, LONG).await.unwrap();
    spool
        .dead_letter(&[one[0].receipt.clone()], "x")
        .await
        .unwrap();
    assert!(matches!(
        spool.append(vec![payload(5)]).await,
        Err(SpoolError::Full { .. })
    ));
    // Delivering does.
    let rest = spool.lease(10, usize::MAX, LONG).await.unwrap();
    assert_eq!(
        rest.iter().map(|l| number(&l.payload)).collect::<Vec<_>>(),
        [1, 2, 3, 4],
        "stored payloads intact"
    );
    spool.ack(&[rest[0].receipt.clone()]).await.unwrap();
    spool.append(vec![payload(5)]).await.unwrap();
    assert_eq!(spool.counters().full_rejections, 3);
    spool.close().await.unwrap();

    // The byte limit, with the same handle reopened under another limit.
    // Held now: 2, 3, 4, 5 pending and 0 dead. Room for payload 10, not for 10 and 11.
    let held: usize = [0, 2, 3, 4, 5]
        .map(|n| payload(n).stored_len())
        .iter()
        .sum();
    let limit = (held + payload(10).stored_len() + payload(11).stored_len() - 1) as u64;
    let spool = SqliteSpool::open(
        dir.path(),
        SqliteConfig {
            max_bytes: limit,
            ..config()
        },
    )
    .unwrap();
    let err = spool
        .append((10..12).map(payload).collect())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("bytes"), "{err}");
    spool.append(vec![payload(10)]).await.unwrap();
    let stats = spool.stats().await.unwrap();
    assert_eq!((stats.pending, stats.dead_letters), (5, 1));
    spool.close().await.unwrap();
    verify_db(dir.path());
}

#[tokio::test]
async fn retention_moves_expired_payloads_to_dead_letters() {
    let dir = tempfile::tempdir().unwrap();
    let spool = SqliteSpool::open(
        dir.path(),
        SqliteConfig {
            retention: Duration::from_millis(300),
            chunk: 2,
            ..config()
        },
    )
    .unwrap();
    spool.append((1..=5).map(payload).collect()).await.unwrap();
    // One is being delivered: retention leaves it to its holder.
    let held = spool.lease(1, usize::MAX, LONG).await.unwrap();
    assert_eq!(spool.maintain().await.unwrap(), 0, "nothing is old yet");

    let moved = wait_for("the payloads to expire", || async {
        let n = spool.maintain().await.unwrap();
        (n > 0).then_some(n)
    })
    .await;
    assert_eq!(moved, 4);
    spool.append(vec![payload(6)]).await.unwrap();
    assert_eq!(spool.maintain().await.unwrap(), 0, "a fresh payload stays");

    let stats = spool.stats().await.unwrap();
    assert_eq!((stats.pending, stats.dead_letters), (2, 4));
    let dead = spool.dead_letters(10).await.unwrap();
    assert_eq!(
        dead.iter().map(|d| number(&d.payload)).collect::<Vec<_>>(),
        [2, 3, 4, 5]
    );
    assert!(
        dead[0].reason.contains("expired") && dead[0].reason.contains("300ms"),
        "{}",
        dead[0].reason
    );
    // The held one can still be acked by its holder.
    spool.ack(&[held[0].receipt.clone()]).await.unwrap();
    assert_eq!(spool.stats().await.unwrap().pending, 1);
    spool.close().await.unwrap();
    verify_db(dir.path());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_are_group_committed() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Arc::new(SqliteSpool::open(dir.path(), config()).unwrap());
    let tasks = 64u64;
    let each = 20u64;
    let mut set = tokio::task::JoinSet::new();
    for t in 0..tasks {
        let spool = spool.clone();
        set.spawn(async move {
            for i in 0..each {
                spool.append(vec![payload(t * each + i)]).await.unwrap();
            }
        });
    }
    while let Some(r) = set.join_next().await {
        r.unwrap();
    }
    let c = spool.counters();
    assert_eq!(c.appends, tasks * each);
    assert_eq!(c.appended_payloads, tasks * each);
    assert!(
        c.append_commits < c.appends / 2,
        "expected group commits, got {} commits for {} appends",
        c.append_commits,
        c.appends
    );
    let all = spool.lease(10_000, usize::MAX, LONG).await.unwrap();
    let got: BTreeSet<u64> = all.iter().map(|l| number(&l.payload)).collect();
    assert_eq!(got, (0..tasks * each).collect());
    spool.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_handle_works_beside_the_first() {
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(
        SqliteSpool::open_existing(dir.path(), config()),
        Err(SpoolError::Config(_))
    ));
    let relay = Arc::new(SqliteSpool::open(dir.path(), config()).unwrap());
    let cli = SqliteSpool::open_existing(dir.path(), config()).unwrap();

    let writer = {
        let relay = relay.clone();
        tokio::spawn(async move {
            for n in 0..300 {
                relay.append(vec![payload(n)]).await.unwrap();
            }
        })
    };
    // Stats from the other handle while the first writes.
    wait_for("the other handle to see every append", || async {
        let s = cli.stats().await.unwrap();
        (s.pending == 300).then_some(())
    })
    .await;
    writer.await.unwrap();

    // Dead-letter operations from the other handle while the first keeps working.
    let leased = relay.lease(10, usize::MAX, LONG).await.unwrap();
    let receipts: Vec<Receipt> = leased.iter().map(|l| l.receipt.clone()).collect();
    relay.dead_letter(&receipts, "bad").await.unwrap();
    let appending = {
        let relay = relay.clone();
        tokio::spawn(async move {
            for n in 300..400 {
                relay.append(vec![payload(n)]).await.unwrap();
            }
        })
    };
    assert_eq!(cli.dead_letters(100).await.unwrap().len(), 10);
    assert_eq!(cli.retry_dead_letters(Selection::All).await.unwrap(), 10);
    appending.await.unwrap();
    let stats = relay.stats().await.unwrap();
    assert_eq!((stats.pending, stats.dead_letters), (400, 0));
    let other = cli.stats().await.unwrap();
    assert_eq!(
        (
            other.pending,
            other.pending_bytes,
            other.pending_events,
            other.leased
        ),
        (
            stats.pending,
            stats.pending_bytes,
            stats.pending_events,
            stats.leased
        )
    );
    cli.close().await.unwrap();
    relay.close().await.unwrap();
    verify_db(dir.path());
}

#[tokio::test]
async fn reopen_preserves_everything_and_close_is_final() {
    let dir = tempfile::tempdir().unwrap();
    let spool = SqliteSpool::open(dir.path(), config()).unwrap();
    spool.append((0..10).map(payload).collect()).await.unwrap();
    let leased = spool.lease(3, usize::MAX, LONG).await.unwrap();
    spool
        .dead_letter(&[leased[0].receipt.clone()], "why")
        .await
        .unwrap();
    spool.ack(&[leased[1].receipt.clone()]).await.unwrap();
    let before = spool.stats().await.unwrap();
    spool.close().await.unwrap();
    assert!(matches!(spool.close().await, Err(SpoolError::Closed)));
    assert!(matches!(
        spool.append(vec![payload(99)]).await,
        Err(SpoolError::Closed)
    ));
    assert!(matches!(spool.stats().await, Err(SpoolError::Closed)));

    let spool = SqliteSpool::open(dir.path(), config()).unwrap();
    let after = spool.stats().await.unwrap();
    assert_eq!(
        (
            after.pending,
            after.pending_bytes,
            after.dead_letters,
            after.leased
        ),
        (
            before.pending,
            before.pending_bytes,
            before.dead_letters,
            before.leased
        )
    );
    // The lease survives a restart: payload 2 is still hidden, the rest come out.
    let rest = spool.lease(100, usize::MAX, LONG).await.unwrap();
    assert_eq!(
        rest.iter().map(|l| number(&l.payload)).collect::<Vec<_>>(),
        [3, 4, 5, 6, 7, 8, 9]
    );
    assert_eq!(spool.dead_letters(10).await.unwrap()[0].reason, "why");
    // Ids are never reused, so a receipt from before cannot hit a newer payload.
    spool.append(vec![payload(100)]).await.unwrap();
    let stale = leased[1].receipt.clone();
    spool.ack(&[stale]).await.unwrap();
    assert_eq!(spool.stats().await.unwrap().pending, 9);
    drop(spool);
}

/// Not a test on its own: the child process of `acknowledged_appends_survive_kill_9`.
/// Appends from several tasks forever and prints `acked <n>` after each `Ok`.
#[test]
fn kill9_child() {
    let Ok(dir) = std::env::var("TRIBUTARY_SPOOL_KILL9_CHILD") else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let spool = Arc::new(SqliteSpool::open(Path::new(&dir), config()).unwrap());
        let base: u64 = std::env::var("TRIBUTARY_SPOOL_KILL9_BASE")
            .unwrap()
            .parse()
            .unwrap();
        let next = Arc::new(AtomicU64::new(base));
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..8 {
            let spool = spool.clone();
            let next = next.clone();
            set.spawn(async move {
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    // Two payloads per append: all or nothing must hold across a kill too.
                    spool.append(vec![payload(n), payload(n)]).await.unwrap();
                    println!("acked {n}");
                }
            });
        }
        while set.join_next().await.is_some() {}
    });
}

#[test]
fn acknowledged_appends_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut acked = BTreeSet::new();
    // Several kills at different points, on the same spool.
    for (round, kill_after) in [150usize, 400, 700].into_iter().enumerate() {
        let mut child = Command::new(&exe)
            .args(["--exact", "kill9_child", "--nocapture", "--test-threads=1"])
            .env("TRIBUTARY_SPOOL_KILL9_CHILD", dir.path())
            .env(
                "TRIBUTARY_SPOOL_KILL9_BASE",
                (round * 10_000_000).to_string(),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let mut this_round = 0;
        while this_round < kill_after {
            let Some(line) = lines.next() else {
                panic!("child exited early: {:?}", child.wait());
            };
            if let Some(n) = line.unwrap().strip_prefix("acked ") {
                acked.insert(n.parse::<u64>().unwrap());
                this_round += 1;
            }
        }
        child.kill().unwrap();
        child.wait().unwrap();
        // Lines written before the kill are acknowledged appends too; a cut last line
        // (no newline) is not.
        for line in lines {
            let Ok(line) = line else { break };
            if let Some(n) = line
                .strip_prefix("acked ")
                .and_then(|n| n.parse::<u64>().ok())
            {
                acked.insert(n);
            }
        }

        verify_db(dir.path());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let spool = SqliteSpool::open(dir.path(), config()).unwrap();
            let all = spool
                .lease(usize::MAX, usize::MAX, Duration::ZERO)
                .await
                .unwrap();
            let mut copies: BTreeMap<u64, u32> = BTreeMap::new();
            for l in &all {
                *copies.entry(number(&l.payload)).or_default() += 1;
            }
            let missing: Vec<&u64> = acked.iter().filter(|n| !copies.contains_key(n)).collect();
            assert!(
                missing.is_empty(),
                "round {round}: acknowledged but lost: {missing:?}"
            );
            assert!(
                copies.values().all(|&c| c == 2),
                "round {round}: an append was cut in half"
            );
            assert_eq!(spool.stats().await.unwrap().pending, all.len() as u64);
            spool.close().await.unwrap();
        });
    }
}

/// A million payloads: opening, stats and the first lease must not scan them.
/// Ignored in the normal suite (it writes ~300 MB and takes a minute in debug builds); run
/// with `cargo test --release -p tributary-spool --test sqlite_spool -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "writes a million payloads; run explicitly"]
async fn a_million_payloads_reopen_fast() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = SqliteConfig {
        sync: SyncMode::Normal,
        ..config()
    };
    let spool = SqliteSpool::open(dir.path(), cfg.clone()).unwrap();
    let started = Instant::now();
    for chunk in 0..100u64 {
        spool
            .append(
                (chunk * 10_000..(chunk + 1) * 10_000)
                    .map(payload)
                    .collect(),
            )
            .await
            .unwrap();
    }
    println!("appended 1,000,000 payloads in {:?}", started.elapsed());
    spool.close().await.unwrap();

    let started = Instant::now();
    let spool = SqliteSpool::open(dir.path(), cfg).unwrap();
    let opened = started.elapsed();
    let stats = spool.stats().await.unwrap();
    let stats_at = started.elapsed();
    let leased = spool.lease(1000, usize::MAX, LONG).await.unwrap();
    let leased_at = started.elapsed();
    println!("reopen {opened:?}, +stats {stats_at:?}, +lease 1000 {leased_at:?}");
    assert_eq!(stats.pending, 1_000_000);
    assert_eq!(leased.len(), 1000);
    assert!(leased_at < Duration::from_secs(1), "took {leased_at:?}");
    spool.close().await.unwrap();
}

/// The rows of `account_pending`, behind the spool's back.
fn account_rows(dir: &Path) -> BTreeMap<String, (i64, i64)> {
    let conn = rusqlite::Connection::open(dir.join(DB_FILE)).unwrap();
    let mut stmt = conn
        .prepare("SELECT account, pending, pending_bytes FROM account_pending")
        .unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, (r.get(1)?, r.get(2)?))))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

fn payload_of(account: &str, n: u64) -> Payload {
    Payload {
        header: Bytes::from(format!(r#""account_id":"{account}","project_id":"2""#)),
        ..payload(n)
    }
}

#[tokio::test]
async fn an_account_with_nothing_pending_leaves_no_row() {
    let dir = tempfile::tempdir().unwrap();
    let spool = SqliteSpool::open(dir.path(), config()).unwrap();
    spool
        .append(vec![
            payload_of("a", 1),
            payload_of("a", 2),
            payload_of("b", 3),
        ])
        .await
        .unwrap();
    let a_bytes = (payload_of("a", 1).stored_len() + payload_of("a", 2).stored_len()) as u64;
    assert_eq!(
        spool.account_pending_bytes("a").await.unwrap(),
        Some(a_bytes)
    );
    assert_eq!(account_rows(dir.path()).len(), 2);

    // Acked: `a` has nothing left, and its row goes with its last payload.
    let leased = spool.lease(10, usize::MAX, LONG).await.unwrap();
    let (of_a, of_b): (Vec<_>, Vec<_>) = leased
        .iter()
        .partition(|l| l.payload.header.starts_with(br#""account_id":"a""#));
    spool.ack(&[of_a[0].receipt.clone()]).await.unwrap();
    assert_eq!(account_rows(dir.path())["a"].0, 1, "one of a's left");
    spool.ack(&[of_a[1].receipt.clone()]).await.unwrap();
    let rows = account_rows(dir.path());
    assert!(!rows.contains_key("a"), "a's row stayed at 0: {rows:?}");
    assert_eq!(spool.account_pending_bytes("a").await.unwrap(), Some(0));
    assert_eq!(rows["b"].0, 1);

    // Dead-lettered: the same; retried, it is pending (and counted) again.
    let receipts: Vec<Receipt> = of_b.iter().map(|l| l.receipt.clone()).collect();
    spool
        .dead_letter(&receipts, "upstream answered 400")
        .await
        .unwrap();
    assert!(
        account_rows(dir.path()).is_empty(),
        "{:?}",
        account_rows(dir.path())
    );
    spool.retry_dead_letters(Selection::All).await.unwrap();
    assert_eq!(
        spool.account_pending_bytes("b").await.unwrap(),
        Some(payload_of("b", 3).stored_len() as u64)
    );
    spool.close().await.unwrap();
    verify_db(dir.path());
}
