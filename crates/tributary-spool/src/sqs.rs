//! [`SqsSpool`]: the spool as an AWS SQS queue, shared by any number of ingest and drain
//! nodes.
//!
//! The [`Spool`] trait was modelled on a queue service, so the mapping is direct:
//!
//! | spool | SQS |
//! |---|---|
//! | [`Spool::append`] | `SendMessageBatch`, 10 messages or the request size limit per call |
//! | [`Spool::lease`] | several `ReceiveMessage` in parallel, `VisibilityTimeout` = the lease |
//! | [`Spool::ack`] | `DeleteMessageBatch`, only after the upstream's 2xx |
//! | [`Spool::release`] | `ChangeMessageVisibilityBatch` to the retry delay |
//! | [`Spool::dead_letter`] | `SendMessageBatch` to the dead-letter queue, then delete |
//! | [`Spool::settle_parts`] | remainders sent back to the queue, refused visitors to the dead-letter queue, then delete |
//! | [`Spool::stats`] | `GetQueueAttributes` (approximate counts) |
//! | dead letters | received from, sent back from, or deleted in the dead-letter queue |
//!
//! # Messages
//!
//! A message body is a normal Event API JSON body (the stored payload encoded), so a queue
//! can be inspected with any SQS tool, and any producer that can send JSON can feed a drain
//! node. Message attributes: `route` (`us` or `eu`; a message without it goes to the US
//! upstream), `appended_at_ms`, and on dead letters `reason` and `dead_at_ms`. A payload
//! larger than one message ([`SqsConfig::max_message_bytes`]) is split by visitors into
//! several messages; the forwarder merges them again. A message whose body is not an Event
//! API payload is never deleted silently: it goes to the dead-letter queue.
//!
//! # Guarantees and their limits
//!
//! - Delivery is at least once. SQS standard queues may deliver a message twice, a drain
//!   node that dies mid-send leaves its messages to reappear after the lease, and an append
//!   that fails part-way (some batch entries stored, some not after all retries) fails as a
//!   whole, so the client resends and the stored part is sent twice.
//! - [`Spool::append`] is durable on return: SQS has stored every message.
//! - [`SpoolStats`] counts are SQS's approximate ones; `pending_bytes`, `pending_events` and
//!   `oldest_age_ms` are `0`, meaning "unknown" (SQS does not report them cheaply).
//! - Retention is the queue's `MessageRetentionPeriod`: SQS deletes older messages itself,
//!   [`Spool::maintain`] moves nothing.
//!
//! ```no_run
//! use tributary_spool::{SqsConfig, SqsSpool};
//! # async fn f() -> Result<(), tributary_spool::SpoolError> {
//! // Region, credentials and AWS_ENDPOINT_URL come from the standard AWS configuration.
//! let spool = SqsSpool::from_env(SqsConfig {
//!     dead_letter_queue: Some("events-dlq".into()),
//!     ..SqsConfig::new("events")
//! })
//! .await?;
//! # Ok(()) }
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aws_sdk_sqs::Client;
use aws_sdk_sqs::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_sqs::types::QueueAttributeName;

use crate::{
    DeadLetter, Leased, PartialSettlement, Payload, Receipt, Selection, Spool, SpoolError,
    SpoolStats,
};

mod calls;
mod dead;
mod lease;
mod message;

use lease::Leases;

/// The largest message SQS accepted until 2025 and the limit moto enforces by default;
/// queues created since may take 1 MiB.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 262_144;

/// Longest visibility timeout SQS allows: 12 hours.
const MAX_VISIBILITY_SECS: i32 = 43_200;

/// Settings of an [`SqsSpool`]. Every field but `queue` has a documented default
/// ([`SqsConfig::new`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqsConfig {
    /// The queue: a name (looked up with `GetQueueUrl`) or a full queue URL.
    pub queue: String,
    /// The dead-letter queue, name or URL. Default `None`: the target of the queue's own
    /// redrive policy if it has one; with neither, dead letters stay in the queue hidden
    /// for 12 hours at a time until SQS's retention deletes them (see `docs/sqs.md`).
    pub dead_letter_queue: Option<String>,
    /// Dead-letter a message when it is received more than this many times without being
    /// delivered. `0` turns the check off (the default): every retry of a payload during
    /// an upstream outage is one receive, so a low value would dead-letter healthy events
    /// during a long outage. Set it above `retention / max retry delay`.
    pub max_receives: u32,
    /// How long the first receive of a lease waits for messages (SQS long polling; at
    /// most 20 s). Default 1 s. The further receives of a lease do not wait.
    pub wait_time: Duration,
    /// `ReceiveMessage` calls in flight at once while a lease fills (each returns at most
    /// 10 messages). Default 8.
    pub receivers: usize,
    /// Largest message, and largest `SendMessageBatch` request, in bytes. Default
    /// [`DEFAULT_MAX_MESSAGE_BYTES`]. Payloads are split by visitors to fit; one visitor
    /// that cannot fit alone is [`SpoolError::TooLarge`].
    pub max_message_bytes: usize,
    /// Tries per batch entry (send, delete, change visibility) before the operation
    /// fails. Default 4. This is on top of the AWS SDK's own retries of failed calls.
    pub attempts: u32,
    /// `SendMessageBatch` / `DeleteMessageBatch` calls in flight at once. Default 8.
    pub concurrency: usize,
}

