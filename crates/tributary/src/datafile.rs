//! [`ProjectConfig`]: a version-4 Optimizely datafile, parsed once into the lookups that
//! building events needs.
//!
//! Only what events carry is kept: ids and keys of attributes, events, experiments (top-level
//! and inside groups), rollouts and their rules, flags, and the variations of every rule,
//! plus the project-wide settings that go into an [`EventContext`]. Audiences, traffic
//! allocation and variables are bucketing concerns and are ignored.
//!
//! Defaults follow the Python SDK 5.7.0: absent lists are empty, an absent `anonymizeIP` is
//! `false`, an absent or null `botFiltering` means no `$opt_bot_filtering` attribute, an
//! absent, null or empty `region` is US. Where the SDK would go on with a broken datafile
//! (a missing id, a wrong type) this module stops with a [`DatafileError`] naming the JSON
//! path, because an event built from a guess is worse than no event.
//!
//! ```
//! use tributary::datafile::ProjectConfig;
//! let config = ProjectConfig::from_json(r#"{"version": "4", "accountId": "1",
//!     "projectId": "2", "revision": "3", "botFiltering": false,
//!     "attributes": [{"id": "11", "key": "plan"}]}"#).unwrap();
//! assert_eq!(config.attribute_id("plan"), Some("11"));
//! assert_eq!(config.bot_filtering(), Some(false));
//! assert!(!config.anonymize_ip());
//! ```

use std::collections::HashMap;
use std::fmt::Write as _;

use serde_json::{Map, Value};

use crate::event::{EventContext, Region};

/// The only datafile version this module reads.
pub const SUPPORTED_VERSION: &str = "4";

/// Why a datafile could not be read. Every variant names where the problem is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DatafileError {
    /// The text is not JSON.
    #[error("datafile is not valid JSON: {message} (line {line}, column {column})")]
    InvalidJson {
        /// 1-based line of the error.
        line: usize,
        /// 1-based column of the error.
        column: usize,
        /// What the JSON parser said.
        message: String,
    },
    /// A required field is absent.
    #[error("datafile: missing required field `{path}`")]
    MissingField {
        /// JSON path of the field, e.g. `experiments[1].layerId`.
        path: String,
    },
    /// A field has the wrong JSON type.
    #[error("datafile: `{path}` must be {expected}, found {found}")]
    WrongType {
        /// JSON path of the field (`$` for the whole document).
        path: String,
        /// The JSON type expected.
        expected: &'static str,
        /// The JSON type found.
        found: &'static str,
    },
    /// `version` is not `"4"`.
    #[error("unsupported datafile version {version}: only version \"4\" is supported")]
    UnsupportedVersion {
        /// The `version` value as JSON text.
        version: String,
    },
    /// `region` is neither US nor EU. The SDK would fall back to the US endpoint; sending
    /// events of an unknown region to the US is what must never happen, so this refuses.
    #[error("datafile: unknown region {region:?}: expected \"US\" or \"EU\"")]
    UnknownRegion {
        /// The region found.
        region: String,
    },
}

/// An attribute the datafile declares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attribute {
    /// Attribute id, sent as `entity_id`.
    pub id: String,
    /// Attribute key.
    pub key: String,
}

/// A conversion event the datafile declares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Event id, sent as the snapshot event's `entity_id`.
    pub id: String,
    /// Event key.
    pub key: String,
    /// Experiments that use this event as a metric.
    pub experiment_ids: Vec<String>,
}

/// A variation of an experiment or rollout rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Variation {
    /// Variation id.
    pub id: String,
    /// Variation key.
    pub key: String,
    /// Whether the flag is on in this variation (absent means `false`).
    pub feature_enabled: bool,
}

/// An experiment: a flag's A/B test, an experiment inside a group, or a rollout rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Experiment {
    /// Experiment (rule) id.
    pub id: String,
    /// Experiment (rule) key.
    pub key: String,
    /// Layer id, sent as `campaign_id`.
    pub layer_id: String,
    /// The mutual exclusion group this experiment belongs to, if any.
    pub group_id: Option<String>,
    /// Its variations, in datafile order.
    pub variations: Vec<Variation>,
}

impl Experiment {
    /// The variation with this key.
    pub fn variation(&self, key: &str) -> Option<&Variation> {
        self.variations.iter().find(|v| v.key == key)
    }

    /// The variation with this id.
    pub fn variation_by_id(&self, id: &str) -> Option<&Variation> {
        self.variations.iter().find(|v| v.id == id)
    }
}

