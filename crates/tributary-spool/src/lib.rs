//! Durable spools for the Tributary relay: where accepted payloads wait until the upstream
//! has taken them.
//!
//! One trait, [`Spool`], with lease semantics modelled on a queue service's visibility
//! timeout: [`Spool::lease`] hands out pending payloads and hides them for a while;
//! [`Spool::ack`] deletes them after the upstream answered 2xx; [`Spool::release`] makes them
//! visible again after a delay; [`Spool::dead_letter`] moves them aside with a reason. A
//! relay that crashes holding leases loses nothing: the leases run out and the payloads are
//! handed out again (at-least-once).
//!
//! Store and forward in one crate, each part behind a cargo feature (all on by default):
//!
//! | feature | what |
//! |---|---|
//! | `sqlite` | [`SqliteSpool`]: the embedded spool, one WAL file (bundled SQLite) |
//! | `sqs` | [`SqsSpool`]: AWS SQS as the spool, its dead-letter queue for dead letters |
//! | `forward` | [`forward::Forwarder`]: spool to the Event API in few large requests, with retries and isolation of refused visitors (turns on `tributary/http`) |
//!
//! [`SpoolDispatcher`] is the producer side: a processor's requests appended to any spool.
//! `cargo tree -p tributary-spool --no-default-features --features sqlite` has no AWS SDK.

// The docs link every backend; built without some of them, those links have no target.
#![cfg_attr(
    not(all(feature = "sqlite", feature = "sqs", feature = "forward")),
    allow(rustdoc::broken_intra_doc_links)
)]

use std::time::Duration;

use async_trait::async_trait;

mod audit;
pub mod clock;
pub mod dispatcher;
#[cfg(feature = "forward")]
pub mod forward;
mod payload;
mod route;
#[cfg(feature = "sqlite")]
mod sqlite;
#[cfg(feature = "sqs")]
pub mod sqs;

pub use audit::{Ledger, SpoolAudit, SpoolTotals};
pub use dispatcher::{
    SpoolDispatcher, SpoolDispatcherBuilder, SpoolDispatcherError, SpoolDispatcherStats,
};
pub use payload::Payload;
pub use route::Route;
#[cfg(feature = "sqlite")]
pub use sqlite::dedup::{DEDUP_FILE, DedupKey, DedupStore, dedup_key};
#[cfg(feature = "sqlite")]
pub use sqlite::{
    Compression, DB_FILE, ParseCompressionError, ParseSyncModeError, SqliteConfig, SqliteCounters,
    SqliteSpool, SyncMode,
};
#[cfg(feature = "sqs")]
pub use sqs::{DEFAULT_MAX_MESSAGE_BYTES, SqsConfig, SqsConfigError, SqsSetting, SqsSpool};

/// Identifies one leased payload until it is acked, released or dead-lettered.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Receipt(pub String);

/// A payload handed out by [`Spool::lease`].
#[derive(Debug, Clone)]
pub struct Leased {
    /// Pass back to ack, release or dead-letter it.
    pub receipt: Receipt,
    /// The payload as appended.
    pub payload: Payload,
    /// How many times it has been leased before this one (0 on first delivery).
    pub attempts: u32,
    /// When it was appended, in milliseconds since the Unix epoch.
    pub appended_at_ms: u64,
}

/// How one leased payload is settled piece by piece, once isolation has split it: some of
/// its visitors were delivered, some were refused alone, and the rest is still to send.
///
/// ```
/// use std::time::Duration;
/// use tributary_spool::{PartialSettlement, Receipt};
/// // Every visitor delivered but one, which the upstream refused alone:
/// let settle = PartialSettlement {
///     receipt: Receipt("7:1".into()),
///     delivered_events: 9,
///     dead: vec![/* (that visitor as a one-visitor Payload, "upstream answered 400: ...") */],
///     remainder: None,
///     delay: Duration::ZERO,
/// };
/// # let _ = settle;
/// ```
#[derive(Debug, Clone)]
pub struct PartialSettlement {
    /// The lease being settled.
    pub receipt: Receipt,
    /// How many of its visitors the upstream accepted: they leave the spool.
    pub delivered_events: u32,
    /// Visitors refused when sent alone, each as a one-visitor payload with the payload's
    /// route and header, and the reason (status and upstream answer): each becomes a dead
    /// letter of its own.
    pub dead: Vec<(Payload, String)>,
    /// Visitors neither delivered nor refused (the upstream failed part-way, or isolation
    /// ran out of budget): they stay pending as one payload, with the original append time
    /// and attempts.
    pub remainder: Option<Payload>,
    /// When the remainder becomes visible again.
    pub delay: Duration,
}

/// A payload set aside because it could not be delivered.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// Stable id for retry or purge.
    pub id: String,
    /// The payload.
    pub payload: Payload,
    /// Why it was set aside (upstream status and message, expiry, ...).
    pub reason: String,
    /// When it was appended, in milliseconds since the Unix epoch.
    pub appended_at_ms: u64,
    /// When it was set aside, in milliseconds since the Unix epoch.
    pub dead_at_ms: u64,
}

