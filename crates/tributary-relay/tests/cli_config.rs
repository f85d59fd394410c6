//! The relay's settings seen from outside: `--help` shows the defaults the relay really runs
//! with (checked against `tributary serve --print-config` with nothing set), and flags,
//! `TRIBUTARY_*` variables and the `--config` file layer in that order.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::process::{Command, Output};
use std::time::Duration;

/// Runs `tributary ARGS` with no `TRIBUTARY_*` variable but those in `env`.
fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tributary"));
    cmd.args(args).env("RUST_LOG", "warn");
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("TRIBUTARY_") {
            cmd.env_remove(key);
        }
    }
    cmd.envs(env.iter().copied());
    cmd.output().unwrap()
}

fn stdout_ok(args: &[&str], env: &[(&str, &str)]) -> String {
    let out = run(args, env);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// What `serve --print-config ARGS` prints: the values (strings bare, as help writes them),
/// and the settings it says are not set with what it says happens then.
struct Printed {
    values: BTreeMap<String, String>,
    unset: BTreeMap<String, String>,
}

fn printed(args: &[&str], env: &[(&str, &str)]) -> Printed {
    let text = stdout_ok(&[&["serve", "--print-config"], args].concat(), env);
    let table: toml::Table = text.parse().unwrap();
    let values = table
        .into_iter()
        .map(|(k, v)| match v {
            toml::Value::String(s) => (k, s),
            other => (k, other.to_string()),
        })
        .collect();
    let unset = text
        .lines()
        .filter_map(|l| l.strip_prefix("# ")?.split_once(": not set ("))
        .map(|(k, rest)| (k.to_owned(), rest.trim_end_matches(')').to_owned()))
        .collect();
    Printed { values, unset }
}

/// `tributary SUB --help`: each long option (without `--`) and its whole entry, on one line.
fn help(sub: &[&str]) -> BTreeMap<String, String> {
    let text = stdout_ok(&[sub, &["--help"]].concat(), &[]);
    let mut entries = BTreeMap::new();
    let mut current: Option<(String, String)> = None;
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('-') {
            entries.extend(current.take());
            if let Some(rest) = t.strip_prefix("--") {
                let name = rest.split([' ', '<']).next().unwrap().to_owned();
                current = Some((name, t.to_owned()));
            }
        } else if let Some((_, entry)) = &mut current {
            entry.push(' ');
            entry.push_str(t);
        }
    }
    entries.extend(current);
    entries
}

/// The `[default: X]` of a help entry.
fn shown_default(entry: &str) -> Option<&str> {
    let start = entry.find("[default: ")? + "[default: ".len();
    let len = entry[start..]
        .find("] [")
        .or_else(|| entry[start..].rfind(']'))?;
    Some(&entry[start..start + len])
}

#[test]
fn help_shows_the_defaults_the_relay_runs_with() {
    let defaults = printed(&[], &[]);
    assert!(defaults.values.len() > 25, "{:?}", defaults.values);
    for sub in [&["serve"][..], &["drain"], &["spool", "stats"]] {
        let help = help(sub);
        // Every setting the relay prints has a flag whose help shows that value; the lease
        // is derived from the request timeout (see the next test).
        for (key, value) in &defaults.values {
            let entry = help
                .get(key)
                .unwrap_or_else(|| panic!("{sub:?}: no --{key}"));
            if key == "lease-timeout" {
                continue;
            }
            assert_eq!(
                shown_default(entry),
                Some(value.as_str()),
                "{sub:?}: {entry}"
            );
        }
        // A setting left unset by default says so, in the help's words.
        for (key, what) in &defaults.unset {
            let entry = help
                .get(key)
                .unwrap_or_else(|| panic!("{sub:?}: no --{key}"));
            assert_eq!(
                shown_default(entry),
                Some(what.as_str()),
                "{sub:?}: {entry}"
            );
        }
        // And every setting in the help is one of those (or the tokens, never printed).
        for (flag, entry) in &help {
            if !entry.contains("[env: TRIBUTARY_") || ["config", "no-forward"].contains(&&**flag) {
                continue;
            }
            assert!(
                defaults.values.contains_key(flag)
                    || defaults.unset.contains_key(flag)
                    || flag.starts_with("auth-tokens"),
                "{sub:?}: --{flag} is not printed by --print-config"
            );
            assert!(shown_default(entry).is_some(), "{sub:?}: {entry}");
        }
    }
}

