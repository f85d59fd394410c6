//! Checks that bytes are an Event API v1 `EventBatch`, naming every problem by JSON path.
//!
//! Two rule sets:
//!
//! - **Full** ([`validate_payload`], [`Validator::full`]): every field the Event API reads,
//!   with its type (see the table below), and the 3,500,000-byte body limit. This is what
//!   `tributary validate` applies: a payload that passes is one the Event API accepts.
//! - **Shape** ([`validate_payload_shape`], [`Validator::shape`]): only what the relay needs to
//!   store and merge a payload: a top-level object with a non-empty string `account_id` and a
//!   non-empty `visitors` array whose items are objects with a non-empty string `visitor_id`
//!   and a non-empty `snapshots` array. It does not build a JSON tree: the visitors are
//!   scanned, not decoded, so it is cheap enough for an ingest path. No size check unless
//!   asked for ([`Validator::max_payload_bytes`]): the relay splits large bodies itself.
//!
//! Unknown fields (Java's `session_id`, Go's `region`, ...) are allowed at every level.
//!
//! Full rules, by path (`?` = optional, checked when present):
//!
//! | path | rule |
//! |---|---|
//! | `$` | an object, at most [`MAX_PAYLOAD_BYTES`] long |
//! | `$.account_id` | non-empty string |
//! | `$.project_id?`, `$.revision?`, `$.client_name?`, `$.client_version?` | string |
//! | `$.anonymize_ip?`, `$.enrich_decisions?` | boolean |
//! | `$.visitors` | non-empty array of objects |
//! | `$.visitors[i].visitor_id` | non-empty string |
//! | `$.visitors[i].attributes?` | array of objects with string `entity_id`, `key`, `type` and a string, boolean or number `value` |
//! | `$.visitors[i].snapshots` | non-empty array of objects |
//! | `…snapshots[j].events` | non-empty array of objects |
//! | `…events[k]` | string `entity_id`, non-empty string `key`, string `uuid`, non-negative integer `timestamp`, integer `revenue?`, number `value?`, object `tags?` |
//! | `…snapshots[j].decisions?` | array of objects with string `campaign_id`, `experiment_id`, string or null `variation_id`, object `metadata?` |
//! | `…decisions[d].metadata` | string `flag_key`, `rule_key`, `rule_type`, `variation_key`, boolean `enabled`, string `cmab_uuid?` |
//!
//! ```
//! use tributary::validate::{validate_payload, validate_payload_shape};
//! let body = br#"{"account_id":"1","visitors":[{"visitor_id":"u","snapshots":[
//!     {"events":[{"entity_id":"7","key":"buy","uuid":"x","timestamp":-1,"revenue":1.5}]}]}]}"#;
//! let problems = validate_payload(body).unwrap_err();
//! let paths: Vec<&str> = problems.iter().map(|p| p.path.as_str()).collect();
//! assert_eq!(paths, [
//!     "$.visitors[0].snapshots[0].events[0].timestamp",
//!     "$.visitors[0].snapshots[0].events[0].revenue",
//! ]);
//! // The relay's cheaper rules do not look inside snapshots.
//! assert_eq!(validate_payload_shape(body).unwrap().visitors, 1);
//! ```

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;

use crate::raw::MAX_PAYLOAD_BYTES;

/// The default bound on the problems one validation reports; see [`Validator::max_problems`].
pub const DEFAULT_MAX_PROBLEMS: usize = 1000;

/// One thing wrong with a payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// Where: a JSONPath such as `$.visitors[3].snapshots[0].events[1].timestamp`; `$` for the
    /// whole body (syntax errors, size).
    pub path: String,
    /// What, in a short sentence. Syntax errors give the line and column.
    pub message: String,
}

impl Problem {
    fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Problem {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// What a valid payload holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ValidatedSummary {
    /// Number of visitors.
    pub visitors: usize,
    /// Number of events across all snapshots; `None` under the shape rules, which do not
    /// look inside snapshots.
    pub events: Option<usize>,
    /// Body size in bytes: the input's length, or for [`Validator::validate_value`] the
    /// length of the value's compact encoding.
    pub bytes: usize,
}

/// Which checks a [`Validator`] applies; see the [module docs](self).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rules {
    /// Every field the Event API reads.
    Full,
    /// Only what the relay needs to store and merge a payload.
    Shape,
}