/// A dead letter without its body: what a status page lists. Cheap to read (the SQLite
/// spool does not load the bodies) and bounded: `reason` is at most
/// [`DeadLetterSummary::MAX_REASON_CHARS`] characters.
#[derive(Debug, Clone)]
pub struct DeadLetterSummary {
    /// Stable id for retry or purge.
    pub id: String,
    /// The payload's route.
    pub route: Route,
    /// Visitors in it.
    pub visitor_count: u32,
    /// Its stored size in bytes.
    pub stored_len: usize,
    /// Why it was set aside, cut to [`DeadLetterSummary::MAX_REASON_CHARS`] characters.
    pub reason: String,
    /// When it was appended, in milliseconds since the Unix epoch.
    pub appended_at_ms: u64,
    /// When it was set aside, in milliseconds since the Unix epoch.
    pub dead_at_ms: u64,
}

impl DeadLetterSummary {
    /// Longest `reason` a summary carries (the full reason stays with the dead letter).
    pub const MAX_REASON_CHARS: usize = 500;

    /// `reason` cut to [`DeadLetterSummary::MAX_REASON_CHARS`] characters.
    pub fn truncate_reason(reason: &str) -> String {
        reason.chars().take(Self::MAX_REASON_CHARS).collect()
    }
}

impl From<&DeadLetter> for DeadLetterSummary {
    fn from(d: &DeadLetter) -> DeadLetterSummary {
        DeadLetterSummary {
            id: d.id.clone(),
            route: d.payload.route.clone(),
            visitor_count: d.payload.visitor_count,
            stored_len: d.payload.stored_len(),
            reason: DeadLetterSummary::truncate_reason(&d.reason),
            appended_at_ms: d.appended_at_ms,
            dead_at_ms: d.dead_at_ms,
        }
    }
}

/// What a spool holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct SpoolStats {
    /// Payloads waiting or leased.
    pub pending: u64,
    /// Their total size in bytes.
    pub pending_bytes: u64,
    /// Visitors (events) in them.
    pub pending_events: u64,
    /// Payloads currently leased.
    pub leased: u64,
    /// Age of the oldest pending payload, in milliseconds (0 when empty).
    pub oldest_age_ms: u64,
    /// Dead letters.
    pub dead_letters: u64,
    /// Their total size in bytes (0, meaning unknown, on SQS). The SQLite spool's
    /// `max_bytes` limit counts `pending_bytes + dead_bytes`.
    pub dead_bytes: u64,
}

/// Which dead letters an operation applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// All of them.
    All,
    /// Those with these ids.
    Ids(Vec<String>),
}

/// Why a spool operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// The spool is at its configured size limit; nothing was appended.
    #[error("spool full: {reason}")]
    Full {
        /// Which limit was reached.
        reason: String,
    },
    /// The storage failed (disk, database, queue service); nothing was appended.
    #[error("spool storage error: {0}")]
    Storage(String),
    /// The spool was closed.
    #[error("spool closed")]
    Closed,
    /// A receipt or id the spool does not know.
    #[error("unknown receipt or id: {0}")]
    Unknown(String),
    /// Bad configuration or spool address.
    #[error("invalid spool configuration: {0}")]
    Config(String),
    /// One visitor is too large for the spool to store, even alone (an SQS message is at
    /// most 256 KiB by default); nothing was appended. Retrying cannot help.
    #[error("payload too large for the spool: {0}")]
    TooLarge(String),
    /// The spool's file cannot be trusted: it is not a spool, it is damaged, or a newer
    /// version wrote it. Nothing was read from it or written to it.
    #[error("{path}: {detail}")]
    Damaged {
        /// The file.
        path: String,
        /// What is wrong and what to do.
        detail: String,
    },
    /// This kind of spool cannot do that (an SQS queue keeps no durable totals).
    #[error("not supported by this spool: {0}")]
    Unsupported(String),
}

impl SpoolError {
    /// A copy, for every caller of a failed group operation (the error holds no handles).
    pub fn duplicate(&self) -> SpoolError {
        match self {
            SpoolError::Full { reason } => SpoolError::Full {
                reason: reason.clone(),
            },
            SpoolError::Storage(m) => SpoolError::Storage(m.clone()),
            SpoolError::Closed => SpoolError::Closed,
            SpoolError::Unknown(m) => SpoolError::Unknown(m.clone()),
            SpoolError::Config(m) => SpoolError::Config(m.clone()),
            SpoolError::TooLarge(m) => SpoolError::TooLarge(m.clone()),
            SpoolError::Damaged { path, detail } => SpoolError::Damaged {
                path: path.clone(),
                detail: detail.clone(),
            },
            SpoolError::Unsupported(m) => SpoolError::Unsupported(m.clone()),
        }
    }
}