impl SqsConfig {
    /// Defaults for `queue` (a name or a URL).
    pub fn new(queue: impl Into<String>) -> Self {
        SqsConfig {
            queue: queue.into(),
            dead_letter_queue: None,
            max_receives: 0,
            wait_time: Duration::from_secs(1),
            receivers: 8,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            attempts: 4,
            concurrency: 8,
        }
    }

    /// Checks every setting's range; [`SqsSpool::open`] refuses a config that fails it.
    /// Callers that take these settings from users (the relay) call it to report a bad
    /// value before anything is opened.
    pub fn check(&self) -> Result<(), SqsConfigError> {
        let bad = |setting, requirement| {
            Err(SqsConfigError {
                setting,
                requirement,
            })
        };
        if self.queue.trim().is_empty() {
            return bad(SqsSetting::Queue, "must not be empty");
        }
        if self.wait_time > Duration::from_secs(20) {
            return bad(SqsSetting::WaitTime, "must be at most 20s");
        }
        if self.receivers == 0 || self.receivers > 64 {
            return bad(SqsSetting::Receivers, "must be between 1 and 64");
        }
        if self.concurrency == 0 || self.concurrency > 64 {
            return bad(SqsSetting::Concurrency, "must be between 1 and 64");
        }
        // Room for a header, one small visitor and the attributes.
        if self.max_message_bytes < 4096 || self.max_message_bytes > 1_048_576 {
            return bad(
                SqsSetting::MaxMessageBytes,
                "must be between 4096 and 1048576",
            );
        }
        if self.attempts == 0 {
            return bad(SqsSetting::Attempts, "must be at least 1");
        }
        Ok(())
    }
}

/// One setting of an [`SqsConfig`], as named by an [`SqsConfigError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SqsSetting {
    /// [`SqsConfig::queue`].
    Queue,
    /// [`SqsConfig::wait_time`].
    WaitTime,
    /// [`SqsConfig::receivers`].
    Receivers,
    /// [`SqsConfig::concurrency`].
    Concurrency,
    /// [`SqsConfig::max_message_bytes`].
    MaxMessageBytes,
    /// [`SqsConfig::attempts`].
    Attempts,
}

impl SqsSetting {
    /// The setting in words, as error messages name it: `wait time`, `max message bytes`.
    pub fn words(self) -> &'static str {
        match self {
            SqsSetting::Queue => "queue name or URL",
            SqsSetting::WaitTime => "wait time",
            SqsSetting::Receivers => "receivers",
            SqsSetting::Concurrency => "concurrency",
            SqsSetting::MaxMessageBytes => "max message bytes",
            SqsSetting::Attempts => "attempts",
        }
    }
}

/// An [`SqsConfig`] value out of range: which setting, and what it must be.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("SQS {} {requirement}", setting.words())]
pub struct SqsConfigError {
    /// The setting out of range.
    pub setting: SqsSetting,
    /// What it must be, such as `must be at most 20s`.
    pub requirement: &'static str,
}

impl From<SqsConfigError> for SpoolError {
    fn from(e: SqsConfigError) -> Self {
        SpoolError::Config(e.to_string())
    }
}

/// A [`Spool`] on an AWS SQS standard queue. See the [module docs](self) for the mapping
/// and its guarantees. Cheap to share (`Arc`); one client and connection pool for its life.
pub struct SqsSpool {
    inner: Arc<Inner>,
}

/// What every operation needs.
struct Inner {
    client: Client,
    queue_url: String,
    dead_letter_url: Option<String>,
    config: SqsConfig,
    leases: Leases,
}