/// A configured validation: rules, size limit, bound on problems reported.
///
/// ```
/// use tributary::validate::Validator;
/// let v = Validator::full().max_payload_bytes(Some(50)).max_problems(10);
/// let problems = v.validate(br#"{"account_id":"","visitors":[]}"#).unwrap_err();
/// assert_eq!(problems.len(), 2);
/// assert_eq!(problems[0].path, "$.account_id");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validator {
    rules: Rules,
    max_payload_bytes: Option<usize>,
    max_problems: usize,
}

impl Validator {
    /// Full rules with the Event API's [`MAX_PAYLOAD_BYTES`] limit.
    pub fn full() -> Self {
        Validator {
            rules: Rules::Full,
            max_payload_bytes: Some(MAX_PAYLOAD_BYTES),
            max_problems: DEFAULT_MAX_PROBLEMS,
        }
    }

    /// Shape rules, without a size limit.
    pub fn shape() -> Self {
        Validator {
            rules: Rules::Shape,
            max_payload_bytes: None,
            max_problems: DEFAULT_MAX_PROBLEMS,
        }
    }

    /// A body longer than `limit` bytes is a problem (at `$`); `None` disables the check.
    pub fn max_payload_bytes(mut self, limit: Option<usize>) -> Self {
        self.max_payload_bytes = limit;
        self
    }

    /// Reports at most `n` problems (at least 1), then one more at `$` that counts the rest.
    /// Bounds the memory a hostile or badly broken body can make validation use.
    /// Default [`DEFAULT_MAX_PROBLEMS`].
    pub fn max_problems(mut self, n: usize) -> Self {
        self.max_problems = n.max(1);
        self
    }

    /// The rules in force.
    pub fn rules(&self) -> Rules {
        self.rules
    }

    /// Validates a request body.
    pub fn validate(&self, json: &[u8]) -> Result<ValidatedSummary, Vec<Problem>> {
        let mut sink = Sink::new(self.max_problems);
        self.check_size(json.len(), &mut sink);
        let counts = match self.rules {
            Rules::Full => match serde_json::from_slice::<Value>(json) {
                Ok(value) => Some(walk(&value, "$", true, &mut sink)),
                Err(e) => {
                    sink.push(Problem::new("$", syntax_message(&e)));
                    None
                }
            },
            Rules::Shape => shape_scan(json, &mut sink),
        };
        sink.finish(counts, json.len())
    }

    /// Validates an already-parsed payload, naming problems from `root` (for a payload
    /// nested in another document, e.g. `"$.params"` for a LogEvent's `params`). The size
    /// checked and reported is that of the value's compact encoding, which is what a
    /// dispatcher sends.
    pub fn validate_value(
        &self,
        value: &Value,
        root: &str,
    ) -> Result<ValidatedSummary, Vec<Problem>> {
        let mut sink = Sink::new(self.max_problems);
        let mut counter = ByteCounter(0);
        // Writing to a counter cannot fail, and a Value always serialises.
        let bytes = match serde_json::to_writer(&mut counter, value) {
            Ok(()) => counter.0,
            Err(_) => 0,
        };
        if let Some(limit) = self.max_payload_bytes
            && bytes > limit
        {
            sink.push(size_problem(root, bytes, limit));
        }
        let counts = walk(value, root, self.rules == Rules::Full, &mut sink);
        sink.finish(Some(counts), bytes)
    }

    fn check_size(&self, len: usize, sink: &mut Sink) {
        if let Some(limit) = self.max_payload_bytes
            && len > limit
        {
            sink.push(size_problem("$", len, limit));
        }
    }
}

/// Full rules and the 3,500,000-byte limit: reports every problem (up to
/// [`DEFAULT_MAX_PROBLEMS`]). Use this to check that the Event API will accept a payload.
pub fn validate_payload(json: &[u8]) -> Result<ValidatedSummary, Vec<Problem>> {
    Validator::full().validate(json)
}

/// Shape rules only, no size limit: the cheap check the relay's ingest path needs before it
/// stores a payload (top-level object, non-empty `account_id`, non-empty `visitors`, each
/// with `visitor_id` and non-empty `snapshots`). See the [module docs](self).
pub fn validate_payload_shape(json: &[u8]) -> Result<ValidatedSummary, Vec<Problem>> {
    Validator::shape().validate(json)
}

