//! How a [`Payload`] becomes SQS messages, and how a received message becomes a payload
//! again.
//!
//! Body: the payload as an Event API JSON body (`{header..., "visitors":[...]}`). Message
//! attributes: `route`, `appended_at_ms`, and on dead letters `reason` and `dead_at_ms`.

use aws_sdk_sqs::types::{
    Message, MessageAttributeValue, MessageSystemAttributeName, SendMessageBatchRequestEntry,
};
use bytes::Bytes;
use tributary::RawBatch;

use crate::{Payload, SpoolError};

/// Attribute: the upstream a payload goes to.
pub(super) const ROUTE: &str = "route";
/// Attribute: when the payload was first appended (ms since the epoch); kept through dead
/// letters and retries, so ages stay true.
pub(super) const APPENDED_AT: &str = "appended_at_ms";
/// Attribute of dead letters: why.
pub(super) const REASON: &str = "reason";
/// Attribute of dead letters: when (ms since the epoch).
pub(super) const DEAD_AT: &str = "dead_at_ms";

/// Route of a message without a `route` attribute (one sent by another producer).
pub(super) const DEFAULT_ROUTE: &str = "us";

/// Bytes of each message kept free for its attributes: names, data types and values of
/// `route`, two timestamps and a `reason` of at most [`MAX_REASON_BYTES`]. SQS counts
/// attributes against the message size limit.
pub(super) const ATTRIBUTE_HEADROOM: usize = 2048;

/// A dead letter's reason is cut to this many bytes.
pub(super) const MAX_REASON_BYTES: usize = 1024;

/// One message to send.
#[derive(Debug, Clone)]
pub(super) struct Outgoing {
    pub body: String,
    pub route: String,
    pub appended_at_ms: u64,
    /// Set on dead letters.
    pub dead: Option<(String, u64)>,
    /// Seconds before SQS delivers it (at most 900); 0 for at once.
    pub delay_secs: i32,
}

impl Outgoing {
    /// What SQS counts against its size limits: body plus attribute names, types and values.
    pub fn size(&self) -> usize {
        let attr = |name: &str, kind: &str, value: usize| name.len() + kind.len() + value;
        let mut n = self.body.len()
            + attr(ROUTE, "String", self.route.len())
            + attr(APPENDED_AT, "Number", 20);
        if let Some((reason, _)) = &self.dead {
            n += attr(REASON, "String", reason.len()) + attr(DEAD_AT, "Number", 20);
        }
        n
    }

    /// The batch entry, with `id` unique within its call.
    pub fn entry(&self, id: usize) -> Result<SendMessageBatchRequestEntry, SpoolError> {
        let mut entry = SendMessageBatchRequestEntry::builder()
            .id(id.to_string())
            .message_body(self.body.clone())
            .message_attributes(ROUTE, string_attr(&self.route)?)
            .message_attributes(APPENDED_AT, number_attr(self.appended_at_ms)?);
        if let Some((reason, at)) = &self.dead {
            entry = entry
                .message_attributes(REASON, string_attr(reason)?)
                .message_attributes(DEAD_AT, number_attr(*at)?);
        }
        if self.delay_secs > 0 {
            entry = entry.delay_seconds(self.delay_secs.min(900));
        }
        entry
            .build()
            .map_err(|e| SpoolError::Storage(format!("cannot build an SQS message: {e}")))
    }
}

fn string_attr(v: &str) -> Result<MessageAttributeValue, SpoolError> {
    MessageAttributeValue::builder()
        .data_type("String")
        .string_value(v)
        .build()
        .map_err(|e| SpoolError::Storage(format!("cannot build an SQS attribute: {e}")))
}

fn number_attr(v: u64) -> Result<MessageAttributeValue, SpoolError> {
    MessageAttributeValue::builder()
        .data_type("Number")
        .string_value(v.to_string())
        .build()
        .map_err(|e| SpoolError::Storage(format!("cannot build an SQS attribute: {e}")))
}

