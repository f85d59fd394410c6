//! `tributary lambda`: the binary as an AWS Lambda custom runtime (cargo feature `lambda`,
//! on by default), with the `lambda_runtime` crate. Packaged as `bootstrap`, it starts this
//! subcommand by itself (see `main.rs`). Two modes, chosen by `--mode` /
//! `TRIBUTARY_LAMBDA_MODE`:
//!
//! - `scheduled` (an EventBridge rule, `rate(1 minute)`): each invocation drains the SQS
//!   spool like `drain --once`, until nothing is visible or until `--settle-margin` before
//!   the invocation's deadline: then the sends in flight are abandoned and their leases
//!   released at once, so every lease is settled before Lambda stops the function. It
//!   returns the [`ForwardSummary`] and the spool's counts.
//! - `sqs-trigger` (an event source mapping with `ReportBatchItemFailures`): the messages of
//!   the invocation are merged and forwarded, refused visitors isolated, as the forwarder
//!   does; the answer lists in `batchItemFailures` exactly the messages not delivered, so SQS
//!   redelivers only those, and a poison message reaches the dead-letter queue by the
//!   queue's redrive policy (`maxReceiveCount`). A message is SQS's unit of redelivery: one
//!   with some visitors refused is reported failed whole, and its other visitors are sent
//!   again with it (at-least-once).
//!
//! The spool, the upstream client and the forwarder are built once, at initialisation, and
//! reused by every invocation of the same execution environment.

use std::process::ExitCode;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use lambda_runtime::{LambdaEvent, service_fn};
use tokio::sync::Notify;
use tributary::RawBatch;
use tributary_spool::forward::{ForwardSummary, Forwarder, Upstreams};
use tributary_spool::{
    DeadLetter, Leased, PartialSettlement, Payload, Receipt, Selection, Spool, SpoolError,
    SpoolStats,
};

use crate::config::{HumanDuration, RelayConfig, RelaySettings};

/// The message attribute the SQS spool stores a payload's route in (`us`, `eu`).
pub const ROUTE_ATTRIBUTE: &str = "route";

/// What each invocation does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LambdaMode {
    /// Drain the SQS spool until empty or the deadline (EventBridge schedule).
    Scheduled,
    /// Forward the invocation's SQS messages; report the undelivered ones.
    SqsTrigger,
}

/// `tributary lambda` flags (each also an environment variable: Lambda configures a function
/// by its environment).
#[derive(Debug, clap::Args)]
pub struct LambdaArgs {
    /// What each invocation does.
    #[arg(long, env = "TRIBUTARY_LAMBDA_MODE", value_enum)]
    pub mode: LambdaMode,

    /// Stop forwarding this long before the invocation's deadline, to release the leases of
    /// unfinished sends and answer in time. More than the time one lease release takes
    /// (one SQS call); the function's timeout must be longer.
    #[arg(
        long,
        env = "TRIBUTARY_LAMBDA_SETTLE_MARGIN",
        value_name = "DURATION",
        default_value = "3s"
    )]
    pub settle_margin: HumanDuration,

    /// TOML file with any of the settings; flags and environment variables win over it.
    #[arg(long, env = "TRIBUTARY_CONFIG", value_name = "FILE")]
    pub config: Option<std::path::PathBuf>,

    // Flattened: clap shows the inner flags' own help.
    #[allow(missing_docs)]
    #[command(flatten)]
    pub settings: RelaySettings,
}

/// Why `tributary lambda` cannot start.
#[derive(Debug, thiserror::Error)]
pub enum LambdaError {
    /// A variable the Lambda service always sets is missing: not running in Lambda (or an
    /// emulator that does not set it).
    #[error(
        "{0} is not set: `tributary lambda` runs inside AWS Lambda (or an emulator of its \
         Runtime API), which sets it"
    )]
    MissingEnv(&'static str),
    /// Scheduled mode drains an SQS spool; a local one would vanish with the environment.
    #[error(
        "--mode scheduled drains an SQS spool (--spool sqs://...); {0:?} is not one: a \
         function's local disk does not outlive it"
    )]
    NotSqs(String),
    /// A receive cut short at the deadline must end within the settle margin.
    #[error(
        "--sqs-wait-time ({wait:?}) must be shorter than --settle-margin ({margin:?}): a long \
         poll in progress at the deadline must end, and its messages be released, in time"
    )]
    WaitTooLong {
        /// `--sqs-wait-time`.
        wait: Duration,
        /// `--settle-margin`.
        margin: Duration,
    },
}

