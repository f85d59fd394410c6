//! The factory's output for hand-built events equals the Python SDK's fixtures, without
//! going through a datafile: this pins the serialiser itself.

use serde_json::Value;
use tributary::{EventFactory, UserEvent, UserEventKind};

// The same golden events the benches measure, so the benches time what this test pins.
#[path = "../benches/golden/mod.rs"]
#[allow(dead_code)]
mod golden;
use golden::{golden_attributes, golden_context};

fn fixture(name: &str) -> Value {
    let path = format!(
        "{}/../../../shared/fixtures/python-sdk-5.7.0/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).expect("fixture is JSON")
}

/// Copies uuid and timestamp from `expected` so the rest can be compared whole.
fn build_like(expected: &Value, kind: UserEventKind) -> Value {
    let ev = &expected["visitors"][0]["snapshots"][0]["events"][0];
    let mut event = UserEvent::new(golden_context(), "user-golden-1", golden_attributes(), kind);
    event.uuid = ev["uuid"].as_str().expect("uuid").into();
    event.timestamp = ev["timestamp"].as_u64().expect("timestamp");
    let log_events = EventFactory::new()
        .create_log_events(&[event])
        .into_result()
        .expect("fits");
    assert_eq!(log_events.len(), 1);
    assert_eq!(log_events[0].url, "https://logx.optimizely.com/v1/events");
    serde_json::from_slice(log_events[0].body()).expect("body is JSON")
}

#[test]
fn impression_matches_python_sdk() {
    let expected = fixture("impression.json");
    let actual = build_like(&expected, golden::impression());
    assert_eq!(actual, expected);
}

#[test]
fn conversion_matches_python_sdk() {
    let expected = fixture("conversion.json");
    let actual = build_like(&expected, golden::conversion());
    assert_eq!(actual, expected);
}
