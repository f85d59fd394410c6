//! Hostile clients and careless operators, through the real binary: authentication that
//! fails closed, bodies cut short or padded, one huge POST split to `--max-batch-events`,
//! secrets kept out of the log, and a shutdown that keeps its deadline whatever clients do.

#![allow(clippy::unwrap_used)]

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use support::{InProcessRelay, RelayProcess, payload, post, post_json, relay_args, run_cli, uuids};
use tributary_testkit::{RecordingUpstream, Reply, Script, delivered_uuids};

const WAIT: Duration = Duration::from_secs(60);

/// The tests that flood the relay (memory, connections) take turns, so that what one of them
/// measures (RSS, a normal POST within a second) is not another's load.
static HEAVY: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn heavy() -> std::sync::MutexGuard<'static, ()> {
    HEAVY
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[test]
fn blank_auth_tokens_refuse_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    for tokens in [",", " ", "good,,other", ""] {
        let (code, _, err) = run_cli(&[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--spool",
            spool.to_str().unwrap(),
            "--auth-tokens",
            tokens,
        ]);
        assert_ne!(code, 0, "started with --auth-tokens {tokens:?}");
        assert!(err.contains("auth-tokens"), "{err}");
    }
    let empty = dir.path().join("tokens");
    std::fs::write(&empty, "\n# nothing\n").unwrap();
    let (code, _, err) = run_cli(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--spool",
        spool.to_str().unwrap(),
        "--auth-tokens-file",
        empty.to_str().unwrap(),
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("holds no token"), "{err}");
}

#[test]
fn tokens_from_a_file_and_any_case_of_the_scheme() {
    let upstream = RecordingUpstream::start();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens");
    std::fs::write(&file, "# team shop\ns3cret-a\ns3cret-b\n").unwrap();
    let spool = dir.path().join("spool");
    let relay = InProcessRelay::serve(&relay_args(
        &upstream.url(),
        spool.to_str().unwrap(),
        &["--auth-tokens-file", file.to_str().unwrap()],
    ));
    let url = relay.url("/v1/events");
    let body = payload("131", &uuids("auth", 1));
    let json = ("content-type", "application/json");
    assert_eq!(post(&url, body.clone(), &[json]).0, 401);
    assert_eq!(
        post(
            &url,
            body.clone(),
            &[json, ("authorization", "Bearer nope")]
        )
        .0,
        401
    );
    assert_eq!(
        post(&url, body.clone(), &[json, ("authorization", "Bearer ")]).0,
        401
    );
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let auth = format!("{scheme} s3cret-b");
        assert_eq!(
            post(&url, body.clone(), &[json, ("authorization", &auth)]).0,
            204,
            "{scheme}"
        );
    }
    assert!(
        !relay.log_text().contains("s3cret"),
        "a token reached the log"
    );
}

#[test]
fn one_large_post_is_split_to_max_batch_events_upstream() {
    let upstream = RecordingUpstream::start();
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let relay = InProcessRelay::serve(&relay_args(
        &upstream.url(),
        spool.to_str().unwrap(),
        &["--max-batch-events", "100"],
    ));
    let sent = uuids("big", 1000);
    assert_eq!(
        post_json(&relay.url("/v1/events"), &payload("131", &sent)).0,
        204
    );
    assert!(upstream.wait_for(|r| delivered_uuids(r).len() >= 1000, WAIT));
    for r in upstream.requests() {
        let n = r.json().unwrap()["visitors"].as_array().unwrap().len();
        assert!(n <= 100, "an upstream request carried {n} visitors");
    }
}

