//! The Event API v1 `EventBatch` as typed values, for reading and inspecting payloads.
//!
//! [`crate::EventFactory`] does not build these: it serialises user events straight to
//! bytes (see [`crate::RawBatch`]). These types are what [`crate::LogEvent::params`] parses
//! those bytes back into, and what tests and listeners compare against. Optional fields
//! follow the SDKs: `decisions` is absent on conversions, `revenue`/`value`/`tags` when unset,
//! `cmab_uuid` when there was no bandit decision. Fields the SDKs do not send (Java's
//! `session_id`, Go's `region`, ...) are kept in `extra` so nothing read is lost.

use serde::{Deserialize, Serialize};

use crate::event::VisitorAttribute;

type Extra = serde_json::Map<String, serde_json::Value>;

/// One Event API request body.
///
/// ```
/// use tributary::EventBatch;
/// let json = r#"{"account_id":"1","project_id":"2","revision":"3","client_name":"c",
///   "client_version":"1","anonymize_ip":true,"enrich_decisions":true,"visitors":[]}"#;
/// let batch: EventBatch = serde_json::from_str(json).unwrap();
/// assert_eq!(batch.account_id, "1");
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventBatch {
    /// Optimizely account id.
    pub account_id: String,
    /// Project id.
    #[serde(default)]
    pub project_id: String,
    /// Datafile revision.
    #[serde(default)]
    pub revision: String,
    /// SDK name.
    #[serde(default)]
    pub client_name: String,
    /// SDK version.
    #[serde(default)]
    pub client_version: String,
    /// IP anonymization (the Event API's default is true).
    #[serde(default = "default_true")]
    pub anonymize_ip: bool,
    /// Ask the Event API to fill decisions in from the datafile; the SDKs send true.
    #[serde(default = "default_true")]
    pub enrich_decisions: bool,
    /// One entry per user event.
    pub visitors: Vec<Visitor>,
    /// Top-level fields not listed above.
    #[serde(flatten)]
    pub extra: Extra,
}

fn default_true() -> bool {
    true
}

/// One visitor: who, with which attributes, and what happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Visitor {
    /// What happened (one snapshot per user event, as the SDKs send).
    pub snapshots: Vec<Snapshot>,
    /// Visitor attributes.
    #[serde(default)]
    pub attributes: Vec<VisitorAttribute>,
    /// Visitor (user) id.
    pub visitor_id: String,
    /// Fields not listed above.
    #[serde(flatten)]
    pub extra: Extra,
}

/// Events and, for impressions, the decisions they record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The events.
    pub events: Vec<SnapshotEvent>,
    /// Decisions; absent for conversions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decisions: Option<Vec<Decision>>,
    /// Fields not listed above.
    #[serde(flatten)]
    pub extra: Extra,
}

/// One decision of an impression.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// Campaign (layer) id, or the experiment id when the layer id is empty.
    pub campaign_id: String,
    /// Experiment or rule id.
    pub experiment_id: String,
    /// Variation id, `null` unless all decimal digits.
    pub variation_id: Option<String>,
    /// Flag-level metadata.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<DecisionMetadata>,
    /// Fields not listed above.
    #[serde(flatten)]
    pub extra: Extra,
}

/// Flag decision metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecisionMetadata {
    /// Flag key.
    pub flag_key: String,
    /// Rule key.
    pub rule_key: String,
    /// Rule type (`feature-test`, `rollout`, ...).
    pub rule_type: String,
    /// Variation key.
    pub variation_key: String,
    /// Whether the flag was enabled.
    pub enabled: bool,
    /// Bandit decision id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmab_uuid: Option<String>,
}

/// One event in a snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotEvent {
    /// Campaign id (impressions) or event id (conversions).
    pub entity_id: String,
    /// Event UUID.
    pub uuid: String,
    /// `campaign_activated` or the event key.
    pub key: String,
    /// Milliseconds since the Unix epoch.
    pub timestamp: u64,
    /// Integral revenue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revenue: Option<i64>,
    /// Numeric value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    /// Event tags as given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<serde_json::Map<String, serde_json::Value>>,
    /// Fields not listed above.
    #[serde(flatten)]
    pub extra: Extra,
}
