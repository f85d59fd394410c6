//! [`UserEventFactory`]: impressions and conversions built from a datafile the way the
//! official SDKs build them (Python SDK 5.7.0 is the reference).
//!
//! **Which factory?** This one, `UserEventFactory`, turns *one decision or one conversion*
//! plus a datafile into one [`UserEvent`] (ids looked up by key, attributes filtered). The
//! other one, [`EventFactory`](crate::EventFactory), turns *many user events* into Event API
//! request bodies ([`LogEvent`](crate::LogEvent)s); the [`BatchEventProcessor`](crate::BatchEventProcessor)
//! calls it for you, so an application usually needs only this one.
//!
//! It does not decide anything: bucketing, audiences and rule evaluation are the SDK's job.
//! You tell it which variation of which rule a user got (what `decide` returned), and it
//! records that as an impression.
//!
//! - Attributes: in the order given, only keys the datafile declares (or with the reserved
//!   `$opt_` prefix, sent with the key as id), only values the Event API takes (string,
//!   boolean, or a finite number within ±2^53); then `$opt_bot_filtering` when the
//!   datafile's `botFiltering` is a boolean. No attributes: [`NO_ATTRIBUTES`] (a bare `[]`
//!   does not compile, error E0283, because its element type cannot be inferred).
//! - Tags: sent as given, except that, like the SDK, null-valued `revenue`, `value`, `tags`
//!   and `decisions` keys are dropped from every object in them; `revenue` is taken from an integral, non-boolean number; `value`
//!   from a finite number or a string Python's `float()` reads as a finite number.
//! - Impressions: described by an [`ImpressionRequest`] and built with
//!   [`UserEventFactory::build_impression`]. The rule is looked up among the flag's
//!   experiments (`rule_type` `"feature-test"`), then its rollout's rules (`"rollout"`);
//!   `campaign_id` is the rule's layer id; the variation is looked up by key in that rule.
//!
//! Attribute order matters: the payload's `attributes` is an array, and the SDK keeps the
//! caller's insertion order. So attributes are taken as any sequence of `(key, value)` pairs,
//! not as a `serde_json::Map` (which sorts its keys unless serde_json's `preserve_order`
//! feature is on). [`parse_json_object`] reads a JSON object text into such a sequence,
//! keeping its order.
//!
//! ```
//! use std::sync::Arc;
//! use serde_json::json;
//! use tributary::datafile::ProjectConfig;
//! use tributary::user_event_factory::{ImpressionRequest, NO_ATTRIBUTES, UserEventFactory};
//!
//! let config = ProjectConfig::from_json(r#"{"version": "4", "accountId": "1",
//!     "projectId": "2", "revision": "3", "botFiltering": true,
//!     "attributes": [{"id": "11", "key": "plan"}],
//!     "events": [{"id": "21", "key": "purchase"}]}"#).unwrap();
//! let factory = UserEventFactory::new(Arc::new(config));
//! let tags = json!({"revenue": 4200, "value": "3.5"});
//! let event = factory.conversion("user-1", [("plan", json!("free")), ("other", json!(1))],
//!     "purchase", tags.as_object()).unwrap();
//! assert_eq!(event.attributes.len(), 2); // plan, $opt_bot_filtering
//!
//! let bare = factory.conversion("user-2", NO_ATTRIBUTES, "purchase", None).unwrap();
//! assert_eq!(bare.attributes.len(), 1); // $opt_bot_filtering only
//! ```

use std::borrow::Borrow;
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use serde::Deserialize;
use serde::de::{MapAccess, Visitor};
use serde_json::{Map, Value};

use crate::datafile::{Experiment, ProjectConfig, Variation};
use crate::event::{
    AttributeValue, CompactString, Conversion, EventContext, Impression, UserEvent, UserEventKind,
    VisitorAttribute,
};

