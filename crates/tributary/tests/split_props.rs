//! Property tests of splitting: `EventFactory` at random size limits, `RawBatch::split_to_fit`,
//! and `RawBatch::parse` -> `encode` round trips.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use bytes::Bytes;
use proptest::prelude::*;
use serde_json::Value;
use tributary::raw::encoded_len;
use tributary::validate::Validator;
use tributary::{
    AttributeValue, Conversion, EventContext, EventFactory, Impression, RawBatch, Region,
    UserEvent, UserEventKind, VisitorAttribute,
};

// ---------------------------------------------------------------------------------------
// Random user events.

/// Contexts the events are drawn from: two that differ in revision, an EU one with another
/// client, and one equal to the first but in its own `Arc` (equal contexts share payloads).
fn contexts() -> Vec<Arc<EventContext>> {
    let a = EventContext::new("12133785640", "21537940595", "131");
    let mut b = a.clone();
    b.revision = "132".into();
    let mut eu = EventContext::new("555", "777", "9");
    eu.region = Region::Eu;
    eu.client_name = "python-sdk".into();
    eu.bot_filtering = Some(true);
    vec![Arc::new(a.clone()), Arc::new(b), Arc::new(eu), Arc::new(a)]
}

#[derive(Debug, Clone)]
enum KindSpec {
    Impression {
        variation_id: String,
        flag_key: String,
        enabled: bool,
    },
    Conversion {
        event_key: String,
        revenue: Option<i64>,
        value: Option<f64>,
        tags: Option<BTreeMap<String, String>>,
    },
}

#[derive(Debug, Clone)]
struct EventSpec {
    ctx: usize,
    user: String,
    attrs: Vec<(String, AttributeValue)>,
    kind: KindSpec,
}

fn arb_attr_value() -> impl Strategy<Value = AttributeValue> {
    prop_oneof![
        ".{0,40}".prop_map(|s| AttributeValue::String(s.into())),
        any::<bool>().prop_map(AttributeValue::Bool),
        any::<i32>().prop_map(|i| AttributeValue::Int(i64::from(i))),
        (-1e9f64..1e9).prop_map(AttributeValue::Float),
    ]
}

/// A tag value: usually short, now and then huge (so that one event alone can exceed the
/// limit while its neighbours fit).
fn arb_tag_value() -> impl Strategy<Value = String> {
    prop_oneof![
        20 => "[a-z0-9 ]{0,60}",
        1 => (500usize..6000).prop_map(|n| "x".repeat(n)),
    ]
}

fn arb_kind() -> impl Strategy<Value = KindSpec> {
    prop_oneof![
        ("[0-9a-z]{0,8}", "[a-z_]{1,20}", any::<bool>()).prop_map(
            |(variation_id, flag_key, enabled)| KindSpec::Impression {
                variation_id,
                flag_key,
                enabled,
            }
        ),
        (
            "[a-z_]{1,20}",
            proptest::option::of(any::<i64>()),
            proptest::option::of(-1e6f64..1e6),
            proptest::option::of(proptest::collection::btree_map(
                "[a-z]{1,12}",
                arb_tag_value(),
                0..6
            )),
        )
            .prop_map(|(event_key, revenue, value, tags)| KindSpec::Conversion {
                event_key,
                revenue,
                value,
                tags,
            }),
    ]
}

fn arb_event() -> impl Strategy<Value = EventSpec> {
    (
        // Runs of one context are likelier than a change at every event.
        prop_oneof![3 => Just(0usize), 1 => 1usize..4],
        "[a-zA-Z0-9é\"\\\\-]{1,24}",
        proptest::collection::vec(("[a-z$_]{1,16}", arb_attr_value()), 0..8),
        arb_kind(),
    )
        .prop_map(|(ctx, user, attrs, kind)| EventSpec {
            ctx,
            user,
            attrs,
            kind,
        })
}

