//! The factory's output for hand-built events equals the Python SDK's fixtures, without
//! going through a datafile: this pins the serialiser itself.

use std::sync::Arc;

use serde_json::Value;
use tributary::{
    AttributeValue, Conversion, EventContext, EventFactory, Impression, UserEvent, UserEventKind,
    VisitorAttribute,
};

fn fixture(name: &str) -> Value {
    let path = format!(
        "{}/../../../shared/fixtures/python-sdk-5.7.0/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).expect("fixture is JSON")
}

fn golden_context() -> Arc<EventContext> {
    let mut ctx = EventContext::new("12133785640", "21537940595", "131");
    ctx.client_name = "python-sdk".into();
    ctx.client_version = "5.7.0".into();
    ctx.bot_filtering = Some(true);
    Arc::new(ctx)
}

fn golden_attributes() -> Vec<VisitorAttribute> {
    vec![
        VisitorAttribute::custom(
            "21554750045",
            "country",
            AttributeValue::String("DE".into()),
        ),
        VisitorAttribute::custom("21556420039", "plan", AttributeValue::String("free".into())),
        VisitorAttribute::custom("21563280023", "age", AttributeValue::Int(34)),
        VisitorAttribute::custom(
            "$opt_bot_filtering",
            "$opt_bot_filtering",
            AttributeValue::Bool(true),
        ),
    ]
}

/// Copies uuid and timestamp from `expected` so the rest can be compared whole.
fn build_like(expected: &Value, kind: UserEventKind) -> Value {
    let ev = &expected["visitors"][0]["snapshots"][0]["events"][0];
    let mut event = UserEvent::new(golden_context(), "user-golden-1", golden_attributes(), kind);
    event.uuid = ev["uuid"].as_str().expect("uuid").to_owned();
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
    let actual = build_like(
        &expected,
        UserEventKind::Impression(Impression {
            campaign_id: "9300000010000".into(),
            experiment_id: "9300000010001".into(),
            variation_id: "410102".into(),
            variation_key: "treatment".into(),
            flag_key: "checkout_redesign".into(),
            rule_key: "checkout_redesign_ab".into(),
            rule_type: "feature-test".into(),
            enabled: true,
            cmab_uuid: None,
        }),
    );
    assert_eq!(actual, expected);
}

#[test]
fn conversion_matches_python_sdk() {
    let expected = fixture("conversion.json");
    let tags = serde_json::json!({"revenue": 4200, "value": 3.5, "category": "shoes"});
    let actual = build_like(
        &expected,
        UserEventKind::Conversion(Conversion {
            event_id: "21549340108".into(),
            event_key: "purchase".into(),
            revenue: Some(4200),
            value: Some(3.5),
            tags: tags.as_object().cloned(),
        }),
    );
    assert_eq!(actual, expected);
}
