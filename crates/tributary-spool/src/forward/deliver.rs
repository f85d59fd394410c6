//! Delivery: one batch sent, and every payload in it settled with the spool by its answer.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tributary::isolate::{BisectOutcome, IsolationBudget, isolate};
use tributary::retry::{Jitter, RetryPolicy, is_content_rejection};
use tributary::{DispatchError, RawBatch};

use super::pack::Batch;
use super::{ForwardSummary, Suspects, Upstreams};
use crate::{Leased, PartialSettlement, Payload, Receipt, Spool, SpoolError};

/// What one batch's delivery needs.
pub(super) struct Delivery {
    pub(super) spool: Arc<dyn Spool>,
    pub(super) upstreams: Arc<Upstreams>,
    pub(super) suspects: Arc<Suspects>,
    pub(super) budget: Arc<IsolationBudget>,
    pub(super) max_retry_delay: Duration,
    pub(super) suspect_delay: Duration,
    /// Most payload bytes per ack or release command ([`super::Forwarder::with_turn_bytes`]).
    pub(super) turn_bytes: usize,
}

/// What happened to one visitor of an isolated batch.
#[derive(Clone)]
enum Fate {
    Delivered,
    /// Refused alone; what the upstream said (it names the status).
    Rejected {
        message: String,
    },
    /// Not isolated before the budget ran out: in a refused group of this many visitors.
    Unresolved(usize),
    /// Not delivered for a reason that is not its own.
    Undelivered,
}

impl Delivery {
    /// Sends one batch and settles every payload in it with the spool.
    pub(super) async fn deliver(&self, batch: Batch) -> Result<ForwardSummary, SpoolError> {
        let mut summary = ForwardSummary {
            requests: 1,
            ..ForwardSummary::default()
        };
        metrics::histogram!("tributary_upstream_batch_events").record(batch.events() as f64);
        let body = batch.body(&batch.items);
        metrics::histogram!("tributary_upstream_batch_bytes").record(body.len() as f64);
        match self.upstreams.send(&batch.route, body).await {
            Ok(()) => {
                settle_delivered(&*self.spool, &batch.items, self.turn_bytes, &mut summary).await?;
            }
            Err(DispatchError::Permanent { status, message }) if is_content_rejection(status) => {
                self.isolate(batch, (status, message), &mut summary).await?;
            }
            Err(error) => {
                settle_failed(
                    &*self.spool,
                    &batch.items,
                    &error,
                    self.max_retry_delay,
                    self.turn_bytes,
                    &mut summary,
                )
                .await?;
            }
        }
        Ok(summary)
    }

