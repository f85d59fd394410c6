//! The relay under the failures its spool must survive: a full file system (a real tmpfs),
//! repeated `kill -9` against a flaky upstream, and spool files that are damaged or not
//! ours. After each, `tributary spool audit` must balance and the file must pass SQLite's
//! integrity check.

#![allow(clippy::unwrap_used)]

mod support;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use support::{
    InProcessRelay, RelayProcess, audit_balances, get, payload, post_full, post_json, relay_args,
    uuids, wait_until,
};
use tributary_testkit::{RecordingUpstream, Reply, Script, delivered_uuids};

const WAIT: Duration = Duration::from_secs(90);

/// Waits until every uuid of `acked` reached the upstream with a 2xx.
fn all_delivered(upstream: &RecordingUpstream, acked: &[String]) -> bool {
    let want: HashSet<&String> = acked.iter().collect();
    upstream.wait_for(
        |r| {
            let got: HashSet<String> = delivered_uuids(r).into_iter().collect();
            want.iter().all(|u| got.contains(*u))
        },
        WAIT,
    )
}

/// `PRAGMA integrity_check` of the spool file, with nothing else using it.
fn integrity_ok(spool: &Path) {
    let conn = rusqlite::Connection::open(spool.join("spool.db")).unwrap();
    let check: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok", "{}", spool.display());
}

/// A tmpfs of `size` mounted on a fresh directory, unmounted on drop. Needs root (CI runs
/// as root): the test fails, loudly, where it cannot mount.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "this test mounts a tmpfs to fill it and needs root: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs { dir }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().to_owned()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// [`payload`] with 512 bytes of noise in each visitor. The spool stores visitors
/// zstd-compressed, and plain test events shrink tenfold: these shrink by a third, so that a
/// few hundred requests fill a small disk, as they would with events that vary more.
fn incompressible_payload(batch: &[String], seed: u64) -> String {
    let mut v: serde_json::Value = serde_json::from_str(&payload("131", batch)).unwrap();
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    for visitor in v["visitors"].as_array_mut().unwrap() {
        let noise: String = (0..512)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                char::from(ALPHABET[(x % 64) as usize])
            })
            .collect();
        visitor["attributes"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({
                "entity_id": "21554750046", "key": "noise", "type": "custom", "value": noise
            }));
    }
    v.to_string()
}