#[test]
fn passwords_in_upstream_urls_stay_out_of_the_log() {
    let upstream = RecordingUpstream::start();
    let with_secret = upstream
        .url()
        .replacen("http://", "http://relay:hunter2@", 1);
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let relay = RelayProcess::serve(&relay_args(&with_secret, spool.to_str().unwrap(), &[]));
    let log = relay.log_text();
    assert!(log.contains("relay:***@"), "{log}");
    assert!(!log.contains("hunter2"), "{log}");
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

#[test]
fn bodies_cut_short_or_padded_get_the_right_answer() {
    let upstream = RecordingUpstream::start();
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let relay = InProcessRelay::serve(&relay_args(&upstream.url(), spool.to_str().unwrap(), &[]));
    let url = relay.url("/v1/events");
    let gz = [
        ("content-type", "application/json"),
        ("content-encoding", "gzip"),
    ];

    // Two gzip members are one valid gzip stream.
    let body = payload("131", &uuids("gz", 2));
    let (half, rest) = body.as_bytes().split_at(body.len() / 2);
    let mut two = gzip(half);
    two.extend(gzip(rest));
    assert_eq!(post(&url, two, &gz).0, 204);
    // Junk after the stream is refused, not dropped.
    let mut junk = gzip(payload("131", &uuids("junk", 1)).as_bytes());
    junk.extend_from_slice(b"trailing junk");
    let (status, text) = post(&url, junk, &gz);
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("gzip"), "{text}");

    // A body that ends before its Content-Length: 400, not 413.
    let addr = relay.addr;
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 5000\r\n\r\n{{\"account_id\":"
    )
    .unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(!answer.contains("bytes\""), "{answer}");
}

#[test]
fn sigterm_keeps_the_grace_whatever_clients_do() {
    let _turn = heavy();
    let upstream = RecordingUpstream::start_with(Script::new().default_reply(Reply::status(204)));
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let mut relay = RelayProcess::serve(&relay_args(
        &upstream.url(),
        spool.to_str().unwrap(),
        &["--shutdown-grace", "2s"],
    ));
    assert_eq!(
        post_json(
            &relay.url("/v1/events"),
            &payload("131", &uuids("before", 3))
        )
        .0,
        204
    );
    // 500 uploads that never finish their bodies.
    let addr = relay.addr.unwrap();
    let mut slow = Vec::new();
    for _ in 0..500 {
        let mut s = TcpStream::connect(addr).unwrap();
        write!(
            s,
            "POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{{\"account_id\":\"1\","
        )
        .unwrap();
        slow.push(s);
    }
    let started = Instant::now();
    let status = relay.terminate(Duration::from_secs(30));
    let took = started.elapsed();
    assert!(status.success(), "{status}");
    assert!(
        took < Duration::from_secs(6),
        "exit took {took:?} with a 2 s grace"
    );
    assert!(upstream.wait_for(|r| delivered_uuids(r).len() >= 3, WAIT));
    drop(slow);
}

/// Opens a connection and starts a POST of `len` body bytes, sending `send` of them.
fn start_upload(addr: std::net::SocketAddr, len: usize, send: usize) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len}\r\n\r\n"
    )
    .unwrap();
    let chunk = vec![b' '; 64 << 10];
    let mut sent = 0;
    while sent < send {
        let n = chunk.len().min(send - sent);
        if s.write_all(&chunk[..n]).is_err() {
            break; // the relay refused and closed: fine
        }
        sent += n;
    }
    s
}

#[test]
fn sixty_unfinished_15_mb_uploads_stay_within_the_memory_budget() {
    let _turn = heavy();
    let upstream = RecordingUpstream::start();
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let relay = RelayProcess::serve(&relay_args(&upstream.url(), spool.to_str().unwrap(), &[]));
    let addr = relay.addr.unwrap();
    let before = relay.rss_mib();
    // Each sends all but the last byte of a 15 MB body, then waits.
    let uploads: Vec<TcpStream> = (0..60)
        .map(|_| {
            let mut s = start_upload(addr, 15 << 20, (15 << 20) - 1);
            s.set_nonblocking(true).unwrap();
            let _ = s.flush();
            s
        })
        .collect();
    let peak = relay.rss_mib();
    // docs/relay.md: RSS stays under 200 MiB with the default --max-buffered-bytes (128 MiB).
    assert!(peak < 200.0, "RSS {peak:.0} MiB (from {before:.0})");
    let started = Instant::now();
    let (status, text) = post_json(
        &relay.url("/v1/events"),
        &payload("131", &uuids("small", 1)),
    );
    assert_eq!(status, 204, "{text}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    drop(uploads);
}

#[test]
fn a_body_that_never_arrives_gets_408() {
    let upstream = RecordingUpstream::start();
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let relay = InProcessRelay::serve(&relay_args(
        &upstream.url(),
        spool.to_str().unwrap(),
        &["--body-timeout", "1s"],
    ));
    let mut s = start_upload(relay.addr, 5000, 10);
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut answer = vec![0u8; 4096];
    let n = s.read(&mut answer).unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("--body-timeout"), "{answer}");
}

/// Whether the server closed `s` (a read sees end of file or a reset) within `within`.
fn closed_by_server(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 512];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            // A 408 or 400 before the close is fine; keep reading to the close.
            Ok(_) => continue,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return false;
            }
            Err(_) => return true,
        }
    }
}