    /// Takes a refused batch apart into its visitors, isolates the refused ones, and
    /// settles each payload by the fate of its visitors.
    async fn isolate(
        &self,
        batch: Batch,
        refusal: (u16, String),
        summary: &mut ForwardSummary,
    ) -> Result<(), SpoolError> {
        let mut visitors: Vec<Bytes> = Vec::new();
        let mut owners: Vec<Range> = Vec::with_capacity(batch.items.len());
        let mut whole: Vec<bool> = Vec::with_capacity(batch.items.len());
        for l in &batch.items {
            let start = visitors.len();
            match l.payload.to_batch() {
                Ok(raw) => {
                    visitors.extend(raw.into_visitors());
                    whole.push(false);
                }
                // Unreadable as visitors (never written by this relay): one unit, judged
                // and settled whole.
                Err(_) => {
                    visitors.push(l.payload.visitors.clone());
                    whole.push(true);
                }
            }
            owners.push(start..visitors.len());
        }
        let raw = RawBatch::from_parts(batch.header.clone(), visitors);
        let outcome = isolate(raw.visitors().len(), refusal, &self.budget, |range| {
            let body = raw.slice(range).encode();
            metrics::histogram!("tributary_upstream_batch_bytes").record(body.len() as f64);
            self.upstreams.send(&batch.route, body)
        })
        .await;
        summary.requests += outcome.requests as u64;
        summary.isolation_requests += outcome.requests as u64;
        metrics::counter!("tributary_isolation_requests_total").increment(outcome.requests as u64);
        let fates = fates(raw.visitors().len(), &outcome);
        let failure = outcome.undelivered.as_ref().map(|u| &u.error);

        let mut acked = Vec::new();
        let mut released: Vec<&Leased> = Vec::new();
        let mut parts = Vec::new();
        let mut buried: Vec<(Receipt, String)> = Vec::new();
        for ((l, range), whole) in batch.items.iter().zip(owners).zip(whole) {
            let mine = &fates[range.clone()];
            if mine.iter().all(|f| matches!(f, Fate::Delivered)) {
                acked.push(l.clone());
                continue;
            }
            if let (true, [Fate::Rejected { message }]) = (whole, mine) {
                buried.push((l.receipt.clone(), refused_alone(message)));
                summary.events_dead += u64::from(l.payload.visitor_count);
                summary.payloads_dead += 1;
                continue;
            }
            let unresolved_group = mine
                .iter()
                .filter_map(|f| match f {
                    Fate::Unresolved(n) => Some(*n),
                    _ => None,
                })
                .min();
            let untouched = mine
                .iter()
                .all(|f| matches!(f, Fate::Unresolved(_) | Fate::Undelivered));
            if untouched {
                if let Some(group) = unresolved_group {
                    self.suspects.remember(&l.payload, group);
                }
                released.push(l);
                continue;
            }
            let mut delivered = 0u32;
            let mut dead = Vec::new();
            let mut rest = Vec::new();
            for (visitor, fate) in raw.visitors()[range].iter().zip(mine) {
                match fate {
                    Fate::Delivered => delivered += 1,
                    Fate::Rejected { message } => {
                        dead.push((one_visitor(&l.payload, visitor), refused_alone(message)));
                    }
                    Fate::Unresolved(_) | Fate::Undelivered => rest.push(visitor.clone()),
                }
            }
            let remainder = (!rest.is_empty()).then(|| {
                Payload::from_batch(
                    l.payload.route.clone(),
                    &RawBatch::from_parts(l.payload.header.clone(), rest),
                )
            });
            if let (Some(r), Some(group)) = (&remainder, unresolved_group) {
                self.suspects.remember(r, group);
            }
            let delay = match failure {
                Some(error) => failure_delay(error, l.attempts, self.max_retry_delay),
                None => self.suspect_delay,
            };
            summary.events_delivered += u64::from(delivered);
            summary.events_dead += dead.len() as u64;
            summary.payloads_dead += dead.len() as u64;
            if failure.is_none() {
                summary.events_unresolved +=
                    remainder.as_ref().map_or(0, |r| u64::from(r.visitor_count));
            }
            if remainder.is_none() && delivered > 0 {
                summary.payloads_delivered += 1;
            }
            metrics::counter!("tributary_forwarded_events_total").increment(u64::from(delivered));
            metrics::counter!("tributary_dead_letters_total").increment(dead.len() as u64);
            parts.push(PartialSettlement {
                receipt: l.receipt.clone(),
                delivered_events: delivered,
                dead,
                remainder,
                delay,
            });
        }
        let rejected = outcome.rejected.len();
        if rejected > 0 {
            tracing::warn!(
                rejected,
                visitors = raw.visitors().len(),
                requests = outcome.requests,
                "visitors refused upstream were isolated; each refused alone is now a dead letter"
            );
        }
        settle_delivered(&*self.spool, &acked, self.turn_bytes, summary).await?;
        if !parts.is_empty() {
            self.spool.settle_parts(parts).await?;
        }
        for (receipt, reason) in buried {
            metrics::counter!("tributary_dead_letters_total").increment(1);
            self.spool
                .dead_letter(std::slice::from_ref(&receipt), &reason)
                .await?;
        }
        if !released.is_empty() {
            let items: Vec<Leased> = released.into_iter().cloned().collect();
            match &outcome.undelivered {
                Some(u) => {
                    settle_failed(
                        &*self.spool,
                        &items,
                        &u.error,
                        self.max_retry_delay,
                        self.turn_bytes,
                        summary,
                    )
                    .await?;
                }
                None => {
                    summary.events_unresolved += items
                        .iter()
                        .map(|l| u64::from(l.payload.visitor_count))
                        .sum::<u64>();
                    summary.payloads_retried += items.len() as u64;
                    for turn in turns(&items, self.turn_bytes) {
                        self.spool
                            .release(&receipts(turn), self.suspect_delay)
                            .await?;
                    }
                }
            }
        }
        Ok(())
    }
}

type Range = std::ops::Range<usize>;

/// The fate of each of `n` visitors in `outcome`.
fn fates(n: usize, outcome: &BisectOutcome) -> Vec<Fate> {
    let mut fates = vec![Fate::Undelivered; n];
    for r in &outcome.delivered {
        fates[r.clone()].fill(Fate::Delivered);
    }
    for r in &outcome.unresolved {
        fates[r.clone()].fill(Fate::Unresolved(r.len()));
    }
    for r in &outcome.rejected {
        if let Some(f) = fates.get_mut(r.index) {
            *f = Fate::Rejected {
                message: r.message.clone(),
            };
        }
    }
    fates
}

