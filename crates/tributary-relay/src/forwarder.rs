//! The forwarder: spool in, few large upstream requests out.
//!
//! One cycle leases a window of pending payloads, groups them by route and header (payloads
//! merge only when every top-level field but `visitors` is equal and they go to the same
//! upstream), packs each group into batches of at most `max_batch_bytes` and
//! `max_batch_events`, and sends the batches with bounded concurrency. Each payload's fate
//! follows its batch's answer:
//!
//! - 2xx: acknowledged (deleted from the spool);
//! - transient failure (connection, timeout, 5xx, 408, 429): released, visible again after a
//!   backoff that grows with the payload's attempts, or after the upstream's `Retry-After`;
//! - a 4xx that blames the content (400, 413, 422): the batch is split in halves until the
//!   refused payloads are alone; those become dead letters, the rest are delivered;
//! - another 4xx (401, 403, 404, ...): a configuration problem, not the payload's: released
//!   with the longest delay and logged, so nothing is lost while an operator fixes it.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use tokio::sync::{Notify, Semaphore, watch};
use tokio::task::JoinSet;
use tributary::DispatchError;
use tributary::dispatcher::http::bisect;
use tributary::raw::encoded_len;
use tributary_spool::{Leased, Receipt, Spool, SpoolError};

use crate::upstream::Upstreams;

/// Forwarder limits.
#[derive(Debug, Clone)]
pub struct ForwarderConfig {
    /// Largest upstream payload in bytes.
    pub max_batch_bytes: usize,
    /// Most visitors in one upstream payload.
    pub max_batch_events: usize,
    /// Upstream requests in flight at once.
    pub concurrency: usize,
    /// Longest time a payload waits for company before it is sent anyway.
    pub flush_interval: Duration,
    /// Cap on the retry delay of a failed payload.
    pub max_retry_delay: Duration,
    /// How long a lease hides payloads from other forwarders; must outlast one send.
    pub lease_for: Duration,
}

impl ForwarderConfig {
    /// Most bytes leased at once: enough to fill every concurrent request.
    fn window_bytes(&self) -> usize {
        self.max_batch_bytes.saturating_mul(self.concurrency)
    }
}

/// What one or more cycles did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ForwardSummary {
    /// Payloads leased.
    pub leased: u64,
    /// Upstream requests made (bisection included).
    pub requests: u64,
    /// Events (visitors) delivered.
    pub events_delivered: u64,
    /// Payloads delivered.
    pub payloads_delivered: u64,
    /// Payloads released for a later retry.
    pub payloads_retried: u64,
    /// Payloads moved to the dead letters.
    pub payloads_dead: u64,
}

impl ForwardSummary {
    fn add(&mut self, o: ForwardSummary) {
        self.leased += o.leased;
        self.requests += o.requests;
        self.events_delivered += o.events_delivered;
        self.payloads_delivered += o.payloads_delivered;
        self.payloads_retried += o.payloads_retried;
        self.payloads_dead += o.payloads_dead;
    }
}

/// Moves payloads from a spool to the upstreams.
pub struct Forwarder {
    spool: Arc<dyn Spool>,
    upstreams: Arc<Upstreams>,
    config: ForwarderConfig,
    wake: Arc<Notify>,
    appended_bytes: Arc<AtomicUsize>,
    /// Receipts leased and not yet settled: released at once when forwarding stops.
    in_flight: Arc<Mutex<HashSet<Receipt>>>,
}