/// Milliseconds since the Unix epoch.
pub(super) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// `payload` as one or more messages of at most `max_message_bytes` each (split by
/// visitors, order kept). A visitor too large to fit alone fails the whole payload.
pub(super) fn encode(
    payload: &Payload,
    max_message_bytes: usize,
    now: u64,
) -> Result<Vec<Outgoing>, SpoolError> {
    let batch = payload
        .to_batch()
        .map_err(|e| SpoolError::Storage(format!("stored payload does not parse: {e}")))?;
    let limit = max_message_bytes.saturating_sub(ATTRIBUTE_HEADROOM);
    let parts = batch.split_to_fit(limit).map_err(|e| {
        SpoolError::TooLarge(format!(
            "visitor {} needs a {}-byte message, over the {limit}-byte SQS message budget \
             (--sqs-max-message-bytes minus {ATTRIBUTE_HEADROOM} for attributes)",
            e.index, e.size
        ))
    })?;
    parts
        .into_iter()
        .map(|part| {
            let body = String::from_utf8(part.encode().to_vec())
                .map_err(|e| SpoolError::Storage(format!("payload is not UTF-8: {e}")))?;
            Ok(Outgoing {
                body: sqs_safe(body),
                route: payload.route.as_str().to_owned(),
                appended_at_ms: now,
                dead: None,
                delay_secs: 0,
            })
        })
        .collect()
}

/// SQS refuses the Unicode noncharacters U+FFFE and U+FFFF in a body. JSON text can hold
/// them only inside strings, where `\ufffe` / `\uffff` mean the same; every other byte is
/// kept as received.
fn sqs_safe(body: String) -> String {
    if body.contains(['\u{fffe}', '\u{ffff}']) {
        body.replace('\u{fffe}', "\\ufffe")
            .replace('\u{ffff}', "\\uffff")
    } else {
        body
    }
}

/// A received message, read.
#[derive(Debug, Clone)]
pub(super) struct Received {
    pub receipt: String,
    pub message_id: String,
    pub body: String,
    pub route: String,
    pub appended_at_ms: u64,
    /// `ApproximateReceiveCount`, this receive included.
    pub receive_count: u32,
    /// The payload, or why the body is not one.
    pub payload: Result<Payload, String>,
    /// Dead letters: reason and time.
    pub dead: Option<(String, u64)>,
}

impl Received {
    /// Reads `msg`; `None` when SQS left out the receipt handle (never seen in practice).
    pub fn read(msg: &Message) -> Option<Received> {
        let receipt = msg.receipt_handle()?.to_owned();
        let body = msg.body().unwrap_or_default().to_owned();
        let attrs = msg.message_attributes();
        let attr = |name: &str| -> Option<&str> { attrs?.get(name)?.string_value() };
        let system = |name: MessageSystemAttributeName| -> Option<u64> {
            msg.attributes()?.get(&name)?.parse().ok()
        };
        let route = attr(ROUTE).unwrap_or(DEFAULT_ROUTE).to_owned();
        let appended_at_ms = attr(APPENDED_AT)
            .and_then(|v| v.parse().ok())
            .or_else(|| system(MessageSystemAttributeName::SentTimestamp))
            .unwrap_or_else(now_ms);
        let receive_count = system(MessageSystemAttributeName::ApproximateReceiveCount)
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(1);
        let dead = attr(REASON).map(|reason| {
            let at = attr(DEAD_AT)
                .and_then(|v| v.parse().ok())
                .or_else(|| system(MessageSystemAttributeName::SentTimestamp))
                .unwrap_or(appended_at_ms);
            (reason.to_owned(), at)
        });
        let payload = RawBatch::parse(Bytes::from(body.clone().into_bytes()))
            .map(|batch| Payload::from_batch(route.as_str(), &batch))
            .map_err(|e| format!("message body is not an Event API payload: {e}"));
        Some(Received {
            receipt,
            message_id: msg.message_id().unwrap_or_default().to_owned(),
            body,
            route,
            appended_at_ms,
            receive_count,
            payload,
            dead,
        })
    }

