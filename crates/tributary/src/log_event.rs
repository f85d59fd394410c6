//! [`LogEvent`]: one Event API request, ready to dispatch.

use std::sync::Arc;

use bytes::Bytes;

use crate::event::{EventContext, Region};
use crate::payload::EventBatch;
use crate::raw::RawBatch;

/// One Event API request: where to send it, how, and the `EventBatch` body.
///
/// The body is held serialised ([`LogEvent::body`]) because that is what is sent; listeners
/// that want the typed payload call [`LogEvent::params`], which parses it.
///
/// ```
/// use bytes::Bytes;
/// use tributary::{LogEvent, RawBatch};
/// let batch = RawBatch::from_parts(Bytes::from_static(br#""account_id":"1""#),
///     vec![Bytes::from_static(br#"{"visitor_id":"u","snapshots":[]}"#)]);
/// let log_event = LogEvent::new("https://logx.optimizely.com/v1/events", batch);
/// assert_eq!(log_event.http_verb, "POST");
/// assert_eq!(log_event.params().unwrap().visitors[0].visitor_id, "u");
/// ```
#[derive(Debug, Clone)]
pub struct LogEvent {
    /// Endpoint URL.
    pub url: String,
    /// Always `POST`.
    pub http_verb: &'static str,
    /// Request headers: `Content-Type: application/json`.
    pub headers: Vec<(&'static str, &'static str)>,
    batch: RawBatch,
    body: Bytes,
    context: Option<Arc<EventContext>>,
}

impl LogEvent {
    /// A POST of `batch` to `url` with the JSON content type.
    pub fn new(url: impl Into<String>, batch: RawBatch) -> Self {
        let body = batch.encode();
        LogEvent {
            url: url.into(),
            http_verb: "POST",
            headers: vec![("Content-Type", "application/json")],
            batch,
            body,
            context: None,
        }
    }

    /// A LogEvent whose body the caller already encoded: `body` must equal `batch.encode()`.
    pub(crate) fn from_encoded(url: &str, batch: RawBatch, body: Bytes) -> Self {
        debug_assert_eq!(body.len(), batch.encoded_len());
        LogEvent {
            url: url.to_owned(),
            http_verb: "POST",
            headers: vec![("Content-Type", "application/json")],
            batch,
            body,
            context: None,
        }
    }

    pub(crate) fn with_context(mut self, context: Arc<EventContext>) -> Self {
        self.context = Some(context);
        self
    }

    /// The context of the user events this was built from, when built by
    /// [`crate::EventFactory`].
    pub fn context(&self) -> Option<&Arc<EventContext>> {
        self.context.as_ref()
    }

    /// Which Event API region the events belong to: their context's region when built by
    /// [`crate::EventFactory`]. A LogEvent built by hand ([`LogEvent::new`]) has no context;
    /// its region is read from its URL: EU for the EU Event API endpoint, an `eu.` host or a
    /// relay's `/eu/v1/events` path, else US.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use tributary::{LogEvent, RawBatch, Region};
    /// let batch = RawBatch::from_parts(Bytes::from_static(br#""account_id":"1""#), vec![]);
    /// let to_relay = LogEvent::new("http://relay:8080/eu/v1/events", batch);
    /// assert_eq!(to_relay.region(), Region::Eu);
    /// ```
    pub fn region(&self) -> Region {
        match &self.context {
            Some(ctx) => ctx.region,
            None if is_eu_url(&self.url) => Region::Eu,
            None => Region::Us,
        }
    }

    /// The serialised `EventBatch`: the request body.
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// Header and visitors, for splitting.
    pub fn batch(&self) -> &RawBatch {
        &self.batch
    }

    /// Number of visitors (user events) in the body.
    pub fn visitor_count(&self) -> usize {
        self.batch.visitors().len()
    }

    /// A LogEvent to the same URL with the visitors `range` of this one.
    pub fn slice(&self, range: std::ops::Range<usize>) -> LogEvent {
        LogEvent {
            context: self.context.clone(),
            ..LogEvent::new(self.url.clone(), self.batch.slice(range))
        }
    }

    /// The body parsed as a typed [`EventBatch`].
    pub fn params(&self) -> Result<EventBatch, serde_json::Error> {
        serde_json::from_slice(&self.body)
    }

    /// `{"url", "http_verb", "headers", "params"}`, the shape the SDKs' LogEvent has.
    pub fn to_json(&self) -> Result<serde_json::Value, serde_json::Error> {
        let params: serde_json::Value = serde_json::from_slice(&self.body)?;
        let headers: serde_json::Map<String, serde_json::Value> = self
            .headers
            .iter()
            .map(|(k, v)| ((*k).to_owned(), serde_json::Value::from(*v)))
            .collect();
        Ok(serde_json::json!({
            "url": self.url,
            "http_verb": self.http_verb,
            "headers": headers,
            "params": params,
        }))
    }
}

/// The EU Event API endpoint, an `eu.` host, or a relay's `/eu/v1/events`.
fn is_eu_url(url: &str) -> bool {
    url == Region::Eu.endpoint()
        || url
            .split_once("://")
            .is_some_and(|(_, rest)| rest.starts_with("eu.") || rest.contains("/eu/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eu_urls_are_recognised() {
        assert!(is_eu_url("https://eu.logx.optimizely.com/v1/events"));
        assert!(is_eu_url("http://127.0.0.1:8080/eu/v1/events"));
        assert!(!is_eu_url("https://logx.optimizely.com/v1/events"));
        assert!(!is_eu_url("http://relay/v1/events"));
    }
}
