//! A hand-written writer for one visitor object of an Event API body, byte-identical to what
//! serde_json makes of the same event (the test oracle below is the serde path it replaced).
//!
//! Why by hand: serde_json escapes every field name on every event, and field names and
//! punctuation are a third of a visitor's bytes. Here they are constant byte strings, copied;
//! string values take a fast path that checks eight bytes at a time for anything needing an
//! escape and copies the string whole when nothing does. Only what serde_json formats in ways
//! worth not re-implementing - numbers inside the conversion's `tags`, floats, strings that
//! need escaping - still goes through it, so those bytes are serde_json's by construction.
//! The body's header fields are written the same way.

use crate::event::{
    AttributeValue, EventContext, Impression, UserEvent, UserEventKind, VisitorAttribute,
};

/// The impression event key the Event API expects.
pub(crate) const ACTIVATE_EVENT_KEY: &str = "campaign_activated";

/// A visitor's bytes apart from its string values, rounded up: what to reserve on top of the
/// strings' lengths so that writing one visitor does not grow the buffer.
const VISITOR_OVERHEAD: usize = 320;
/// Per attribute, apart from its strings.
const ATTRIBUTE_OVERHEAD: usize = 64;

/// The visitor's length if none of its strings needs escaping and `tags` are small: an
/// estimate for reserving, never relied on for correctness.
pub(crate) fn estimated_len(e: &UserEvent) -> usize {
    let attrs: usize = e
        .attributes
        .iter()
        .map(|a| {
            let value = match &a.value {
                AttributeValue::String(s) => s.len(),
                _ => 24,
            };
            ATTRIBUTE_OVERHEAD + a.entity_id.len() + a.key.len() + a.kind.len() + value
        })
        .sum();
    let kind = match &e.kind {
        UserEventKind::Impression(imp) => {
            // The campaign id is written twice (event and decision).
            2 * imp.campaign_id.len().max(imp.experiment_id.len())
                + imp.experiment_id.len()
                + imp.variation_id.len()
                + imp.variation_key.len()
                + imp.flag_key.len()
                + imp.rule_key.len()
                + imp.rule_type.len()
                + imp.cmab_uuid.as_ref().map_or(0, |c| c.len() + 16)
        }
        UserEventKind::Conversion(conv) => {
            conv.event_id.len() + conv.event_key.len() + conv.tags.as_ref().map_or(0, |_| 128)
        }
    };
    VISITOR_OVERHEAD + attrs + kind + e.user_id.len() + e.uuid.len()
}