/// Attribute keys with this prefix are Optimizely's own (`$opt_user_agent`,
/// `$opt_bucketing_id`, ...): sent even though the datafile does not declare them.
pub const RESERVED_ATTRIBUTE_PREFIX: &str = "$opt_";
/// The attribute carrying the datafile's `botFiltering`.
pub const BOT_FILTERING_ATTRIBUTE: &str = "$opt_bot_filtering";
/// Largest magnitude of a numeric attribute value the Event API takes: 2^53.
pub const MAX_ATTRIBUTE_NUMBER: f64 = 9_007_199_254_740_992.0;

/// No attributes, with a type: pass it where a bare `[]` fails to compile (E0283, the element
/// type of an empty array cannot be inferred).
///
/// ```
/// # use std::sync::Arc;
/// use tributary::user_event_factory::{NO_ATTRIBUTES, UserEventFactory};
/// # let config = tributary::ProjectConfig::from_json(r#"{"version": "4", "accountId": "1",
/// #     "projectId": "2", "revision": "3", "events": [{"id": "21", "key": "purchase"}]}"#).unwrap();
/// let factory = UserEventFactory::new(Arc::new(config));
/// let event = factory.conversion("user-1", NO_ATTRIBUTES, "purchase", None).unwrap();
/// assert!(event.attributes.is_empty());
/// ```
pub const NO_ATTRIBUTES: [(&str, Value); 0] = [];

/// The tag `revenue` comes from.
const REVENUE_TAG: &str = "revenue";
/// The tag `value` comes from.
const VALUE_TAG: &str = "value";

/// Why an event could not be built: a key the datafile does not have.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventBuildError {
    /// No flag has this key.
    #[error("unknown flag {flag_key:?}; the datafile has {known}")]
    UnknownFlag {
        /// The key asked for.
        flag_key: String,
        /// The flag keys the datafile has.
        known: KnownKeys,
    },
    /// The flag has no experiment or rollout rule with this key.
    #[error("flag {flag_key:?} has no rule {rule_key:?}; its rules are {known}")]
    UnknownRule {
        /// The flag.
        flag_key: String,
        /// The rule key asked for.
        rule_key: String,
        /// The flag's rule keys.
        known: KnownKeys,
    },
    /// The rule has no variation with this key.
    #[error(
        "rule {rule_key:?} of flag {flag_key:?} has no variation {variation_key:?}; its variations are {known}"
    )]
    UnknownVariation {
        /// The flag.
        flag_key: String,
        /// The rule.
        rule_key: String,
        /// The variation key asked for.
        variation_key: String,
        /// The rule's variation keys.
        known: KnownKeys,
    },
    /// No event has this key.
    #[error("unknown event {event_key:?}; the datafile has {known}")]
    UnknownEvent {
        /// The key asked for.
        event_key: String,
        /// The event keys the datafile has.
        known: KnownKeys,
    },
}

/// The keys that would have been accepted, for error messages. Shows at most 10.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KnownKeys(pub Vec<String>);

impl KnownKeys {
    const SHOWN: usize = 10;

    fn of<'a>(keys: impl IntoIterator<Item = &'a str>) -> KnownKeys {
        KnownKeys(keys.into_iter().map(str::to_owned).collect())
    }
}

impl fmt::Display for KnownKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("none");
        }
        for (i, k) in self.0.iter().take(Self::SHOWN).enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{k:?}")?;
        }
        if self.0.len() > Self::SHOWN {
            write!(f, " and {} more", self.0.len() - Self::SHOWN)?;
        }
        Ok(())
    }
}