#[test]
fn help_states_how_the_lease_default_is_derived() {
    let help = help(&["serve"]);
    let shown = shown_default(&help["lease-timeout"]).unwrap().to_owned();
    // "F × request-timeout, at least M"
    let (factor, floor) = shown.split_once(" × request-timeout, at least ").unwrap();
    let factor: u32 = factor.parse().unwrap();
    let floor = humantime::parse_duration(floor).unwrap();
    let lease = |request_timeout: &str| {
        let p = printed(&["--request-timeout", request_timeout], &[]);
        humantime::parse_duration(&p.values["lease-timeout"]).unwrap()
    };
    assert_eq!(lease("1s"), floor);
    assert_eq!(lease("1h"), Duration::from_secs(3600) * factor);
    let defaults = printed(&[], &[]);
    let request = humantime::parse_duration(&defaults.values["request-timeout"]).unwrap();
    assert_eq!(
        humantime::parse_duration(&defaults.values["lease-timeout"]).unwrap(),
        (request * factor).max(floor)
    );
    // Set, it is taken as it is.
    assert_eq!(
        printed(&["--lease-timeout", "3s"], &[]).values["lease-timeout"],
        "3s"
    );
}

#[test]
fn flags_win_over_environment_over_file_over_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("relay.toml");
    std::fs::write(
        &file,
        "concurrency = 8\nmax-batch-events = 500\nflush-interval = \"250ms\"\nspool-sync = \"normal\"\n",
    )
    .unwrap();
    let file = file.to_str().unwrap();
    let env = [
        ("TRIBUTARY_CONFIG", file),
        ("TRIBUTARY_CONCURRENCY", "6"),
        ("TRIBUTARY_MAX_BATCH_EVENTS", "700"),
    ];
    let p = printed(&["--concurrency", "2"], &env);
    assert_eq!(p.values["concurrency"], "2");
    assert_eq!(p.values["max-batch-events"], "700");
    assert_eq!(p.values["flush-interval"], "250ms");
    assert_eq!(p.values["spool-sync"], "normal");
    assert_eq!(p.values["retention"], printed(&[], &[]).values["retention"]);
    // --config as a flag, the rest from the file.
    let p = printed(&["--config", file], &[]);
    assert_eq!(p.values["concurrency"], "8");
    assert_eq!(p.values["max-batch-events"], "500");
}

#[test]
fn printed_config_is_a_config_file_of_the_same_settings_without_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "--upstream",
        "http://me:hunter2@upstream.example/v1/events",
        "--auth-tokens",
        "s3cret-a,s3cret-b",
        "--max-connections",
        "100",
        "--sqs-wait-time",
        "250ms",
    ];
    let text = stdout_ok(&[&["serve", "--print-config"][..], &args].concat(), &[]);
    assert!(
        !text.contains("hunter2") && !text.contains("s3cret"),
        "{text}"
    );
    assert!(
        text.contains("# auth-tokens: 2 accepted, not shown"),
        "{text}"
    );
    assert!(text.contains("max-connections = 100"), "{text}");
    // Nor does --help show the tokens of the environment.
    let help = stdout_ok(
        &["serve", "--help"],
        &[("TRIBUTARY_AUTH_TOKENS", "s3cret-env")],
    );
    assert!(!help.contains("s3cret"), "{help}");
    // Without secrets, the output read back as --config prints the same.
    let plain = stdout_ok(
        &["serve", "--print-config", "--sqs-dead-letter-queue", "dlq"],
        &[],
    );
    let file = dir.path().join("printed.toml");
    std::fs::write(&file, &plain).unwrap();
    let again = stdout_ok(
        &[
            "serve",
            "--print-config",
            "--config",
            file.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(again, plain);
}

#[test]
fn bad_settings_are_refused_with_their_name() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("typo.toml");
    std::fs::write(&file, "concurency = 8\n").unwrap();
    let cases: [(&[&str], &str); 5] = [
        (&["--config", file.to_str().unwrap()], "concurency"),
        // The SQS ranges are the spool crate's, named as the relay's settings.
        (
            &["--sqs-wait-time", "21s"],
            "sqs-wait-time: must be at most 20s",
        ),
        (
            &["--sqs-receivers", "0"],
            "sqs-receivers: must be between 1 and 64",
        ),
        (
            &["--sqs-max-message-bytes", "100"],
            "sqs-max-message-bytes: must be between 4096 and 1048576",
        ),
        (&["--spool", "sqs://"], "invalid setting spool"),
    ];
    for (args, expected) in cases {
        let out = run(&[&["serve", "--print-config"][..], args].concat(), &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(expected), "{args:?}: {err}");
    }
    let out = run(&["serve", "--print-config", "--spool-sync", "fast"], &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("full") && err.contains("normal"), "{err}");
}

#[test]
fn spool_compression_is_set_like_every_other_setting() {
    assert_eq!(printed(&[], &[]).values["spool-compression"], "zstd");
    let env = [("TRIBUTARY_SPOOL_COMPRESSION", "none")];
    assert_eq!(printed(&[], &env).values["spool-compression"], "none");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("relay.toml");
    std::fs::write(&file, "spool-compression = \"none\"\n").unwrap();
    let p = printed(&["--config", file.to_str().unwrap()], &[]);
    assert_eq!(p.values["spool-compression"], "none");
    let out = run(
        &["serve", "--print-config", "--spool-compression", "gzip"],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("zstd") && err.contains("none"), "{err}");
}