/// A rollout: the ordered delivery rules of a flag, the last being "everyone else".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rollout {
    /// Rollout id, referenced by a flag's `rolloutId`.
    pub id: String,
    /// Its rules, in evaluation order.
    pub rules: Vec<Experiment>,
}

/// A feature flag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureFlag {
    /// Flag id.
    pub id: String,
    /// Flag key.
    pub key: String,
    /// Its experiments (A/B tests), by id.
    pub experiment_ids: Vec<String>,
    /// Its rollout's id; may be empty.
    pub rollout_id: String,
}

/// What kind of rule a flag decision came from; sent as `metadata.rule_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RuleType {
    /// An experiment of the flag (`"feature-test"`, the SDK's `DecisionSources.FEATURE_TEST`).
    FeatureTest,
    /// A rule of the flag's rollout (`"rollout"`).
    Rollout,
}

impl RuleType {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            RuleType::FeatureTest => "feature-test",
            RuleType::Rollout => "rollout",
        }
    }
}

/// A flag's rule found by key: the experiment and whether it is a test or a rollout rule.
#[derive(Debug, Clone, Copy)]
pub struct FlagRule<'a> {
    /// The rule.
    pub experiment: &'a Experiment,
    /// Where the flag has it.
    pub rule_type: RuleType,
}

/// A parsed version-4 datafile with lookups by key and id. Build it once per datafile
/// revision and share it (`Arc<ProjectConfig>`); lookups are hash-map reads.
#[derive(Debug, Clone)]
pub struct ProjectConfig {
    account_id: String,
    project_id: String,
    revision: String,
    anonymize_ip: bool,
    bot_filtering: Option<bool>,
    send_flag_decisions: bool,
    region: Region,
    attributes: Vec<Attribute>,
    events: Vec<Event>,
    experiments: Vec<Experiment>,
    rollouts: Vec<Rollout>,
    flags: Vec<FeatureFlag>,
    attribute_by_key: HashMap<String, usize>,
    event_by_key: HashMap<String, usize>,
    experiment_by_key: HashMap<String, usize>,
    experiment_by_id: HashMap<String, usize>,
    rollout_by_id: HashMap<String, usize>,
    flag_by_key: HashMap<String, usize>,
}

impl ProjectConfig {
    /// Parses a version-4 datafile.
    ///
    /// ```
    /// use tributary::datafile::{DatafileError, ProjectConfig};
    /// let err = ProjectConfig::from_json(r#"{"version": "4", "accountId": "1",
    ///     "projectId": "2", "revision": "3", "events": [{"key": "buy"}]}"#).unwrap_err();
    /// assert_eq!(err, DatafileError::MissingField { path: "events[0].id".into() });
    /// ```
    pub fn from_json(text: &str) -> Result<ProjectConfig, DatafileError> {
        let root: Value = serde_json::from_str(text).map_err(|e| DatafileError::InvalidJson {
            line: e.line(),
            column: e.column(),
            message: strip_position(&e.to_string()),
        })?;
        let root = Obj::root(&root)?;

        match root.get("version") {
            None => return Err(root.missing("version")),
            Some(Value::String(v)) if v == SUPPORTED_VERSION => {}
            Some(other) => {
                return Err(DatafileError::UnsupportedVersion {
                    version: other.to_string(),
                });
            }
        }

        let region = match root.opt_str("region")? {
            None | Some("") => Region::Us,
            Some(r) => r.parse().map_err(|_| DatafileError::UnknownRegion {
                region: r.to_owned(),
            })?,
        };

        let mut config = ProjectConfig {
            account_id: root.str("accountId")?.to_owned(),
            project_id: root.str("projectId")?.to_owned(),
            revision: root.str("revision")?.to_owned(),
            anonymize_ip: root.opt_bool("anonymizeIP")?.unwrap_or(false),
            bot_filtering: root.opt_bool("botFiltering")?,
            send_flag_decisions: root.opt_bool("sendFlagDecisions")?.unwrap_or(false),
            region,
            attributes: Vec::new(),
            events: Vec::new(),
            experiments: Vec::new(),
            rollouts: Vec::new(),
            flags: Vec::new(),
            attribute_by_key: HashMap::new(),
            event_by_key: HashMap::new(),
            experiment_by_key: HashMap::new(),
            experiment_by_id: HashMap::new(),
            rollout_by_id: HashMap::new(),
            flag_by_key: HashMap::new(),
        };

        for a in root.list("attributes")? {
            config.attributes.push(Attribute {
                id: a.str("id")?.to_owned(),
                key: a.str("key")?.to_owned(),
            });
        }
        for e in root.list("events")? {
            config.events.push(Event {
                id: e.str("id")?.to_owned(),
                key: e.str("key")?.to_owned(),
                experiment_ids: e.str_list("experimentIds")?,
            });
        }
        for e in root.list("experiments")? {
            config.experiments.push(experiment(&e, None)?);
        }
        // Like the SDK, experiments inside groups are experiments like any other.
        for g in root.list("groups")? {
            let group_id = g.str("id")?;
            for e in g.required_list("experiments")? {
                config
                    .experiments
                    .push(experiment(&e, Some(group_id.to_owned()))?);
            }
        }
        for r in root.list("rollouts")? {
            let mut rules = Vec::new();
            for e in r.required_list("experiments")? {
                rules.push(experiment(&e, None)?);
            }
            config.rollouts.push(Rollout {
                id: r.str("id")?.to_owned(),
                rules,
            });
        }
        for f in root.list("featureFlags")? {
            config.flags.push(FeatureFlag {
                id: f.str("id")?.to_owned(),
                key: f.str("key")?.to_owned(),
                experiment_ids: f.required_str_list("experimentIds")?,
                rollout_id: f.str("rolloutId")?.to_owned(),
            });
        }
        config.index();
        Ok(config)
    }