fn build(specs: &[EventSpec]) -> Vec<UserEvent> {
    let ctxs = contexts();
    specs
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let attrs = s
                .attrs
                .iter()
                .enumerate()
                .map(|(j, (key, value))| {
                    VisitorAttribute::custom(format!("{}", 1000 + j), key.clone(), value.clone())
                })
                .collect();
            let kind = match &s.kind {
                KindSpec::Impression {
                    variation_id,
                    flag_key,
                    enabled,
                } => UserEventKind::Impression(Impression {
                    campaign_id: if i % 3 == 0 {
                        String::new().into()
                    } else {
                        "93".into()
                    },
                    experiment_id: "94".into(),
                    variation_id: variation_id.as_str().into(),
                    variation_key: "treatment".into(),
                    flag_key: flag_key.as_str().into(),
                    rule_key: "rule".into(),
                    rule_type: "feature-test".into(),
                    enabled: *enabled,
                    cmab_uuid: None,
                }),
                KindSpec::Conversion {
                    event_key,
                    revenue,
                    value,
                    tags,
                } => UserEventKind::Conversion(Conversion {
                    event_id: "215".into(),
                    event_key: event_key.as_str().into(),
                    revenue: *revenue,
                    value: *value,
                    tags: tags.as_ref().map(|t| {
                        t.iter()
                            .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
                            .collect()
                    }),
                }),
            };
            let mut e = UserEvent::new(ctxs[s.ctx].clone(), s.user.clone(), attrs, kind);
            e.uuid = format!("uuid-{i}").into();
            e
        })
        .collect()
}

/// The events' uuids in a body, in order.
fn body_uuids(body: &[u8]) -> Vec<String> {
    let v: Value = serde_json::from_slice(body).unwrap();
    v["visitors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|visitor| {
            let events = visitor["snapshots"][0]["events"].as_array().unwrap();
            assert_eq!(events.len(), 1, "one event per visitor");
            events[0]["uuid"].as_str().unwrap().to_owned()
        })
        .collect()
}