/// What an impression records: which variation of which rule of which flag a user got, as
/// the SDK decided it (this crate does not bucket). Build it with [`ImpressionRequest::new`]
/// or as a struct literal with `..Default::default()`, then pass it to
/// [`UserEventFactory::build_impression`].
///
/// ```
/// use tributary::user_event_factory::ImpressionRequest;
/// let req = ImpressionRequest::new("user-1", "checkout_redesign", "checkout_redesign_ab", "treatment")
///     .enabled(true)
///     .cmab_uuid("c0ffee");
/// assert_eq!(req.enabled, Some(true));
///
/// // The same, as a struct literal; left out: `enabled` from the variation, no CMAB id.
/// let req = ImpressionRequest {
///     user_id: "user-1",
///     flag_key: "checkout_redesign",
///     rule_key: "checkout_redesign_ab",
///     variation_key: "treatment",
///     ..Default::default()
/// };
/// assert_eq!(req.enabled, None);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ImpressionRequest<'a> {
    /// The visitor id.
    pub user_id: &'a str,
    /// Flag key.
    pub flag_key: &'a str,
    /// Rule key: one of the flag's experiments or rollout rules.
    pub rule_key: &'a str,
    /// Variation key within that rule.
    pub variation_key: &'a str,
    /// Whether the flag was on; `None` takes the variation's `featureEnabled`, which is what
    /// `decide` reports.
    pub enabled: Option<bool>,
    /// The contextual multi-armed bandit decision id, for CMAB rules.
    pub cmab_uuid: Option<&'a str>,
}

impl<'a> ImpressionRequest<'a> {
    /// A request with `enabled` from the variation and no CMAB id.
    pub fn new(
        user_id: &'a str,
        flag_key: &'a str,
        rule_key: &'a str,
        variation_key: &'a str,
    ) -> Self {
        ImpressionRequest {
            user_id,
            flag_key,
            rule_key,
            variation_key,
            enabled: None,
            cmab_uuid: None,
        }
    }

    /// Sets whether the flag was on.
    pub fn enabled(mut self, enabled: bool) -> Self {
        self.enabled = Some(enabled);
        self
    }

    /// Sets the CMAB decision id.
    pub fn cmab_uuid(mut self, cmab_uuid: &'a str) -> Self {
        self.cmab_uuid = Some(cmab_uuid);
        self
    }
}

/// Builds [`UserEvent`]s from a [`ProjectConfig`]. Every event it builds shares one
/// [`EventContext`], so they batch together.
#[derive(Debug, Clone)]
pub struct UserEventFactory {
    config: Arc<ProjectConfig>,
    context: Arc<EventContext>,
}

impl UserEventFactory {
    /// A factory whose events name this crate as client ([`crate::CLIENT_NAME`]).
    pub fn new(config: Arc<ProjectConfig>) -> Self {
        Self::with_client(config, crate::CLIENT_NAME, crate::CLIENT_VERSION)
    }

    /// A factory whose events carry this `client_name` and `client_version`.
    pub fn with_client(
        config: Arc<ProjectConfig>,
        client_name: impl Into<String>,
        client_version: impl Into<String>,
    ) -> Self {
        let context = Arc::new(config.event_context(client_name, client_version));
        UserEventFactory { config, context }
    }

    /// The datafile.
    pub fn config(&self) -> &Arc<ProjectConfig> {
        &self.config
    }

    /// The context shared by every event this factory builds.
    pub fn context(&self) -> &Arc<EventContext> {
        &self.context
    }

    /// An impression: `user_id` got `variation_key` of rule `rule_key` of `flag_key`.
    ///
    /// The positional form of [`build_impression`](Self::build_impression), kept for
    /// existing callers; prefer `build_impression` with an [`ImpressionRequest`], which
    /// names its fields and can take `enabled` from the datafile. No attributes:
    /// [`NO_ATTRIBUTES`].
    pub fn impression(
        &self,
        user_id: &str,
        attributes: impl IntoIterator<Item = impl AttributeEntry>,
        flag_key: &str,
        rule_key: &str,
        variation_key: &str,
        enabled: bool,
    ) -> Result<UserEvent, EventBuildError> {
        let req =
            ImpressionRequest::new(user_id, flag_key, rule_key, variation_key).enabled(enabled);
        self.build_impression(&req, attributes)
    }