impl std::fmt::Debug for SqsSpool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqsSpool")
            .field("queue_url", &self.inner.queue_url)
            .field("dead_letter_url", &self.inner.dead_letter_url)
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl SqsSpool {
    /// Opens the queue with the standard AWS configuration: region, credentials chain
    /// (environment, profile, web identity, instance or task role) and `AWS_ENDPOINT_URL`.
    pub async fn from_env(config: SqsConfig) -> Result<SqsSpool, SpoolError> {
        let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .load()
            .await;
        SqsSpool::open(&sdk, config).await
    }

    /// Opens the queue with an explicit AWS configuration. The queue (and the dead-letter
    /// queue) must exist: a spool never creates queues, so a typo fails here instead of
    /// filling a queue nobody drains.
    pub async fn open(
        sdk: &aws_config::SdkConfig,
        config: SqsConfig,
    ) -> Result<SqsSpool, SpoolError> {
        config.check()?;
        if sdk.region().is_none() {
            return Err(SpoolError::Config(
                "no AWS region: set AWS_REGION (or a profile's region)".into(),
            ));
        }
        let client = Client::new(sdk);
        let queue_url = resolve_queue(&client, &config.queue).await?;
        let dead_letter_url = match &config.dead_letter_queue {
            Some(q) => Some(resolve_queue(&client, q).await?),
            None => redrive_target(&client, &queue_url).await?,
        };
        tracing::info!(queue = %queue_url, dead_letters = ?dead_letter_url, "SQS spool open");
        Ok(SqsSpool {
            inner: Arc::new(Inner {
                client,
                queue_url,
                dead_letter_url,
                config,
                leases: Leases::default(),
            }),
        })
    }

    /// The queue's URL.
    pub fn queue_url(&self) -> &str {
        &self.inner.queue_url
    }

    /// The dead-letter queue's URL, when there is one.
    pub fn dead_letter_url(&self) -> Option<&str> {
        self.inner.dead_letter_url.as_deref()
    }

    /// The settings in force.
    pub fn config(&self) -> &SqsConfig {
        &self.inner.config
    }
}

/// A readable account of an SDK error: SQS's code and message for a service error (the
/// SDK's own display says only "service error"), else the chain of causes (connection
/// refused, timeout, credentials).
pub(crate) fn describe<E>(e: &SdkError<E>) -> String
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    match e.as_service_error() {
        Some(se) => format!(
            "{}: {}",
            se.code().unwrap_or("unknown error"),
            se.message().unwrap_or_default()
        ),
        None => DisplayErrorContext(e).to_string(),
    }
}

/// An SDK error as a storage error.
pub(crate) fn sdk_error<E>(what: &str, e: SdkError<E>) -> SpoolError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    SpoolError::Storage(format!("SQS {what}: {}", describe(&e)))
}

/// A URL as is; a name through `GetQueueUrl`.
async fn resolve_queue(client: &Client, queue: &str) -> Result<String, SpoolError> {
    if queue.starts_with("https://") || queue.starts_with("http://") {
        return Ok(queue.to_owned());
    }
    let out = client
        .get_queue_url()
        .queue_name(queue)
        .send()
        .await
        .map_err(|e| {
            SpoolError::Config(format!(
                "SQS queue {queue:?} not found or not accessible: {}",
                describe(&e)
            ))
        })?;
    out.queue_url()
        .map(str::to_owned)
        .ok_or_else(|| SpoolError::Storage(format!("GetQueueUrl for {queue:?} returned no URL")))
}

/// The dead-letter queue of `queue_url`'s redrive policy, if any. Reading the attributes
/// also checks that the queue exists and is readable.
async fn redrive_target(client: &Client, queue_url: &str) -> Result<Option<String>, SpoolError> {
    let out = client
        .get_queue_attributes()
        .queue_url(queue_url)
        .attribute_names(QueueAttributeName::RedrivePolicy)
        .send()
        .await
        .map_err(|e| {
            SpoolError::Config(format!(
                "SQS queue {queue_url} not accessible: {}",
                describe(&e)
            ))
        })?;
    let Some(policy) = out
        .attributes()
        .and_then(|a| a.get(&QueueAttributeName::RedrivePolicy))
    else {
        return Ok(None);
    };
    let policy: serde_json::Value = serde_json::from_str(policy)
        .map_err(|e| SpoolError::Config(format!("unreadable RedrivePolicy: {e}")))?;
    let Some(arn) = policy.get("deadLetterTargetArn").and_then(|v| v.as_str()) else {
        return Ok(None);
    };
    // arn:aws:sqs:REGION:ACCOUNT:NAME
    let parts: Vec<&str> = arn.split(':').collect();
    let [.., account, name] = parts.as_slice() else {
        return Err(SpoolError::Config(format!(
            "unreadable deadLetterTargetArn {arn:?}"
        )));
    };
    let out = client
        .get_queue_url()
        .queue_name(*name)
        .queue_owner_aws_account_id(*account)
        .send()
        .await
        .map_err(|e| sdk_error("GetQueueUrl (dead-letter queue)", e))?;
    Ok(out.queue_url().map(str::to_owned))
}