/// Variables the Lambda service sets, which `lambda_runtime` reads (it panics without them).
const LAMBDA_ENV: [&str; 4] = [
    "AWS_LAMBDA_RUNTIME_API",
    "AWS_LAMBDA_FUNCTION_NAME",
    "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
    "AWS_LAMBDA_FUNCTION_VERSION",
];

/// Runs `tributary lambda` until the Lambda service stops the environment.
pub fn run(args: LambdaArgs) -> anyhow::Result<ExitCode> {
    for name in LAMBDA_ENV {
        if std::env::var_os(name).is_none() {
            return Err(LambdaError::MissingEnv(name).into());
        }
    }
    let file = match &args.config {
        Some(path) => RelaySettings::from_file(path)?,
        None => RelaySettings::default(),
    };
    let config = args.settings.resolve(file)?;
    let margin = args.settle_margin.0;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        match args.mode {
            LambdaMode::Scheduled => scheduled(config, margin).await,
            LambdaMode::SqsTrigger => sqs_trigger(config, margin).await,
        }
    })?;
    Ok(ExitCode::SUCCESS)
}

/// The Instant `margin` before a Lambda deadline given in Unix milliseconds.
fn stop_before(deadline_ms: u64, margin: Duration) -> Instant {
    let left = Duration::from_millis(deadline_ms.saturating_sub(now_ms()));
    Instant::now() + left.saturating_sub(margin)
}

async fn scheduled(config: RelayConfig, margin: Duration) -> anyhow::Result<()> {
    if !config.spool.starts_with("sqs://") {
        return Err(LambdaError::NotSqs(config.spool.clone()).into());
    }
    if config.sqs_wait_time >= margin {
        return Err(LambdaError::WaitTooLong {
            wait: config.sqs_wait_time,
            margin,
        }
        .into());
    }
    let spool = crate::spool_addr::open(
        &config.spool,
        &config,
        crate::spool_addr::OpenMode::Existing,
    )
    .await?;
    let tracked = Arc::new(TrackedSpool::new(spool.clone()));
    let forwarder = Arc::new(crate::forwarding::forwarder(
        &config,
        tracked.clone(),
        Arc::new(Notify::new()),
        Arc::new(AtomicUsize::new(0)),
    )?);
    tracing::info!(spool = %config.spool, "tributary lambda (scheduled) ready");
    let handler = service_fn(move |event: LambdaEvent<serde_json::Value>| {
        let forwarder = forwarder.clone();
        let spool = spool.clone();
        let tracked = tracked.clone();
        async move {
            let stop = stop_before(event.context.deadline, margin);
            tracked.take_acked();
            let summary = forwarder.drain(stop).await?;
            // A receive cut short by the deadline may still have leased messages: wait for
            // it, then release whatever no one settled.
            let deadline = Instant::now()
                + Duration::from_millis(event.context.deadline.saturating_sub(now_ms()));
            let released_late = tracked.settle_leftovers(deadline).await?;
            let acked = tracked.take_acked();
            let stats = spool.stats().await?;
            let stopped_early = Instant::now() >= stop;
            tracing::info!(
                request_id = %event.context.request_id,
                events = summary.events_delivered,
                retried = summary.payloads_retried,
                dead = summary.payloads_dead,
                pending = stats.pending,
                stopped_early,
                "scheduled drain done"
            );
            Ok::<_, lambda_runtime::Error>(serde_json::json!({
                "summary": summary,
                "payloads_acked": acked,
                "leases_released_after_drain": released_late,
                "spool": stats,
                "stopped_at_deadline": stopped_early,
            }))
        }
    });
    lambda_runtime::run(handler)
        .await
        .map_err(|e| anyhow::anyhow!("Lambda runtime: {e}"))
}