/// Collects problems up to a bound and counts the rest.
struct Sink {
    problems: Vec<Problem>,
    max: usize,
    dropped: usize,
}

impl Sink {
    fn new(max: usize) -> Self {
        Sink {
            problems: Vec::new(),
            max,
            dropped: 0,
        }
    }

    fn push(&mut self, p: Problem) {
        if self.problems.len() < self.max {
            self.problems.push(p);
        } else {
            self.dropped += 1;
        }
    }

    fn finish(
        mut self,
        counts: Option<(usize, Option<usize>)>,
        bytes: usize,
    ) -> Result<ValidatedSummary, Vec<Problem>> {
        if self.dropped > 0 {
            self.problems.push(Problem::new(
                "$",
                format!("{} more problems not listed", self.dropped),
            ));
        }
        match counts {
            Some((visitors, events)) if self.problems.is_empty() => Ok(ValidatedSummary {
                visitors,
                events,
                bytes,
            }),
            _ => Err(self.problems),
        }
    }
}

fn size_problem(path: &str, len: usize, limit: usize) -> Problem {
    Problem::new(
        path,
        format!(
            "body is {len} bytes, over the {limit}-byte limit (the Event API answers 400); \
             split it into several payloads"
        ),
    )
}

fn syntax_message(e: &serde_json::Error) -> String {
    if e.line() == 0 {
        return format!("invalid JSON: {e}");
    }
    format!(
        "invalid JSON at line {}, column {}: {}",
        e.line(),
        e.column(),
        message_only(e)
    )
}

/// serde_json's message without its " at line L column C" suffix.
fn message_only(e: &serde_json::Error) -> String {
    let text = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    match text.strip_suffix(&suffix) {
        Some(m) => m.to_owned(),
        None => text,
    }
}

struct ByteCounter(usize);

impl std::io::Write for ByteCounter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Rules over a parsed tree (full rules, and shape rules for `validate_value`).

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

fn expected(what: &str, found: &Value) -> String {
    format!("expected {what}, found {}", type_name(found))
}

const MISSING: &str = "required field is missing";

/// What a field must be.
#[derive(Clone, Copy)]
enum Want {
    String,
    NonEmptyString,
    StringOrNull,
    Bool,
    Number,
    Integer,
    NonNegativeInteger,
    Object,
    Scalar,
}

impl Want {
    /// `None` if `v` is acceptable, else the message.
    fn check(self, v: &Value) -> Option<String> {
        let ok = match self {
            Want::String => v.is_string(),
            Want::NonEmptyString => {
                if v.as_str() == Some("") {
                    return Some("must not be empty".to_owned());
                }
                v.is_string()
            }
            Want::StringOrNull => v.is_string() || v.is_null(),
            Want::Bool => v.is_boolean(),
            // serde_json cannot hold NaN or infinities, so every number is finite.
            Want::Number => v.is_number(),
            Want::Integer => v.is_i64() || v.is_u64(),
            Want::NonNegativeInteger => {
                if v.is_i64() && !v.is_u64() {
                    return Some("must not be negative".to_owned());
                }
                v.is_u64()
            }
            Want::Object => v.is_object(),
            Want::Scalar => v.is_string() || v.is_boolean() || v.is_number(),
        };
        if ok {
            return None;
        }
        let what = match self {
            Want::String | Want::NonEmptyString => "a string",
            Want::StringOrNull => "a string or null",
            Want::Bool => "a boolean",
            Want::Number => "a number",
            Want::Integer => "an integer",
            Want::NonNegativeInteger => "a non-negative integer (milliseconds since the epoch)",
            Want::Object => "an object",
            Want::Scalar => "a string, a boolean or a number",
        };
        Some(expected(what, v))
    }
}

/// Checks `obj[key]` against `want`; a missing field is a problem only if `required`.
fn field(
    obj: &serde_json::Map<String, Value>,
    path: &str,
    key: &str,
    want: Want,
    required: bool,
    sink: &mut Sink,
) {
    match obj.get(key) {
        None if required => sink.push(Problem::new(format!("{path}.{key}"), MISSING)),
        None => {}
        Some(v) => {
            if let Some(msg) = want.check(v) {
                sink.push(Problem::new(format!("{path}.{key}"), msg));
            }
        }
    }
}