/// The dead-letter reason of what the upstream refused alone, with what it said.
fn refused_alone(message: &str) -> String {
    format!("refused alone by the upstream: {message}")
}

/// A payload of one visitor under `of`'s route and header.
fn one_visitor(of: &Payload, visitor: &Bytes) -> Payload {
    Payload {
        route: of.route.clone(),
        header: of.header.clone(),
        visitors: visitor.clone(),
        visitor_count: 1,
    }
}

/// `items` cut, in order, into runs of at most `turn_bytes` stored bytes (a larger item is
/// a run of its own), so that settling a 3.5 MB batch does not hold the spool's writer, and
/// the appends queued behind it, for the whole batch at once.
fn turns(items: &[Leased], turn_bytes: usize) -> Vec<&[Leased]> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut bytes = 0usize;
    for (i, l) in items.iter().enumerate() {
        let len = l.payload.stored_len();
        if i > start && bytes.saturating_add(len) > turn_bytes {
            out.push(&items[start..i]);
            start = i;
            bytes = 0;
        }
        bytes = bytes.saturating_add(len);
    }
    if start < items.len() {
        out.push(&items[start..]);
    }
    out
}

fn receipts(items: &[Leased]) -> Vec<Receipt> {
    items.iter().map(|l| l.receipt.clone()).collect()
}

async fn settle_delivered(
    spool: &dyn Spool,
    items: &[Leased],
    turn_bytes: usize,
    summary: &mut ForwardSummary,
) -> Result<(), SpoolError> {
    for turn in turns(items, turn_bytes) {
        spool.ack(&receipts(turn)).await?;
    }
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
    turn_bytes: usize,
    summary: &mut ForwardSummary,
) -> Result<(), SpoolError> {
    let attempts = items.iter().map(|l| l.attempts).max().unwrap_or(0);
    let delay = failure_delay(error, attempts, max_retry_delay);
    match error {
        DispatchError::Permanent { status, .. } => {
            tracing::error!(
                status,
                "upstream refuses the relay itself (check --upstream and credentials); payloads kept"
            );
        }
        other => {
            tracing::warn!(error = %other, payloads = items.len(), delay_ms = delay.as_millis() as u64, "upstream delivery failed; will retry");
            metrics::counter!("tributary_upstream_retries_total").increment(1);
        }
    }
    for turn in turns(items, turn_bytes) {
        spool.release(&receipts(turn), delay).await?;
    }
    summary.payloads_retried += items.len() as u64;
    Ok(())
}

/// How long payloads wait after a failure that is not their content's: the longest delay
/// when the upstream refuses the relay itself (401, 403, 404: an operator must act), else
/// the backoff for their attempts, or the upstream's `Retry-After` when longer, never more
/// than `--max-retry-delay`.
fn failure_delay(error: &DispatchError, attempts: u32, max_retry_delay: Duration) -> Duration {
    let policy = held_retry_policy(max_retry_delay);
    // `attempts` counts earlier leases: the first failure waits the initial backoff.
    let failed = attempts.saturating_add(1);
    match error {
        DispatchError::Permanent { .. } => max_retry_delay,
        DispatchError::Transient { retry_after, .. } => {
            policy.held_delay(failed, *retry_after, &mut rand::rng())
        }
        _ => policy.held_delay(failed, None, &mut rand::rng()),
    }
}