async fn sqs_trigger(config: RelayConfig, margin: Duration) -> anyhow::Result<()> {
    let upstreams = Arc::new(Upstreams::new(&config.upstream_config())?);
    let forwarder_config = config.forwarder_config();
    tracing::info!("tributary lambda (sqs-trigger) ready");
    let handler = service_fn(move |event: LambdaEvent<SqsEvent>| {
        let upstreams = upstreams.clone();
        let forwarder_config = forwarder_config.clone();
        async move {
            let stop = stop_before(event.context.deadline, margin);
            let (spool, unreadable) = InvocationSpool::from_records(event.payload.records);
            let spool = Arc::new(spool);
            let forwarder = Forwarder::new(
                spool.clone(),
                upstreams,
                forwarder_config,
                Arc::new(Notify::new()),
                Arc::new(AtomicUsize::new(0)),
            );
            let summary = forwarder.drain(stop).await?;
            let mut failures = spool.undelivered();
            failures.extend(unreadable);
            tracing::info!(
                request_id = %event.context.request_id,
                events = summary.events_delivered,
                failed_messages = failures.len(),
                "sqs-trigger batch done"
            );
            Ok::<_, lambda_runtime::Error>(BatchResponse {
                batch_item_failures: failures
                    .into_iter()
                    .map(|item_identifier| BatchItemFailure { item_identifier })
                    .collect(),
                summary,
            })
        }
    });
    lambda_runtime::run(handler)
        .await
        .map_err(|e| anyhow::anyhow!("Lambda runtime: {e}"))
}

/// The event an SQS event source mapping sends (the fields used).
#[derive(Debug, serde::Deserialize)]
pub struct SqsEvent {
    /// The messages.
    #[serde(rename = "Records", default)]
    pub records: Vec<SqsRecord>,
}

/// One message of an [`SqsEvent`].
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SqsRecord {
    /// What `batchItemFailures` names it by.
    pub message_id: String,
    /// The message body: an Event API payload, as the SQS spool wrote it.
    #[serde(default)]
    pub body: String,
    /// Message attributes (the spool's `route`).
    #[serde(default)]
    pub message_attributes: std::collections::HashMap<String, SqsAttribute>,
    /// System attributes (`ApproximateReceiveCount`, `SentTimestamp`).
    #[serde(default)]
    pub attributes: std::collections::HashMap<String, String>,
}

/// A message attribute of an [`SqsRecord`].
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SqsAttribute {
    /// Its value, for `String` and `Number` attributes.
    pub string_value: Option<String>,
}

/// The answer to an SQS event: the messages SQS must deliver again.
#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BatchResponse {
    /// The messages not delivered.
    pub batch_item_failures: Vec<BatchItemFailure>,
    /// What the forwarder did (ignored by Lambda; in the function's logs and test output).
    pub summary: ForwardSummary,
}

/// One entry of `batchItemFailures`.
#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BatchItemFailure {
    /// The `messageId` of the record.
    pub item_identifier: String,
}

/// A spool that remembers every lease until it is settled, with receives that finish even
/// when the forwarder abandons them at the deadline (their task runs on). After the drain,
/// [`TrackedSpool::settle_leftovers`] releases what no one settled: the messages of a
/// receive that completed after the forwarder stopped waiting, which the forwarder never
/// saw and so could not release.
struct TrackedSpool {
    inner: Arc<dyn Spool>,
    held: Arc<Mutex<std::collections::HashSet<Receipt>>>,
    receiving: Arc<(AtomicUsize, Notify)>,
    /// Payloads acked (deleted) since the last [`TrackedSpool::take_acked`]: unlike the
    /// forwarder's summary, this counts the cycle the deadline cut short too.
    acked: std::sync::atomic::AtomicU64,
}