/// `obj[key]` as a non-empty array when it is one; reports what it is otherwise.
fn array_field<'v>(
    obj: &'v serde_json::Map<String, Value>,
    path: &str,
    key: &str,
    required: bool,
    non_empty: bool,
    sink: &mut Sink,
) -> &'v [Value] {
    match obj.get(key) {
        None => {
            if required {
                sink.push(Problem::new(format!("{path}.{key}"), MISSING));
            }
            &[]
        }
        Some(Value::Array(items)) => {
            if non_empty && items.is_empty() {
                sink.push(Problem::new(format!("{path}.{key}"), "must not be empty"));
            }
            items
        }
        Some(other) => {
            sink.push(Problem::new(
                format!("{path}.{key}"),
                expected("an array", other),
            ));
            &[]
        }
    }
}

/// `v` as an object, or a problem at `path`.
fn object<'v>(
    v: &'v Value,
    path: &str,
    sink: &mut Sink,
) -> Option<&'v serde_json::Map<String, Value>> {
    match v {
        Value::Object(o) => Some(o),
        other => {
            sink.push(Problem::new(path, expected("an object", other)));
            None
        }
    }
}

/// Walks a payload; returns (visitors, events) counted whatever the problems.
fn walk(value: &Value, root: &str, full: bool, sink: &mut Sink) -> (usize, Option<usize>) {
    let Some(top) = object(value, root, sink) else {
        return (0, full.then_some(0));
    };
    field(top, root, "account_id", Want::NonEmptyString, true, sink);
    if full {
        for key in ["project_id", "revision", "client_name", "client_version"] {
            field(top, root, key, Want::String, false, sink);
        }
        for key in ["anonymize_ip", "enrich_decisions"] {
            field(top, root, key, Want::Bool, false, sink);
        }
    }
    let visitors = array_field(top, root, "visitors", true, true, sink);
    let mut events = 0;
    for (i, v) in visitors.iter().enumerate() {
        let path = format!("{root}.visitors[{i}]");
        let Some(visitor) = object(v, &path, sink) else {
            continue;
        };
        field(
            visitor,
            &path,
            "visitor_id",
            Want::NonEmptyString,
            true,
            sink,
        );
        let snapshots = array_field(visitor, &path, "snapshots", true, true, sink);
        if !full {
            continue;
        }
        for (j, a) in array_field(visitor, &path, "attributes", false, false, sink)
            .iter()
            .enumerate()
        {
            let path = format!("{path}.attributes[{j}]");
            if let Some(attr) = object(a, &path, sink) {
                field(attr, &path, "entity_id", Want::String, true, sink);
                field(attr, &path, "key", Want::String, true, sink);
                field(attr, &path, "type", Want::String, true, sink);
                field(attr, &path, "value", Want::Scalar, true, sink);
            }
        }
        for (j, s) in snapshots.iter().enumerate() {
            let path = format!("{path}.snapshots[{j}]");
            events += snapshot(s, &path, sink);
        }
    }
    (visitors.len(), full.then_some(events))
}

/// Checks one snapshot (full rules); returns its number of events.
fn snapshot(s: &Value, path: &str, sink: &mut Sink) -> usize {
    let Some(snap) = object(s, path, sink) else {
        return 0;
    };
    let events = array_field(snap, path, "events", true, true, sink);
    for (k, e) in events.iter().enumerate() {
        let path = format!("{path}.events[{k}]");
        if let Some(ev) = object(e, &path, sink) {
            field(ev, &path, "entity_id", Want::String, true, sink);
            field(ev, &path, "key", Want::NonEmptyString, true, sink);
            field(ev, &path, "uuid", Want::String, true, sink);
            field(ev, &path, "timestamp", Want::NonNegativeInteger, true, sink);
            field(ev, &path, "revenue", Want::Integer, false, sink);
            field(ev, &path, "value", Want::Number, false, sink);
            field(ev, &path, "tags", Want::Object, false, sink);
        }
    }
    for (d, dec) in array_field(snap, path, "decisions", false, false, sink)
        .iter()
        .enumerate()
    {
        let path = format!("{path}.decisions[{d}]");
        let Some(dec) = object(dec, &path, sink) else {
            continue;
        };
        field(dec, &path, "campaign_id", Want::String, true, sink);
        field(dec, &path, "experiment_id", Want::String, true, sink);
        field(dec, &path, "variation_id", Want::StringOrNull, true, sink);
        if let Some(m) = dec.get("metadata") {
            let path = format!("{path}.metadata");
            if let Some(meta) = object(m, &path, sink) {
                for key in ["flag_key", "rule_key", "rule_type", "variation_key"] {
                    field(meta, &path, key, Want::String, true, sink);
                }
                field(meta, &path, "enabled", Want::Bool, true, sink);
                field(meta, &path, "cmab_uuid", Want::String, false, sink);
            }
        }
    }
    events.len()
}

