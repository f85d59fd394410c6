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
//! - a 4xx that blames the content (400, 413, 422): the batch is taken apart into its
//!   visitors and isolated (see [`tributary::isolate`]) until each refused part is a single
//!   visitor sent alone. Only such a visitor becomes a dead letter (with its payload's
//!   route and header, the status and the upstream's answer); every other visitor is
//!   delivered, the other visitors of the same client payload included;
//! - another 4xx (401, 403, 404, ...): a configuration problem, not the payload's: released
//!   with the longest delay and logged, so nothing is lost while an operator fixes it.
//!
//! Isolation draws on a budget of requests per cycle (`--isolation-budget`). What is not
//! isolated when it runs out goes back to the spool, visible again after a short delay, and
//! is remembered as suspect ([`Suspects`]): the next cycle packs suspect payloads in batches
//! no larger than the group they were left in. A payload is never cut here, so one larger
//! than its group is sent whole and its search restarts from its top. Nothing is
//! dead-lettered for want of budget.
//!
//! Cost, with `k` refused visitors among the `n` of a batch: one request for the batch,
//! then at most `2·k·⌈log2 n⌉` for isolation (fewer when refused visitors share halves),
//! plus one request per unresolved group each time the budget runs out.

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use tokio::sync::{Notify, Semaphore, watch};
use tokio::task::JoinSet;
use tributary::isolate::{BisectOutcome, IsolationBudget, isolate};
use tributary::raw::encoded_len;
use tributary::retry::is_content_rejection;
use tributary::{DispatchError, RawBatch};
use tributary_spool::{Leased, PartialSettlement, Payload, Receipt, Spool, SpoolError};

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
    /// Most upstream requests one cycle spends isolating refused visitors.
    pub isolation_budget: usize,
    /// How long what isolation did not finish waits before the next try.
    pub suspect_delay: Duration,
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
/// group at the byte and event limits. Suspect payloads (see [`Suspects`]) go in batches of
/// their own, cut at the smallest group size any of them was left in.
fn pack(leased: Vec<Leased>, config: &ForwarderConfig, suspects: &Suspects) -> Vec<Batch> {
    let mut order: Vec<(String, Bytes)> = Vec::new();
    let mut groups: HashMap<(String, Bytes), Group> = HashMap::new();
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
    route: &'a str,
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
        route: &'a str,
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
                route: self.route.to_owned(),
                header: self.header.clone(),
                items: std::mem::take(&mut self.current),
            });
        }
        (self.bytes, self.events, self.limit) = (0, 0, usize::MAX);
    }
}

/// Most payloads remembered as suspect; past it the memory starts over (a forgotten
/// suspect costs a larger first request next time, nothing else).
const SUSPECTS_CAPACITY: usize = 100_000;

/// Payloads whose isolation the budget cut short, by content, with the size of the group
/// they were left in: the next cycle sends them in batches no larger than that.
///
/// Kept in memory by content, not by spool id, so it works the same over SQLite and SQS;
/// lost on a restart, which only makes the next first request larger.
pub struct Suspects {
    hints: Mutex<HashMap<u64, usize>>,
    capacity: usize,
}

impl Suspects {
    fn new(capacity: usize) -> Self {
        Suspects {
            hints: Mutex::new(HashMap::new()),
            capacity,
        }
    }

    fn key(p: &Payload) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        p.route.hash(&mut h);
        p.header.hash(&mut h);
        p.visitors.hash(&mut h);
        h.finish()
    }

    fn remember(&self, p: &Payload, group: usize) {
        let mut hints = lock(&self.hints);
        if hints.len() >= self.capacity {
            hints.clear();
        }
        let e = hints.entry(Self::key(p)).or_insert(group);
        *e = (*e).min(group);
    }

    fn take(&self, p: &Payload) -> Option<usize> {
        let mut hints = lock(&self.hints);
        if hints.is_empty() {
            return None;
        }
        hints.remove(&Self::key(p))
    }
}

/// What one batch's delivery needs.
struct Delivery {
    spool: Arc<dyn Spool>,
    upstreams: Arc<Upstreams>,
    suspects: Arc<Suspects>,
    budget: Arc<IsolationBudget>,
    max_retry_delay: Duration,
    suspect_delay: Duration,
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
    async fn deliver(&self, batch: Batch) -> Result<ForwardSummary, SpoolError> {
        let mut summary = ForwardSummary {
            requests: 1,
            ..ForwardSummary::default()
        };
        metrics::histogram!("tributary_upstream_batch_events").record(batch.events() as f64);
        let body = batch.body(&batch.items);
        metrics::histogram!("tributary_upstream_batch_bytes").record(body.len() as f64);
        match self.upstreams.send(&batch.route, body).await {
            Ok(()) => {
                settle_delivered(&*self.spool, &batch.items, &mut summary).await?;
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
        settle_delivered(&*self.spool, &acked, summary).await?;
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
                        summary,
                    )
                    .await?;
                }
                None => {
                    let receipts: Vec<Receipt> = items.iter().map(|l| l.receipt.clone()).collect();
                    summary.events_unresolved += items
                        .iter()
                        .map(|l| u64::from(l.payload.visitor_count))
                        .sum::<u64>();
                    summary.payloads_retried += items.len() as u64;
                    self.spool.release(&receipts, self.suspect_delay).await?;
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
    spool.release(&receipts, delay).await?;
    summary.payloads_retried += items.len() as u64;
    Ok(())
}

/// How long payloads wait after a failure that is not their content's: the longest delay
/// when the upstream refuses the relay itself (401, 403, 404: an operator must act), else
/// the backoff for their attempts, or the upstream's `Retry-After` when longer.
fn failure_delay(error: &DispatchError, attempts: u32, max_retry_delay: Duration) -> Duration {
    match error {
        DispatchError::Permanent { .. } => max_retry_delay,
        DispatchError::Transient { retry_after, .. } => {
            retry_delay(attempts, *retry_after, max_retry_delay)
        }
        _ => retry_delay(attempts, None, max_retry_delay),
    }
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