/// Locks a mutex whose data stays consistent even if a holder panicked (a set of receipts).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Forwarder {
    /// A forwarder woken early by `wake` once `appended_bytes` fills a batch.
    pub fn new(
        spool: Arc<dyn Spool>,
        upstreams: Arc<Upstreams>,
        config: ForwarderConfig,
        wake: Arc<Notify>,
        appended_bytes: Arc<AtomicUsize>,
    ) -> Self {
        Forwarder {
            spool,
            upstreams,
            config,
            wake,
            appended_bytes,
            in_flight: Arc::default(),
        }
    }

    /// Forwards until `stop` turns true, then returns. Cycles run back to back while there is
    /// a backlog; otherwise the forwarder waits for a full batch's worth of appends or the
    /// flush interval, whichever comes first.
    pub async fn run(&self, mut stop: watch::Receiver<bool>) {
        let mut spool_errors = 0u32;
        loop {
            if *stop.borrow() {
                return;
            }
            let stopped = async {
                while !*stop.borrow() {
                    if stop.changed().await.is_err() {
                        return;
                    }
                }
            };
            let Some(result) = self.cycle_or_stop(stopped).await else {
                return;
            };
            match result {
                Ok((summary, full)) => {
                    spool_errors = 0;
                    if full || summary.requests > 0 && self.backlog() {
                        continue;
                    }
                }
                Err(e) => {
                    spool_errors = spool_errors.saturating_add(1);
                    tracing::error!(error = %e, "forwarder cannot read the spool");
                    let pause = Duration::from_millis(100 << spool_errors.min(6));
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = stop.changed() => {}
                    }
                    continue;
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(self.config.flush_interval) => {}
                _ = self.wake.notified() => {}
                _ = stop.changed() => {}
            }
        }
    }

    /// Forwards until nothing is visible in the spool or `deadline` passes.
    pub async fn drain(&self, deadline: Instant) -> Result<ForwardSummary, SpoolError> {
        let mut total = ForwardSummary::default();
        while Instant::now() < deadline {
            let timeout = tokio::time::sleep_until(deadline.into());
            let Some(result) = self.cycle_or_stop(timeout).await else {
                break;
            };
            let (summary, _) = result?;
            total.add(summary);
            if summary.leased == 0 {
                break;
            }
        }
        Ok(total)
    }

    fn backlog(&self) -> bool {
        self.appended_bytes.load(Ordering::Relaxed) >= self.config.max_batch_bytes
    }

    /// Runs one cycle unless `stop` resolves first; then the cycle's sends are abandoned
    /// and its unsettled payloads released at once, so the next forwarder (after a restart,
    /// say) need not wait for their leases to run out.
    async fn cycle_or_stop(
        &self,
        stop: impl std::future::Future<Output = ()>,
    ) -> Option<Result<(ForwardSummary, bool), SpoolError>> {
        tokio::select! {
            result = self.cycle() => Some(result),
            () = stop => {
                let receipts: Vec<Receipt> = lock(&self.in_flight).drain().collect();
                if !receipts.is_empty() {
                    // Releasing a receipt that was acked meanwhile does nothing.
                    if let Err(e) = self.spool.release(&receipts, Duration::ZERO).await {
                        tracing::warn!(error = %e, "could not release leases; they will expire");
                    }
                }
                None
            }
        }
    }

    /// One lease-send-settle round. Returns what it did and whether the lease window was
    /// full (a backlog: go again at once).
    pub async fn cycle(&self) -> Result<(ForwardSummary, bool), SpoolError> {
        self.appended_bytes.store(0, Ordering::Relaxed);
        let window_payloads = self
            .config
            .max_batch_events
            .saturating_mul(self.config.concurrency);
        let leased = self
            .spool
            .lease(
                window_payloads,
                self.config.window_bytes(),
                self.config.lease_for,
            )
            .await?;
        let mut summary = ForwardSummary {
            leased: leased.len() as u64,
            ..Default::default()
        };
        if leased.is_empty() {
            return Ok((summary, false));
        }
        let leased_bytes: usize = leased.iter().map(|l| l.payload.stored_len()).sum();
        let full =
            leased.len() >= window_payloads || leased_bytes >= self.config.window_bytes() / 2;

        lock(&self.in_flight).extend(leased.iter().map(|l| l.receipt.clone()));
        let batches = pack(leased, &self.config);
        let permits = Arc::new(Semaphore::new(self.config.concurrency));
        let mut tasks = JoinSet::new();
        for batch in batches {
            let permits = permits.clone();
            let spool = self.spool.clone();
            let upstreams = self.upstreams.clone();
            let max_retry_delay = self.config.max_retry_delay;
            let in_flight = self.in_flight.clone();
            tasks.spawn(async move {
                let _permit = permits.acquire_owned().await;
                let receipts: Vec<Receipt> =
                    batch.items.iter().map(|l| l.receipt.clone()).collect();
                let result = deliver(&*spool, &upstreams, batch, max_retry_delay).await;
                let mut held = lock(&in_flight);
                for r in &receipts {
                    held.remove(r);
                }
                result
            });
        }
        while let Some(done) = tasks.join_next().await {
            match done {
                Ok(Ok(s)) => summary.add(s),
                Ok(Err(e)) => return Err(e),
                Err(e) => tracing::error!(error = %e, "a delivery task failed"),
            }
        }
        Ok((summary, full))
    }
}

