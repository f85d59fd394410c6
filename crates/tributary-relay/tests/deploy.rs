//! The files under `deploy/`: the Prometheus alert rules (checked and unit-tested by
//! `promtool`), the Grafana dashboard (valid JSON, every query on metrics the relay exports)
//! and the systemd unit (`systemd-analyze verify`, sandboxing settings present). The tools
//! come from Debian's `prometheus` and `systemd` packages (scripts/test.sh installs them);
//! a missing tool fails the test.

#![allow(clippy::unwrap_used)]

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn deploy(path: &str) -> PathBuf {
    support::repo_root().join("deploy").join(path)
}

fn tool(name: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{name} not found on PATH: install Debian's `{package}` package \
                 (scripts/test.sh does)"
            )
        })
}

fn run(program: &Path, args: &[&str], dir: &Path) -> (bool, String) {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Every metric name the relay exports, from the table in `telemetry.rs`'s docs (names
/// there are without the `tributary_` prefix; histograms add `_bucket`, `_sum`, `_count`).
fn exported_metrics() -> BTreeSet<String> {
    let source = std::fs::read_to_string(
        support::repo_root().join("crates/tributary-relay/src/telemetry.rs"),
    )
    .unwrap();
    let mut names = BTreeSet::new();
    for line in source.lines().filter_map(|l| l.strip_prefix("//! | `")) {
        let first_cell = format!("`{}", line.split(" | ").next().unwrap_or(""));
        let histogram = line.contains("| histogram |");
        for quoted in first_cell.split('`').skip(1).step_by(2) {
            let name = format!("tributary_{}", quoted.split('{').next().unwrap_or(""));
            if histogram {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
            names.insert(name);
        }
    }
    assert!(
        names.len() > 20,
        "the telemetry.rs table could not be read: {names:?}"
    );
    names
}

/// The `tributary_*` identifiers in a PromQL expression.
fn metrics_in(expr: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("tributary_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        found.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    found
}

#[test]
fn promtool_checks_the_alert_rules_and_passes_their_unit_tests() {
    let promtool = tool("promtool", "prometheus");
    let dir = deploy("prometheus");
    let (ok, out) = run(&promtool, &["check", "rules", "alerts.yml"], &dir);
    assert!(ok, "promtool check rules failed:\n{out}");
    assert!(out.contains("SUCCESS: 7 rules found"), "{out}");
    let (ok, out) = run(&promtool, &["test", "rules", "alerts.test.yml"], &dir);
    assert!(ok, "promtool test rules failed:\n{out}");
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn every_alert_has_a_unit_test_and_names_only_exported_metrics() {
    let rules = std::fs::read_to_string(deploy("prometheus/alerts.yml")).unwrap();
    let tests = std::fs::read_to_string(deploy("prometheus/alerts.test.yml")).unwrap();
    let exported = exported_metrics();
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    assert_eq!(alerts.len(), 7, "{alerts:?}");
    for alert in &alerts {
        assert!(
            tests.contains(&format!("alertname: {alert}")),
            "alert {alert} has no promtool unit test in alerts.test.yml"
        );
    }
    let unknown: Vec<String> = rules
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .flat_map(metrics_in)
        .filter(|m| !exported.contains(m))
        .collect();
    assert!(
        unknown.is_empty(),
        "alerts.yml names metrics the relay does not export: {unknown:?}"
    );
}

#[test]
fn the_grafana_dashboard_is_json_whose_every_query_names_an_exported_metric() {
    let text = std::fs::read_to_string(deploy("grafana/tributary.json")).unwrap();
    let dashboard: serde_json::Value =
        serde_json::from_str(&text).expect("deploy/grafana/tributary.json is not valid JSON");
    let exported = exported_metrics();
    let panels = dashboard["panels"].as_array().expect("a panels array");
    assert!(panels.len() >= 10, "{} panels", panels.len());
    let mut queries = 0;
    for panel in panels {
        let title = panel["title"].as_str().unwrap_or("(untitled)");
        let targets = panel["targets"]
            .as_array()
            .expect("every panel has targets");
        assert!(!targets.is_empty(), "panel {title:?} has no query");
        for target in targets {
            let expr = target["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("panel {title:?}: a target without expr"));
            queries += 1;
            let named = metrics_in(expr);
            // `up` is Prometheus's own, for the relays-up panel.
            assert!(
                !named.is_empty() || expr.contains("up{job=\"tributary\"}"),
                "panel {title:?}: {expr} names no tributary metric"
            );
            for m in named {
                assert!(
                    exported.contains(&m),
                    "panel {title:?}: {m} is not a metric the relay exports ({expr})"
                );
            }
        }
    }
    assert!(queries >= 15, "{queries} queries");
}

#[test]
fn the_systemd_unit_verifies_and_is_sandboxed() {
    let analyze = tool("systemd-analyze", "systemd");
    let unit = std::fs::read_to_string(deploy("systemd/tributary.service")).unwrap();
    for setting in [
        "DynamicUser=yes",
        "StateDirectory=tributary",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "ExecStart=/usr/local/bin/tributary serve --spool /var/lib/tributary/spool --listen 127.0.0.1:8080",
    ] {
        assert!(
            unit.lines().any(|l| l == setting),
            "the unit lacks {setting}"
        );
    }
    // verify checks that ExecStart's program exists: point it at the binary under test.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tributary.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/tributary", support::tributary_bin()),
    )
    .unwrap();
    let (ok, out) = run(&analyze, &["verify", path.to_str().unwrap()], dir.path());
    assert!(ok, "systemd-analyze verify failed:\n{out}");
    let complaints: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("tributary.service"))
        .collect();
    assert!(
        complaints.is_empty(),
        "systemd-analyze verify complained:\n{out}"
    );
    // The unit's command line is one the binary accepts.
    let (code, out, err) = support::run_cli(&[
        "serve",
        "--spool",
        "/var/lib/tributary/spool",
        "--listen",
        "127.0.0.1:8080",
        "--print-config",
    ]);
    assert_eq!(code, 0, "{out}{err}");
}