    /// The same message, to send elsewhere (the dead-letter queue, or back from it).
    pub fn outgoing(&self, dead: Option<(String, u64)>) -> Outgoing {
        Outgoing {
            body: self.body.clone(),
            route: self.route.clone(),
            appended_at_ms: self.appended_at_ms,
            dead,
            delay_secs: 0,
        }
    }
}

/// Cuts `reason` to [`MAX_REASON_BYTES`] on a character boundary.
pub(super) fn short_reason(reason: &str) -> String {
    if reason.len() <= MAX_REASON_BYTES {
        return reason.to_owned();
    }
    let mut end = MAX_REASON_BYTES;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason[..end].to_owned()
}

/// For tests: a message as SQS would return it.
#[cfg(test)]
pub(super) fn fake_message(body: &str, attrs: &[(&str, &str)], receive_count: u32) -> Message {
    let mut m = Message::builder()
        .receipt_handle("r")
        .message_id("m")
        .body(body)
        .attributes(
            MessageSystemAttributeName::ApproximateReceiveCount,
            receive_count.to_string(),
        );
    let map: std::collections::HashMap<String, MessageAttributeValue> = attrs
        .iter()
        .filter_map(|(k, v)| Some(((*k).to_owned(), string_attr(v).ok()?)))
        .collect();
    m = m.set_message_attributes(Some(map));
    m.build()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn payload(visitors: usize, visitor_bytes: usize) -> Payload {
        let pad = "x".repeat(visitor_bytes);
        let vs: Vec<String> = (0..visitors)
            .map(|i| format!(r#"{{"visitor_id":"v{i}","snapshots":[],"pad":"{pad}"}}"#))
            .collect();
        let body = format!(
            r#"{{"account_id":"1","revision":"7","visitors":[{}]}}"#,
            vs.join(",")
        );
        Payload::from_batch("eu", &RawBatch::parse(Bytes::from(body)).unwrap())
    }

    #[test]
    fn large_payloads_split_by_visitors_and_read_back() {
        let p = payload(40, 20_000);
        let out = encode(&p, 262_144, 5).unwrap();
        assert!(out.len() >= 4, "{} messages", out.len());
        let mut visitors = 0;
        for o in &out {
            assert!(
                o.size() <= 262_144 - ATTRIBUTE_HEADROOM + 100,
                "{}",
                o.size()
            );
            let m = fake_message(&o.body, &[(ROUTE, &o.route), (APPENDED_AT, "5")], 1);
            let r = Received::read(&m).unwrap();
            let back = r.payload.unwrap();
            assert_eq!(back.route, "eu");
            assert_eq!(back.header, p.header);
            assert_eq!(r.appended_at_ms, 5);
            visitors += back.visitor_count;
        }
        assert_eq!(visitors, 40);
    }

    #[test]
    fn one_visitor_over_the_limit_is_too_large() {
        let err = encode(&payload(1, 300_000), 262_144, 0).unwrap_err();
        assert!(matches!(err, SpoolError::TooLarge(_)), "{err}");
    }

    #[test]
    fn foreign_and_broken_messages() {
        let m = fake_message(r#"{"account_id":"1","visitors":[]}"#, &[], 3);
        let r = Received::read(&m).unwrap();
        assert_eq!(r.route, "us");
        assert_eq!(r.receive_count, 3);
        assert!(r.payload.is_ok());
        let r = Received::read(&fake_message("not json", &[], 1)).unwrap();
        assert!(r.payload.is_err());
    }

    #[test]
    fn noncharacters_are_escaped_and_reasons_cut() {
        assert_eq!(sqs_safe("a\u{ffff}b".into()), "a\\uffffb");
        assert_eq!(short_reason(&"é".repeat(1000)).len(), 1024);
    }
}