/// The backoff of payloads that go back to the spool: from 1 s, doubled per attempt, equal
/// jitter (at least half of each step), capped by `--max-retry-delay`.
fn held_retry_policy(max_retry_delay: Duration) -> RetryPolicy {
    RetryPolicy {
        initial_backoff: Duration::from_secs(1),
        max_backoff: max_retry_delay,
        multiplier: 2.0,
        jitter: Jitter::Equal,
        ..RetryPolicy::default()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn failure_delay_grows_and_is_capped() {
        let cap = Duration::from_secs(300);
        let transient = |retry_after| DispatchError::Transient {
            message: "503".into(),
            retry_after,
        };
        let first = failure_delay(&transient(None), 0, cap);
        assert!(first >= Duration::from_millis(500) && first <= Duration::from_secs(1));
        let fourth = failure_delay(&transient(None), 3, cap);
        assert!(fourth >= Duration::from_secs(4) && fourth <= Duration::from_secs(8));
        assert!(failure_delay(&transient(None), 30, cap) >= cap / 2);
        assert!(failure_delay(&transient(None), 30, cap) <= cap);
        let asked = Some(Duration::from_secs(20));
        assert!(failure_delay(&transient(asked), 0, cap) >= Duration::from_secs(20));
        // A Retry-After past the cap is held to the cap.
        let a_day = Some(Duration::from_secs(86_400));
        assert_eq!(failure_delay(&transient(a_day), 0, cap), cap);
        let refused = DispatchError::Permanent {
            status: 401,
            message: String::new(),
        };
        assert_eq!(failure_delay(&refused, 0, cap), cap);
    }

    fn leased(id: usize, bytes: usize) -> Leased {
        Leased {
            receipt: Receipt(format!("{id}:1")),
            payload: Payload {
                route: crate::Route::US,
                header: Bytes::new(),
                visitors: Bytes::from(vec![b' '; bytes]),
                visitor_count: 1,
            },
            attempts: 0,
            appended_at_ms: 0,
        }
    }

    fn sizes(runs: &[&[Leased]]) -> Vec<Vec<usize>> {
        runs.iter()
            .map(|r| r.iter().map(|l| l.payload.stored_len()).collect())
            .collect()
    }

    #[test]
    fn turns_keep_the_order_cut_at_the_bound_and_give_a_large_payload_its_own_turn() {
        let items: Vec<Leased> = [400, 500, 200, 2000, 100, 100]
            .iter()
            .enumerate()
            .map(|(i, &b)| leased(i, b))
            .collect();
        let runs = turns(&items, 1000);
        assert_eq!(
            sizes(&runs),
            vec![vec![400, 500], vec![200], vec![2000], vec![100, 100]]
        );
        assert_eq!(
            sizes(&turns(&items, usize::MAX)),
            vec![vec![400, 500, 200, 2000, 100, 100]]
        );
        assert!(turns(&[], 1000).is_empty());
    }

    #[cfg(feature = "sqlite")]
    #[tokio::test]
    async fn acks_and_releases_go_in_turns_and_turns_off_is_one_command() {
        use super::super::counting::{Call, CountingSpool, payload};
        let spool = CountingSpool::open(None);
        spool
            .append((0..6).map(|_| payload(40 * 1024)).collect())
            .await
            .unwrap();
        let items = spool
            .lease(usize::MAX, usize::MAX, Duration::from_secs(60))
            .await
            .unwrap();
        let (first, second) = items.split_at(3);
        let mut summary = ForwardSummary::default();
        // 64 KiB turns hold one 40 KiB payload each.
        settle_delivered(&spool, first, 64 * 1024, &mut summary)
            .await
            .unwrap();
        let transient = DispatchError::Transient {
            message: "503".into(),
            retry_after: None,
        };
        let cap = Duration::from_secs(1);
        settle_failed(&spool, second, &transient, cap, 64 * 1024, &mut summary)
            .await
            .unwrap();
        let settles: Vec<Call> = spool.calls().into_iter().skip(1).collect();
        let mut want = vec![Call::Ack(1); 3];
        want.extend(vec![Call::Release(1); 3]);
        assert_eq!(settles, want);
        assert_eq!(summary.payloads_delivered, 3);
        assert_eq!(summary.payloads_retried, 3);

        // Turns off: the whole batch in one command.
        let again = wait_visible(&spool, 3).await;
        settle_failed(&spool, &again, &transient, cap, usize::MAX, &mut summary)
            .await
            .unwrap();
        assert_eq!(spool.calls().last(), Some(&Call::Release(3)));
        let again = wait_visible(&spool, 3).await;
        settle_delivered(&spool, &again, usize::MAX, &mut summary)
            .await
            .unwrap();
        assert_eq!(spool.calls().last(), Some(&Call::Ack(3)));
    }

    /// Leases until `n` payloads are back (a release has a short delay), bounded.
    #[cfg(feature = "sqlite")]
    async fn wait_visible(spool: &dyn Spool, n: usize) -> Vec<Leased> {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let mut got = Vec::new();
        while got.len() < n {
            assert!(
                std::time::Instant::now() < deadline,
                "payloads never came back"
            );
            got.extend(
                spool
                    .lease(n - got.len(), usize::MAX, Duration::from_secs(60))
                    .await
                    .unwrap(),
            );
            if got.len() < n {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        got
    }
}