#[test]
fn slowloris_connections_are_closed_by_the_header_timeout() {
    let _turn = heavy();
    let upstream = RecordingUpstream::start();
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let relay = InProcessRelay::serve(&relay_args(
        &upstream.url(),
        spool.to_str().unwrap(),
        &["--header-timeout", "1s"],
    ));
    let addr = relay.addr;
    // 2,000 clients that start a request head and never finish it.
    let mut slow: Vec<TcpStream> = (0..2000)
        .map(|_| {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(b"POST /v1/events HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                .unwrap();
            s
        })
        .collect();
    let started = Instant::now();
    let mut open = 0;
    for s in &mut slow {
        let left = Duration::from_secs(10)
            .saturating_sub(started.elapsed())
            .max(Duration::from_millis(1));
        if !closed_by_server(s, left) {
            open += 1;
        }
    }
    assert_eq!(open, 0, "{open} slow connections still open after 10 s");
    let (status, text) = post_json(
        &relay.url("/v1/events"),
        &payload("131", &uuids("after", 1)),
    );
    assert_eq!(status, 204, "{text}");
}

#[test]
fn idle_sockets_past_the_file_limit_do_not_lock_out_new_clients() {
    let _turn = heavy();
    let upstream = RecordingUpstream::start();
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let relay = RelayProcess::serve_with_file_limit(
        1024,
        &relay_args(
            &upstream.url(),
            spool.to_str().unwrap(),
            &["--header-timeout", "2s"],
        ),
    );
    let addr = relay.addr.unwrap();
    let idle: Vec<TcpStream> = (0..1100)
        .map(|_| TcpStream::connect(addr).unwrap())
        .collect();
    // A new client gets in once the idle ones time out, and the relay keeps working.
    let started = Instant::now();
    let mut last = (0, String::new());
    while started.elapsed() < Duration::from_secs(20) {
        last = post_json(&relay.url("/v1/events"), &payload("131", &uuids("new", 1)));
        if last.0 == 204 {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(last.0, 204, "locked out: {}\n{}", last.1, relay.log_text());
    assert!(
        !relay.log_text().contains("Too many open files"),
        "{}",
        relay.log_text()
    );
    assert!(upstream.wait_for(|r| !delivered_uuids(r).is_empty(), WAIT));
    drop(idle);
}

#[test]
fn five_hundred_unfinished_large_headers_stay_within_the_memory_budget() {
    let _turn = heavy();
    let upstream = RecordingUpstream::start();
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let relay = RelayProcess::serve(&relay_args(
        &upstream.url(),
        spool.to_str().unwrap(),
        &["--auth-tokens", "t"],
    ));
    let addr = relay.addr.unwrap();
    let filler = "a".repeat(380 << 10);
    let held: Vec<TcpStream> = (0..500)
        .map(|_| {
            let mut s = TcpStream::connect(addr).unwrap();
            s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
            // 380 KB of one header, never finished; the relay may stop reading (or close).
            let _ = write!(s, "POST /v1/events HTTP/1.1\r\nHost: x\r\nX-Big: {filler}");
            s
        })
        .collect();
    let rss = relay.rss_mib();
    assert!(rss < 200.0, "RSS {rss:.0} MiB");
    let auth = [
        ("content-type", "application/json"),
        ("authorization", "Bearer t"),
    ];
    let started = Instant::now();
    let (status, text) = post(
        &relay.url("/v1/events"),
        payload("131", &uuids("ok", 1)),
        &auth,
    );
    assert_eq!(status, 204, "{text}");
    assert!(started.elapsed() < Duration::from_secs(1));
    drop(held);
}

#[test]
fn a_hundred_h2_streams_of_8_mb_stay_within_the_memory_budget() {
    let _turn = heavy();
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let upstream = RecordingUpstream::start();
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    // A 64 MiB body budget against 800 MB offered: what the relay holds must stay near the
    // budget, far from what is offered. The slack covers the allocator keeping freed 8 MB
    // buffers, the runtime and the spool.
    let budget_mib = 64.0;
    let slack_mib = 100.0;
    let relay = RelayProcess::serve(&relay_args(
        &upstream.url(),
        spool.to_str().unwrap(),
        &["--max-buffered-bytes", "67108864"],
    ));
    let addr = relay.addr.unwrap();
    let baseline = relay.rss_mib();
    let bound = baseline + budget_mib + slack_mib;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // One h2c connection (prior knowledge), 100 streams, each posting 8 MB (one shared
    // buffer on this side).
    let eight_mb = bytes::Bytes::from(vec![b' '; 8 << 20]);
    let streams = runtime.block_on(async {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .unwrap();
        tokio::spawn(conn);
        let mut streams = Vec::new();
        for _ in 0..100 {
            let mut sender = sender.clone();
            let body = http_body_util::Full::new(eight_mb.clone());
            let request = hyper::Request::post(format!("http://{addr}/v1/events"))
                .header("content-type", "application/json")
                .body(body)
                .unwrap();
            streams.push(tokio::spawn(async move {
                let _ = sender.ready().await;
                sender
                    .send_request(request)
                    .await
                    .map(|r| r.status().as_u16())
            }));
        }
        streams
    });
    // Let the relay read what flow control and its budget allow.
    std::thread::sleep(Duration::from_secs(2));
    let rss = relay.rss_mib();
    assert!(
        rss < bound,
        "RSS {rss:.0} MiB, over {bound:.0} (baseline {baseline:.0})"
    );
    let started = Instant::now();
    let (status, text) = post_json(&relay.url("/v1/events"), &payload("131", &uuids("h1", 1)));
    assert_eq!(status, 204, "{text}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    for s in streams {
        s.abort();
    }
    drop(runtime);
    let after = relay.rss_mib();
    assert!(
        after < bound,
        "RSS {after:.0} MiB after the connection closed, over {bound:.0}"
    );
}
