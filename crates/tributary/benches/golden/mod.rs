//! The Python SDK 5.7.0 fixtures' events, shared by the benches: the golden impression and
//! conversion, alternating, distinct users, one context.

use std::sync::Arc;

use tributary::{
    AttributeValue, Conversion, EventContext, Impression, UserEvent, UserEventKind,
    VisitorAttribute,
};

/// The context of the fixtures' datafile (account, project, revision, bot filtering on).
pub fn golden_context() -> Arc<EventContext> {
    let mut ctx = EventContext::new("12133785640", "21537940595", "131");
    ctx.client_name = "python-sdk".into();
    ctx.client_version = "5.7.0".into();
    ctx.bot_filtering = Some(true);
    Arc::new(ctx)
}

/// The fixtures' attributes `{'country': 'DE', 'plan': 'free', 'age': 34}` plus the bot
/// filtering attribute the SDK appends.
pub fn golden_attributes() -> Vec<VisitorAttribute> {
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

pub fn impression() -> UserEventKind {
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
    })
}

pub fn conversion() -> UserEventKind {
    let mut tags = serde_json::Map::new();
    tags.insert("revenue".into(), 4200.into());
    tags.insert("value".into(), 3.5.into());
    tags.insert("category".into(), "shoes".into());
    UserEventKind::Conversion(Conversion {
        event_id: "21549340108".into(),
        event_key: "purchase".into(),
        revenue: Some(4200),
        value: Some(3.5),
        tags: Some(tags),
    })
}

/// `n` events, impressions and conversions alternating, distinct users, one context.
pub fn events(n: usize) -> Vec<UserEvent> {
    let ctx = golden_context();
    (0..n)
        .map(|i| {
            let kind = if i % 2 == 0 {
                impression()
            } else {
                conversion()
            };
            UserEvent::new(
                ctx.clone(),
                format!("user-golden-{i}"),
                golden_attributes(),
                kind,
            )
        })
        .collect()
}
