//! The user events an application records: impressions and conversions, with the
//! context (account, project, datafile revision, client) they were decided in.
//!
//! These are the inputs of the pipeline. They carry what the SDK knows at decision
//! time; [`crate::EventFactory`] turns many of them into one Event API payload.
//!
//! Their strings are [`CompactString`]s (re-exported as `tributary::CompactString`, so
//! callers need no dependency of their own): an id, key or visitor id of up to 24 bytes,
//! which is nearly all of them, is held inside the event instead of in an allocation of its
//! own. An event is built on the application's thread and freed on a dispatch worker's, and
//! each separate allocation costs a `malloc` there and a cross-thread `free` here: with
//! `String`s those frees were a fifth of the processor's samples (BENCHMARKS.md,
//! 2026-12-07). Build them from `&str` or `String` with `.into()`; read them as `&str`
//! (`CompactString` derefs to `str`).

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

pub use compact_str::CompactString;
use serde::{Deserialize, Serialize};

/// Where the Event API lives for a project. EU projects must never be sent to the US
/// endpoint, so the region is part of an event's context.
///
/// ```
/// use tributary::Region;
/// assert_eq!(Region::Eu.endpoint(), "https://eu.logx.optimizely.com/v1/events");
/// assert_eq!("eu".parse::<Region>().unwrap(), Region::Eu);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum Region {
    /// `https://logx.optimizely.com/v1/events`
    #[default]
    #[serde(rename = "US")]
    Us,
    /// `https://eu.logx.optimizely.com/v1/events`
    #[serde(rename = "EU")]
    Eu,
}

impl Region {
    /// The Event API endpoint of this region.
    pub fn endpoint(self) -> &'static str {
        match self {
            Region::Us => "https://logx.optimizely.com/v1/events",
            Region::Eu => "https://eu.logx.optimizely.com/v1/events",
        }
    }
}

impl std::str::FromStr for Region {
    type Err = UnknownRegion;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("us") {
            Ok(Region::Us)
        } else if s.eq_ignore_ascii_case("eu") {
            Ok(Region::Eu)
        } else {
            Err(UnknownRegion(s.to_owned()))
        }
    }
}

impl fmt::Display for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Region::Us => "US",
            Region::Eu => "EU",
        })
    }
}

/// A region name other than `US` or `EU`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown region {0:?}: expected \"US\" or \"EU\"")]
pub struct UnknownRegion(pub String);

/// Everything about an event that is the same for a whole payload: two events may share a
/// payload only if their contexts are equal.
///
/// Build one per datafile revision and share it through an [`Arc`]: comparing two events'
/// contexts is then usually a pointer comparison.
///
/// ```
/// use tributary::{EventContext, Region};
/// let ctx = EventContext::new("12133785640", "21537940595", "131");
/// assert_eq!(ctx.client_name, "tributary");
/// assert_eq!(ctx.region, Region::Us);
/// assert!(ctx.anonymize_ip);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct EventContext {
    /// Optimizely account id.
    pub account_id: String,
    /// Project id.
    pub project_id: String,
    /// Datafile revision the decisions were made with.
    pub revision: String,
    /// SDK name sent as `client_name` (debugging aid for the Event API).
    pub client_name: String,
    /// SDK version sent as `client_version`.
    pub client_version: String,
    /// Whether the Event API should anonymize the visitor's IP address.
    pub anonymize_ip: bool,
    /// The datafile's `botFiltering`: when set, every visitor carries a
    /// `$opt_bot_filtering` attribute with this value.
    pub bot_filtering: Option<bool>,
    /// Which Event API endpoint the events belong to.
    pub region: Region,
}