    /// Builds the lookup maps. When keys or ids repeat, the last one wins, as in the SDK.
    fn index(&mut self) {
        fn by<T>(items: &[T], key: impl Fn(&T) -> &str) -> HashMap<String, usize> {
            items
                .iter()
                .enumerate()
                .map(|(i, t)| (key(t).to_owned(), i))
                .collect()
        }
        self.attribute_by_key = by(&self.attributes, |a| &a.key);
        self.event_by_key = by(&self.events, |e| &e.key);
        self.experiment_by_key = by(&self.experiments, |e| &e.key);
        self.experiment_by_id = by(&self.experiments, |e| &e.id);
        self.rollout_by_id = by(&self.rollouts, |r| &r.id);
        self.flag_by_key = by(&self.flags, |f| &f.key);
    }

    /// Account id.
    pub fn account_id(&self) -> &str {
        &self.account_id
    }

    /// Project id.
    pub fn project_id(&self) -> &str {
        &self.project_id
    }

    /// Datafile revision.
    pub fn revision(&self) -> &str {
        &self.revision
    }

    /// `anonymizeIP` (absent: `false`).
    pub fn anonymize_ip(&self) -> bool {
        self.anonymize_ip
    }

    /// `botFiltering` (absent or null: `None`, and no `$opt_bot_filtering` attribute is sent).
    pub fn bot_filtering(&self) -> Option<bool> {
        self.bot_filtering
    }

    /// `sendFlagDecisions` (absent: `false`): whether SDKs send impressions for rollout
    /// decisions. Informational here: this crate builds whatever impression it is asked for.
    pub fn send_flag_decisions(&self) -> bool {
        self.send_flag_decisions
    }

    /// The Event API region (absent: US).
    pub fn region(&self) -> Region {
        self.region
    }

    /// The id of the attribute with this key, if the datafile declares it.
    pub fn attribute_id(&self, key: &str) -> Option<&str> {
        self.attribute_by_key
            .get(key)
            .map(|&i| self.attributes[i].id.as_str())
    }

    /// The event with this key.
    pub fn event(&self, key: &str) -> Option<&Event> {
        self.event_by_key.get(key).map(|&i| &self.events[i])
    }

    /// The experiment (top-level or in a group; not a rollout rule) with this key.
    pub fn experiment(&self, key: &str) -> Option<&Experiment> {
        self.experiment_by_key
            .get(key)
            .map(|&i| &self.experiments[i])
    }

    /// The experiment (top-level or in a group; not a rollout rule) with this id.
    pub fn experiment_by_id(&self, id: &str) -> Option<&Experiment> {
        self.experiment_by_id.get(id).map(|&i| &self.experiments[i])
    }

    /// The rollout with this id.
    pub fn rollout(&self, id: &str) -> Option<&Rollout> {
        self.rollout_by_id.get(id).map(|&i| &self.rollouts[i])
    }

    /// The flag with this key.
    pub fn flag(&self, key: &str) -> Option<&FeatureFlag> {
        self.flag_by_key.get(key).map(|&i| &self.flags[i])
    }

