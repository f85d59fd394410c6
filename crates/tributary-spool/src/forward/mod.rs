//! Store and forward: a [`Forwarder`] moves payloads from any [`Spool`] to the Event API,
//! spool in, few large upstream requests out. The relay runs one beside its ingest; a
//! program that writes to a spool with [`crate::SpoolDispatcher`] can run one in process.
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
//! - a 4xx that blames the content (400, 413, 422): the batch is taken apart into its
//!   visitors and isolated (see [`tributary::isolate`]) until each refused part is a single
//!   visitor sent alone. Only such a visitor becomes a dead letter (with its payload's
//!   route and header, the status and the upstream's answer); every other visitor is
//!   delivered, the other visitors of the same client payload included;
//! - another 4xx (401, 403, 404, ...): a configuration problem, not the payload's: released
//!   with the longest delay and logged, so nothing is lost while an operator fixes it.
//!
//! Isolation draws on a budget of requests per cycle ([`ForwarderConfig::isolation_budget`]). What is not
//! isolated when it runs out goes back to the spool, visible again after a short delay, and
//! is remembered as suspect ([`Suspects`]): the next cycle packs suspect payloads in batches
//! no larger than the group they were left in. A payload is never cut here, so one larger
//! than its group is sent whole and its search restarts from its top. Nothing is
//! dead-lettered for want of budget.
//!
//! Cost, with `k` refused visitors among the `n` of a batch: one request for the batch,
//! then at most `2·k·⌈log2 n⌉` for isolation (fewer when refused visitors share halves),
//! plus one request per unresolved group each time the budget runs out.

#[cfg(all(test, feature = "sqlite"))]
mod counting;
mod deliver;
mod pack;
mod suspects;
mod upstream;

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, Semaphore, watch};
use tokio::task::JoinSet;
use tributary::isolate::IsolationBudget;

use crate::{Receipt, Spool, SpoolError};
use deliver::Delivery;
use pack::pack;
use suspects::SUSPECTS_CAPACITY;
pub use suspects::Suspects;
pub use upstream::{RouteHealth, UpstreamConfig, UpstreamHealth, Upstreams};

/// The forwarder's merger on its own, for `benches/merge.rs`: packs `leased` as one
/// forwarding cycle does (grouped by route and header, cut at `config`'s limits, no
/// suspects) and writes each request body. Returns (events, body) per upstream request.
#[doc(hidden)]
pub fn merge_for_bench(
    leased: Vec<crate::Leased>,
    config: &ForwarderConfig,
) -> Vec<(usize, bytes::Bytes)> {
    let suspects = Suspects::new(SUSPECTS_CAPACITY);
    pack(leased, config, &suspects)
        .into_iter()
        .map(|b| (b.events(), b.body(&b.items)))
        .collect()
}

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
    /// Most upstream requests one cycle spends isolating refused visitors.
    pub isolation_budget: usize,
    /// How long what isolation did not finish waits before the next try.
    pub suspect_delay: Duration,
}

/// The smallest [`Forwarder::with_turn_bytes`]: below it a turn's fixed cost (a
/// transaction, an fsync) outweighs the bytes it moves.
pub const MIN_TURN_BYTES: usize = 64 * 1024;

/// The turn the relay's `serve` uses over a SQLite spool ([`Forwarder::with_turn_bytes`]):
/// 1 MiB, or `max_batch_bytes` when that is smaller.
pub const DEFAULT_TURN_BYTES: usize = 1 << 20;

/// [`Forwarder::with_turn_bytes`] with this value turns turns off, which is also what
/// [`Forwarder::new`] starts with: one lease of the whole window per cycle and one ack or
/// release per batch. Turns only help a spool whose commands queue behind one writer
/// (SQLite, beside ingest); for SQS each extra lease is another request that can long-poll,
/// and a drain with no ingest beside it only loses throughput.
pub const TURNS_OFF: usize = usize::MAX;

/// A forwarder setting that cannot work.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ForwarderConfigError {
    /// `turn_bytes` out of bounds.
    #[error(
        "forwarder turn bytes {got} is out of bounds: at least {min} and at most max_batch_bytes ({max}), or TURNS_OFF"
    )]
    TurnBytes {
        /// What was asked for.
        got: usize,
        /// [`MIN_TURN_BYTES`], or `max_batch_bytes` when that is smaller.
        min: usize,
        /// The configured `max_batch_bytes`.
        max: usize,
    },
}

