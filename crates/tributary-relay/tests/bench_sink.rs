//! `tributary bench sink`'s outage schedule, run as a process: the sink stops listening
//! (connections refused), comes back on the same address, and bad schedules are refused
//! naming the flag.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use support::{RelayProcess, get, run_cli, wait_until};

fn accepts(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok()
}

#[test]
fn an_outage_refuses_connections_then_the_sink_comes_back_on_the_same_address() {
    let mut sink = RelayProcess::spawn(&[
        "bench",
        "sink",
        "--listen",
        "127.0.0.1:0",
        "--outage-every",
        "1500ms",
        "--outage-for",
        "500ms",
    ]);
    let line = sink.wait_for_log("sink listening on", Duration::from_secs(30));
    let addr: SocketAddr = line.rsplit(' ').next().unwrap().parse().unwrap();
    // Waited on, not asserted once: a stalled machine could land one check in an outage.
    assert!(
        wait_until(Duration::from_secs(30), || accepts(addr)),
        "the sink accepts connections"
    );

    assert!(
        wait_until(Duration::from_secs(30), || !accepts(addr)),
        "an outage refuses connections"
    );
    assert!(
        wait_until(Duration::from_secs(30), || accepts(addr)),
        "the sink listens on {addr} again after the outage"
    );
    sink.wait_for_log("sink back on", Duration::from_secs(30));

    let counts: serde_json::Value = wait_for_counts(addr);
    assert!(counts["outages"].as_u64().unwrap() >= 1, "{counts}");
}

/// `GET /counts`, retried while the sink may be in its next outage.
fn wait_for_counts(addr: SocketAddr) -> serde_json::Value {
    let url = format!("http://{addr}/counts");
    let mut got = None;
    assert!(wait_until(Duration::from_secs(30), || {
        let (status, body) = get(&url);
        got = (status == 200)
            .then(|| serde_json::from_str(&body).ok())
            .flatten();
        got.is_some()
    }));
    got.unwrap()
}

#[test]
fn a_bad_outage_schedule_is_refused_naming_the_flag() {
    let cases: [(&[&str], &str); 4] = [
        (
            &["--outage-every", "10s", "--outage-for", "10s"],
            "--outage-for",
        ),
        (
            &["--outage-every", "10s", "--outage-for", "0s"],
            "--outage-for",
        ),
        (
            &["--outage-every", "0s", "--outage-for", "1s"],
            "--outage-every",
        ),
        (&["--outage-every", "10s"], "--outage-for"),
    ];
    for (flags, named) in cases {
        let mut args = vec!["bench", "sink", "--listen", "127.0.0.1:0"];
        args.extend_from_slice(flags);
        let (code, _, stderr) = run_cli(&args);
        assert_ne!(code, 0, "{flags:?} must be refused");
        assert!(stderr.contains(named), "{flags:?}: {stderr}");
    }
}