    /// The rule `rule_key` of `flag`: among its experiments first (`feature-test`), then
    /// among its rollout's rules (`rollout`).
    pub fn flag_rule<'a>(&'a self, flag: &FeatureFlag, rule_key: &str) -> Option<FlagRule<'a>> {
        self.flag_rules(flag).find(|r| r.experiment.key == rule_key)
    }

    /// Every rule of `flag` in evaluation order: its experiments, then its rollout's rules.
    /// Experiment ids the datafile does not define are skipped.
    pub fn flag_rules<'a>(
        &'a self,
        flag: &FeatureFlag,
    ) -> impl Iterator<Item = FlagRule<'a>> + use<'a> {
        let tests: Vec<&'a Experiment> = flag
            .experiment_ids
            .iter()
            .filter_map(|id| self.experiment_by_id(id))
            .collect();
        let rollout = self.rollout(&flag.rollout_id);
        tests
            .into_iter()
            .map(|experiment| FlagRule {
                experiment,
                rule_type: RuleType::FeatureTest,
            })
            .chain(rollout.into_iter().flat_map(|r| {
                r.rules.iter().map(|experiment| FlagRule {
                    experiment,
                    rule_type: RuleType::Rollout,
                })
            }))
    }

    /// Declared attributes, in datafile order.
    pub fn attributes(&self) -> &[Attribute] {
        &self.attributes
    }

    /// Declared events, in datafile order.
    pub fn events(&self) -> &[Event] {
        &self.events
    }

    /// Experiments: top-level ones, then those of groups, in datafile order.
    pub fn experiments(&self) -> &[Experiment] {
        &self.experiments
    }

    /// Rollouts, in datafile order.
    pub fn rollouts(&self) -> &[Rollout] {
        &self.rollouts
    }

    /// Flags, in datafile order.
    pub fn flags(&self) -> &[FeatureFlag] {
        &self.flags
    }

    /// The [`EventContext`] of events built from this datafile, sent with the given client
    /// name and version.
    pub fn event_context(
        &self,
        client_name: impl Into<String>,
        client_version: impl Into<String>,
    ) -> EventContext {
        EventContext {
            account_id: self.account_id.clone(),
            project_id: self.project_id.clone(),
            revision: self.revision.clone(),
            client_name: client_name.into(),
            client_version: client_version.into(),
            anonymize_ip: self.anonymize_ip,
            bot_filtering: self.bot_filtering,
            region: self.region,
        }
    }
}

/// serde_json appends " at line L column C"; the error carries those as fields already.
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_owned(),
        None => message.to_owned(),
    }
}

fn experiment(e: &Obj<'_>, group_id: Option<String>) -> Result<Experiment, DatafileError> {
    let mut variations = Vec::new();
    for v in e.required_list("variations")? {
        variations.push(Variation {
            id: v.str("id")?.to_owned(),
            key: v.str("key")?.to_owned(),
            feature_enabled: v.opt_bool("featureEnabled")?.unwrap_or(false),
        });
    }
    Ok(Experiment {
        id: e.str("id")?.to_owned(),
        key: e.str("key")?.to_owned(),
        layer_id: e.str("layerId")?.to_owned(),
        group_id,
        variations,
    })
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A JSON object and the path it was found at, so every error can say where.
struct Obj<'a> {
    map: &'a Map<String, Value>,
    path: String,
}

impl<'a> Obj<'a> {
    fn root(v: &'a Value) -> Result<Obj<'a>, DatafileError> {
        match v {
            Value::Object(map) => Ok(Obj {
                map,
                path: String::new(),
            }),
            other => Err(DatafileError::WrongType {
                path: "$".into(),
                expected: "an object",
                found: type_name(other),
            }),
        }
    }

    fn path_of(&self, field: &str) -> String {
        if self.path.is_empty() {
            field.to_owned()
        } else {
            format!("{}.{field}", self.path)
        }
    }

    fn get(&self, field: &str) -> Option<&'a Value> {
        self.map.get(field)
    }

    fn missing(&self, field: &str) -> DatafileError {
        DatafileError::MissingField {
            path: self.path_of(field),
        }
    }

    fn wrong(&self, field: &str, expected: &'static str, found: &Value) -> DatafileError {
        DatafileError::WrongType {
            path: self.path_of(field),
            expected,
            found: type_name(found),
        }
    }