// ---------------------------------------------------------------------------------------
// Shape rules over bytes, without building a tree: each level is read as raw slices and
// only the few fields the relay needs are looked at.

/// Deserialises a field as its raw text, keeping `null` (which `Option` would turn into
/// `None`, indistinguishable from a missing field).
fn some_raw<'de, D: Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

#[derive(Deserialize)]
struct ShapeTop<'a> {
    #[serde(borrow, default, deserialize_with = "some_raw")]
    account_id: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "some_raw")]
    visitors: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct ShapeVisitor<'a> {
    #[serde(borrow, default, deserialize_with = "some_raw")]
    visitor_id: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "some_raw")]
    snapshots: Option<&'a RawValue>,
}

/// The JSON type of a raw value, from its first byte (raw values have no leading space).
fn raw_type(raw: &RawValue) -> &'static str {
    match raw.get().as_bytes().first() {
        Some(b'{') => "an object",
        Some(b'[') => "an array",
        Some(b'"') => "a string",
        Some(b't' | b'f') => "a boolean",
        Some(b'n') => "null",
        _ => "a number",
    }
}

fn raw_is_empty_array(raw: &RawValue) -> bool {
    raw.get()
        .strip_prefix('[')
        .is_some_and(|rest| rest.trim_start().starts_with(']'))
}

/// `required non-empty string` on a raw value.
fn raw_non_empty_string(raw: Option<&RawValue>, path: String, sink: &mut Sink) {
    match raw {
        None => sink.push(Problem::new(path, MISSING)),
        Some(r) if r.get() == "\"\"" => sink.push(Problem::new(path, "must not be empty")),
        Some(r) if raw_type(r) != "a string" => sink.push(Problem::new(
            path,
            format!("expected a string, found {}", raw_type(r)),
        )),
        Some(_) => {}
    }
}

/// `required non-empty array`; returns the raw array when it is one.
fn raw_non_empty_array<'a>(
    raw: Option<&'a RawValue>,
    path: String,
    sink: &mut Sink,
) -> Option<&'a RawValue> {
    match raw {
        None => sink.push(Problem::new(path, MISSING)),
        Some(r) if raw_type(r) != "an array" => sink.push(Problem::new(
            path,
            format!("expected an array, found {}", raw_type(r)),
        )),
        Some(r) if raw_is_empty_array(r) => sink.push(Problem::new(path, "must not be empty")),
        Some(r) => return Some(r),
    }
    None
}