impl Default for ForwarderConfig {
    /// The relay's defaults: Event API sized batches (3.5 MB, 10,000 visitors), 4 requests in
    /// flight, a 1 s merge window, retries backing off to 5 minutes, 1 minute leases, 1,000
    /// isolation requests per cycle, and 1 s before an unfinished isolation goes on.
    fn default() -> Self {
        ForwarderConfig {
            max_batch_bytes: tributary::MAX_PAYLOAD_BYTES,
            max_batch_events: 10_000,
            concurrency: 4,
            flush_interval: Duration::from_secs(1),
            max_retry_delay: Duration::from_secs(300),
            lease_for: Duration::from_secs(60),
            isolation_budget: 1000,
            suspect_delay: Duration::from_secs(1),
        }
    }
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
    /// Dead letters created (one per visitor refused alone, or per payload refused whole).
    pub payloads_dead: u64,
    /// Events (visitors) moved to the dead letters.
    pub events_dead: u64,
    /// Requests spent on isolation (included in `requests`).
    pub isolation_requests: u64,
    /// Events whose isolation the budget cut short: released as suspect, not dead.
    pub events_unresolved: u64,
}

impl ForwardSummary {
    fn add(&mut self, o: ForwardSummary) {
        self.leased += o.leased;
        self.requests += o.requests;
        self.events_delivered += o.events_delivered;
        self.payloads_delivered += o.payloads_delivered;
        self.payloads_retried += o.payloads_retried;
        self.payloads_dead += o.payloads_dead;
        self.events_dead += o.events_dead;
        self.isolation_requests += o.isolation_requests;
        self.events_unresolved += o.events_unresolved;
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
    suspects: Arc<Suspects>,
    /// Most payload bytes one spool command leases, acknowledges or releases (a payload
    /// larger than this still goes alone). The SQLite spool runs one command at a time on
    /// its writer thread, ingest's appends included, so this bounds how long an append
    /// waits behind forwarding: after an outage a cycle leases its whole window
    /// (`max_batch_bytes` times `concurrency`) in turns of this size, and settles each
    /// batch in turns too. [`TURNS_OFF`] (the default) is one command per window or batch.
    turn_bytes: usize,
}

/// `turn_bytes` if it is within the bounds of [`Forwarder::with_turn_bytes`].
fn check_turn_bytes(
    turn_bytes: usize,
    max_batch_bytes: usize,
) -> Result<usize, ForwarderConfigError> {
    let min = MIN_TURN_BYTES.min(max_batch_bytes);
    if turn_bytes == TURNS_OFF {
        return Ok(turn_bytes);
    }
    if turn_bytes < min || turn_bytes > max_batch_bytes {
        return Err(ForwarderConfigError::TurnBytes {
            got: turn_bytes,
            min,
            max: max_batch_bytes,
        });
    }
    Ok(turn_bytes)
}

/// The pause after `n` failed cycles in a row that could not read the spool: from 100 ms,
/// doubled, at most 6.4 s.
fn spool_error_backoff() -> tributary::RetryPolicy {
    tributary::RetryPolicy {
        initial_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_millis(6400),
        multiplier: 2.0,
        jitter: tributary::retry::Jitter::Equal,
        ..tributary::RetryPolicy::default()
    }
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
            suspects: Arc::new(Suspects::new(SUSPECTS_CAPACITY)),
            turn_bytes: TURNS_OFF,
        }
    }

    /// The same forwarder moving at most `turn_bytes` payload bytes per spool command: from
    /// [`MIN_TURN_BYTES`] (or `max_batch_bytes` if that is smaller) to `max_batch_bytes` (a
    /// larger turn would be a whole batch or more), or [`TURNS_OFF`], the default of
    /// [`Forwarder::new`]. [`DEFAULT_TURN_BYTES`] is what the relay's `serve` uses over a
    /// SQLite spool.
    pub fn with_turn_bytes(mut self, turn_bytes: usize) -> Result<Self, ForwarderConfigError> {
        self.turn_bytes = check_turn_bytes(turn_bytes, self.config.max_batch_bytes)?;
        Ok(self)
    }

    /// How the upstreams have been answering (for a status page).
    pub fn upstream_health(&self) -> RouteHealth {
        self.upstreams.health()
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
                    let pause = spool_error_backoff().backoff(spool_errors, &mut rand::rng());
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
            if summary.events_unresolved > 0 {
                // Isolation ran out of budget and released the rest as suspect: it is
                // visible again after the suspect delay; wait for it rather than stop.
                let pause = self.config.suspect_delay;
                if Instant::now() + pause >= deadline {
                    break;
                }
                tokio::time::sleep(pause).await;
                continue;
            }
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

    /// Leases up to `window_payloads` and `window_bytes` in turns of at most `turn_bytes`, so
    /// appends queued behind a turn wait for that turn only, not for the whole window (the
    /// writer runs commands in the order they came). With turns off it is one lease, as
    /// before turns. A short turn does not end the window (a payload that did not fit is
    /// the next turn's first); an empty one does: nothing more is visible. A last turn is
    /// skipped when less than half a turn of window is left, so the window goes past
    /// `window_bytes` by no more than one lease alone would. Every leased receipt is in
    /// `in_flight` as soon as it is leased, so a stop releases it; if a later turn fails,
    /// what the earlier turns leased is released at once.
    async fn lease_window(
        &self,
        window_payloads: usize,
        window_bytes: usize,
    ) -> Result<Vec<crate::Leased>, SpoolError> {
        if self.turn_bytes >= window_bytes {
            let leased = self
                .spool
                .lease(window_payloads, window_bytes, self.config.lease_for)
                .await?;
            lock(&self.in_flight).extend(leased.iter().map(|l| l.receipt.clone()));
            return Ok(leased);
        }
        let turn_bytes = self.turn_bytes.max(1);
        let mut leased: Vec<crate::Leased> = Vec::new();
        let mut leased_bytes = 0usize;
        let mut turns = 0u64;
        while leased.len() < window_payloads && leased_bytes < window_bytes {
            let left = window_bytes - leased_bytes;
            if turns > 0 && left < turn_bytes / 2 {
                break;
            }
            let turn = match self
                .spool
                .lease(
                    window_payloads - leased.len(),
                    turn_bytes.min(left),
                    self.config.lease_for,
                )
                .await
            {
                Ok(turn) => turn,
                Err(e) => {
                    self.release_now(&leased).await;
                    return Err(e);
                }
            };
            turns += 1;
            if turn.is_empty() {
                break;
            }
            lock(&self.in_flight).extend(turn.iter().map(|l| l.receipt.clone()));
            leased_bytes += turn.iter().map(|l| l.payload.stored_len()).sum::<usize>();
            leased.extend(turn);
        }
        if turns > 1 {
            tracing::debug!(
                turns,
                payloads = leased.len(),
                bytes = leased_bytes,
                "window leased in turns"
            );
        }
        Ok(leased)
    }

    /// Releases `leased` at once (a cycle that cannot go on); failure only logs, as the
    /// leases run out anyway.
    async fn release_now(&self, leased: &[crate::Leased]) {
        if leased.is_empty() {
            return;
        }
        let receipts: Vec<Receipt> = leased.iter().map(|l| l.receipt.clone()).collect();
        {
            let mut held = lock(&self.in_flight);
            for r in &receipts {
                held.remove(r);
            }
        }
        if let Err(e) = self.spool.release(&receipts, Duration::ZERO).await {
            tracing::warn!(error = %e, "could not release leases; they will expire");
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
            .lease_window(window_payloads, self.config.window_bytes())
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

        let batches = pack(leased, &self.config, &self.suspects);
        let permits = Arc::new(Semaphore::new(self.config.concurrency));
        let budget = Arc::new(IsolationBudget::new(self.config.isolation_budget));
        let mut tasks = JoinSet::new();
        for batch in batches {
            let permits = permits.clone();
            let in_flight = self.in_flight.clone();
            let delivery = Delivery {
                spool: self.spool.clone(),
                upstreams: self.upstreams.clone(),
                suspects: self.suspects.clone(),
                budget: budget.clone(),
                max_retry_delay: self.config.max_retry_delay,
                suspect_delay: self.config.suspect_delay,
                turn_bytes: self.turn_bytes,
            };
            tasks.spawn(async move {
                let _permit = permits.acquire_owned().await;
                let receipts: Vec<Receipt> =
                    batch.items.iter().map(|l| l.receipt.clone()).collect();
                let result = delivery.deliver(batch).await;
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
        if budget.left() == 0 && self.config.isolation_budget > 0 {
            metrics::counter!("tributary_isolation_budget_exhausted_total").increment(1);
        }
        Ok((summary, full))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn turn_bytes_is_checked_against_its_bounds() {
        let max = tributary::MAX_PAYLOAD_BYTES;
        assert_eq!(check_turn_bytes(MIN_TURN_BYTES, max), Ok(MIN_TURN_BYTES));
        assert_eq!(check_turn_bytes(max, max), Ok(max));
        for bad in [0, MIN_TURN_BYTES - 1, max + 1] {
            let err = check_turn_bytes(bad, max).unwrap_err();
            assert!(err.to_string().contains("turn bytes"), "{err}");
        }
        // A batch limit below the minimum turn allows a turn of the batch's size.
        assert_eq!(check_turn_bytes(4096, 4096), Ok(4096));
        assert!(DEFAULT_TURN_BYTES.min(max) >= MIN_TURN_BYTES);
        assert_eq!(check_turn_bytes(TURNS_OFF, max), Ok(TURNS_OFF));
        // Below the minimum, the message names the minimum that applies.
        let err = check_turn_bytes(1024, 4096).unwrap_err();
        assert!(err.to_string().contains("at least 4096"), "{err}");
    }

    #[cfg(feature = "sqlite")]
    mod turns {
        use super::super::counting::{CountingSpool, payload};
        use super::*;

        const KIB: usize = 1024;

        /// A forwarder over `spool` with 256 KiB batches, 2 in flight (a 512 KiB window),
        /// and an upstream nobody calls (the tests lease, they do not send).
        fn forwarder(spool: Arc<CountingSpool>, turn_bytes: usize) -> Forwarder {
            let upstreams = Arc::new(
                Upstreams::new(&UpstreamConfig {
                    us: "http://127.0.0.1:9/".into(),
                    eu: "http://127.0.0.1:9/".into(),
                    request_timeout: Duration::from_secs(1),
                })
                .unwrap(),
            );
            let config = ForwarderConfig {
                max_batch_bytes: 256 * KIB,
                concurrency: 2,
                ..ForwarderConfig::default()
            };
            Forwarder::new(
                spool,
                upstreams,
                config,
                Arc::new(Notify::new()),
                Arc::new(AtomicUsize::new(0)),
            )
            .with_turn_bytes(turn_bytes)
            .unwrap()
        }

        /// 10 KiB and 60 KiB payloads in turn, 1 MiB in all: with 64 KiB turns every
        /// 10 KiB payload leaves its turn less than half full.
        async fn fill(spool: &CountingSpool) {
            let payloads = (0..30)
                .map(|i| payload(if i % 2 == 0 { 10 * KIB } else { 60 * KIB }))
                .collect();
            spool.append(payloads).await.unwrap();
        }

        #[tokio::test]
        async fn a_window_is_leased_in_several_turns_up_to_the_window() {
            let spool = Arc::new(CountingSpool::open(None));
            fill(&spool).await;
            let f = forwarder(spool.clone(), MIN_TURN_BYTES);
            let window = f.config.window_bytes();
            let leased = f.lease_window(usize::MAX, window).await.unwrap();
            let bytes: usize = leased.iter().map(|l| l.payload.stored_len()).sum();
            let leases = spool.leases();
            assert!(leases.len() > 2, "{leases:?}");
            assert!(
                leases.iter().all(|&(max, _)| max <= MIN_TURN_BYTES),
                "{leases:?}"
            );
            // Short turns did not end the window: it reached within half a turn of the
            // window, and past it by at most one payload.
            assert!(
                bytes + MIN_TURN_BYTES / 2 + 60 * KIB >= window,
                "{bytes} of {window}"
            );
            assert!(bytes <= window + 60 * KIB, "{bytes} of {window}");
            assert_eq!(lock(&f.in_flight).len(), leased.len());
        }

        #[tokio::test]
        async fn a_window_stops_at_an_empty_turn() {
            let spool = Arc::new(CountingSpool::open(None));
            spool.append(vec![payload(10 * KIB); 3]).await.unwrap();
            let f = forwarder(spool.clone(), MIN_TURN_BYTES);
            let leased = f
                .lease_window(usize::MAX, f.config.window_bytes())
                .await
                .unwrap();
            assert_eq!(leased.len(), 3);
            let leases = spool.leases();
            assert_eq!(leases.len(), 2, "{leases:?}");
            assert_eq!(leases[1].1, 0);
        }

        #[tokio::test]
        async fn a_later_turn_that_fails_releases_what_the_earlier_turns_leased() {
            let spool = Arc::new(CountingSpool::open(Some(3)));
            fill(&spool).await;
            let f = forwarder(spool.clone(), MIN_TURN_BYTES);
            let err = f.lease_window(usize::MAX, f.config.window_bytes()).await;
            assert!(err.is_err());
            assert_eq!(spool.leases().len(), 3);
            assert!(lock(&f.in_flight).is_empty());
            // Everything is visible again, at once.
            let all = spool
                .inner
                .lease(usize::MAX, usize::MAX, Duration::from_secs(60))
                .await
                .unwrap();
            assert_eq!(all.len(), 30);
        }

        #[tokio::test]
        async fn with_turns_off_a_window_is_one_lease() {
            let spool = Arc::new(CountingSpool::open(None));
            fill(&spool).await;
            let f = forwarder(spool.clone(), TURNS_OFF);
            let window = f.config.window_bytes();
            let leased = f.lease_window(usize::MAX, window).await.unwrap();
            assert!(!leased.is_empty());
            let leases = spool.leases();
            assert_eq!(leases.len(), 1, "{leases:?}");
            assert_eq!(leases[0].0, window);
        }
    }
}