/// Payloads of one route and header, to be sent as one request.
struct Batch {
    route: String,
    header: Bytes,
    items: Vec<Leased>,
}

impl Batch {
    fn events(&self) -> usize {
        self.items
            .iter()
            .map(|l| l.payload.visitor_count as usize)
            .sum()
    }

    fn body(&self, items: &[Leased]) -> Bytes {
        let visitors_len: usize = items.iter().map(|l| l.payload.visitors.len()).sum();
        let count = items.len();
        let mut out =
            BytesMut::with_capacity(encoded_len(self.header.len(), visitors_len, count) + 8);
        out.put_u8(b'{');
        out.put_slice(&self.header);
        if !self.header.is_empty() {
            out.put_u8(b',');
        }
        out.put_slice(br#""visitors":["#);
        let mut first = true;
        for l in items {
            if l.payload.visitors.is_empty() {
                continue;
            }
            if !first {
                out.put_u8(b',');
            }
            first = false;
            out.put_slice(&l.payload.visitors);
        }
        out.put_slice(b"]}");
        out.freeze()
    }
}

/// Groups by (route, header), keeping the spool's order within each group, and cuts each
/// group at the byte and event limits.
fn pack(leased: Vec<Leased>, config: &ForwarderConfig) -> Vec<Batch> {
    let mut order: Vec<(String, Bytes)> = Vec::new();
    let mut groups: HashMap<(String, Bytes), Vec<Leased>> = HashMap::new();
    for l in leased {
        let key = (l.payload.route.clone(), l.payload.header.clone());
        groups
            .entry(key.clone())
            .or_insert_with(|| {
                order.push(key);
                Vec::new()
            })
            .push(l);
    }
    let mut batches = Vec::new();
    for key in order {
        let Some(items) = groups.remove(&key) else {
            continue;
        };
        let (route, header) = key;
        let mut current: Vec<Leased> = Vec::new();
        let (mut bytes, mut events, mut runs) = (0usize, 0usize, 0usize);
        for l in items {
            let v_len = l.payload.visitors.len();
            let v_events = l.payload.visitor_count as usize;
            let would_bytes = encoded_len(header.len(), bytes + v_len, runs + 1);
            let too_big =
                would_bytes > config.max_batch_bytes || events + v_events > config.max_batch_events;
            if too_big && !current.is_empty() {
                batches.push(Batch {
                    route: route.clone(),
                    header: header.clone(),
                    items: std::mem::take(&mut current),
                });
                (bytes, events, runs) = (0, 0, 0);
            }
            bytes += v_len;
            events += v_events;
            runs += 1;
            current.push(l);
        }
        if !current.is_empty() {
            batches.push(Batch {
                route,
                header,
                items: current,
            });
        }
    }
    batches
}

/// Most upstream requests one refused batch may cost while its culprits are isolated.
const MAX_BISECT_REQUESTS: usize = 64;

/// Sends one batch and settles every payload in it with the spool. A refusal that blames
/// the content splits the batch (see [`bisect`]) so only the refused payloads become dead
/// letters.
async fn deliver(
    spool: &dyn Spool,
    upstreams: &Upstreams,
    batch: Batch,
    max_retry_delay: Duration,
) -> Result<ForwardSummary, SpoolError> {
    let mut summary = ForwardSummary::default();
    metrics::histogram!("tributary_upstream_batch_events").record(batch.events() as f64);
    let outcome = bisect(batch.items.len(), MAX_BISECT_REQUESTS, |range| {
        let body = batch.body(&batch.items[range]);
        metrics::histogram!("tributary_upstream_batch_bytes").record(body.len() as f64);
        upstreams.send(&batch.route, body)
    })
    .await;
    summary.requests += outcome.requests as u64;

    for range in &outcome.delivered {
        settle_delivered(spool, &batch.items[range.clone()], &mut summary).await?;
    }
    for rejected in &outcome.rejected {
        let item = &batch.items[rejected.index];
        let reason = format!(
            "upstream answered {}: {}",
            rejected.status, rejected.message
        );
        tracing::warn!(
            status = rejected.status,
            events = item.payload.visitor_count,
            "payload refused upstream; moved to dead letters"
        );
        metrics::counter!("tributary_dead_letters_total").increment(1);
        spool
            .dead_letter(std::slice::from_ref(&item.receipt), &reason)
            .await?;
        summary.payloads_dead += 1;
    }
    if let Some(undelivered) = &outcome.undelivered {
        let items: Vec<Leased> = undelivered
            .ranges
            .iter()
            .flat_map(|r| batch.items[r.clone()].iter().cloned())
            .collect();
        settle_failed(
            spool,
            &items,
            &undelivered.error,
            max_retry_delay,
            &mut summary,
        )
        .await?;
    }
    Ok(summary)
}

async fn settle_delivered(
    spool: &dyn Spool,
    items: &[Leased],
    summary: &mut ForwardSummary,
) -> Result<(), SpoolError> {
    let receipts: Vec<Receipt> = items.iter().map(|l| l.receipt.clone()).collect();
    spool.ack(&receipts).await?;
    summary.payloads_delivered += items.len() as u64;
    let events: u64 = items
        .iter()
        .map(|l| u64::from(l.payload.visitor_count))
        .sum();
    summary.events_delivered += events;
    metrics::counter!("tributary_forwarded_events_total").increment(events);
    Ok(())
}

async fn settle_failed(
    spool: &dyn Spool,
    items: &[Leased],
    error: &DispatchError,
    max_retry_delay: Duration,
    summary: &mut ForwardSummary,
) -> Result<(), SpoolError> {
    let receipts: Vec<Receipt> = items.iter().map(|l| l.receipt.clone()).collect();
    match error {
        DispatchError::Permanent { status, .. } => {
            tracing::error!(
                status,
                "upstream refuses the relay itself (check --upstream and credentials); payloads kept"
            );
            spool.release(&receipts, max_retry_delay).await?;
            summary.payloads_retried += items.len() as u64;
        }
        other => {
            let attempts = items.iter().map(|l| l.attempts).max().unwrap_or(0);
            let retry_after = match other {
                DispatchError::Transient { retry_after, .. } => *retry_after,
                _ => None,
            };
            let delay = retry_delay(attempts, retry_after, max_retry_delay);
            tracing::warn!(error = %other, payloads = items.len(), delay_ms = delay.as_millis() as u64, "upstream delivery failed; will retry");
            metrics::counter!("tributary_upstream_retries_total").increment(1);
            spool.release(&receipts, delay).await?;
            summary.payloads_retried += items.len() as u64;
        }
    }
    Ok(())
}

/// Exponential from 1 s, doubled per attempt, jittered by up to a quarter, capped; the
/// upstream's `Retry-After` wins when it is longer.
fn retry_delay(attempts: u32, retry_after: Option<Duration>, cap: Duration) -> Duration {
    let base = Duration::from_secs(1).saturating_mul(1u32 << attempts.min(16));
    let jitter = base.mul_f64(rand::random::<f64>() * 0.25);
    let backoff = (base + jitter).min(cap);
    retry_after.map_or(backoff, |ra| ra.max(backoff).min(cap.max(ra)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delay_grows_and_is_capped() {
        let cap = Duration::from_secs(300);
        assert!(retry_delay(0, None, cap) >= Duration::from_secs(1));
        assert!(retry_delay(0, None, cap) <= Duration::from_millis(1250));
        assert!(retry_delay(3, None, cap) >= Duration::from_secs(8));
        assert_eq!(retry_delay(30, None, cap), cap);
        assert!(retry_delay(0, Some(Duration::from_secs(20)), cap) >= Duration::from_secs(20));
    }

    mod props {
        #![allow(clippy::unwrap_used)]
        use super::super::*;
        use proptest::prelude::*;
        use tributary::RawBatch;
        use tributary_spool::Payload;

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
                        want.push((route.to_owned(), batch.header().clone(), v.clone()));
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
                };
                let mut got = Vec::new();
                for batch in pack(leased, &config) {
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

            /// The ingest parser never panics, whatever the bytes.
            #[test]
            fn ingest_parser_never_panics(body in proptest::collection::vec(any::<u8>(), 0..512)) {
                let _ = crate::ingest::parse_payload(Bytes::from(body));
            }

            /// Nor on JSON-looking input, where the interesting paths are.
            #[test]
            fn ingest_parser_never_panics_on_json_like_input(
                body in r#"[{}\[\]",:0-9a-z_ ]{0,200}"#,
                prefix in prop_oneof![
                    Just(""),
                    Just(r#"{"account_id":"1","visitors":"#),
                    Just(r#"{"account_id":"1","visitors":[{"visitor_id":"#),
                ],
            ) {
                let _ = crate::ingest::parse_payload(Bytes::from(format!("{prefix}{body}")));
            }
        }
    }
}