impl EventContext {
    /// A context with this crate as client, IP anonymization on, no bot filtering, US region.
    pub fn new(
        account_id: impl Into<String>,
        project_id: impl Into<String>,
        revision: impl Into<String>,
    ) -> Self {
        EventContext {
            account_id: account_id.into(),
            project_id: project_id.into(),
            revision: revision.into(),
            client_name: crate::CLIENT_NAME.to_owned(),
            client_version: crate::CLIENT_VERSION.to_owned(),
            anonymize_ip: true,
            bot_filtering: None,
            region: Region::Us,
        }
    }
}

/// The value of a visitor attribute as the Event API accepts it: a string, a boolean or a
/// finite number. Integers and floats are kept apart so `34` stays `34` and `34.0` stays `34.0`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum AttributeValue {
    /// A string value.
    String(CompactString),
    /// A boolean value.
    Bool(bool),
    /// An integer value (within ±2^53 when built by [`crate::UserEventFactory`]).
    Int(i64),
    /// A finite floating-point value.
    Float(f64),
}

/// One visitor attribute, in the Event API's shape.
///
/// ```
/// use tributary::{AttributeValue, VisitorAttribute};
/// let a = VisitorAttribute::custom("21554750045", "country", AttributeValue::String("DE".into()));
/// assert_eq!(a.kind, "custom");
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VisitorAttribute {
    /// Attribute id from the datafile, or the reserved key for `$opt_*` attributes.
    pub entity_id: CompactString,
    /// Attribute key.
    pub key: CompactString,
    /// Always `"custom"` for what the SDKs send. Borrowed when static, so building an
    /// attribute costs no allocation for it.
    #[serde(rename = "type")]
    pub kind: Cow<'static, str>,
    /// The attribute's value.
    pub value: AttributeValue,
}

impl VisitorAttribute {
    /// A `"custom"` attribute.
    pub fn custom(
        entity_id: impl Into<CompactString>,
        key: impl Into<CompactString>,
        value: AttributeValue,
    ) -> Self {
        VisitorAttribute {
            entity_id: entity_id.into(),
            key: key.into(),
            kind: Cow::Borrowed("custom"),
            value,
        }
    }
}

/// A decision: the user was bucketed into a variation of a rule of a flag.
#[derive(Debug, Clone, PartialEq)]
pub struct Impression {
    /// The experiment's layer (campaign) id; empty falls back to the experiment id.
    pub campaign_id: CompactString,
    /// Experiment or rollout rule id.
    pub experiment_id: CompactString,
    /// Variation id as the datafile has it; sent as `null` unless it is all decimal digits.
    pub variation_id: CompactString,
    /// Variation key.
    pub variation_key: CompactString,
    /// Flag key.
    pub flag_key: CompactString,
    /// Rule key.
    pub rule_key: CompactString,
    /// `"feature-test"`, `"rollout"`, `"experiment"`, `"holdout"`, ...
    pub rule_type: CompactString,
    /// Whether the flag was enabled for the user.
    pub enabled: bool,
    /// Contextual multi-armed bandit decision id, when there was one.
    pub cmab_uuid: Option<CompactString>,
}

/// A conversion: the user did something that is measured (`track`).
#[derive(Debug, Clone, PartialEq)]
pub struct Conversion {
    /// Event id from the datafile.
    pub event_id: CompactString,
    /// Event key.
    pub event_key: CompactString,
    /// `revenue` taken from the tags (integral, in cents).
    pub revenue: Option<i64>,
    /// `value` taken from the tags (finite).
    pub value: Option<f64>,
    /// The event tags, sent as they were given; `None` omits `tags`.
    pub tags: Option<serde_json::Map<String, serde_json::Value>>,
}

/// What kind of user event this is.
#[derive(Debug, Clone, PartialEq)]
pub enum UserEventKind {
    /// A decision.
    Impression(Impression),
    /// A tracked event.
    Conversion(Conversion),
}

