//! A real Prometheus server (Debian's `prometheus`, on a loopback port) scrapes a real relay
//! and evaluates `deploy/prometheus/alerts.yml`, with every `for:` shortened to one second
//! and a one-second scrape and evaluation interval: the upstream-failing alert fires while
//! the upstream is down and clears once it is back; relay-down fires when the relay is killed.

#![allow(clippy::unwrap_used)]

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::{RelayProcess, get, payload, post_json, relay_args, uuids, wait_until};
use tributary_testkit::{RecordingUpstream, Reply, Script};

/// A Prometheus server, killed (and waited for) on drop.
struct Prometheus {
    child: Child,
    url: String,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn prometheus_bin() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("prometheus"))
        .find(|p| p.is_file())
        .expect(
            "prometheus not found on PATH: the live alert test needs Debian's `prometheus` \
             package (scripts/test.sh installs it)",
        )
}

/// The project's alert rules with every `for:` set to 1s.
fn fast_rules() -> String {
    let rules =
        std::fs::read_to_string(support::repo_root().join("deploy/prometheus/alerts.yml")).unwrap();
    let fast: Vec<String> = rules
        .lines()
        .map(|l| match l.split_once("for: ") {
            Some((indent, _)) if indent.trim().is_empty() => format!("{indent}for: 1s"),
            _ => l.to_owned(),
        })
        .collect();
    assert!(fast.iter().any(|l| l.ends_with("for: 1s")), "no for: found");
    fast.join("\n")
}

fn start_prometheus(dir: &Path, relay: &str) -> Prometheus {
    std::fs::write(dir.join("alerts.yml"), fast_rules()).unwrap();
    std::fs::write(
        dir.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files: [alerts.yml]\n\
             scrape_configs:\n  - job_name: tributary\n    scrape_timeout: 900ms\n    \
             static_configs:\n      - targets: ['{relay}']\n"
        ),
    )
    .unwrap();
    // A free port: bound, read, released just before Prometheus binds it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(prometheus_bin())
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
        .spawn()
        .expect("start prometheus");
    let mut p = Prometheus {
        child,
        url: format!("http://127.0.0.1:{port}"),
    };
    let ready = wait_until(Duration::from_secs(60), || {
        if let Ok(Some(status)) = p.child.try_wait() {
            panic!(
                "prometheus exited ({status}):\n{}",
                std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default()
            );
        }
        get(&format!("{}/-/ready", p.url)).0 == 200
    });
    assert!(ready, "prometheus never became ready");
    p
}

/// The alerts Prometheus has for `name`, as (state, instance, route) triples.
fn alerts(p: &Prometheus, name: &str) -> Vec<(String, String, String)> {
    let (code, body) = get(&format!("{}/api/v1/alerts", p.url));
    if code != 200 {
        return Vec::new();
    }
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["data"]["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["labels"]["alertname"] == name)
        .map(|a| {
            (
                a["state"].as_str().unwrap_or("").to_owned(),
                a["labels"]["instance"].as_str().unwrap_or("").to_owned(),
                a["labels"]["route"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

/// Whether Prometheus has scraped the relay successfully (`up` is 1).
fn scraped_up(p: &Prometheus) -> bool {
    let (code, body) = get(&format!("{}/api/v1/query?query=up", p.url));
    code == 200
        && serde_json::from_str::<serde_json::Value>(&body)
            .is_ok_and(|v| v["data"]["result"][0]["value"][1] == "1")
}

fn firing(p: &Prometheus, name: &str, instance: &str) -> bool {
    alerts(p, name)
        .iter()
        .any(|(state, i, _)| state == "firing" && i == instance)
}

#[test]
fn a_real_prometheus_fires_upstream_failing_while_the_upstream_is_down() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = RecordingUpstream::start_with(Script::new().default_reply(Reply::status(503)));
    // The EU upstream delivers all along: its successes must not hide the US outage.
    let eu = RecordingUpstream::start();
    let spool = dir.path().join("spool").display().to_string();
    let mut relay = RelayProcess::serve(&relay_args(
        &upstream.url(),
        &spool,
        &["--eu-upstream", &eu.url()],
    ));
    let instance = relay.addr.unwrap().to_string();
    let prometheus = start_prometheus(dir.path(), &instance);

    assert!(
        wait_until(Duration::from_secs(30), || scraped_up(&prometheus)),
        "prometheus never scraped the relay"
    );
    assert!(!firing(&prometheus, "TributaryUpstreamFailing", &instance));

    let (code, body) = post_json(&relay.url("/v1/events"), &payload("1", &uuids("down", 5)));
    assert_eq!(code, 204, "{body}");
    let (code, body) = post_json(
        &relay.url("/eu/v1/events"),
        &payload("1", &uuids("eu-up", 2)),
    );
    assert_eq!(code, 204, "{body}");
    assert!(
        eu.wait_for(
            |reqs| reqs.iter().any(|r| r.is_success()),
            Duration::from_secs(30)
        ),
        "the EU upstream never got its payload"
    );
    assert!(
        wait_until(Duration::from_secs(60), || firing(
            &prometheus,
            "TributaryUpstreamFailing",
            &instance
        )),
        "TributaryUpstreamFailing never fired while the upstream answered 503: {:?}\n{}",
        alerts(&prometheus, "TributaryUpstreamFailing"),
        relay.log_text()
    );
    let routes: Vec<String> = alerts(&prometheus, "TributaryUpstreamFailing")
        .into_iter()
        .map(|(_, _, route)| route)
        .collect();
    assert_eq!(routes, ["us"], "only the US upstream is failing");

    upstream.set_script(Script::new().default_reply(Reply::no_content()));
    assert!(
        upstream.wait_for(
            |reqs| reqs.iter().any(|r| r.is_success()),
            Duration::from_secs(30)
        ),
        "the relay never delivered once the upstream was back"
    );
    assert!(
        wait_until(Duration::from_secs(60), || alerts(
            &prometheus,
            "TributaryUpstreamFailing"
        )
        .is_empty()),
        "TributaryUpstreamFailing did not clear after delivery: {:?}",
        alerts(&prometheus, "TributaryUpstreamFailing")
    );

    relay.kill9();
    assert!(
        wait_until(Duration::from_secs(60), || firing(
            &prometheus,
            "TributaryRelayDown",
            &instance
        )),
        "TributaryRelayDown never fired after the relay was killed: {:?}",
        alerts(&prometheus, "TributaryRelayDown")
    );
}