#[test]
fn a_full_disk_refuses_politely_loses_nothing_and_recovers_by_itself() {
    let disk = Tmpfs::mount("3m");
    let spool = disk.path().join("spool");
    let spool_s = spool.to_str().unwrap().to_owned();
    // The upstream is down, so nothing frees the disk until it comes back.
    let upstream = RecordingUpstream::start_with(Script::new().default_reply(Reply::status(503)));
    // A lease far longer than the test's wait: a forwarder write that fails on the full disk
    // (it used to be the release of a whole leased window after a 503) leaves its payloads
    // leased until the lease ends, so such a failure shows here as events never delivered,
    // not as a delay of a minute that fits in the wait.
    let relay = InProcessRelay::serve(&relay_args(
        &upstream.url(),
        &spool_s,
        &[
            "--spool-reserve-bytes",
            "600000",
            "--spool-sync",
            "normal",
            "--lease-timeout",
            "10m",
        ],
    ));
    let url = relay.url("/v1/events");

    let mut acked = Vec::new();
    let mut refusal = None;
    // The spool stores these payloads zstd-compressed, about a tenth of their size: filling
    // the 2.4 MB above the reserve takes some 20 MB of events.
    for i in 0..10_000 {
        let batch = uuids(&format!("disk{i}"), 20);
        let (status, headers, body) = post_full(
            &url,
            incompressible_payload(&batch, i),
            &[("content-type", "application/json")],
        );
        match status {
            204 => acked.extend(batch),
            503 => {
                refusal = Some((headers, body));
                break;
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    let (headers, body) = refusal.expect("the 3 MB disk never filled");
    assert!(
        headers.iter().any(|(k, _)| k == "retry-after"),
        "503 without Retry-After"
    );
    assert!(body.contains("disk full"), "{body}");
    assert!(acked.len() >= 500, "only {} events fit", acked.len());
    let (ready, why) = get(&relay.url("/readyz"));
    assert_eq!(ready, 503);
    assert!(why.contains("disk full"), "{why}");

    // The upstream is back: the forwarder leases and acks on the full disk, frees it, and
    // ingest takes requests again without anyone restarting anything.
    upstream.set_script(Script::new());
    assert!(
        all_delivered(&upstream, &acked),
        "acknowledged events lost:\n{}",
        relay.log_text()
    );
    assert!(
        wait_until(WAIT, || get(&relay.url("/readyz")).0 == 200),
        "never ready again:\n{}",
        relay.log_text()
    );
    let more = uuids("after", 10);
    assert_eq!(post_json(&url, &payload("131", &more)).0, 204);
    assert!(upstream.wait_for(|r| delivered_uuids(r).iter().any(|u| u == &more[0]), WAIT));
    drop(relay);
    integrity_ok(&spool);
    let audit = audit_balances(&spool_s);
    assert_eq!(audit["totals"]["events"]["pending"], 0);
    assert_eq!(audit["totals"]["events"]["accepted"], acked.len() + 10);
}

#[test]
fn three_kill_9s_against_a_flaky_upstream_lose_nothing_acknowledged() {
    // 20% of requests fail: half 503s, half connection resets after the request was read
    // (the upstream may have taken it: a lost acknowledgement, so duplicates are allowed).
    let upstream = RecordingUpstream::start_with(Script::new().fail_mix(
        20,
        11,
        vec![Reply::status(503), Reply::reset()],
    ));
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let spool_s = spool.to_str().unwrap().to_owned();
    let mut acked: Vec<String> = Vec::new();
    for round in 0..3 {
        let mut relay = RelayProcess::serve(&relay_args(&upstream.url(), &spool_s, &[]));
        let url = relay.url("/v1/events");
        let poster = std::thread::spawn(move || {
            let mut acked = Vec::new();
            for i in 0.. {
                let batch = uuids(&format!("r{round}-{i}"), 5);
                match post_json(&url, &payload("131", &batch)).0 {
                    204 => acked.extend(batch),
                    0 => return acked,
                    other => panic!("unexpected status {other}"),
                }
            }
            acked
        });
        // Kill it mid-load, once it has delivered some of this round's events.
        let prefix = format!("r{round}-");
        assert!(upstream.wait_for(
            |r| {
                delivered_uuids(r)
                    .iter()
                    .filter(|u| u.starts_with(&prefix))
                    .count()
                    >= 100
            },
            WAIT
        ));
        relay.kill9();
        acked.extend(poster.join().unwrap());
        integrity_ok(&spool);
        audit_balances(&spool_s);
    }
    // A last start delivers what the three deaths left behind.
    let relay = RelayProcess::serve(&relay_args(&upstream.url(), &spool_s, &[]));
    assert!(
        all_delivered(&upstream, &acked),
        "acknowledged events lost:\n{}",
        relay.log_text()
    );
    assert!(wait_until(WAIT, || {
        let (_, m) = get(&relay.url("/metrics"));
        support::metric(&m, "tributary_spool_pending_events") == 0.0
    }));
    drop(relay);
    integrity_ok(&spool);
    let audit = audit_balances(&spool_s);
    // A request committed just before a kill has no answer for its client: the spool may
    // hold a few events more than were acknowledged, never fewer.
    let accepted = audit["totals"]["events"]["accepted"].as_u64().unwrap() as usize;
    assert!(
        (acked.len()..=acked.len() + 3 * 5).contains(&accepted),
        "accepted {accepted}, acknowledged {}",
        acked.len()
    );
    assert_eq!(audit["totals"]["events"]["dead"], 0);
}

/// `serve` on `spool` must refuse to start, naming the file, what is wrong and what to do,
/// and leave the file as it was.
fn refuses_to_start(spool: &Path, expect: &str, advice: &str) {
    let db = spool.join("spool.db");
    let before = std::fs::read(&db).unwrap();
    let mut relay = RelayProcess::spawn(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--spool",
        spool.to_str().unwrap(),
        "--upstream",
        "http://127.0.0.1:9/v1/events",
    ]);
    let code = relay.wait_exit(Duration::from_secs(60)).code();
    let err = relay.log_text();
    assert_ne!(code, Some(0), "started on a bad spool:\n{err}");
    assert!(err.contains(db.to_str().unwrap()), "names the file: {err}");
    assert!(err.contains(expect), "says {expect:?}: {err}");
    assert!(err.contains(advice), "says what to do: {err}");
    assert!(!err.contains("tributary relay ready"), "{err}");
    assert_eq!(std::fs::read(&db).unwrap(), before, "the file was changed");
}

#[test]
fn a_damaged_or_foreign_spool_file_is_refused_and_kept() {
    let dir = tempfile::tempdir().unwrap();

    let junk = dir.path().join("junk");
    std::fs::create_dir(&junk).unwrap();
    std::fs::write(
        junk.join("spool.db"),
        b"not a database at all\n".repeat(300),
    )
    .unwrap();
    refuses_to_start(
        &junk,
        "not a readable SQLite database",
        "move the file aside",
    );

    let foreign = dir.path().join("foreign");
    std::fs::create_dir(&foreign).unwrap();
    rusqlite::Connection::open(foreign.join("spool.db"))
        .unwrap()
        .execute_batch("CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT);")
        .unwrap();
    refuses_to_start(
        &foreign,
        "another program",
        "point --spool at another directory",
    );

    // A real spool cut in half: after a clean stop, and copied with its WAL while running.
    let upstream = RecordingUpstream::start_with(Script::new().default_reply(Reply::status(503)));
    for keep_wal in [false, true] {
        let live = dir.path().join(format!("live-{keep_wal}"));
        let live_s = live.to_str().unwrap().to_owned();
        // Ingest only: a forwarder would keep rewriting every page into the WAL (lease,
        // release), and a WAL that holds every page makes the cut file whole again.
        let mut relay =
            RelayProcess::serve(&relay_args(&upstream.url(), &live_s, &["--no-forward"]));
        let post_some = |from: usize| {
            for i in from..from + 150 {
                let batch = uuids(&format!("c{i}"), 10);
                assert_eq!(
                    post_json(&relay.url("/v1/events"), &payload("131", &batch)).0,
                    204
                );
            }
        };
        post_some(0);
        let cut = dir.path().join(format!("cut-{keep_wal}"));
        std::fs::create_dir(&cut).unwrap();
        if keep_wal {
            // Half of it in the file, the rest only in the WAL, copied as a careless backup
            // would while the relay runs.
            rusqlite::Connection::open(live.join("spool.db"))
                .unwrap()
                .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
                .unwrap();
            post_some(150);
            std::fs::copy(live.join("spool.db-wal"), cut.join("spool.db-wal")).unwrap();
            std::fs::copy(live.join("spool.db"), cut.join("spool.db")).unwrap();
            drop(relay);
        } else {
            assert!(relay.terminate(Duration::from_secs(30)).success());
            assert!(
                !live.join("spool.db-wal").exists()
                    || std::fs::metadata(live.join("spool.db-wal")).unwrap().len() == 0,
                "a clean stop leaves no WAL behind"
            );
            std::fs::copy(live.join("spool.db"), cut.join("spool.db")).unwrap();
        }
        let db = cut.join("spool.db");
        let len = std::fs::metadata(&db).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&db)
            .unwrap()
            .set_len(len / 2)
            .unwrap();
        refuses_to_start(&cut, "damaged", "sqlite3 spool.db.damaged .recover");
    }

    // A newer version's spool.
    let newer = dir.path().join("newer");
    std::fs::create_dir(&newer).unwrap();
    let conn = rusqlite::Connection::open(newer.join("spool.db")).unwrap();
    conn.execute_batch("CREATE TABLE payloads (id INTEGER PRIMARY KEY);")
        .unwrap();
    conn.pragma_update(None, "user_version", 7).unwrap();
    drop(conn);
    refuses_to_start(
        &newer,
        "newer version",
        "run the newer version, or move the file aside",
    );
}

/// Makes files immutable (`chattr +i`) until dropped. Needs root and a file system with
/// the attribute (ext4, xfs): the test fails, loudly, where it cannot.
struct Immutable(Vec<PathBuf>);

impl Immutable {
    fn set(files: &[PathBuf]) -> Immutable {
        for f in files {
            let out = Command::new("chattr").arg("+i").arg(f).output().unwrap();
            assert!(
                out.status.success(),
                "this test needs chattr +i (root, ext4): {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Immutable(files.to_vec())
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        for f in &self.0 {
            let _ = Command::new("chattr").arg("-i").arg(f).status();
        }
    }
}

#[test]
fn readiness_tells_the_truth_when_the_spool_cannot_be_written() {
    let upstream = RecordingUpstream::start_with(Script::new().default_reply(Reply::status(503)));
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let relay = InProcessRelay::serve(&relay_args(
        &upstream.url(),
        spool.to_str().unwrap(),
        &["--no-forward"],
    ));
    let url = relay.url("/v1/events");
    assert_eq!(post_json(&url, &payload("131", &uuids("w", 2))).0, 204);
    assert_eq!(get(&relay.url("/readyz")).0, 200);
    {
        let _frozen = Immutable::set(&[spool.join("spool.db"), spool.join("spool.db-wal")]);
        let (status, headers, body) = post_full(
            &url,
            payload("131", &uuids("frozen", 1)),
            &[("content-type", "application/json")],
        );
        assert_eq!(status, 503, "{body}");
        assert!(headers.iter().any(|(k, _)| k == "retry-after"));
        let (ready, why) = get(&relay.url("/readyz"));
        assert_eq!(ready, 503, "ready while nothing can be written");
        assert!(why.contains("cannot write"), "{why}");
    }
    assert!(
        wait_until(WAIT, || get(&relay.url("/readyz")).0 == 200),
        "{}",
        relay.log_text()
    );
    assert_eq!(post_json(&url, &payload("131", &uuids("thawed", 1))).0, 204);
    drop(relay);
    integrity_ok(&spool);
    let audit = audit_balances(spool.to_str().unwrap());
    assert_eq!(audit["totals"]["events"]["accepted"], 3);
}