/// One user event: an impression or a conversion, with who, when and in what context.
///
/// ```
/// use std::sync::Arc;
/// use tributary::{Conversion, EventContext, UserEvent, UserEventKind};
/// let ctx = Arc::new(EventContext::new("1", "2", "3"));
/// let event = UserEvent::new(ctx, "user-1", vec![], UserEventKind::Conversion(Conversion {
///     event_id: "7".into(), event_key: "purchase".into(),
///     revenue: Some(4200), value: None, tags: None,
/// }));
/// assert_eq!(event.uuid.len(), 36);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct UserEvent {
    /// Shared context; events with equal contexts may share a payload.
    pub context: Arc<EventContext>,
    /// The visitor id.
    pub user_id: CompactString,
    /// Visitor attributes, already filtered to what the Event API accepts.
    pub attributes: Vec<VisitorAttribute>,
    /// A v4 UUID identifying this event (deduplication key upstream).
    pub uuid: CompactString,
    /// Milliseconds since the Unix epoch.
    pub timestamp: u64,
    /// Impression or conversion.
    pub kind: UserEventKind,
}

impl UserEvent {
    /// An event stamped now with a fresh v4 UUID.
    pub fn new(
        context: Arc<EventContext>,
        user_id: impl Into<CompactString>,
        attributes: Vec<VisitorAttribute>,
        kind: UserEventKind,
    ) -> Self {
        UserEvent {
            context,
            user_id: user_id.into(),
            attributes,
            uuid: new_uuid(),
            timestamp: now_millis(),
            kind,
        }
    }
}

/// A fresh v4 UUID in its hyphenated form, written without a `String` in between.
pub(crate) fn new_uuid() -> CompactString {
    let mut buf = uuid::Uuid::encode_buffer();
    CompactString::from(&*uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buf))
}

/// Milliseconds since the Unix epoch; 0 if the clock is before 1970.
pub(crate) fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_new_uuid_is_a_lowercase_hyphenated_v4() {
        let a = new_uuid();
        let parsed = uuid::Uuid::parse_str(&a).unwrap();
        assert_eq!(parsed.get_version_num(), 4);
        assert_eq!(a, parsed.hyphenated().to_string());
        assert_ne!(a, new_uuid());
    }

    /// What the inline strings are for: an event of the fixtures' shape allocates nothing
    /// for its ids, keys, visitor id and short attribute values, so the dispatch worker
    /// that frees it has nothing of them to free.
    #[test]
    fn the_ids_and_keys_of_a_typical_event_are_held_inline() {
        let impression = Impression {
            campaign_id: "9300000010000".into(),
            experiment_id: "9300000010001".into(),
            variation_id: "410102".into(),
            variation_key: "treatment".into(),
            flag_key: "checkout_redesign".into(),
            rule_key: "checkout_redesign_ab".into(),
            rule_type: "feature-test".into(),
            enabled: true,
            cmab_uuid: None,
        };
        let attribute = VisitorAttribute::custom(
            "21554750045",
            "country",
            AttributeValue::String("DE".into()),
        );
        let ctx = Arc::new(EventContext::new("12133785640", "21537940595", "131"));
        let event = UserEvent::new(
            ctx,
            String::from("visitor-0123456789"),
            vec![attribute.clone()],
            UserEventKind::Impression(impression.clone()),
        );
        let AttributeValue::String(value) = &attribute.value else {
            unreachable!("built as a string above")
        };
        let inline = [
            &event.user_id,
            &impression.campaign_id,
            &impression.experiment_id,
            &impression.variation_id,
            &impression.variation_key,
            &impression.flag_key,
            &impression.rule_key,
            &impression.rule_type,
            &attribute.entity_id,
            &attribute.key,
            value,
        ];
        for s in inline {
            assert!(!s.is_heap_allocated(), "{s:?} is on the heap");
        }
        // Longer strings work as before, from their own allocation (a uuid is 36 bytes).
        assert!(event.uuid.is_heap_allocated());
        let long = CompactString::from("x".repeat(1000));
        assert_eq!(long.len(), 1000);
    }
}
