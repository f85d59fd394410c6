//! Packing: leased payloads grouped by route and header and cut into upstream batches.

use std::collections::HashMap;

use bytes::Bytes;
use tributary::raw::encoded_len;

use super::{ForwarderConfig, Suspects};
use crate::{Leased, Route};

/// Payloads of one route and header, to be sent as one request.
pub(super) struct Batch {
    pub(super) route: Route,
    pub(super) header: Bytes,
    pub(super) items: Vec<Leased>,
}

impl Batch {
    pub(super) fn events(&self) -> usize {
        self.items
            .iter()
            .map(|l| l.payload.visitor_count as usize)
            .sum()
    }

    pub(super) fn body(&self, items: &[Leased]) -> Bytes {
        tributary::raw::write_body(&self.header, items.iter().map(|l| &l.payload.visitors))
    }
}

/// Groups by (route, header), keeping the spool's order within each group, and cuts each
/// group at the byte and event limits. Suspect payloads (see [`Suspects`]) go in batches of
/// their own, cut at the smallest group size any of them was left in.
pub(super) fn pack(
    leased: Vec<Leased>,
    config: &ForwarderConfig,
    suspects: &Suspects,
) -> Vec<Batch> {
    let mut order: Vec<(Route, Bytes)> = Vec::new();
    let mut groups: HashMap<(Route, Bytes), Group> = HashMap::new();
    for l in leased {
        let key = (l.payload.route.clone(), l.payload.header.clone());
        let hint = suspects.take(&l.payload);
        let group = groups.entry(key.clone()).or_insert_with(|| {
            order.push(key);
            (Vec::new(), Vec::new())
        });
        match hint {
            Some(h) => group.1.push((l, h)),
            None => group.0.push(l),
        }
    }
    let mut batches = Vec::new();
    for key in order {
        let Some((clean, suspect)) = groups.remove(&key) else {
            continue;
        };
        let (route, header) = key;
        let mut cut = Cutter::new(&route, &header, config, &mut batches);
        for l in clean {
            cut.push(l, config.max_batch_events);
        }
        cut.finish();
        for (l, hint) in suspect {
            cut.push(l, hint.clamp(1, config.max_batch_events));
        }
        cut.finish();
    }
    batches
}

/// The payloads of one route and header: clean ones, and suspects with their group size.
type Group = (Vec<Leased>, Vec<(Leased, usize)>);

/// Fills batches of one route and header up to the byte limit and an event limit.
struct Cutter<'a> {
    route: &'a Route,
    header: &'a Bytes,
    max_bytes: usize,
    out: &'a mut Vec<Batch>,
    current: Vec<Leased>,
    bytes: usize,
    events: usize,
    limit: usize,
}

impl<'a> Cutter<'a> {
    fn new(
        route: &'a Route,
        header: &'a Bytes,
        config: &ForwarderConfig,
        out: &'a mut Vec<Batch>,
    ) -> Self {
        Cutter {
            route,
            header,
            max_bytes: config.max_batch_bytes,
            out,
            current: Vec::new(),
            bytes: 0,
            events: 0,
            limit: usize::MAX,
        }
    }

    /// Adds `l` to the current batch, or starts a new one when `l` would take it past the
    /// bytes or the event limit (the smallest limit of its members). A payload alone may
    /// pass the limits: it is never split here.
    fn push(&mut self, l: Leased, event_limit: usize) {
        let v_len = l.payload.visitors.len();
        let v_events = l.payload.visitor_count as usize;
        let limit = self.limit.min(event_limit);
        let would_bytes = encoded_len(
            self.header.len(),
            self.bytes + v_len,
            self.current.len() + 1,
        );
        if !self.current.is_empty()
            && (would_bytes > self.max_bytes || self.events + v_events > limit)
        {
            self.finish();
        }
        self.limit = self.limit.min(event_limit);
        self.bytes += v_len;
        self.events += v_events;
        self.current.push(l);
    }

    fn finish(&mut self) {
        if !self.current.is_empty() {
            self.out.push(Batch {
                route: self.route.clone(),
                header: self.header.clone(),
                items: std::mem::take(&mut self.current),
            });
        }
        (self.bytes, self.events, self.limit) = (0, 0, usize::MAX);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::time::Duration;

    use proptest::prelude::*;
    use tributary::RawBatch;

    use super::*;
    use crate::{Payload, Receipt};

    /// A visitor object with awkward but valid JSON: escapes, non-ASCII, number spellings.
    fn arb_visitor() -> impl Strategy<Value = String> {
        (
            "[a-zA-Z0-9 é\\\"\u{1F600}]{0,40}",
            prop_oneof![
                Just("4200"),
                Just("3.50"),
                Just("1e3"),
                Just("-0"),
                Just("null")
            ],
            0usize..300,
        )
            .prop_map(|(id, n, pad)| {
                let id = serde_json::to_string(&id).unwrap();
                format!(
                    r#"{{ "visitor_id" : {id}, "snapshots":[{{}}], "n": {n}, "pad": "{}" }}"#,
                    "x".repeat(pad)
                )
            })
    }

    fn arb_payload() -> impl Strategy<Value = (u8, u8, Vec<String>)> {
        (
            0u8..2,
            0u8..3,
            proptest::collection::vec(arb_visitor(), 1..6),
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Merging then splitting: every visitor of every payload comes out exactly once,
        /// byte for byte, in a batch of its own route and header, none over the limits.
        #[test]
        fn packing_preserves_every_visitor(
            payloads in proptest::collection::vec(arb_payload(), 1..40),
            max_batch_bytes in 1500usize..6000,
            max_batch_events in 1usize..20,
        ) {
            let mut leased = Vec::new();
            let mut want = Vec::new();
            for (i, (route, rev, visitors)) in payloads.iter().enumerate() {
                let route = ["us", "eu"][*route as usize];
                let body = format!(
                    r#"{{"account_id":"1","revision":"{rev}","visitors":[{}]}}"#,
                    visitors.join(",")
                );
                let batch = RawBatch::parse(Bytes::from(body)).unwrap();
                for v in batch.visitors() {
                    want.push((Route::from(route), batch.header().clone(), v.clone()));
                }
                leased.push(Leased {
                    receipt: Receipt(i.to_string()),
                    payload: Payload::from_batch(route, &batch),
                    attempts: 0,
                    appended_at_ms: 0,
                });
            }
            let config = ForwarderConfig {
                max_batch_bytes,
                max_batch_events,
                concurrency: 1,
                flush_interval: Duration::from_secs(1),
                max_retry_delay: Duration::from_secs(1),
                lease_for: Duration::from_secs(60),
                isolation_budget: 100,
                suspect_delay: Duration::from_secs(1),
            };
            let mut got = Vec::new();
            for batch in pack(leased, &config, &Suspects::new(16)) {
                let body = batch.body(&batch.items);
                let events = batch.events();
                // A batch may exceed the limits only when it holds a single payload.
                if batch.items.len() > 1 {
                    prop_assert!(body.len() <= max_batch_bytes, "{} bytes", body.len());
                    prop_assert!(events <= max_batch_events);
                }
                let parsed = RawBatch::parse(body).unwrap();
                prop_assert_eq!(parsed.header(), &batch.header);
                for v in parsed.visitors() {
                    got.push((batch.route.clone(), batch.header.clone(), v.clone()));
                }
            }
            want.sort();
            got.sort();
            prop_assert_eq!(got, want);
        }
    }
}