/// `d` in whole seconds, rounded up, within SQS's visibility range.
fn visibility_secs(d: Duration, min: i32) -> i32 {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    i32::try_from(secs)
        .unwrap_or(MAX_VISIBILITY_SECS)
        .clamp(min, MAX_VISIBILITY_SECS)
}

/// `secs` lowered so the message's visibility ends within 12 hours of when it was
/// received (SQS refuses more), with a minute to spare for clock differences.
fn capped(secs: i32, received_at: Option<Instant>) -> i32 {
    let Some(at) = received_at else {
        return secs;
    };
    let used = i32::try_from(at.elapsed().as_secs()).unwrap_or(MAX_VISIBILITY_SECS);
    secs.min(MAX_VISIBILITY_SECS - 60 - used).max(0)
}

#[async_trait]
impl Spool for SqsSpool {
    async fn append(&self, payloads: Vec<Payload>) -> Result<(), SpoolError> {
        let now = message::now_ms();
        let mut outgoing = Vec::new();
        for p in &payloads {
            outgoing.extend(message::encode(
                p,
                self.inner.config.max_message_bytes,
                now,
            )?);
        }
        calls::send(&self.inner, &self.inner.queue_url, outgoing).await
    }

    async fn lease(
        &self,
        max_payloads: usize,
        max_bytes: usize,
        lease_for: Duration,
    ) -> Result<Vec<Leased>, SpoolError> {
        lease::lease(&self.inner, max_payloads, max_bytes, lease_for).await
    }

    async fn ack(&self, receipts: &[Receipt]) -> Result<(), SpoolError> {
        self.inner.leases.forget(receipts);
        let handles = receipts.iter().map(|r| r.0.clone()).collect();
        calls::delete(&self.inner, &self.inner.queue_url, handles).await
    }

    async fn release(&self, receipts: &[Receipt], delay: Duration) -> Result<(), SpoolError> {
        let received = self.inner.leases.forget(receipts);
        let secs = visibility_secs(delay, 0);
        let entries = receipts
            .iter()
            .zip(received)
            .map(|(r, at)| (r.0.clone(), capped(secs, at)))
            .collect();
        calls::change_visibility(&self.inner, &self.inner.queue_url, entries).await
    }

    async fn dead_letter(&self, receipts: &[Receipt], reason: &str) -> Result<(), SpoolError> {
        let held = self.inner.leases.take(receipts);
        dead::bury(&self.inner, held, reason).await
    }

    async fn settle_parts(&self, parts: Vec<PartialSettlement>) -> Result<(), SpoolError> {
        dead::settle_parts(&self.inner, parts).await
    }

    async fn stats(&self) -> Result<SpoolStats, SpoolError> {
        dead::stats(&self.inner).await
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, SpoolError> {
        dead::list(&self.inner, limit).await
    }

    /// `None`: listing means receiving from the dead-letter queue, which hides the
    /// messages and counts a receive against each; [`Spool::stats`] has the count.
    async fn dead_letter_summaries(
        &self,
        _limit: usize,
    ) -> Result<Option<Vec<crate::DeadLetterSummary>>, SpoolError> {
        Ok(None)
    }

    async fn release_unhanded(&self) -> Result<u64, SpoolError> {
        let stashed = self.inner.leases.take_stash();
        if stashed.is_empty() {
            return Ok(0);
        }
        let entries = stashed.iter().map(|r| (r.0.clone(), 0)).collect();
        calls::change_visibility(&self.inner, &self.inner.queue_url, entries).await?;
        Ok(stashed.len() as u64)
    }

    async fn retry_dead_letters(&self, which: Selection) -> Result<u64, SpoolError> {
        dead::retry(&self.inner, which).await
    }

    async fn purge_dead_letters(&self, which: Selection) -> Result<u64, SpoolError> {
        dead::purge(&self.inner, which).await
    }

    async fn maintain(&self) -> Result<u64, SpoolError> {
        // SQS enforces retention itself; only forget leases nobody settled.
        self.inner.leases.prune();
        Ok(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn visibility_rounds_up_and_clamps() {
        assert_eq!(visibility_secs(Duration::from_millis(1500), 1), 2);
        assert_eq!(visibility_secs(Duration::ZERO, 1), 1);
        assert_eq!(visibility_secs(Duration::ZERO, 0), 0);
        assert_eq!(visibility_secs(Duration::from_secs(100_000), 0), 43_200);
    }

    #[test]
    fn config_is_checked() {
        assert!(SqsConfig::new("q").check().is_ok());
        assert!(SqsConfig::new(" ").check().is_err());
        let c = SqsConfig {
            wait_time: Duration::from_secs(21),
            ..SqsConfig::new("q")
        };
        assert!(c.check().is_err());
        let c = SqsConfig {
            max_message_bytes: 100,
            ..SqsConfig::new("q")
        };
        assert!(c.check().is_err());
    }
}
