//! [`EventFactory`]: user events in, Event API requests out, none over the size limit.
//!
//! This is the *payload* builder: many [`UserEvent`]s to request bodies. The processor calls
//! it; applications rarely do. To build a user event from a datafile and a decision, use
//! [`UserEventFactory`](crate::UserEventFactory) (the *user-event* builder) instead.

use std::sync::Arc;

use bytes::Bytes;

use crate::event::{EventContext, UserEvent};
use crate::log_event::LogEvent;
use crate::raw::{MAX_PAYLOAD_BYTES, RawBatch, encoded_len};
use crate::visitor_json::{estimated_len, write_header_fields, write_visitor};

/// Turns user events into [`LogEvent`]s: one visitor object per event, as the SDKs send,
/// events of one context per payload, and as many payloads as needed so that none is larger
/// than `max_batch_bytes`.
///
/// Not to be confused with [`UserEventFactory`](crate::UserEventFactory), which builds the
/// user events this one batches.
///
/// ```
/// use std::sync::Arc;
/// use tributary::{Conversion, EventContext, EventFactory, UserEvent, UserEventKind};
/// let ctx = Arc::new(EventContext::new("1", "2", "3"));
/// let events: Vec<UserEvent> = (0..3).map(|i| UserEvent::new(ctx.clone(), format!("u{i}"), vec![],
///     UserEventKind::Conversion(Conversion { event_id: "7".into(), event_key: "buy".into(),
///         revenue: None, value: None, tags: None }))).collect();
/// let out = EventFactory::new().create_log_events(&events);
/// assert_eq!(out.log_events.len(), 1);
/// assert_eq!(out.log_events[0].visitor_count(), 3);
/// assert!(out.oversized.is_empty());
/// ```
#[derive(Debug, Clone, Copy)]
pub struct EventFactory {
    max_batch_bytes: usize,
}

impl Default for EventFactory {
    fn default() -> Self {
        Self::new()
    }
}

/// A user event that alone serialises to a payload over the limit. It cannot be sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("event {uuid} needs a {size}-byte payload on its own, over the {limit}-byte limit")]
pub struct OversizedEvent {
    /// Index of the event in the factory's input.
    pub index: usize,
    /// The event's uuid.
    pub uuid: String,
    /// Size of the smallest payload carrying it.
    pub size: usize,
    /// The limit in force.
    pub limit: usize,
}

/// What [`EventFactory::create_log_events`] made: the requests, and the events too large to
/// send (reported, never silently dropped).
#[derive(Debug, Default)]
pub struct FactoryOutput {
    /// Requests in input order.
    pub log_events: Vec<LogEvent>,
    /// Events left out because each alone exceeds the limit.
    pub oversized: Vec<OversizedEvent>,
}

impl FactoryOutput {
    /// The requests, or the first oversized event as an error.
    pub fn into_result(self) -> Result<Vec<LogEvent>, OversizedEvent> {
        match self.oversized.into_iter().next() {
            Some(e) => Err(e),
            None => Ok(self.log_events),
        }
    }
}

impl EventFactory {
    /// A factory with the Event API's 3,500,000-byte limit.
    pub fn new() -> Self {
        EventFactory {
            max_batch_bytes: MAX_PAYLOAD_BYTES,
        }
    }

    /// A factory that keeps every payload at most `max_batch_bytes` long.
    pub fn with_max_batch_bytes(max_batch_bytes: usize) -> Self {
        EventFactory { max_batch_bytes }
    }

    /// The size limit in force.
    pub fn max_batch_bytes(&self) -> usize {
        self.max_batch_bytes
    }

    /// Builds the requests for `events`. Consecutive events with equal contexts share
    /// payloads; a change of context starts a new one.
    pub fn create_log_events(&self, events: &[UserEvent]) -> FactoryOutput {
        let mut out = FactoryOutput::default();
        let mut start = 0;
        while start < events.len() {
            let ctx = &events[start].context;
            let end = events[start..]
                .iter()
                .position(|e| !same_context(&e.context, ctx))
                .map_or(events.len(), |n| start + n);
            self.build_run(ctx, &events[start..end], start, &mut out);
            start = end;
        }
        out
    }

