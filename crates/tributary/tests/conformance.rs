//! Events built from a datafile through `ProjectConfig` + `UserEventFactory` + `EventFactory`
//! equal what the official Python SDK 5.7.0 sends for the same calls, field for field but
//! `uuid` and `timestamp`.
//!
//! Fixtures: the two hand-captured ones in `../shared/fixtures/python-sdk-5.7.0/`, and those
//! `scripts/gen_fixtures.py` recorded in `tests/fixtures/python-sdk-5.7.0/` (each holds the
//! call's inputs and the LogEvent the SDK produced). Also: every error path.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{Map, Value, json};
use tributary::datafile::{DatafileError, RuleType};
use tributary::user_event_factory::KnownKeys;
use tributary::{
    EventBuildError, EventFactory, ImpressionRequest, ProjectConfig, UserEvent, UserEventFactory,
};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn shared_dir() -> PathBuf {
    repo_root().join("../shared/fixtures/python-sdk-5.7.0")
}

fn generated_dir() -> PathBuf {
    repo_root().join("tests/fixtures/python-sdk-5.7.0")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&read(path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn shared_datafile() -> String {
    read(&shared_dir().join("datafile.json"))
}

fn python_factory(datafile: &str) -> UserEventFactory {
    let config = ProjectConfig::from_json(datafile).unwrap();
    UserEventFactory::with_client(Arc::new(config), "python-sdk", "5.7.0")
}

/// The event's LogEvent as `{"url","http_verb","headers","params"}`, with uuid and
/// timestamp taken from `expected_params` so the rest can be compared whole.
fn log_event_like(mut event: UserEvent, expected_params: &Value) -> Value {
    let ev = &expected_params["visitors"][0]["snapshots"][0]["events"][0];
    event.uuid = ev["uuid"].as_str().unwrap().into();
    event.timestamp = ev["timestamp"].as_u64().unwrap();
    let log_events = EventFactory::new()
        .create_log_events(&[event])
        .into_result()
        .unwrap();
    assert_eq!(log_events.len(), 1);
    log_events[0].to_json().unwrap()
}

fn golden_attributes() -> Vec<(&'static str, Value)> {
    vec![
        ("country", json!("DE")),
        ("plan", json!("free")),
        ("age", json!(34)),
    ]
}

#[test]
fn shared_impression_fixture() {
    let expected = read_json(&shared_dir().join("impression.json"));
    let event = python_factory(&shared_datafile())
        .impression(
            "user-golden-1",
            golden_attributes(),
            "checkout_redesign",
            "checkout_redesign_ab",
            "treatment",
            true,
        )
        .unwrap();
    let actual = log_event_like(event, &expected);
    assert_eq!(actual["params"], expected);
    assert_eq!(actual["url"], "https://logx.optimizely.com/v1/events");
}

#[test]
fn shared_conversion_fixture() {
    let expected = read_json(&shared_dir().join("conversion.json"));
    let tags = json!({"revenue": 4200, "value": 3.5, "category": "shoes"});
    let event = python_factory(&shared_datafile())
        .conversion(
            "user-golden-1",
            golden_attributes(),
            "purchase",
            tags.as_object(),
        )
        .unwrap();
    assert_eq!(log_event_like(event, &expected)["params"], expected);
}

/// `[[key, value], ...]` as the generator writes attributes. Values JSON cannot hold
/// (`{"$python": "nan"}`) cannot be given to the factory either, since `serde_json::Value`
/// has no NaN or infinity; they are left out, and the fixture shows the SDK dropped them too.
fn call_attributes(call: &Value) -> Vec<(String, Value)> {
    call["attributes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|pair| {
            let key = pair[0].as_str().unwrap().to_owned();
            let value = pair[1].clone();
            match value.get("$python") {
                Some(_) => None,
                None => Some((key, value)),
            }
        })
        .collect()
}

fn replay(fixture: &Value) -> Value {
    let datafile = read(&repo_root().join(fixture["datafile"].as_str().unwrap()));
    let factory = python_factory(&datafile);
    let call = &fixture["call"];
    let user = call["user_id"].as_str().unwrap();
    let attributes = call_attributes(call);
    let event = match call["kind"].as_str().unwrap() {
        "impression" => {
            let req = ImpressionRequest::new(
                user,
                call["flag_key"].as_str().unwrap(),
                call["rule_key"].as_str().unwrap(),
                call["variation_key"].as_str().unwrap(),
            );
            let enabled = call["enabled"].as_bool().unwrap();
            // `decide` reports the variation's featureEnabled; so does the default.
            let by_default = factory.build_impression(&req, &attributes).unwrap();
            let explicit = factory
                .build_impression(&req.clone().enabled(enabled), &attributes)
                .unwrap();
            assert_eq!(by_default.kind, explicit.kind, "enabled default");
            explicit
        }
        "conversion" => factory
            .conversion(
                user,
                &attributes,
                call["event_key"].as_str().unwrap(),
                call["tags"].as_object(),
            )
            .unwrap(),
        other => panic!("unknown call kind {other}"),
    };
    log_event_like(event, &fixture["log_event"]["params"])
}

#[test]
fn generated_fixtures() {
    let mut names: Vec<PathBuf> = std::fs::read_dir(generated_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_str().unwrap();
            name.ends_with(".json") && !name.starts_with("datafile")
        })
        .collect();
    names.sort();
    // The generator writes 46 cases; a missing directory or a bad glob must not pass.
    assert!(names.len() >= 40, "only {} fixtures found", names.len());
    let mut failures = Vec::new();
    for path in &names {
        let fixture = read_json(path);
        let actual = replay(&fixture);
        if actual != fixture["log_event"] {
            failures.push(format!(
                "{}:\n  expected {}\n  actual   {}",
                path.file_name().unwrap().to_string_lossy(),
                fixture["log_event"],
                actual
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Integers, floats and their JSON spelling survive: `4200` is not `4200.0`.
#[test]
fn numbers_keep_their_type() {
    let fixture = read_json(&generated_dir().join("conversion_value_int.json"));
    let actual = replay(&fixture);
    let event = &actual["params"]["visitors"][0]["snapshots"][0]["events"][0];
    assert!(event["value"].is_f64(), "value 7 is sent as 7.0");
    assert!(event["revenue"].is_i64());
    assert_eq!(event["tags"]["value"], json!(7));
}

#[test]
fn events_of_one_factory_share_a_context() {
    let factory = python_factory(&shared_datafile());
    let no_attrs: [(&str, Value); 0] = [];
    let a = factory
        .conversion("u", no_attrs.clone(), "purchase", None)
        .unwrap();
    let b = factory
        .impression(
            "u",
            no_attrs,
            "search_ranking",
            "search_ranking_mvt",
            "hybrid",
            true,
        )
        .unwrap();
    assert!(Arc::ptr_eq(&a.context, &b.context));
    assert_eq!(a.context.client_name, "python-sdk");
}

#[test]
fn attributes_keep_the_callers_order() {
    let factory = python_factory(&shared_datafile());
    let attrs = tributary::user_event_factory::parse_json_object(
        r#"{"plan": "free", "age": 34, "country": "DE"}"#,
    )
    .unwrap();
    let keys: Vec<String> = factory
        .attributes(&attrs)
        .into_iter()
        .map(|a| a.key.into())
        .collect();
    assert_eq!(keys, ["plan", "age", "country", "$opt_bot_filtering"]);
}

#[test]
fn config_lookups() {
    let config = ProjectConfig::from_json(&shared_datafile()).unwrap();
    assert_eq!(config.account_id(), "12133785640");
    assert_eq!(config.revision(), "131");
    assert_eq!(config.bot_filtering(), Some(true));
    assert_eq!(config.attribute_id("age"), Some("21563280023"));
    assert_eq!(config.event("add_to_cart").unwrap().id, "21550880117");
    let flag = config.flag("checkout_redesign").unwrap();
    let rules: Vec<(&str, RuleType)> = config
        .flag_rules(flag)
        .map(|r| (r.experiment.key.as_str(), r.rule_type))
        .collect();
    assert_eq!(
        rules,
        [
            ("checkout_redesign_ab", RuleType::FeatureTest),
            ("premium_early_access", RuleType::Rollout),
            ("default-rollout-123011-21537940595", RuleType::Rollout),
        ]
    );
    let rollout_rule = config.flag_rule(flag, "premium_early_access").unwrap();
    assert_eq!(
        rollout_rule.experiment.layer_id,
        "rollout-123011-21537940595"
    );
    // Rollout rules are not experiments.
    assert!(config.experiment("premium_early_access").is_none());

    let rev =
        ProjectConfig::from_json(&read(&generated_dir().join("datafile-rev132.json"))).unwrap();
    let grouped = rev.experiment("search_ranking_mvt").unwrap();
    assert_eq!(grouped.group_id.as_deref(), Some("19228"));
    assert_eq!(rev.bot_filtering(), Some(false));
    assert!(!rev.anonymize_ip());
}

// ---- errors ----

fn no_attrs() -> [(&'static str, Value); 0] {
    []
}

#[test]
fn unknown_flag() {
    let err = python_factory(&shared_datafile())
        .impression(
            "u",
            no_attrs(),
            "nope",
            "checkout_redesign_ab",
            "treatment",
            true,
        )
        .unwrap_err();
    assert_eq!(
        err,
        EventBuildError::UnknownFlag {
            flag_key: "nope".into(),
            known: KnownKeys(vec!["checkout_redesign".into(), "search_ranking".into()]),
        }
    );
    assert_eq!(
        err.to_string(),
        r#"unknown flag "nope"; the datafile has "checkout_redesign", "search_ranking""#
    );
}

#[test]
fn unknown_rule_and_rule_of_another_flag() {
    let factory = python_factory(&shared_datafile());
    for rule in [
        "nope",
        "search_ranking_mvt",
        "default-rollout-123012-21537940595",
    ] {
        let err = factory
            .impression(
                "u",
                no_attrs(),
                "checkout_redesign",
                rule,
                "treatment",
                true,
            )
            .unwrap_err();
        match &err {
            EventBuildError::UnknownRule {
                flag_key, rule_key, ..
            } => assert_eq!(
                (flag_key.as_str(), rule_key.as_str()),
                ("checkout_redesign", rule)
            ),
            other => panic!("{other:?}"),
        }
        assert!(err.to_string().contains(rule), "{err}");
        assert!(err.to_string().contains("premium_early_access"), "{err}");
    }
}

#[test]
fn unknown_variation() {
    let factory = python_factory(&shared_datafile());
    // "on" exists, but in the rollout rule, not in the A/B test.
    let err = factory
        .impression(
            "u",
            no_attrs(),
            "checkout_redesign",
            "checkout_redesign_ab",
            "on",
            true,
        )
        .unwrap_err();
    assert_eq!(
        err,
        EventBuildError::UnknownVariation {
            flag_key: "checkout_redesign".into(),
            rule_key: "checkout_redesign_ab".into(),
            variation_key: "on".into(),
            known: KnownKeys(vec!["control".into(), "treatment".into()]),
        }
    );
    assert!(err.to_string().contains(r#"no variation "on""#), "{err}");
}

#[test]
fn unknown_event() {
    let err = python_factory(&shared_datafile())
        .conversion("u", no_attrs(), "refund", None)
        .unwrap_err();
    assert!(
        matches!(&err, EventBuildError::UnknownEvent { event_key, .. } if event_key == "refund")
    );
    assert!(err.to_string().contains(r#""refund""#), "{err}");
    assert!(err.to_string().contains("add_to_cart"), "{err}");
}

fn datafile_with(edit: impl FnOnce(&mut Map<String, Value>)) -> String {
    let mut v: Value = serde_json::from_str(&shared_datafile()).unwrap();
    edit(v.as_object_mut().unwrap());
    v.to_string()
}

#[test]
fn malformed_datafile() {
    let text = shared_datafile();
    let truncated = &text[..text.len() / 2];
    let err = ProjectConfig::from_json(truncated).unwrap_err();
    assert!(
        matches!(err, DatafileError::InvalidJson { line, .. } if line > 1),
        "{err:?}"
    );
    assert!(
        err.to_string().starts_with("datafile is not valid JSON"),
        "{err}"
    );

    let err = ProjectConfig::from_json("").unwrap_err();
    assert!(matches!(err, DatafileError::InvalidJson { .. }), "{err:?}");
}

#[test]
fn wrong_version() {
    for (version, shown) in [
        (json!("3"), "\"3\""),
        (json!(4), "4"),
        (json!(null), "null"),
    ] {
        let text = datafile_with(|d| {
            d.insert("version".into(), version.clone());
        });
        let err = ProjectConfig::from_json(&text).unwrap_err();
        assert_eq!(
            err,
            DatafileError::UnsupportedVersion {
                version: shown.into()
            }
        );
        assert!(err.to_string().contains(shown), "{err}");
    }
    let text = datafile_with(|d| {
        d.remove("version");
    });
    assert_eq!(
        ProjectConfig::from_json(&text).unwrap_err(),
        DatafileError::MissingField {
            path: "version".into()
        }
    );
}

#[test]
fn missing_fields_name_their_path() {
    type Edit = Box<dyn Fn(&mut Map<String, Value>)>;
    let cases: Vec<(Edit, &str)> = vec![
        (
            Box::new(|d| {
                d.remove("accountId");
            }),
            "accountId",
        ),
        (
            Box::new(|d| {
                d["experiments"][1]
                    .as_object_mut()
                    .unwrap()
                    .remove("layerId");
            }),
            "experiments[1].layerId",
        ),
        (
            Box::new(|d| {
                d["rollouts"][0]["experiments"][1]["variations"][0]
                    .as_object_mut()
                    .unwrap()
                    .remove("id");
            }),
            "rollouts[0].experiments[1].variations[0].id",
        ),
        (
            Box::new(|d| {
                d["featureFlags"][1]
                    .as_object_mut()
                    .unwrap()
                    .remove("rolloutId");
            }),
            "featureFlags[1].rolloutId",
        ),
        (
            Box::new(|d| {
                d["attributes"][2].as_object_mut().unwrap().remove("key");
            }),
            "attributes[2].key",
        ),
    ];
    for (edit, path) in cases {
        let err = ProjectConfig::from_json(&datafile_with(edit)).unwrap_err();
        assert_eq!(err, DatafileError::MissingField { path: path.into() });
        assert!(err.to_string().contains(path), "{err}");
    }
}

#[test]
fn wrong_types_name_their_path() {
    let text = datafile_with(|d| {
        d.insert("botFiltering".into(), json!("yes"));
    });
    assert_eq!(
        ProjectConfig::from_json(&text).unwrap_err(),
        DatafileError::WrongType {
            path: "botFiltering".into(),
            expected: "a boolean",
            found: "a string",
        }
    );
    let text = datafile_with(|d| {
        d["featureFlags"][0]["experimentIds"] = json!([9300000010001u64]);
    });
    assert_eq!(
        ProjectConfig::from_json(&text).unwrap_err(),
        DatafileError::WrongType {
            path: "featureFlags[0].experimentIds[0]".into(),
            expected: "a string",
            found: "a number",
        }
    );
    let text = datafile_with(|d| {
        d.insert("groups".into(), json!([{"id": "1", "experiments": {}}]));
    });
    assert_eq!(
        ProjectConfig::from_json(&text).unwrap_err(),
        DatafileError::WrongType {
            path: "groups[0].experiments".into(),
            expected: "an array",
            found: "an object",
        }
    );
}