    /// An impression described by `req`, with the visitor's `attributes` (any sequence of
    /// `(key, value)` pairs; [`NO_ATTRIBUTES`] for none).
    ///
    /// ```
    /// # use std::sync::Arc;
    /// use serde_json::json;
    /// use tributary::user_event_factory::{ImpressionRequest, NO_ATTRIBUTES, UserEventFactory};
    /// # let config = tributary::ProjectConfig::from_json(r#"{"version": "4", "accountId": "1",
    /// #   "projectId": "2", "revision": "3", "attributes": [{"id": "11", "key": "plan"}],
    /// #   "experiments": [{"id": "31", "key": "ab", "layerId": "41", "status": "Running",
    /// #     "variations": [{"id": "51", "key": "treatment", "featureEnabled": true}],
    /// #     "trafficAllocation": [], "audienceIds": [], "forcedVariations": {}}],
    /// #   "featureFlags": [{"id": "61", "key": "checkout", "experimentIds": ["31"],
    /// #     "rolloutId": "", "variables": []}]}"#).unwrap();
    /// let factory = UserEventFactory::new(Arc::new(config));
    /// let req = ImpressionRequest::new("user-1", "checkout", "ab", "treatment");
    /// let event = factory.build_impression(&req, [("plan", json!("pro"))]).unwrap();
    /// assert_eq!(event.attributes.len(), 1);
    /// let event = factory.build_impression(&req, NO_ATTRIBUTES).unwrap();
    /// assert!(event.attributes.is_empty());
    /// ```
    pub fn build_impression(
        &self,
        req: &ImpressionRequest<'_>,
        attributes: impl IntoIterator<Item = impl AttributeEntry>,
    ) -> Result<UserEvent, EventBuildError> {
        let (rule, rule_type, variation) = self.resolve(req)?;
        let impression = Impression {
            campaign_id: rule.layer_id.as_str().into(),
            experiment_id: rule.id.as_str().into(),
            variation_id: variation.id.as_str().into(),
            variation_key: variation.key.as_str().into(),
            flag_key: req.flag_key.into(),
            rule_key: rule.key.as_str().into(),
            rule_type: rule_type.into(),
            enabled: req.enabled.unwrap_or(variation.feature_enabled),
            cmab_uuid: req.cmab_uuid.map(CompactString::from),
        };
        Ok(UserEvent::new(
            self.context.clone(),
            req.user_id,
            self.attributes(attributes),
            UserEventKind::Impression(impression),
        ))
    }

    fn resolve(
        &self,
        req: &ImpressionRequest<'_>,
    ) -> Result<(&Experiment, &'static str, &Variation), EventBuildError> {
        let flag = self
            .config
            .flag(req.flag_key)
            .ok_or_else(|| EventBuildError::UnknownFlag {
                flag_key: req.flag_key.to_owned(),
                known: KnownKeys::of(self.config.flags().iter().map(|f| f.key.as_str())),
            })?;
        let rule = self.config.flag_rule(flag, req.rule_key).ok_or_else(|| {
            EventBuildError::UnknownRule {
                flag_key: req.flag_key.to_owned(),
                rule_key: req.rule_key.to_owned(),
                known: KnownKeys::of(
                    self.config
                        .flag_rules(flag)
                        .map(|r| r.experiment.key.as_str()),
                ),
            }
        })?;
        let variation = rule
            .experiment
            .variation(req.variation_key)
            .ok_or_else(|| EventBuildError::UnknownVariation {
                flag_key: req.flag_key.to_owned(),
                rule_key: req.rule_key.to_owned(),
                variation_key: req.variation_key.to_owned(),
                known: KnownKeys::of(rule.experiment.variations.iter().map(|v| v.key.as_str())),
            })?;
        Ok((rule.experiment, rule.rule_type.as_str(), variation))
    }