impl TrackedSpool {
    fn new(inner: Arc<dyn Spool>) -> TrackedSpool {
        TrackedSpool {
            inner,
            held: Arc::default(),
            receiving: Arc::new((AtomicUsize::new(0), Notify::new())),
            acked: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn take_acked(&self) -> u64 {
        self.acked.swap(0, std::sync::atomic::Ordering::SeqCst)
    }

    fn forget(&self, receipts: &[Receipt]) {
        let mut held = lock(&self.held);
        for r in receipts {
            held.remove(r);
        }
    }

    /// Waits (until `deadline`) for receives still running, then releases every lease not
    /// settled.
    async fn settle_leftovers(&self, deadline: Instant) -> Result<u64, SpoolError> {
        let (count, done) = &*self.receiving;
        let _ = tokio::time::timeout_at(deadline.into(), async {
            loop {
                let notified = done.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if count.load(std::sync::atomic::Ordering::SeqCst) == 0 {
                    return;
                }
                notified.await;
            }
        })
        .await;
        let left: Vec<Receipt> = lock(&self.held).drain().collect();
        if !left.is_empty() {
            tracing::info!(
                payloads = left.len(),
                "releasing leases of a receive that ended at the deadline"
            );
            self.inner.release(&left, Duration::ZERO).await?;
        }
        Ok(left.len() as u64)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[async_trait]
impl Spool for TrackedSpool {
    async fn append(&self, payloads: Vec<Payload>) -> Result<(), SpoolError> {
        self.inner.append(payloads).await
    }

    async fn lease(
        &self,
        max_payloads: usize,
        max_bytes: usize,
        lease_for: Duration,
    ) -> Result<Vec<Leased>, SpoolError> {
        let inner = self.inner.clone();
        let held = self.held.clone();
        let receiving = self.receiving.clone();
        receiving
            .0
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        // Spawned: dropping this future (the deadline) does not cut the receive short
        // between SQS hiding the messages and their receipts being recorded.
        let task = tokio::spawn(async move {
            let result = inner.lease(max_payloads, max_bytes, lease_for).await;
            if let Ok(leased) = &result {
                lock(&held).extend(leased.iter().map(|l| l.receipt.clone()));
            }
            receiving
                .0
                .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            receiving.1.notify_waiters();
            result
        });
        task.await
            .map_err(|e| SpoolError::Storage(format!("receive task failed: {e}")))?
    }

    async fn ack(&self, receipts: &[Receipt]) -> Result<(), SpoolError> {
        self.inner.ack(receipts).await?;
        self.acked
            .fetch_add(receipts.len() as u64, std::sync::atomic::Ordering::SeqCst);
        self.forget(receipts);
        Ok(())
    }

    async fn release(&self, receipts: &[Receipt], delay: Duration) -> Result<(), SpoolError> {
        self.inner.release(receipts, delay).await?;
        self.forget(receipts);
        Ok(())
    }

    async fn dead_letter(&self, receipts: &[Receipt], reason: &str) -> Result<(), SpoolError> {
        self.inner.dead_letter(receipts, reason).await?;
        self.forget(receipts);
        Ok(())
    }

    async fn settle_parts(&self, parts: Vec<PartialSettlement>) -> Result<(), SpoolError> {
        let receipts: Vec<Receipt> = parts.iter().map(|p| p.receipt.clone()).collect();
        self.inner.settle_parts(parts).await?;
        self.forget(&receipts);
        Ok(())
    }

    async fn stats(&self) -> Result<SpoolStats, SpoolError> {
        self.inner.stats().await
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, SpoolError> {
        self.inner.dead_letters(limit).await
    }

    async fn retry_dead_letters(&self, which: Selection) -> Result<u64, SpoolError> {
        self.inner.retry_dead_letters(which).await
    }

    async fn purge_dead_letters(&self, which: Selection) -> Result<u64, SpoolError> {
        self.inner.purge_dead_letters(which).await
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ItemState {
    Visible,
    Leased,
    Delivered,
    Failed,
}

struct Item {
    message_id: String,
    leased: Leased,
    state: ItemState,
}

/// The messages of one SQS-triggered invocation as a spool the forwarder can drain: each is
/// handed out once; an ack delivers it; a release, a dead letter or a partial settlement
/// fails it (SQS delivers it again, or moves it to the dead-letter queue).
struct InvocationSpool {
    items: Mutex<Vec<Item>>,
}

impl InvocationSpool {
    /// The spool, and the ids of records whose body is not an Event API payload (failed at
    /// once: their redrive policy takes them to the dead-letter queue).
    fn from_records(records: Vec<SqsRecord>) -> (InvocationSpool, Vec<String>) {
        let mut items = Vec::with_capacity(records.len());
        let mut unreadable = Vec::new();
        for (i, r) in records.into_iter().enumerate() {
            let route = r
                .message_attributes
                .get(ROUTE_ATTRIBUTE)
                .and_then(|a| a.string_value.clone())
                .unwrap_or_else(|| "us".to_owned());
            match RawBatch::parse(Bytes::from(r.body.into_bytes())) {
                Ok(batch) => {
                    let attempts = r
                        .attributes
                        .get("ApproximateReceiveCount")
                        .and_then(|n| n.parse::<u32>().ok())
                        .unwrap_or(1)
                        .saturating_sub(1);
                    let appended_at_ms = r
                        .attributes
                        .get("SentTimestamp")
                        .and_then(|n| n.parse().ok())
                        .unwrap_or_else(now_ms);
                    items.push(Item {
                        leased: Leased {
                            receipt: Receipt(i.to_string()),
                            payload: Payload::from_batch(route.as_str(), &batch),
                            attempts,
                            appended_at_ms,
                        },
                        message_id: r.message_id,
                        state: ItemState::Visible,
                    });
                }
                Err(e) => {
                    tracing::warn!(message_id = %r.message_id, error = %e, "SQS message is not an Event API payload");
                    unreadable.push(r.message_id);
                }
            }
        }
        (
            InvocationSpool {
                items: Mutex::new(items),
            },
            unreadable,
        )
    }

    fn items(&self) -> std::sync::MutexGuard<'_, Vec<Item>> {
        lock(&self.items)
    }

    fn set(&self, receipts: &[Receipt], from: &[ItemState], to: ItemState) {
        let mut items = self.items();
        for r in receipts {
            if let Some(item) = items.iter_mut().find(|i| &i.leased.receipt == r)
                && from.contains(&item.state)
            {
                item.state = to;
            }
        }
    }

    /// Every message not delivered (failed, or never sent before the deadline).
    fn undelivered(&self) -> Vec<String> {
        self.items()
            .iter()
            .filter(|i| i.state != ItemState::Delivered)
            .map(|i| i.message_id.clone())
            .collect()
    }
}

#[async_trait]
impl Spool for InvocationSpool {
    async fn append(&self, _payloads: Vec<Payload>) -> Result<(), SpoolError> {
        Err(SpoolError::Unsupported(
            "an SQS-triggered invocation only forwards".to_owned(),
        ))
    }

    async fn lease(
        &self,
        max_payloads: usize,
        max_bytes: usize,
        _lease_for: Duration,
    ) -> Result<Vec<Leased>, SpoolError> {
        let mut items = self.items();
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for item in items.iter_mut().filter(|i| i.state == ItemState::Visible) {
            let size = item.leased.payload.stored_len();
            if out.len() >= max_payloads || (!out.is_empty() && bytes + size > max_bytes) {
                break;
            }
            bytes += size;
            item.state = ItemState::Leased;
            out.push(item.leased.clone());
        }
        Ok(out)
    }

    async fn ack(&self, receipts: &[Receipt]) -> Result<(), SpoolError> {
        self.set(receipts, &[ItemState::Leased], ItemState::Delivered);
        Ok(())
    }

    async fn release(&self, receipts: &[Receipt], _delay: Duration) -> Result<(), SpoolError> {
        // Not visible again in this invocation: SQS redelivers it after its visibility timeout.
        self.set(receipts, &[ItemState::Leased], ItemState::Failed);
        Ok(())
    }

    async fn dead_letter(&self, receipts: &[Receipt], reason: &str) -> Result<(), SpoolError> {
        tracing::warn!(
            messages = receipts.len(),
            reason,
            "refused by the upstream; reported failed for the queue's redrive policy"
        );
        self.set(receipts, &[ItemState::Leased], ItemState::Failed);
        Ok(())
    }

    async fn settle_parts(&self, parts: Vec<PartialSettlement>) -> Result<(), SpoolError> {
        for part in parts {
            let whole = part.dead.is_empty() && part.remainder.is_none();
            let to = if whole {
                ItemState::Delivered
            } else {
                ItemState::Failed
            };
            self.set(&[part.receipt], &[ItemState::Leased], to);
        }
        Ok(())
    }

    async fn stats(&self) -> Result<SpoolStats, SpoolError> {
        let items = self.items();
        let open = items
            .iter()
            .filter(|i| matches!(i.state, ItemState::Visible | ItemState::Leased));
        let mut s = SpoolStats::default();
        for i in open {
            s.pending += 1;
            s.pending_bytes += i.leased.payload.stored_len() as u64;
            s.pending_events += u64::from(i.leased.payload.visitor_count);
            s.leased += u64::from(i.state == ItemState::Leased);
        }
        Ok(s)
    }

    async fn dead_letters(&self, _limit: usize) -> Result<Vec<DeadLetter>, SpoolError> {
        Ok(Vec::new())
    }

    async fn retry_dead_letters(&self, _which: Selection) -> Result<u64, SpoolError> {
        Ok(0)
    }

    async fn purge_dead_letters(&self, _which: Selection) -> Result<u64, SpoolError> {
        Ok(0)
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
