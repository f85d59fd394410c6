//! `tributary lambda`: the binary as an AWS Lambda custom runtime (cargo feature `lambda`,
//! on by default), with the `lambda_runtime` crate. Packaged as `bootstrap`, it starts this
//! subcommand by itself (see `main.rs`). Two modes, chosen by `--mode` /
//! `TRIBUTARY_LAMBDA_MODE`:
//!
//! - `scheduled` (an EventBridge rule, `rate(1 minute)`): each invocation drains the SQS
//!   spool like `drain --once`, until nothing is visible or until `--settle-margin` before
//!   the invocation's deadline: then the sends in flight are abandoned and their leases
//!   released at once, so every lease is settled before Lambda stops the function. It
//!   returns the [`ForwardSummary`](tributary_spool::forward::ForwardSummary) and the
//!   spool's counts.
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

use lambda_runtime::{LambdaEvent, service_fn};
use tokio::sync::Notify;
use tributary_spool::forward::{Forwarder, Upstreams};

mod sqs_batch;
mod tracked;

use sqs_batch::InvocationSpool;
pub use sqs_batch::{BatchItemFailure, BatchResponse, SqsAttribute, SqsEvent, SqsRecord};
use tracked::TrackedSpool;

use crate::config::{HumanDuration, RelayConfig, RelaySettings};

/// The message attribute the SQS spool stores a payload's route in (`us`, `eu`).
pub const ROUTE_ATTRIBUTE: &str = "route";

/// Scheduled mode stops its release calls this long before the invocation's deadline, to
/// answer in time.
const SETTLE_SPARE: Duration = Duration::from_millis(200);

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
        crate::forwarding::Beside::Nothing,
    )?);
    tracing::info!(spool = %config.spool, "tributary lambda (scheduled) ready");
    let handler = service_fn(move |event: LambdaEvent<serde_json::Value>| {
        let forwarder = forwarder.clone();
        let spool = spool.clone();
        let tracked = tracked.clone();
        async move {
            let stop = stop_before(event.context.deadline, margin);
            tracked.take_acked();
            let drained = forwarder.drain(stop).await;
            // Settled whatever the drain ended with, an error too: a receive cut short by
            // the deadline may still have leased messages, and the spool may hold received
            // messages it never handed out. Waiting ends half-way into the margin, the
            // release calls shortly before the deadline, so the answer is in time.
            let deadline = Instant::now()
                + Duration::from_millis(event.context.deadline.saturating_sub(now_ms()));
            let wait_until = deadline.checked_sub(margin / 2).unwrap_or(stop).max(stop);
            let give_up = deadline
                .checked_sub(SETTLE_SPARE)
                .unwrap_or(wait_until)
                .max(wait_until);
            let released_late = match tracked.settle_leftovers(wait_until, give_up).await {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!(error = %e, "leftover leases not all released; they come back when their lease runs out");
                    0
                }
            };
            let summary = drained?;
            let acked = tracked.take_acked();
            let stopped_early = Instant::now() >= stop;
            // Counts are for the log and the answer only: skipped past the stop time, and
            // never a reason to fail an invocation that delivered.
            let stats = if stopped_early {
                None
            } else {
                match tokio::time::timeout_at(give_up.into(), spool.stats()).await {
                    Ok(Ok(s)) => Some(s),
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "spool stats unavailable after the drain");
                        None
                    }
                    Err(_) => None,
                }
            };
            tracing::info!(
                request_id = %event.context.request_id,
                events = summary.events_delivered,
                retried = summary.payloads_retried,
                dead = summary.payloads_dead,
                pending = stats.as_ref().map(|s| s.pending),
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