/// Appends the visitor object for `e` to `out`.
pub(crate) fn write_visitor(out: &mut Vec<u8>, e: &UserEvent) {
    out.extend_from_slice(br#"{"snapshots":[{"events":[{"entity_id":"#);
    match &e.kind {
        UserEventKind::Impression(imp) => {
            let campaign_id = if imp.campaign_id.is_empty() {
                &imp.experiment_id
            } else {
                &imp.campaign_id
            };
            write_str(out, campaign_id);
            write_event_tail(out, e, ACTIVATE_EVENT_KEY);
            str_field(out, br#"}],"decisions":[{"campaign_id":"#, campaign_id);
            str_field(out, br#","experiment_id":"#, &imp.experiment_id);
            out.extend_from_slice(br#","variation_id":"#);
            if is_numeric_id(&imp.variation_id) {
                write_str(out, &imp.variation_id);
            } else {
                out.extend_from_slice(b"null");
            }
            write_metadata(out, imp);
            out.extend_from_slice(b"]}],");
        }
        UserEventKind::Conversion(conv) => {
            write_str(out, &conv.event_id);
            write_event_tail(out, e, &conv.event_key);
            if let Some(revenue) = conv.revenue {
                out.extend_from_slice(br#","revenue":"#);
                out.extend_from_slice(itoa::Buffer::new().format(revenue).as_bytes());
            }
            if let Some(value) = conv.value {
                out.extend_from_slice(br#","value":"#);
                write_serde(out, &value);
            }
            if let Some(tags) = &conv.tags {
                out.extend_from_slice(br#","tags":"#);
                write_json_map(out, tags);
            }
            out.extend_from_slice(b"}]}],");
        }
    }
    out.extend_from_slice(br#""attributes":["#);
    for (i, attribute) in e.attributes.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_attribute(out, attribute);
    }
    str_field(out, br#"],"visitor_id":"#, &e.user_id);
    out.push(b'}');
}

/// `,"uuid":..,"key":..,"timestamp":N` of the snapshot's one event.
fn write_event_tail(out: &mut Vec<u8>, e: &UserEvent, key: &str) {
    str_field(out, br#","uuid":"#, &e.uuid);
    str_field(out, br#","key":"#, key);
    out.extend_from_slice(br#","timestamp":"#);
    out.extend_from_slice(itoa::Buffer::new().format(e.timestamp).as_bytes());
}

/// `,"metadata":{..}}` closing the decision object.
fn write_metadata(out: &mut Vec<u8>, imp: &Impression) {
    str_field(out, br#","metadata":{"flag_key":"#, &imp.flag_key);
    str_field(out, br#","rule_key":"#, &imp.rule_key);
    str_field(out, br#","rule_type":"#, &imp.rule_type);
    str_field(out, br#","variation_key":"#, &imp.variation_key);
    bool_field(out, br#","enabled":"#, imp.enabled);
    // The SDKs leave cmab_uuid out when it is empty as well as when it is unset.
    if let Some(cmab) = imp.cmab_uuid.as_deref().filter(|c| !c.is_empty()) {
        str_field(out, br#","cmab_uuid":"#, cmab);
    }
    out.extend_from_slice(b"}}");
}

fn write_attribute(out: &mut Vec<u8>, a: &VisitorAttribute) {
    str_field(out, br#"{"entity_id":"#, &a.entity_id);
    str_field(out, br#","key":"#, &a.key);
    str_field(out, br#","type":"#, &a.kind);
    out.extend_from_slice(br#","value":"#);
    match &a.value {
        AttributeValue::String(s) => write_str(out, s),
        AttributeValue::Bool(true) => out.extend_from_slice(b"true"),
        AttributeValue::Bool(false) => out.extend_from_slice(b"false"),
        AttributeValue::Int(n) => out.extend_from_slice(itoa::Buffer::new().format(*n).as_bytes()),
        AttributeValue::Float(f) => write_serde(out, f),
    }
    out.push(b'}');
}

/// Appends `name` (pre-escaped, with the punctuation before the value) and `value` as a
/// JSON string.
fn str_field(out: &mut Vec<u8>, name: &[u8], value: &str) {
    out.extend_from_slice(name);
    write_str(out, value);
}

/// Appends `name` (pre-escaped, with the punctuation before the value) and `value`.
fn bool_field(out: &mut Vec<u8>, name: &[u8], value: bool) {
    out.extend_from_slice(name);
    out.extend_from_slice(if value { b"true" } else { b"false" });
}

/// Values whose formatting must stay exactly serde_json's.
fn write_serde<T: serde::Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) {
    // Writing into a Vec cannot fail, and neither floats nor string-keyed maps of JSON
    // values can fail to serialise. Should that ever change, whatever was half written is
    // cut off and `null` written in its place, so the body stays valid JSON.
    let at = out.len();
    if let Err(e) = serde_json::to_writer(&mut *out, value) {
        tracing::error!(error = %e, "serialising a value failed; written as null");
        out.truncate(at);
        out.extend_from_slice(b"null");
    }
}

/// Appends `s` as a JSON string, escaped exactly as serde_json escapes it.
pub(crate) fn write_str(out: &mut Vec<u8>, s: &str) {
    if needs_escape(s.as_bytes()) {
        // Rare: ids, keys and values with quotes, backslashes or control characters.
        write_serde(out, s);
    } else {
        out.reserve(s.len() + 2);
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    }
}

const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);

/// A high bit set in the byte lanes of `x` that are zero (exact as to whether any is).
#[inline]
fn zero_lanes(x: u64) -> u64 {
    x.wrapping_sub(ONES) & !x & HIGHS
}

/// Whether any byte is `"`, `\` or below 0x20: what serde_json escapes (it writes every
/// other byte, non-ASCII included, as it is). Eight bytes at a time, the tail too: most ids
/// and keys are shorter than 16 bytes, so a byte-at-a-time tail loop cost as much as the rest.
///
/// Every lane is loaded straight from the string. The tail used to be copied into a padded
/// buffer and read back as one word; the CPU cannot forward a copy of a few bytes to a
/// wider load, and that stall was over half of this function's samples.
#[inline]
fn needs_escape(bytes: &[u8]) -> bool {
    let n = bytes.len();
    if n < 8 {
        return lane_needs_escape(short_lane(bytes));
    }
    let mut chunks = bytes.chunks_exact(8);
    for chunk in &mut chunks {
        if lane_needs_escape(word(chunk)) {
            return true;
        }
    }
    // The last eight bytes, overlapping the last chunk: checking a byte twice is harmless.
    !chunks.remainder().is_empty() && lane_needs_escape(word(&bytes[n - 8..]))
}

/// The first eight bytes of `b` (at least eight long) as one word.
#[inline]
fn word(b: &[u8]) -> u64 {
    let mut lane = [0u8; 8];
    lane.copy_from_slice(&b[..8]);
    u64::from_ne_bytes(lane)
}

/// Up to seven bytes as one word, from two overlapping loads, the lanes left over filled
/// with `a` (which needs no escape).
#[inline]
fn short_lane(b: &[u8]) -> u64 {
    const PAD: u64 = u64::from_ne_bytes([b'a'; 8]);
    let n = b.len();
    match n {
        0 => PAD,
        1 => u64::from(b[0]) | (PAD & !0xff),
        2 | 3 => {
            let lo = u64::from(u16::from_ne_bytes([b[0], b[1]]));
            let hi = u64::from(u16::from_ne_bytes([b[n - 2], b[n - 1]]));
            lo | (hi << 16) | (PAD & !0xffff_ffff)
        }
        _ => {
            let lo = u64::from(u32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
            let hi = u64::from(u32::from_ne_bytes([b[n - 4], b[n - 3], b[n - 2], b[n - 1]]));
            lo | (hi << 32)
        }
    }
}

#[inline]
fn lane_needs_escape(x: u64) -> bool {
    // Bytes below 0x20: subtracting 0x20 borrows into the high bit only from such a byte
    // (for a byte with its own high bit clear), so whether any lane does is exact.
    let control = x.wrapping_sub(ONES * 0x20) & !x & HIGHS;
    let quote = zero_lanes(x ^ (ONES * u64::from(b'"')));
    let backslash = zero_lanes(x ^ (ONES * u64::from(b'\\')));
    control | quote | backslash != 0
}

/// Appends the header fields of a body (the object's members before `"visitors"`, without
/// braces), in the order the Python SDK writes them.
pub(crate) fn write_header_fields(out: &mut Vec<u8>, ctx: &EventContext) {
    str_field(out, br#""account_id":"#, &ctx.account_id);
    str_field(out, br#","project_id":"#, &ctx.project_id);
    str_field(out, br#","revision":"#, &ctx.revision);
    str_field(out, br#","client_name":"#, &ctx.client_name);
    str_field(out, br#","client_version":"#, &ctx.client_version);
    bool_field(out, br#","anonymize_ip":"#, ctx.anonymize_ip);
    out.extend_from_slice(br#","enrich_decisions":true"#);
}

/// A JSON value as serde_json writes it (compact), with strings and object keys through the
/// fast escape path and only numbers left to serde_json.
fn write_json_value(out: &mut Vec<u8>, v: &serde_json::Value) {
    use serde_json::Value;
    match v {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(n) => write_serde(out, n),
        Value::String(s) => write_str(out, s),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_json_value(out, item);
            }
            out.push(b']');
        }
        Value::Object(map) => write_json_map(out, map),
    }
}

fn write_json_map(out: &mut Vec<u8>, map: &serde_json::Map<String, serde_json::Value>) {
    out.push(b'{');
    for (i, (key, value)) in map.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_str(out, key);
        out.push(b':');
        write_json_value(out, value);
    }
    out.push(b'}');
}

/// The Event API takes a variation id only as a non-empty string of ASCII digits.
fn is_numeric_id(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// The serde path `write_visitor` replaced, kept as the oracle its output must equal.
#[cfg(test)]
mod oracle {
    use serde::ser::{SerializeMap, SerializeStruct};
    use serde::{Serialize, Serializer};

    use super::{ACTIVATE_EVENT_KEY, is_numeric_id};
    use crate::event::{UserEvent, UserEventKind};

    /// Serialises a user event as one visitor object without building intermediate values.
    pub(super) struct VisitorRef<'a>(pub(super) &'a UserEvent);

    impl Serialize for VisitorRef<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let e = self.0;
            let mut v = s.serialize_struct("Visitor", 3)?;
            v.serialize_field("snapshots", &[SnapshotRef(e)])?;
            v.serialize_field("attributes", &e.attributes)?;
            v.serialize_field("visitor_id", &e.user_id)?;
            v.end()
        }
    }

    struct SnapshotRef<'a>(&'a UserEvent);

    impl Serialize for SnapshotRef<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let e = self.0;
            match &e.kind {
                UserEventKind::Impression(imp) => {
                    let campaign_id = if imp.campaign_id.is_empty() {
                        &imp.experiment_id
                    } else {
                        &imp.campaign_id
                    };
                    let mut snap = s.serialize_struct("Snapshot", 2)?;
                    snap.serialize_field(
                        "events",
                        &[EventRef {
                            entity_id: campaign_id,
                            uuid: &e.uuid,
                            key: ACTIVATE_EVENT_KEY,
                            timestamp: e.timestamp,
                            revenue: None,
                            value: None,
                            tags: None,
                        }],
                    )?;
                    let variation_id =
                        is_numeric_id(&imp.variation_id).then_some(imp.variation_id.as_str());
                    snap.serialize_field(
                        "decisions",
                        &[DecisionRef {
                            campaign_id,
                            experiment_id: &imp.experiment_id,
                            variation_id,
                            metadata: MetadataRef(imp),
                        }],
                    )?;
                    snap.end()
                }
                UserEventKind::Conversion(conv) => {
                    let mut snap = s.serialize_struct("Snapshot", 1)?;
                    snap.serialize_field(
                        "events",
                        &[EventRef {
                            entity_id: &conv.event_id,
                            uuid: &e.uuid,
                            key: &conv.event_key,
                            timestamp: e.timestamp,
                            revenue: conv.revenue,
                            value: conv.value,
                            tags: conv.tags.as_ref(),
                        }],
                    )?;
                    snap.end()
                }
            }
        }
    }

    #[derive(Serialize)]
    struct EventRef<'a> {
        entity_id: &'a str,
        uuid: &'a str,
        key: &'a str,
        timestamp: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        revenue: Option<i64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        value: Option<f64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        tags: Option<&'a serde_json::Map<String, serde_json::Value>>,
    }

    #[derive(Serialize)]
    struct DecisionRef<'a> {
        campaign_id: &'a str,
        experiment_id: &'a str,
        variation_id: Option<&'a str>,
        metadata: MetadataRef<'a>,
    }

    /// The header fields as the factory serialised them with serde_json (braces stripped).
    pub(super) fn header(ctx: &crate::event::EventContext) -> Vec<u8> {
        #[derive(Serialize)]
        struct Header<'a> {
            account_id: &'a str,
            project_id: &'a str,
            revision: &'a str,
            client_name: &'a str,
            client_version: &'a str,
            anonymize_ip: bool,
            enrich_decisions: bool,
        }
        let header = Header {
            account_id: &ctx.account_id,
            project_id: &ctx.project_id,
            revision: &ctx.revision,
            client_name: &ctx.client_name,
            client_version: &ctx.client_version,
            anonymize_ip: ctx.anonymize_ip,
            enrich_decisions: true,
        };
        let mut json = serde_json::to_vec(&header).expect("the header serialises");
        json.pop();
        json.remove(0);
        json
    }

    struct MetadataRef<'a>(&'a crate::event::Impression);

    impl Serialize for MetadataRef<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let imp = self.0;
            let cmab = imp.cmab_uuid.as_deref().filter(|c| !c.is_empty());
            let mut m = s.serialize_map(Some(5 + usize::from(cmab.is_some())))?;
            m.serialize_entry("flag_key", &imp.flag_key)?;
            m.serialize_entry("rule_key", &imp.rule_key)?;
            m.serialize_entry("rule_type", &imp.rule_type)?;
            m.serialize_entry("variation_key", &imp.variation_key)?;
            m.serialize_entry("enabled", &imp.enabled)?;
            if let Some(cmab) = cmab {
                m.serialize_entry("cmab_uuid", cmab)?;
            }
            m.end()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;
    use std::sync::Arc;

    use proptest::prelude::*;

    use super::*;
    use crate::event::{Conversion, EventContext};

    fn by_serde(e: &UserEvent) -> Vec<u8> {
        serde_json::to_vec(&oracle::VisitorRef(e)).expect("the oracle serialises")
    }

    fn by_hand(e: &UserEvent) -> Vec<u8> {
        let mut out = Vec::new();
        write_visitor(&mut out, e);
        out
    }

    /// Strings mixing what needs escaping with what does not, around the 8-byte chunks.
    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            Just(String::new()),
            "[a-zA-Z0-9_-]{0,40}",
            "[\"\\\\\\x00-\\x1f\\x7f a-z]{0,20}",
            "\\PC{0,24}",
            "[\u{e9}\u{4e2d}\u{1F600}\u{2028}\u{2029}\u{feff}a\"]{0,12}",
            any::<String>(),
        ]
    }

    /// Harder strings for the escape check alone (nested in the visitor strategy they make
    /// its value tree too deep for a debug build's test-thread stack).
    fn escape_text() -> impl Strategy<Value = String> {
        prop_oneof![
            text(),
            // Control bytes beside multi-byte UTF-8, and past the first few chunks.
            "[\\x00-\\x1f\"\\\\a-z\u{e9}\u{4e2d}\u{1F600}\u{2028}]{0,40}",
            // A clean string of up to 64 bytes with one byte needing escape anywhere in it.
            (
                "[a-z\u{e9}]{0,64}",
                0usize..65,
                prop_oneof![Just('"'), Just('\\'), (0u8..0x20).prop_map(char::from)]
            )
                .prop_map(|(s, at, c)| {
                    let mut chars: Vec<char> = s.chars().collect();
                    chars.insert(at.min(chars.len()), c);
                    chars.into_iter().collect()
                }),
        ]
    }

    fn number() -> impl Strategy<Value = f64> {
        prop_oneof![
            any::<f64>(),
            Just(0.0),
            Just(-0.0),
            Just(3.5),
            Just(1e21),
            Just(1e-7),
            Just(f64::NAN),
            Just(f64::INFINITY),
        ]
    }

    fn attribute_value() -> impl Strategy<Value = AttributeValue> {
        prop_oneof![
            text().prop_map(|s| AttributeValue::String(s.into())),
            any::<bool>().prop_map(AttributeValue::Bool),
            any::<i64>().prop_map(AttributeValue::Int),
            number().prop_map(AttributeValue::Float),
        ]
    }

    fn attribute() -> impl Strategy<Value = VisitorAttribute> {
        (
            text(),
            text(),
            prop_oneof![Just(Cow::Borrowed("custom")), text().prop_map(Cow::Owned)],
            attribute_value(),
        )
            .prop_map(|(entity_id, key, kind, value)| VisitorAttribute {
                entity_id: entity_id.into(),
                key: key.into(),
                kind,
                value,
            })
    }

    fn json_value() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<u64>().prop_map(serde_json::Value::from),
            number().prop_map(serde_json::Value::from),
            text().prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
                prop::collection::vec((text(), inner), 0..4)
                    .prop_map(|kv| serde_json::Value::Object(kv.into_iter().collect())),
            ]
        })
    }

    fn variation_id() -> impl Strategy<Value = String> {
        prop_oneof![
            Just(String::new()),
            "[0-9]{1,12}",
            "[0-9]{0,4}[a-z -]{1,3}",
            text()
        ]
    }

    fn impression() -> impl Strategy<Value = UserEventKind> {
        (
            (text(), text(), variation_id(), text()),
            (text(), text(), text(), any::<bool>()),
            prop_oneof![
                Just(None),
                Just(Some(String::new())),
                text().prop_map(Some),
                "[0-9a-f-]{36}".prop_map(Some),
            ],
        )
            .prop_map(
                |(
                    (campaign_id, experiment_id, variation_id, variation_key),
                    (flag_key, rule_key, rule_type, enabled),
                    cmab_uuid,
                )| {
                    UserEventKind::Impression(Impression {
                        campaign_id: campaign_id.into(),
                        experiment_id: experiment_id.into(),
                        variation_id: variation_id.into(),
                        variation_key: variation_key.into(),
                        flag_key: flag_key.into(),
                        rule_key: rule_key.into(),
                        rule_type: rule_type.into(),
                        enabled,
                        cmab_uuid: cmab_uuid.map(Into::into),
                    })
                },
            )
    }

    fn conversion() -> impl Strategy<Value = UserEventKind> {
        (
            text(),
            text(),
            prop::option::of(any::<i64>()),
            prop::option::of(number()),
            prop::option::of(prop::collection::vec((text(), json_value()), 0..5)),
        )
            .prop_map(|(event_id, event_key, revenue, value, tags)| {
                UserEventKind::Conversion(Conversion {
                    event_id: event_id.into(),
                    event_key: event_key.into(),
                    revenue,
                    value,
                    tags: tags.map(|kv| kv.into_iter().collect()),
                })
            })
    }

    fn user_event() -> impl Strategy<Value = UserEvent> {
        (
            text(),
            prop::collection::vec(attribute(), 0..6),
            text(),
            any::<u64>(),
            prop_oneof![impression(), conversion()],
        )
            .prop_map(|(user_id, attributes, uuid, timestamp, kind)| UserEvent {
                context: Arc::new(EventContext::new("1", "2", "3")),
                user_id: user_id.into(),
                attributes,
                uuid: uuid.into(),
                timestamp,
                kind,
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn hand_written_visitor_is_byte_identical_to_serde(e in user_event()) {
            let hand = by_hand(&e);
            let serde = by_serde(&e);
            prop_assert_eq!(
                String::from_utf8_lossy(&hand),
                String::from_utf8_lossy(&serde)
            );
            prop_assert_eq!(hand, serde);
        }

        #[test]
        fn hand_written_header_is_byte_identical_to_serde(
            ids in (text(), text(), text(), text(), text()),
            anonymize_ip in any::<bool>(),
        ) {
            let (account_id, project_id, revision, client_name, client_version) = ids;
            let mut ctx = EventContext::new(account_id, project_id, revision);
            ctx.client_name = client_name;
            ctx.client_version = client_version;
            ctx.anonymize_ip = anonymize_ip;
            let mut hand = Vec::new();
            write_header_fields(&mut hand, &ctx);
            prop_assert_eq!(hand, oracle::header(&ctx));
        }

        #[test]
        fn escaped_strings_are_byte_identical_to_serde(s in escape_text()) {
            let mut hand = Vec::new();
            write_str(&mut hand, &s);
            prop_assert_eq!(hand, serde_json::to_vec(&s).expect("a str serialises"));
        }
    }

    #[test]
    fn every_byte_that_needs_an_escape_is_found_in_every_lane() {
        // Every byte, on an ASCII background and on backgrounds of high bytes (which must
        // neither hide a byte that needs escaping nor pass for one).
        for background in [b'a', 0x80, 0xbf, 0xff] {
            for b in 0u8..=0xff {
                let expected = b < 0x20 || b == b'"' || b == b'\\';
                for len in 1..=17 {
                    for at in 0..len {
                        let mut bytes = vec![background; len];
                        bytes[at] = b;
                        assert_eq!(
                            needs_escape(&bytes),
                            expected,
                            "byte {b:#x} at {at} of {len} on {background:#x}"
                        );
                    }
                }
            }
        }
        // Non-ASCII bytes, alone or beside a byte below 0x20, never hide or fake one.
        assert!(!needs_escape(
            "\u{ff}\u{80}\u{7ff}\u{10ffff}é中😀".as_bytes()
        ));
        assert!(needs_escape("é\u{1}中😀abcdefgh".as_bytes()));
    }
}