    /// A conversion: `user_id` did `event_key`. `tags` are sent as given (`None` omits
    /// them; an empty map is sent as `{}`, as the SDK does), but for the SDK's removal of
    /// null `revenue`, `value`, `tags` and `decisions` keys at any depth.
    pub fn conversion(
        &self,
        user_id: &str,
        attributes: impl IntoIterator<Item = impl AttributeEntry>,
        event_key: &str,
        tags: Option<&Map<String, Value>>,
    ) -> Result<UserEvent, EventBuildError> {
        let event = self
            .config
            .event(event_key)
            .ok_or_else(|| EventBuildError::UnknownEvent {
                event_key: event_key.to_owned(),
                known: KnownKeys::of(self.config.events().iter().map(|e| e.key.as_str())),
            })?;
        let conversion = Conversion {
            event_id: event.id.as_str().into(),
            event_key: event.key.as_str().into(),
            revenue: tags.and_then(revenue),
            value: tags.and_then(numeric_value),
            tags: tags.map(|t| {
                let mut t = t.clone();
                drop_sdk_nulls(&mut t);
                t
            }),
        };
        Ok(UserEvent::new(
            self.context.clone(),
            user_id,
            self.attributes(attributes),
            UserEventKind::Conversion(conversion),
        ))
    }

    /// The visitor attributes the SDK would send for `attributes`: known (or `$opt_`) keys
    /// with valid values, in the given order, then `$opt_bot_filtering` if the datafile has
    /// a boolean `botFiltering`.
    pub fn attributes(
        &self,
        attributes: impl IntoIterator<Item = impl AttributeEntry>,
    ) -> Vec<VisitorAttribute> {
        let mut out = Vec::new();
        for entry in attributes {
            let key = entry.key();
            let Some(value) = attribute_value(entry.value()) else {
                tracing::debug!(
                    key,
                    "attribute value not accepted by the Event API; left out"
                );
                continue;
            };
            let id = match self.config.attribute_id(key) {
                Some(id) => id,
                None if key.starts_with(RESERVED_ATTRIBUTE_PREFIX) => key,
                None => {
                    tracing::debug!(key, "attribute not in the datafile; left out");
                    continue;
                }
            };
            out.push(VisitorAttribute::custom(id, key, value));
        }
        if let Some(bot_filtering) = self.config.bot_filtering() {
            out.push(VisitorAttribute::custom(
                BOT_FILTERING_ATTRIBUTE,
                BOT_FILTERING_ATTRIBUTE,
                AttributeValue::Bool(bot_filtering),
            ));
        }
        out
    }
}

/// Keys the SDK's payload cleaner (`EventBatch._dict_clean`, a `json.loads`
/// `object_pairs_hook`) removes from every object of the payload when their value is null,
/// tags included, however deep.
const SDK_NULL_DROPPED_KEYS: [&str; 4] = ["revenue", "value", "tags", "decisions"];

/// Removes what the SDK's cleaner removes from the tags: `{"value": null, "a": {"tags": null}}`
/// is sent as `{"a": {}}`. Recursion is as deep as the tags, which serde_json bounds at 128
/// levels when they come from JSON text.
fn drop_sdk_nulls(map: &mut Map<String, Value>) {
    map.retain(|k, v| !(v.is_null() && SDK_NULL_DROPPED_KEYS.contains(&k.as_str())));
    for v in map.values_mut() {
        drop_sdk_nulls_in(v);
    }
}

fn drop_sdk_nulls_in(v: &mut Value) {
    match v {
        Value::Object(map) => drop_sdk_nulls(map),
        Value::Array(items) => items.iter_mut().for_each(drop_sdk_nulls_in),
        _ => {}
    }
}

/// One `(key, value)` attribute as given by the caller: a pair of anything string-like and
/// a [`Value`] (owned or borrowed), or a reference to such a pair. So a `&serde_json::Map`,
/// a `Vec<(String, Value)>`, a `&Vec<(String, Value)>` or an array of `(&str, Value)` all
/// serve as attributes.
pub trait AttributeEntry {
    /// The attribute key.
    fn key(&self) -> &str;
    /// The attribute value.
    fn value(&self) -> &Value;
}

