//! Layering, checks and files of the relay settings.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use super::settings::{LEASE_PER_REQUEST_TIMEOUT, MIN_DEFAULT_LEASE};
use super::*;

#[test]
fn flags_win_over_file_over_defaults() {
    let file: RelaySettings = toml::from_str(
        "upstream = \"http://file.example/v1/events\"\nconcurrency = 8\nflush-interval = \"250ms\"",
    )
    .unwrap();
    let flags = RelaySettings {
        concurrency: Some(2),
        ..Default::default()
    };
    let c = flags.resolve(file).unwrap();
    assert_eq!(c.concurrency, 2);
    assert_eq!(c.upstream, "http://file.example/v1/events");
    assert_eq!(c.flush_interval, Duration::from_millis(250));
    assert_eq!(c.max_batch_bytes, 3_500_000);
    assert_eq!(c.retention, Duration::from_secs(345_600));
}

#[test]
fn unknown_keys_and_bad_values_are_named() {
    let err = toml::from_str::<RelaySettings>("concurency = 8").unwrap_err();
    assert!(err.to_string().contains("concurency"), "{err}");
    let bad = RelaySettings {
        upstream: Some("ftp://x".into()),
        ..Default::default()
    };
    let err = bad.resolve(RelaySettings::default()).unwrap_err();
    assert!(err.to_string().contains("upstream"), "{err}");
}

fn refused(s: RelaySettings, name: &str) -> String {
    let err = s.resolve(RelaySettings::default()).unwrap_err().to_string();
    assert!(err.contains(name), "{err}");
    err
}

#[test]
fn careless_values_are_refused_with_their_name() {
    for url in [
        "http://",
        "http://a b/v1/events",
        "http://h:99999/",
        "file:///x",
        "relay:8080",
    ] {
        refused(
            RelaySettings {
                upstream: Some(url.into()),
                ..Default::default()
            },
            "upstream",
        );
    }
    let err = refused(
        RelaySettings {
            upstream: Some("http://user:hunter2@:99999/".into()),
            ..Default::default()
        },
        "upstream",
    );
    assert!(!err.contains("hunter2"), "{err}");
    refused(
        RelaySettings {
            spool: Some("".into()),
            ..Default::default()
        },
        "spool",
    );
    refused(
        RelaySettings {
            spool_max_bytes: Some(0),
            ..Default::default()
        },
        "spool-max-bytes",
    );
    refused(
        RelaySettings {
            max_retry_delay: Some(HumanDuration(Duration::ZERO)),
            ..Default::default()
        },
        "max-retry-delay",
    );
    refused(
        RelaySettings {
            flush_interval: Some(HumanDuration(Duration::from_nanos(1))),
            ..Default::default()
        },
        "flush-interval",
    );
    // A budget too small to reach one visitor of the largest batch: 2·⌈log2 10000⌉ = 28.
    let err = refused(
        RelaySettings {
            isolation_budget: Some(27),
            ..Default::default()
        },
        "isolation-budget",
    );
    assert!(err.contains("between 28"), "{err}");
    let c = RelaySettings {
        isolation_budget: Some(8),
        max_batch_events: Some(16),
        ..Default::default()
    }
    .resolve(RelaySettings::default())
    .unwrap();
    assert_eq!(c.isolation_budget, 8);
}