/// Shape rules over bytes; `None` when the body is not JSON or not an object.
fn shape_scan(json: &[u8], sink: &mut Sink) -> Option<(usize, Option<usize>)> {
    let first = json.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        // Derived structs also accept arrays; read the value only to report it right.
        match serde_json::from_slice::<&RawValue>(json) {
            Ok(raw) => sink.push(Problem::new(
                "$",
                format!("expected an object, found {}", raw_type(raw)),
            )),
            Err(e) => sink.push(Problem::new("$", syntax_message(&e))),
        }
        return None;
    }
    let top: ShapeTop<'_> = match serde_json::from_slice(json) {
        Ok(top) => top,
        Err(e) => {
            sink.push(Problem::new("$", syntax_message(&e)));
            return None;
        }
    };
    raw_non_empty_string(top.account_id, "$.account_id".to_owned(), sink);
    let Some(visitors) = raw_non_empty_array(top.visitors, "$.visitors".to_owned(), sink) else {
        return Some((0, None));
    };
    // The whole body parsed, so each slice below is valid JSON of the type its first byte
    // says; errors here can only be duplicate fields.
    let items: Vec<&RawValue> = match serde_json::from_str(visitors.get()) {
        Ok(items) => items,
        Err(e) => {
            sink.push(Problem::new("$.visitors", message_only(&e)));
            return Some((0, None));
        }
    };
    for (i, item) in items.iter().enumerate() {
        let path = format!("$.visitors[{i}]");
        if raw_type(item) != "an object" {
            sink.push(Problem::new(
                path,
                format!("expected an object, found {}", raw_type(item)),
            ));
            continue;
        }
        let visitor: ShapeVisitor<'_> = match serde_json::from_str(item.get()) {
            Ok(v) => v,
            Err(e) => {
                sink.push(Problem::new(path, message_only(&e)));
                continue;
            }
        };
        raw_non_empty_string(visitor.visitor_id, format!("{path}.visitor_id"), sink);
        raw_non_empty_array(visitor.snapshots, format!("{path}.snapshots"), sink);
    }
    Some((items.len(), None))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!(
            "{}/../../../shared/fixtures/python-sdk-5.7.0/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read(&path).unwrap()
    }

    fn paths(problems: &[Problem]) -> Vec<&str> {
        problems.iter().map(|p| p.path.as_str()).collect()
    }

    #[test]
    fn fixtures_are_valid_under_both_rules() {
        for name in ["impression.json", "conversion.json"] {
            let body = fixture(name);
            let full = validate_payload(&body).unwrap();
            assert_eq!(full.visitors, 1);
            assert_eq!(full.events, Some(1));
            assert_eq!(full.bytes, body.len());
            let shape = validate_payload_shape(&body).unwrap();
            assert_eq!(shape.visitors, 1);
            assert_eq!(shape.events, None);
            let value: Value = serde_json::from_slice(&body).unwrap();
            let v = Validator::full().validate_value(&value, "$").unwrap();
            assert_eq!(v.bytes, serde_json::to_vec(&value).unwrap().len());
        }
    }

    #[test]
    fn java_and_go_extras_are_allowed() {
        let body = br#"{"account_id":"3","region":"EU","visitors":[{"session_id":"s",
            "snapshots":[{"activation_timestamp":1,"decisions":[{"variation_id":null,
            "campaign_id":"2","experiment_id":"5","is_campaign_holdback":false}],
            "events":[{"revenue":5000,"entity_id":"7","type":"testevent","uuid":"uuid",
            "key":"testevent","timestamp":12345}]}],"attributes":[{"entity_id":"6",
            "type":"custom","value":2.5,"key":"testfeature"}],"visitor_id":"testvisitor"}],
            "client_name":"java-sdk","client_version":"0.1.1","anonymize_ip":true,
            "enrich_decisions":true,"project_id":"1","revision":"1"}"#;
        assert_eq!(validate_payload(body).unwrap().events, Some(1));
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let body = br#"{"account_id":5,"revision":3,"anonymize_ip":"yes","visitors":[
            {"visitor_id":"a","snapshots":[{"events":[{"entity_id":"1","key":"k","uuid":"u","timestamp":1}]}]},
            {"visitor_id":"","snapshots":[],"attributes":[{"entity_id":"1","key":"k","type":"custom","value":null}]},
            {"snapshots":[{"events":[{"entity_id":"1","key":"","uuid":"u","timestamp":1.5,"revenue":2.5,"value":"x","tags":[]}],
              "decisions":[{"campaign_id":"1","experiment_id":2,"variation_id":7,
                "metadata":{"flag_key":"f","rule_key":"r","rule_type":"t","variation_key":"v","enabled":"true"}}]}]},
            7]}"#;
        let problems = validate_payload(body).unwrap_err();
        assert_eq!(
            paths(&problems),
            [
                "$.account_id",
                "$.revision",
                "$.anonymize_ip",
                "$.visitors[1].visitor_id",
                "$.visitors[1].snapshots",
                "$.visitors[1].attributes[0].value",
                "$.visitors[2].visitor_id",
                "$.visitors[2].snapshots[0].events[0].key",
                "$.visitors[2].snapshots[0].events[0].timestamp",
                "$.visitors[2].snapshots[0].events[0].revenue",
                "$.visitors[2].snapshots[0].events[0].value",
                "$.visitors[2].snapshots[0].events[0].tags",
                "$.visitors[2].snapshots[0].decisions[0].experiment_id",
                "$.visitors[2].snapshots[0].decisions[0].variation_id",
                "$.visitors[2].snapshots[0].decisions[0].metadata.enabled",
                "$.visitors[3]",
            ]
        );
        assert_eq!(problems[0].message, "expected a string, found a number");
        assert_eq!(problems[3].message, "must not be empty");
        assert_eq!(problems[6].message, MISSING);
    }

    #[test]
    fn negative_timestamp_is_named() {
        let body = br#"{"account_id":"1","visitors":[{"visitor_id":"u","snapshots":[{"events":[{"entity_id":"1","key":"k","uuid":"u","timestamp":-3}]}]}]}"#;
        let problems = validate_payload(body).unwrap_err();
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].message, "must not be negative");
    }

    #[test]
    fn syntax_errors_give_line_and_column() {
        let problems =
            validate_payload(b"{\"account_id\": \"1\",\n  \"visitors\": [,]}").unwrap_err();
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].path, "$");
        assert!(
            problems[0]
                .message
                .starts_with("invalid JSON at line 2, column 16: "),
            "{}",
            problems[0].message
        );
        let shape =
            validate_payload_shape(b"{\"account_id\": \"1\",\n  \"visitors\": [,]}").unwrap_err();
        assert_eq!(shape, problems);
    }

    #[test]
    fn oversized_body_is_a_problem_even_when_well_formed() {
        let body = fixture("conversion.json");
        let v = Validator::full().max_payload_bytes(Some(body.len() - 1));
        let problems = v.validate(&body).unwrap_err();
        assert_eq!(paths(&problems), ["$"]);
        assert!(problems[0].message.contains("limit"));
        assert!(
            Validator::full()
                .max_payload_bytes(Some(body.len()))
                .validate(&body)
                .is_ok()
        );
    }

    #[test]
    fn problems_are_bounded_and_the_rest_counted() {
        let visitors: Vec<String> = (0..10).map(|_| "{}".to_owned()).collect();
        let body = format!(
            r#"{{"account_id":"1","visitors":[{}]}}"#,
            visitors.join(",")
        );
        let problems = Validator::full()
            .max_problems(5)
            .validate(body.as_bytes())
            .unwrap_err();
        assert_eq!(problems.len(), 6);
        assert_eq!(problems[5].path, "$");
        assert_eq!(problems[5].message, "15 more problems not listed");
    }

    /// The byte scanner and the tree walker apply the same shape rules.
    #[test]
    fn shape_scan_agrees_with_shape_walk() {
        let cases: &[&[u8]] = &[
            b"[]",
            b"\"x\"",
            b"{}",
            br#"{"account_id":null,"visitors":null}"#,
            br#"{"account_id":"","visitors":[]}"#,
            br#"{"account_id":1,"visitors":{}}"#,
            br#"{"account_id":"1","visitors":[1,{},{"visitor_id":"","snapshots":[ ]},
                {"visitor_id":3,"snapshots":{}},{"visitor_id":"u","snapshots":[{}]}]}"#,
            br#"{"account_id":"1","visitors":[{"visitor_id":"u","snapshots":[{"x":1}],"other":[1,2]}]}"#,
        ];
        for case in cases {
            let scanned = validate_payload_shape(case);
            let value: Value = serde_json::from_slice(case).unwrap();
            let walked = Validator::shape()
                .validate_value(&value, "$")
                .map(|s| s.visitors);
            assert_eq!(
                scanned.clone().map(|s| s.visitors),
                walked,
                "{}",
                String::from_utf8_lossy(case)
            );
            if let Ok(s) = scanned {
                assert_eq!(s.bytes, case.len());
            }
        }
    }

    #[test]
    fn validate_value_prefixes_paths_with_root() {
        let value = serde_json::json!({"account_id": "1", "visitors": []});
        let problems = Validator::full()
            .validate_value(&value, "$.params")
            .unwrap_err();
        assert_eq!(paths(&problems), ["$.params.visitors"]);
    }

    #[test]
    fn shape_reports_duplicate_fields_at_the_visitor() {
        let body = br#"{"account_id":"1","visitors":[{"visitor_id":"a","visitor_id":"b","snapshots":[{}]}]}"#;
        let problems = validate_payload_shape(body).unwrap_err();
        assert_eq!(paths(&problems), ["$.visitors[0]"]);
        assert!(problems[0].message.contains("duplicate field"));
    }
}