    /// One run of events sharing `ctx`. Each visitor is serialised once, straight into the
    /// body it will be sent in; only a visitor that does not fit its body is copied, once,
    /// into the next.
    fn build_run(
        &self,
        ctx: &Arc<EventContext>,
        events: &[UserEvent],
        offset: usize,
        out: &mut FactoryOutput,
    ) {
        let header = header_bytes(ctx);
        let url = ctx.region.endpoint();
        // Sized from the events' own strings so that the body does not regrow (a regrowth
        // copies all visitors written so far); over-estimates a little for plain ASCII.
        let visitors: usize = events.iter().map(estimated_len).sum();
        let capacity = visitors.min(self.max_batch_bytes) + header.len() + 32;
        let mut body = BodyWriter::new(&header, capacity);
        for (i, event) in events.iter().enumerate() {
            let mark = body.buf.len();
            if !body.spans.is_empty() {
                body.buf.push(b',');
            }
            let start = body.buf.len();
            write_visitor(&mut body.buf, event);
            let len = body.buf.len() - start;
            let alone = encoded_len(header.len(), len, 1);
            if alone > self.max_batch_bytes {
                body.buf.truncate(mark);
                out.oversized.push(OversizedEvent {
                    index: offset + i,
                    uuid: event.uuid.to_string(),
                    size: alone,
                    limit: self.max_batch_bytes,
                });
                continue;
            }
            let with = encoded_len(header.len(), body.visitors_len + len, body.spans.len() + 1);
            if with > self.max_batch_bytes && !body.spans.is_empty() {
                let visitor = body.buf[start..].to_vec();
                body.buf.truncate(mark);
                let full = std::mem::replace(&mut body, BodyWriter::new(&header, capacity));
                out.log_events.push(full.finish(url, &header, ctx));
                let start = body.buf.len();
                body.buf.extend_from_slice(&visitor);
                body.push_span(start);
            } else {
                body.push_span(start);
            }
        }
        if !body.spans.is_empty() {
            out.log_events.push(body.finish(url, &header, ctx));
        }
    }
}

/// A request body being written: `{HEADER,"visitors":[` then visitors, closed by `finish`.
struct BodyWriter {
    buf: Vec<u8>,
    /// Where each visitor lies in `buf`.
    spans: Vec<std::ops::Range<usize>>,
    /// Their total length.
    visitors_len: usize,
}

impl BodyWriter {
    fn new(header: &[u8], capacity: usize) -> Self {
        let mut buf = Vec::with_capacity(capacity);
        buf.push(b'{');
        buf.extend_from_slice(header);
        if !header.is_empty() {
            buf.push(b',');
        }
        buf.extend_from_slice(br#""visitors":["#);
        BodyWriter {
            buf,
            spans: Vec::new(),
            visitors_len: 0,
        }
    }

    /// Records the visitor written from `start` to the end of the buffer.
    fn push_span(&mut self, start: usize) {
        self.visitors_len += self.buf.len() - start;
        self.spans.push(start..self.buf.len());
    }

    fn finish(mut self, url: &str, header: &Bytes, ctx: &Arc<EventContext>) -> LogEvent {
        self.buf.extend_from_slice(b"]}");
        let body = Bytes::from(self.buf);
        let visitors = self.spans.into_iter().map(|r| body.slice(r)).collect();
        let batch = RawBatch::from_parts(header.clone(), visitors);
        LogEvent::from_encoded(url, batch, body).with_context(ctx.clone())
    }
}

fn same_context(a: &Arc<EventContext>, b: &Arc<EventContext>) -> bool {
    Arc::ptr_eq(a, b) || a == b
}

/// The header fields in the order the Python SDK writes them, without braces: a list of
/// fields to embed in a body.
fn header_bytes(ctx: &EventContext) -> Bytes {
    let mut out = Vec::with_capacity(
        160 + ctx.account_id.len()
            + ctx.project_id.len()
            + ctx.revision.len()
            + ctx.client_name.len()
            + ctx.client_version.len(),
    );
    write_header_fields(&mut out, ctx);
    Bytes::from(out)
}