proptest! {
    // Each case builds up to 32 events and checks every payload: 96 cases keep this test
    // within a few seconds in a debug build.
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn factory_splits_losslessly_under_any_limit(
        specs in proptest::collection::vec(arb_event(), 0..32),
        limit in 200usize..8000,
    ) {
        let events = build(&specs);
        let out = EventFactory::with_max_batch_bytes(limit).create_log_events(&events);
        let by_uuid: HashMap<&str, (usize, &UserEvent)> =
            events.iter().enumerate().map(|(i, e)| (e.uuid.as_str(), (i, e))).collect();

        // Which events are too large alone, measured independently of the split.
        let unlimited = EventFactory::with_max_batch_bytes(usize::MAX);
        let alone: Vec<usize> = events
            .iter()
            .map(|e| unlimited.create_log_events(std::slice::from_ref(e)).log_events[0].body().len())
            .collect();

        let mut sent: Vec<String> = Vec::new();
        let mut batches_indices: Vec<Vec<usize>> = Vec::new();
        for le in &out.log_events {
            let body = le.body();
            prop_assert!(body.len() <= limit, "body {} > limit {}", body.len(), limit);
            prop_assert_eq!(body.len(), le.batch().encoded_len());
            prop_assert_eq!(body, &le.batch().encode(), "the body is what its parts encode to");
            prop_assert!(le.visitor_count() > 0);
            let params = le.params().unwrap();
            let ctx = le.context().unwrap();
            prop_assert_eq!(&le.url, ctx.region.endpoint());
            prop_assert_eq!(&params.account_id, &ctx.account_id);
            prop_assert_eq!(&params.revision, &ctx.revision);
            prop_assert_eq!(&params.client_name, &ctx.client_name);
            // What the factory builds passes the full validator.
            let summary = Validator::full().max_payload_bytes(Some(limit)).validate(body);
            prop_assert!(summary.is_ok(), "{:?}", summary);
            let uuids = body_uuids(body);
            let mut indices = Vec::new();
            for u in &uuids {
                let (i, e) = by_uuid[u.as_str()];
                prop_assert!(*e.context == **ctx, "event {} in a payload of another context", i);
                indices.push(i);
            }
            sent.extend(uuids);
            batches_indices.push(indices);
        }

        // Every event exactly once, sent or oversized; order kept; oversized iff too large alone.
        let oversized: Vec<&str> = out.oversized.iter().map(|o| o.uuid.as_str()).collect();
        for (i, e) in events.iter().enumerate() {
            let n_sent = sent.iter().filter(|u| **u == e.uuid).count();
            let n_over = oversized.iter().filter(|u| **u == e.uuid).count();
            prop_assert_eq!(n_sent + n_over, 1, "event {} seen {} + {} times", i, n_sent, n_over);
            prop_assert_eq!(n_over == 1, alone[i] > limit, "event {} alone is {} bytes", i, alone[i]);
        }
        for o in &out.oversized {
            prop_assert_eq!(&events[o.index].uuid, &o.uuid);
            prop_assert_eq!(o.size, alone[o.index]);
            prop_assert_eq!(o.limit, limit);
        }
        let expected_sent: Vec<&str> = events
            .iter()
            .filter(|e| !oversized.contains(&e.uuid.as_str()))
            .map(|e| e.uuid.as_str())
            .collect();
        prop_assert_eq!(sent.iter().map(String::as_str).collect::<Vec<_>>(), expected_sent);
        prop_assert!(out.oversized.windows(2).all(|w| w[0].index < w[1].index));

        // Greedy: a payload is cut only when the next event of the same run did not fit.
        for (pair, les) in batches_indices.windows(2).zip(out.log_events.windows(2)) {
            let (last, first) = (*pair[0].last().unwrap(), pair[1][0]);
            let run_ctx = &events[last].context;
            let same_run = events[last..=first].iter().all(|e| *e.context == **run_ctx);
            if same_run {
                let next_len = les[1].batch().visitors()[0].len();
                let grown = les[0].batch().encoded_len() + 1 + next_len;
                prop_assert!(grown > limit, "payload cut at {} bytes though {} fit", les[0].body().len(), grown);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// RawBatch::split_to_fit.

fn arb_visitor() -> impl Strategy<Value = Bytes> {
    (
        "[a-z0-9é]{1,10}",
        prop_oneof![4 => 0usize..200, 1 => 200usize..3000],
    )
        .prop_map(|(id, pad)| {
            Bytes::from(format!(
                r#"{{"visitor_id":"{id}","snapshots":[],"pad":"{}"}}"#,
                "p".repeat(pad)
            ))
        })
}

fn arb_header() -> impl Strategy<Value = Bytes> {
    prop_oneof![
        Just(Bytes::new()),
        Just(Bytes::from_static(br#""account_id":"1""#)),
        "[a-z0-9]{0,300}".prop_map(|s| Bytes::from(format!(r#""account_id":"1","x":"{s}""#))),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn split_to_fit_keeps_every_visitor_in_order(
        header in arb_header(),
        visitors in proptest::collection::vec(arb_visitor(), 0..30),
        limit in 50usize..6000,
    ) {
        let batch = RawBatch::from_parts(header.clone(), visitors.clone());
        let first_too_big = visitors
            .iter()
            .position(|v| encoded_len(header.len(), v.len(), 1) > limit);
        match batch.split_to_fit(limit) {
            Ok(parts) => {
                prop_assert_eq!(first_too_big, None);
                let mut joined: Vec<Bytes> = Vec::new();
                for p in &parts {
                    prop_assert!(p.encoded_len() <= limit);
                    prop_assert_eq!(p.encode().len(), p.encoded_len());
                    prop_assert_eq!(p.header(), &header);
                    let _: Value = serde_json::from_slice(&p.encode()).unwrap();
                    joined.extend(p.visitors().iter().cloned());
                }
                prop_assert_eq!(&joined, &visitors);
                if !visitors.is_empty() {
                    prop_assert!(parts.iter().all(|p| !p.visitors().is_empty()));
                }
                for w in parts.windows(2) {
                    let grown = w[0].encoded_len() + 1 + w[1].visitors()[0].len();
                    prop_assert!(grown > limit, "cut though the next visitor fit");
                }
            }
            Err(e) => {
                prop_assert_eq!(Some(e.index), first_too_big);
                prop_assert_eq!(e.size, encoded_len(header.len(), visitors[e.index].len(), 1));
                prop_assert_eq!(e.limit, limit);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// parse -> encode round trips, on bodies written with odd spacing and number forms.

/// Whitespace between tokens.
fn ws() -> impl Strategy<Value = &'static str> {
    prop_oneof![4 => Just(""), 1 => Just(" "), 1 => Just("\n  "), 1 => Just("\t")]
}

/// JSON scalar texts whose form a re-encoder would change.
fn arb_scalar_text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("4200".to_owned()),
        Just("3.50".to_owned()),
        Just("-0".to_owned()),
        Just("1e3".to_owned()),
        Just("1.0E-7".to_owned()),
        Just("18446744073709551616".to_owned()),
        Just("true".to_owned()),
        Just("null".to_owned()),
        Just(r#""\u00e9""#.to_owned()),
        Just(r#""é\n\"\\/""#.to_owned()),
        Just(r#""\ud83d\ude00 😀""#.to_owned()),
        any::<i64>().prop_map(|i| i.to_string()),
        "[a-zA-Z0-9 ]{0,12}".prop_map(|s| format!("\"{s}\"")),
    ]
}

/// A JSON text, possibly nested, with random spacing.
fn arb_json_text() -> impl Strategy<Value = String> {
    arb_scalar_text().prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            (proptest::collection::vec((inner.clone(), ws()), 0..4)).prop_map(|items| {
                let body: Vec<String> = items
                    .into_iter()
                    .map(|(v, w)| format!("{w}{v}{w}"))
                    .collect();
                format!("[{}]", body.join(","))
            }),
            object_text(inner),
        ]
    })
}

fn object_text(values: impl Strategy<Value = String>) -> impl Strategy<Value = String> {
    (proptest::collection::btree_map("[a-z_]{1,8}", (values, ws()), 0..4)).prop_map(|m| {
        let body: Vec<String> = m
            .into_iter()
            .map(|(k, (v, w))| format!("{w}\"{k}\"{w}:{w}{v}{w}"))
            .collect();
        format!("{{{}}}", body.join(","))
    })
}

/// A body: top-level fields (never `visitors`) with `visitors` somewhere among them.
fn arb_body() -> impl Strategy<Value = (String, Vec<String>)> {
    (
        proptest::collection::btree_map("[a-u_]{1,10}", (arb_json_text(), ws()), 0..6),
        proptest::collection::vec((object_text(arb_json_text()), ws()), 0..6),
        any::<prop::sample::Index>(),
        ws(),
    )
        .prop_map(|(fields, visitors, at, w)| {
            let mut entries: Vec<String> = fields
                .into_iter()
                .map(|(k, (v, w))| format!("{w}\"{k}\"{w}:{w}{v}"))
                .collect();
            let list: Vec<String> = visitors.iter().map(|(v, w)| format!("{w}{v}{w}")).collect();
            let pos = at.index(entries.len() + 1);
            entries.insert(pos, format!("{w}\"visitors\":{w}[{}]", list.join(",")));
            let texts = visitors.into_iter().map(|(v, _)| v).collect();
            (format!("{w}{{{}}}{w}", entries.join(",")), texts)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn parse_encode_keeps_visitors_byte_for_byte((body, visitor_texts) in arb_body()) {
        let batch = RawBatch::parse(Bytes::from(body.clone())).unwrap();
        let got: Vec<&[u8]> = batch.visitors().iter().map(|v| &v[..]).collect();
        let want: Vec<&[u8]> = visitor_texts.iter().map(|v| v.as_bytes()).collect();
        prop_assert_eq!(got, want);

        let encoded = batch.encode();
        prop_assert_eq!(encoded.len(), batch.encoded_len());
        let before: Value = serde_json::from_str(&body).unwrap();
        let after: Value = serde_json::from_slice(&encoded).unwrap();
        prop_assert_eq!(before, after);

        // The canonical header is a fixed point: encoding then parsing again changes nothing.
        let again = RawBatch::parse(encoded.clone()).unwrap();
        prop_assert_eq!(again.header(), batch.header());
        prop_assert_eq!(again.visitors(), batch.visitors());
        prop_assert_eq!(again.encode(), encoded);
    }
}