impl<K: AsRef<str>, V: Borrow<Value>> AttributeEntry for (K, V) {
    fn key(&self) -> &str {
        self.0.as_ref()
    }
    fn value(&self) -> &Value {
        self.1.borrow()
    }
}

impl<K: AsRef<str>, V: Borrow<Value>> AttributeEntry for &(K, V) {
    fn key(&self) -> &str {
        self.0.as_ref()
    }
    fn value(&self) -> &Value {
        self.1.borrow()
    }
}

/// An attribute value the Event API accepts: a string, a boolean, or a finite number of
/// magnitude at most 2^53 (the SDK's `is_attribute_valid`). Integers stay integers.
pub fn attribute_value(value: &Value) -> Option<AttributeValue> {
    match value {
        Value::String(s) => Some(AttributeValue::String(s.as_str().into())),
        Value::Bool(b) => Some(AttributeValue::Bool(*b)),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                (i.unsigned_abs() <= 1 << 53).then_some(AttributeValue::Int(i))
            } else if n.is_u64() {
                // Only values over i64::MAX land here: far over 2^53.
                None
            } else {
                let f = n.as_f64()?;
                (f.is_finite() && f.abs() <= MAX_ATTRIBUTE_NUMBER)
                    .then_some(AttributeValue::Float(f))
            }
        }
        Value::Null | Value::Array(_) | Value::Object(_) => None,
    }
}

/// `revenue` from the tags: an integer (JSON number without fraction or exponent; `true` is
/// not one). Integers beyond the `i64` range, which the SDK would send, are left out.
pub fn revenue(tags: &Map<String, Value>) -> Option<i64> {
    match tags.get(REVENUE_TAG)? {
        Value::Number(n) => n.as_i64(),
        _ => None,
    }
}

/// `value` from the tags: a finite number, or a string Python's `float()` reads as one
/// (`" 1_000.5 "`, `"1e3"`, `"+.5"`). Booleans, `"nan"` and `"inf"` are not taken.
pub fn numeric_value(tags: &Map<String, Value>) -> Option<f64> {
    let v = match tags.get(VALUE_TAG)? {
        Value::Number(n) => n.as_f64()?,
        Value::String(s) => python_float(s)?,
        _ => return None,
    };
    v.is_finite().then_some(v)
}

/// Python's `float(str)`: surrounding whitespace, an optional sign, decimal digits with single
/// underscores between them, an optional fraction and exponent, or `inf`/`infinity`/`nan` in
/// any case. Python also accepts non-ASCII decimal digits (`"٣"`); this does not.
pub fn python_float(s: &str) -> Option<f64> {
    // Python's str.isspace() is Unicode White_Space plus the ASCII separators 0x1C-0x1F.
    let is_space = |c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c);
    let s = s.trim_matches(is_space);
    let body = s.strip_prefix(['+', '-']).unwrap_or(s);
    let lower = body.to_ascii_lowercase();
    if matches!(lower.as_str(), "inf" | "infinity" | "nan") {
        return s.parse().ok();
    }
    let bytes = body.as_bytes();
    let mut i = 0;
    // digits ("_"? digit)*; returns how many digits were read.
    let digits = |i: &mut usize| -> Option<usize> {
        let mut n = 0;
        while *i < bytes.len() {
            match bytes[*i] {
                b'0'..=b'9' => {
                    n += 1;
                    *i += 1;
                }
                b'_' if n > 0 && bytes.get(*i + 1).is_some_and(u8::is_ascii_digit) => *i += 1,
                b'_' => return None,
                _ => break,
            }
        }
        Some(n)
    };
    let int_digits = digits(&mut i)?;
    let mut frac_digits = 0;
    if bytes.get(i) == Some(&b'.') {
        i += 1;
        frac_digits = digits(&mut i)?;
    }
    if int_digits + frac_digits == 0 {
        return None;
    }
    if matches!(bytes.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(bytes.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        if digits(&mut i)? == 0 {
            return None;
        }
    }
    if i != bytes.len() {
        return None;
    }
    s.replace('_', "").parse().ok()
}