    /// A required string.
    fn str(&self, field: &str) -> Result<&'a str, DatafileError> {
        match self.get(field) {
            None => Err(self.missing(field)),
            Some(Value::String(s)) => Ok(s),
            Some(other) => Err(self.wrong(field, "a string", other)),
        }
    }

    /// An optional string; null counts as absent.
    fn opt_str(&self, field: &str) -> Result<Option<&'a str>, DatafileError> {
        match self.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(self.wrong(field, "a string", other)),
        }
    }

    /// An optional boolean; null counts as absent.
    fn opt_bool(&self, field: &str) -> Result<Option<bool>, DatafileError> {
        match self.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(self.wrong(field, "a boolean", other)),
        }
    }

    fn array(&self, field: &str, required: bool) -> Result<&'a [Value], DatafileError> {
        match self.get(field) {
            None if required => Err(self.missing(field)),
            None => Ok(&[]),
            Some(Value::Array(items)) => Ok(items),
            Some(other) => Err(self.wrong(field, "an array", other)),
        }
    }

    fn objects(&self, field: &str, required: bool) -> Result<Vec<Obj<'a>>, DatafileError> {
        let mut out = Vec::new();
        for (i, item) in self.array(field, required)?.iter().enumerate() {
            let mut path = self.path_of(field);
            let _ = write!(path, "[{i}]");
            match item {
                Value::Object(map) => out.push(Obj { map, path }),
                other => {
                    return Err(DatafileError::WrongType {
                        path,
                        expected: "an object",
                        found: type_name(other),
                    });
                }
            }
        }
        Ok(out)
    }

    /// An optional array of objects (absent: empty).
    fn list(&self, field: &str) -> Result<Vec<Obj<'a>>, DatafileError> {
        self.objects(field, false)
    }

    /// A required array of objects.
    fn required_list(&self, field: &str) -> Result<Vec<Obj<'a>>, DatafileError> {
        self.objects(field, true)
    }

    fn strings(&self, field: &str, required: bool) -> Result<Vec<String>, DatafileError> {
        let mut out = Vec::new();
        for (i, item) in self.array(field, required)?.iter().enumerate() {
            match item {
                Value::String(s) => out.push(s.clone()),
                other => {
                    return Err(DatafileError::WrongType {
                        path: format!("{}[{i}]", self.path_of(field)),
                        expected: "a string",
                        found: type_name(other),
                    });
                }
            }
        }
        Ok(out)
    }

    /// An optional array of strings (absent: empty).
    fn str_list(&self, field: &str) -> Result<Vec<String>, DatafileError> {
        self.strings(field, false)
    }

    /// A required array of strings.
    fn required_str_list(&self, field: &str) -> Result<Vec<String>, DatafileError> {
        self.strings(field, true)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const MINIMAL: &str =
        r#"{"version": "4", "accountId": "1", "projectId": "2", "revision": "3"}"#;

    #[test]
    fn minimal_datafile_takes_sdk_defaults() {
        let c = ProjectConfig::from_json(MINIMAL).unwrap();
        assert_eq!(c.region(), Region::Us);
        assert_eq!(c.bot_filtering(), None);
        assert!(!c.anonymize_ip());
        assert!(c.flags().is_empty());
        let ctx = c.event_context("x", "9");
        assert_eq!(
            (ctx.client_name.as_str(), ctx.revision.as_str()),
            ("x", "3")
        );
    }

    #[test]
    fn region_is_case_insensitive_and_empty_means_us() {
        let with =
            |r: &str| MINIMAL.replace("\"revision\"", &format!("\"region\": {r}, \"revision\""));
        assert_eq!(
            ProjectConfig::from_json(&with("\"eu\"")).unwrap().region(),
            Region::Eu
        );
        assert_eq!(
            ProjectConfig::from_json(&with("\"\"")).unwrap().region(),
            Region::Us
        );
        assert_eq!(
            ProjectConfig::from_json(&with("null")).unwrap().region(),
            Region::Us
        );
        assert_eq!(
            ProjectConfig::from_json(&with("\"APAC\"")).unwrap_err(),
            DatafileError::UnknownRegion {
                region: "APAC".into()
            }
        );
    }

    #[test]
    fn nested_paths_are_reported() {
        let text = MINIMAL.replace(
            "\"revision\"",
            r#""rollouts": [{"id": "r", "experiments": [{"id": "e", "key": "k", "layerId": "l",
                "variations": [{"id": "v", "key": 5}]}]}], "revision""#,
        );
        assert_eq!(
            ProjectConfig::from_json(&text).unwrap_err(),
            DatafileError::WrongType {
                path: "rollouts[0].experiments[0].variations[0].key".into(),
                expected: "a string",
                found: "a number",
            }
        );
    }

    #[test]
    fn invalid_json_has_a_position() {
        let err = ProjectConfig::from_json("{\n  \"version\": 4,,\n}").unwrap_err();
        match err {
            DatafileError::InvalidJson { line, column, .. } => assert_eq!((line, column), (2, 16)),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            ProjectConfig::from_json("[]").unwrap_err(),
            DatafileError::WrongType { ref path, .. } if path == "$"
        ));
    }
}
