//! `EventFactory::create_log_events` (batching plus JSON serialisation) on realistic events:
//! the golden impression and conversion of the Python SDK 5.7.0 fixtures, alternating.
//!
//! Run: `cargo bench -p tributary --bench factory`. The Python peer is
//! `scripts/bench_python_factory.py`; compare the two from the same machine and run.

// criterion_group! and criterion_main! generate public functions without doc comments.
#![allow(missing_docs)]

use std::hint::black_box;
use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tributary::{
    AttributeValue, Conversion, EventContext, EventFactory, Impression, UserEvent, UserEventKind,
    VisitorAttribute,
};

/// The context of the fixtures' datafile (account, project, revision, bot filtering on).
fn golden_context() -> Arc<EventContext> {
    let mut ctx = EventContext::new("12133785640", "21537940595", "131");
    ctx.client_name = "python-sdk".into();
    ctx.client_version = "5.7.0".into();
    ctx.bot_filtering = Some(true);
    Arc::new(ctx)
}

/// The fixtures' attributes `{'country': 'DE', 'plan': 'free', 'age': 34}` plus the bot
/// filtering attribute the SDK appends.
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

fn impression() -> UserEventKind {
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

fn conversion() -> UserEventKind {
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
fn events(n: usize) -> Vec<UserEvent> {
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

fn bench_factory(c: &mut Criterion) {
    let factory = EventFactory::new();
    let mut group = c.benchmark_group("create_log_events");
    for n in [10usize, 100] {
        let input = events(n);
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::from_parameter(n), &input, |b, input| {
            b.iter(|| {
                let out = factory.create_log_events(black_box(input));
                assert_eq!(out.log_events.len(), 1);
                black_box(out)
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_factory);
criterion_main!(benches);