/// Parses the text of a JSON object into its `(key, value)` pairs in document order, for
/// callers that hold attributes as JSON (a `serde_json::Map` would sort them). A repeated key
/// keeps its first position and its last value, as Python's `json.loads` does.
///
/// ```
/// use tributary::user_event_factory::parse_json_object;
/// let pairs = parse_json_object(r#"{"country": "DE", "age": 34}"#).unwrap();
/// assert_eq!(pairs[0].0, "country");
/// assert!(parse_json_object("[1]").is_err());
/// ```
pub fn parse_json_object(text: &str) -> Result<Vec<(String, Value)>, serde_json::Error> {
    serde_json::from_str::<OrderedObject>(text).map(|o| o.0)
}

struct OrderedObject(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for OrderedObject {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = OrderedObject;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<OrderedObject, A::Error> {
                let mut pairs: Vec<(String, Value)> = Vec::new();
                let mut index: HashMap<String, usize> = HashMap::new();
                while let Some((k, v)) = map.next_entry::<String, Value>()? {
                    match index.get(&k) {
                        Some(&i) => pairs[i].1 = v,
                        None => {
                            index.insert(k.clone(), pairs.len());
                            pairs.push((k, v));
                        }
                    }
                }
                Ok(OrderedObject(pairs))
            }
        }
        d.deserialize_map(V)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use serde_json::json;

    #[test]
    fn python_float_grammar() {
        for (s, want) in [
            ("3.5", 3.5),
            (" \t-1_000.25e-1\n", -100.025),
            ("1E3", 1000.0),
            ("+.5", 0.5),
            ("5.", 5.0),
            ("1_0e1_0", 10e10),
            ("\u{2003}7\u{1f}", 7.0),
            ("-0", -0.0),
        ] {
            assert_eq!(python_float(s), Some(want), "{s:?}");
        }
        for s in [
            "", " ", ".", "1,234", "1__0", "_1", "1_", "1._5", "1e", "e5", "0x10", "1e+", "--1",
            "1 2", "١",
        ] {
            assert_eq!(python_float(s), None, "{s:?}");
        }
        assert!(python_float("-Infinity").unwrap().is_infinite());
        assert!(python_float("NaN").unwrap().is_nan());
    }

    #[test]
    fn value_and_revenue_rules() {
        let tags = |v: Value| v.as_object().cloned().unwrap();
        assert_eq!(numeric_value(&tags(json!({"value": "inf"}))), None);
        assert_eq!(numeric_value(&tags(json!({"value": true}))), None);
        assert_eq!(numeric_value(&tags(json!({"value": 7}))), Some(7.0));
        assert_eq!(revenue(&tags(json!({"revenue": 4200.0}))), None);
        assert_eq!(revenue(&tags(json!({"revenue": -5}))), Some(-5));
        assert_eq!(revenue(&tags(json!({"revenue": u64::MAX}))), None);
        assert_eq!(revenue(&tags(json!({"revenue": false}))), None);
    }

    #[test]
    fn attribute_value_limits() {
        assert_eq!(
            attribute_value(&json!(1u64 << 53)),
            Some(AttributeValue::Int(1 << 53))
        );
        assert_eq!(attribute_value(&json!(-(1i64 << 53) - 1)), None);
        assert_eq!(attribute_value(&json!(u64::MAX)), None);
        assert_eq!(attribute_value(&json!(1e300)), None);
        assert_eq!(
            attribute_value(&json!(34.0)),
            Some(AttributeValue::Float(34.0))
        );
        assert_eq!(attribute_value(&json!(null)), None);
    }

    #[test]
    fn ordered_object_keeps_order_and_last_duplicate() {
        let pairs = parse_json_object(r#"{"b": 1, "a": 2, "b": 3}"#).unwrap();
        assert_eq!(pairs, vec![("b".into(), json!(3)), ("a".into(), json!(2))]);
    }
}