#[test]
fn authentication_fails_closed() {
    for tokens in [
        vec!["".to_owned()],
        vec![" ".to_owned()],
        vec!["a".to_owned(), "".to_owned()],
    ] {
        refused(
            RelaySettings {
                auth_tokens: Some(tokens),
                ..Default::default()
            },
            "auth-tokens",
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty");
    std::fs::write(&empty, "# no tokens here\n\n").unwrap();
    refused(
        RelaySettings {
            auth_tokens_file: Some(empty),
            ..Default::default()
        },
        "auth-tokens-file",
    );
    let good = dir.path().join("tokens");
    std::fs::write(&good, "# team a\nt-one\n\n  t-two  \n").unwrap();
    let c = RelaySettings {
        auth_tokens: Some(vec!["t-zero".into()]),
        auth_tokens_file: Some(good),
        ..Default::default()
    }
    .resolve(RelaySettings::default())
    .unwrap();
    assert_eq!(c.auth_tokens, ["t-zero", "t-one", "t-two"]);
}

#[test]
fn a_config_file_must_be_a_small_regular_file() {
    let err = RelaySettings::from_file(Path::new("/dev/zero")).unwrap_err();
    assert!(err.to_string().contains("regular file"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big.toml");
    std::fs::write(&big, vec![b'#'; 2 << 20]).unwrap();
    let err = RelaySettings::from_file(&big).unwrap_err();
    assert!(err.to_string().contains("at most"), "{err}");
}

#[test]
fn the_lease_is_derived_from_the_request_timeout_unless_set() {
    let with = |flags: RelaySettings| flags.resolve(RelaySettings::default()).unwrap();
    assert_eq!(
        with(RelaySettings::default()).lease_timeout,
        MIN_DEFAULT_LEASE
    );
    let c = with(RelaySettings {
        request_timeout: Some(HumanDuration(Duration::from_secs(30))),
        ..Default::default()
    });
    assert_eq!(
        c.lease_timeout,
        Duration::from_secs(30) * LEASE_PER_REQUEST_TIMEOUT
    );
    let file = RelaySettings {
        lease_timeout: Some(HumanDuration(Duration::from_secs(5))),
        ..Default::default()
    };
    let c = RelaySettings::default().resolve(file).unwrap();
    assert_eq!(c.lease_timeout, Duration::from_secs(5));
    // A request timeout so long that the lease cannot follow it is refused, not wrapped.
    refused(
        RelaySettings {
            request_timeout: Some(HumanDuration(Duration::MAX)),
            ..Default::default()
        },
        "lease-timeout",
    );
}

#[test]
fn a_file_sets_what_has_no_default_and_flags_still_win() {
    let file: RelaySettings =
        toml::from_str("max-connections = 50\nsqs-dead-letter-queue = \"dlq\"").unwrap();
    let c = RelaySettings {
        max_connections: Some(60),
        ..Default::default()
    }
    .resolve(file)
    .unwrap();
    assert_eq!(c.max_connections, Some(60));
    assert_eq!(c.sqs_dead_letter_queue.as_deref(), Some("dlq"));
    let c = RelaySettings::default()
        .resolve(RelaySettings::default())
        .unwrap();
    assert_eq!(c.max_connections, None);
    assert_eq!(c.sqs_dead_letter_queue, None);
    assert_eq!(c.spool_sync, SyncMode::Full);
}

#[test]
fn sqs_ranges_are_the_spool_crates_named_as_relay_settings() {
    let err = refused(
        RelaySettings {
            sqs_wait_time: Some(HumanDuration(Duration::from_secs(21))),
            ..Default::default()
        },
        "sqs-wait-time",
    );
    assert!(err.ends_with("must be at most 20s"), "{err}");
    refused(
        RelaySettings {
            sqs_receivers: Some(65),
            ..Default::default()
        },
        "sqs-receivers",
    );
    refused(
        RelaySettings {
            sqs_max_message_bytes: Some(4095),
            ..Default::default()
        },
        "sqs-max-message-bytes",
    );
    let err = refused(
        RelaySettings {
            spool: Some("sqs://".into()),
            ..Default::default()
        },
        "spool",
    );
    assert!(err.contains("SQS queue name or URL"), "{err}");
}

#[test]
fn defaults_are_what_the_docs_promise() {
    let d = LayeredSettings::default();
    assert_eq!(d.max_batch_bytes, tributary::MAX_PAYLOAD_BYTES);
    assert_eq!(d.spool_max_bytes, 1 << 30);
    assert_eq!(d.retention, Duration::from_secs(4 * 24 * 3600));
    assert_eq!(
        d.sqs_max_message_bytes,
        tributary_spool::DEFAULT_MAX_MESSAGE_BYTES
    );
    // Every default passes the checks.
    d.into_config().unwrap();
}

#[test]
fn an_account_table_replaces_what_it_sets_and_keeps_the_rest() {
    use crate::privacy::AttributeRule;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k");
    std::fs::write(&key, "secret\n").unwrap();
    let file: RelaySettings = toml::from_str(&format!(
        "drop-attributes = [\"email\"]\nhash-visitor-ids = true\nhash-key-file = {:?}\n\n\
         [[privacy.account]]\naccount-id = \"1\"\nallow-attributes = [\"country\"]\n\n\
         [[privacy.account]]\naccount-id = \"2\"\nhash-visitor-ids = false\n",
        key.to_str().unwrap()
    ))
    .unwrap();
    let c = RelaySettings::default().resolve(file).unwrap();
    let rules = &c.privacy_rules;
    let one = rules.for_account("1");
    assert!(matches!(&one.attributes, AttributeRule::Allow(k) if k.contains("country")));
    assert!(
        one.hash_visitor_ids.is_some(),
        "account 1 keeps the relay-wide hashing"
    );
    let two = rules.for_account("2");
    assert!(matches!(&two.attributes, AttributeRule::Drop(k) if k.contains("email")));
    assert!(two.hash_visitor_ids.is_none());
    let other = rules.for_account("3");
    assert_eq!(
        other.hash_visitor_ids.as_ref().unwrap().hash("v"),
        crate::privacy::HashKey::from_file_bytes(b"secret").hash("v")
    );
    // The key never shows in what the relay prints.
    assert!(!c.to_toml().unwrap().contains("secret\""));
    assert!(!format!("{c:?}").contains("secret\""));
}

#[test]
fn privacy_and_fair_share_mistakes_are_named() {
    let twice: RelaySettings = toml::from_str(
        "[[privacy.account]]\naccount-id = \"1\"\n[[privacy.account]]\naccount-id = \"1\"\n",
    )
    .unwrap();
    assert!(refused(twice, "privacy.account").contains("two [[privacy.account]]"));
    let hash_without_key: RelaySettings =
        toml::from_str("[[privacy.account]]\naccount-id = \"1\"\nhash-visitor-ids = true\n")
            .unwrap();
    refused(hash_without_key, "hash-key-file");
    let sqs_quota = RelaySettings {
        spool: Some("sqs://q".into()),
        max_pending_bytes_per_account: Some(1 << 20),
        ..Default::default()
    };
    refused(sqs_quota, "max-pending-bytes-per-account");
    let burst_alone = RelaySettings {
        token_burst: Some(3),
        ..Default::default()
    };
    refused(burst_alone, "token-burst");
    for rate in [1e-300, 0.0009, 2e6, f64::NAN] {
        let tiny = RelaySettings {
            token_rate_limit: Some(rate),
            auth_tokens: Some(vec!["t".into()]),
            ..Default::default()
        };
        let err = s_resolve_err(tiny, rate);
        assert!(
            err.contains("token-rate-limit") && err.contains("at least 0.001"),
            "{rate}: {err}"
        );
    }
    let window = RelaySettings {
        dedup_window: Some("90days".parse().unwrap()),
        ..Default::default()
    };
    refused(window, "dedup-window");
    let labels: RelaySettings = toml::from_str("max-account-labels = 1000000\n").unwrap();
    refused(labels, "max-account-labels");
}

fn s_resolve_err(s: RelaySettings, rate: f64) -> String {
    match s.resolve(RelaySettings::default()) {
        Ok(_) => panic!("token-rate-limit {rate} was accepted"),
        Err(e) => e.to_string(),
    }
}