/// Durable storage of payloads between ingest and upstream delivery.
///
/// Implementations are shared by many tasks (`&self`) and must make [`Spool::append`]
/// durable before returning `Ok`: the relay answers 2xx to its client on that `Ok`.
#[async_trait]
pub trait Spool: Send + Sync + 'static {
    /// Stores `payloads` durably, all or none.
    async fn append(&self, payloads: Vec<Payload>) -> Result<(), SpoolError>;

    /// Hands out up to `max_payloads` visible payloads totalling at most `max_bytes` (at least
    /// one if any is visible, whatever its size), oldest first, and hides them for
    /// `lease_for`.
    async fn lease(
        &self,
        max_payloads: usize,
        max_bytes: usize,
        lease_for: Duration,
    ) -> Result<Vec<Leased>, SpoolError>;

    /// Deletes delivered payloads.
    async fn ack(&self, receipts: &[Receipt]) -> Result<(), SpoolError>;

    /// Makes leased payloads visible again after `delay`, counting an attempt.
    async fn release(&self, receipts: &[Receipt], delay: Duration) -> Result<(), SpoolError>;

    /// Moves leased payloads to the dead letters with `reason`.
    async fn dead_letter(&self, receipts: &[Receipt], reason: &str) -> Result<(), SpoolError>;

    /// Settles leased payloads piece by piece (see [`PartialSettlement`]). A stale receipt
    /// is skipped, as in [`Spool::release`]. Each settlement is atomic on the SQLite
    /// spool; on SQS the new messages are sent before the old one is deleted, so a crash
    /// in between duplicates, never loses.
    async fn settle_parts(&self, parts: Vec<PartialSettlement>) -> Result<(), SpoolError>;

    /// Counts and ages.
    async fn stats(&self) -> Result<SpoolStats, SpoolError>;

    /// Up to `limit` dead letters, oldest first.
    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, SpoolError>;

    /// Up to `limit` dead letters, oldest first, without their bodies; `None` when this spool
    /// cannot list them without changing them (SQS: a receive hides the messages and counts
    /// a receive against each), so a read-only caller shows the count from
    /// [`Spool::stats`] instead. The default reads [`Spool::dead_letters`] and drops the
    /// bodies; spools that can skip reading the bodies override it.
    async fn dead_letter_summaries(
        &self,
        limit: usize,
    ) -> Result<Option<Vec<DeadLetterSummary>>, SpoolError> {
        let dead = self.dead_letters(limit).await?;
        Ok(Some(dead.iter().map(DeadLetterSummary::from).collect()))
    }

    /// Gives back to the spool, visible at once, any messages it received but has not
    /// handed out in a lease (the SQS spool's overflow stash); returns how many. Called
    /// before a short-lived process (a Lambda invocation) answers, so no message stays
    /// hidden after it. The default holds none.
    async fn release_unhanded(&self) -> Result<u64, SpoolError> {
        Ok(0)
    }

    /// Puts the selected dead letters back in the pending queue; returns how many.
    async fn retry_dead_letters(&self, which: Selection) -> Result<u64, SpoolError>;

    /// Deletes the selected dead letters for good; returns how many.
    async fn purge_dead_letters(&self, which: Selection) -> Result<u64, SpoolError>;

    /// Periodic upkeep (retention: expired payloads become dead letters). Returns how many
    /// payloads it moved. The default does nothing.
    async fn maintain(&self) -> Result<u64, SpoolError> {
        Ok(0)
    }

    /// Finishes what is queued and closes the spool cleanly (the SQLite spool checkpoints
    /// its WAL into the database file). Later calls fail with [`SpoolError::Closed`]. The
    /// default does nothing.
    async fn close(&self) -> Result<(), SpoolError> {
        Ok(())
    }

    /// Whether the spool can take appends now, without writing anything: `Err` says why
    /// not (a full disk, a damaged file). The default asks for [`Spool::stats`].
    async fn check_ready(&self) -> Result<(), SpoolError> {
        self.stats().await.map(|_| ())
    }

    /// Bytes of the payloads pending for `account_id` (its `account_id` header field),
    /// cheap to read (one lookup of a running figure, never a scan); `None` for a spool
    /// that keeps no such figure (SQS). The relay's fair share reads it.
    async fn account_pending_bytes(&self, account: &str) -> Result<Option<u64>, SpoolError> {
        let _ = account;
        Ok(None)
    }

    /// The durable running totals, cheap to read; `None` for a spool that keeps none (SQS).
    async fn totals(&self) -> Result<Option<SpoolTotals>, SpoolError> {
        Ok(None)
    }

    /// The totals checked against what the spool holds, counted row by row (reads
    /// everything: an operator's command, not a metric).
    async fn audit(&self) -> Result<SpoolAudit, SpoolError> {
        Err(SpoolError::Unsupported(
            "this spool keeps no durable totals to audit".to_owned(),
        ))
    }
}
