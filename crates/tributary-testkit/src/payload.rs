//! Reading Event API bodies recorded by the upstream.

use serde_json::Value;

use crate::upstream::RecordedRequest;

/// Every `visitors[].snapshots[].events[].uuid` in an Event API body, in body order.
/// A body that is not JSON, or has no such fields, gives an empty list.
///
/// ```
/// let body = br#"{"visitors":[{"snapshots":[{"events":[{"uuid":"a"},{"uuid":"b"}]}]}]}"#;
/// assert_eq!(tributary_testkit::event_uuids(body), ["a", "b"]);
/// ```
pub fn event_uuids(body: &[u8]) -> Vec<String> {
    let Ok(json) = serde_json::from_slice::<Value>(body) else {
        return Vec::new();
    };
    visitors(&json)
        .flat_map(|v| array(&v["snapshots"]))
        .flat_map(|s| array(&s["events"]))
        .filter_map(|e| e["uuid"].as_str().map(str::to_owned))
        .collect()
}

/// Every `visitors[].visitor_id` in an Event API body, in body order.
pub fn visitor_ids(body: &[u8]) -> Vec<String> {
    let Ok(json) = serde_json::from_slice::<Value>(body) else {
        return Vec::new();
    };
    visitors(&json)
        .filter_map(|v| v["visitor_id"].as_str().map(str::to_owned))
        .collect()
}

/// The event uuids of the requests that were answered with a 2xx, in arrival order: what
/// the destination accepted. Duplicates are kept so callers can check "exactly once".
pub fn delivered_uuids(requests: &[RecordedRequest]) -> Vec<String> {
    requests
        .iter()
        .filter(|r| r.is_success())
        .flat_map(|r| event_uuids(&r.body))
        .collect()
}

fn visitors(json: &Value) -> impl Iterator<Item = &Value> {
    array(&json["visitors"])
}

fn array(v: &Value) -> impl Iterator<Item = &Value> {
    v.as_array().map(|a| a.iter()).into_iter().flatten()
}
