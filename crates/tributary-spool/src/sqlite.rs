//! The embedded spool: one SQLite database (WAL) in a directory. See [`SqliteSpool`].

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot};

use crate::clock::Clock;
use crate::{
    DeadLetter, Leased, PartialSettlement, Payload, Receipt, Selection, Spool, SpoolAudit,
    SpoolError, SpoolStats, SpoolTotals,
};

mod accounts;
mod codec;
mod dead;
pub(crate) mod dedup;
mod payloads;
mod room;
mod schema;
mod store;
mod totals;
mod writer;

use codec::StoredPayload;
pub use codec::{Compression, ParseCompressionError};
use dead::{DeadChunk, parse_id};
use payloads::parse_receipt;
use store::Store;
use writer::{Command, Counters, GroupBound};

/// The database file inside the spool directory.
pub const DB_FILE: &str = "spool.db";

/// When a commit is forced to stable storage. Written `full` or `normal` ([`FromStr`],
/// [`Display`](std::fmt::Display) and serde agree).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    /// fsync the WAL on every commit: acknowledged payloads survive power loss.
    #[default]
    Full,
    /// fsync at checkpoints only: acknowledged payloads survive a crash of the process
    /// (`kill -9`), not of the host. Faster on disks with slow fsync.
    Normal,
}

impl SyncMode {
    /// The name of the mode: `full` or `normal`.
    pub fn as_str(self) -> &'static str {
        match self {
            SyncMode::Full => "full",
            SyncMode::Normal => "normal",
        }
    }
}

impl std::fmt::Display for SyncMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A [`SyncMode`] name that is neither `full` nor `normal`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown sync mode {0:?}: expected full or normal")]
pub struct ParseSyncModeError(pub String);

impl FromStr for SyncMode {
    type Err = ParseSyncModeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "full" => Ok(SyncMode::Full),
            "normal" => Ok(SyncMode::Normal),
            _ => Err(ParseSyncModeError(s.to_owned())),
        }
    }
}

/// Settings of a [`SqliteSpool`]. Every field has a documented default
/// ([`SqliteConfig::default`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqliteConfig {
    /// Most payload bytes held, pending and dead letters together. Default 1 GiB.
    pub max_bytes: u64,
    /// Most payloads held, pending and dead letters together. Default 10,000,000.
    pub max_payloads: u64,
    /// How long a payload may wait for delivery before [`Spool::maintain`] moves it to the
    /// dead letters. Default 4 days (as SQS).
    pub retention: Duration,
    /// When commits reach stable storage. Default [`SyncMode::Full`].
    pub sync: SyncMode,
    /// How visitor runs are stored. Default [`Compression::Zstd`], which makes
    /// the file several times smaller than the events it holds and durable ingest faster;
    /// limits and byte counts stay in bytes as received either way.
    pub compression: Compression,
    /// Most payloads one group commit takes from the queue (it always takes at least one
    /// append, whatever its size). Default 8,192.
    pub max_group_commit_payloads: usize,
    /// Most payload bytes one group commit takes from the queue. Default 16 MiB.
    pub max_group_commit_bytes: usize,
    /// How long to wait for another connection (another process) holding the write lock.
    /// Default 5 s.
    pub busy_timeout: Duration,
    /// Commands waiting for the writer thread; callers wait (asynchronously) when it is
    /// full. Default 4,096.
    pub queue_capacity: usize,
    /// SQLite page cache of the connection. Default 8 MiB.
    pub cache_bytes: u64,
    /// Rows per transaction in bulk operations (retention, dead-letter retry and purge).
    /// Default 1,000.
    pub chunk: usize,
    /// Free space kept on the spool's file system for the forwarder: appends are refused
    /// ([`SpoolError::Full`], a 503 from the relay) once less than this plus twice the
    /// append would be left, so leases, acks and WAL checkpoints, which free space, can
    /// always run. Counted as free bytes of the file system plus free pages inside the
    /// database. Default 64 MiB.
    pub reserve_bytes: u64,
    /// Check every page of the database (and WAL) when opening (`PRAGMA quick_check`), so
    /// a damaged file is refused before anything is acknowledged into it. About 1 s per
    /// GiB held, from the page cache. Default `true`.
    pub check_on_open: bool,
    /// Where the spool reads the time (see [`crate::clock`]). Default: the system's.
    pub clock: Clock,
}

impl Default for SqliteConfig {
    fn default() -> Self {
        SqliteConfig {
            max_bytes: 1 << 30,
            max_payloads: 10_000_000,
            retention: Duration::from_secs(4 * 24 * 3600),
            sync: SyncMode::Full,
            compression: Compression::default(),
            max_group_commit_payloads: 8192,
            max_group_commit_bytes: 16 << 20,
            busy_timeout: Duration::from_secs(5),
            queue_capacity: 4096,
            cache_bytes: 8 << 20,
            chunk: 1000,
            reserve_bytes: 64 << 20,
            check_on_open: true,
            clock: Clock::system(),
        }
    }
}

impl SqliteConfig {
    fn validate(&self) -> Result<(), SpoolError> {
        let positive = [
            ("max_group_commit_payloads", self.max_group_commit_payloads),
            ("max_group_commit_bytes", self.max_group_commit_bytes),
            ("queue_capacity", self.queue_capacity),
            ("chunk", self.chunk),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(SpoolError::Config(format!("{name} must be at least 1")));
            }
        }
        if self.retention.is_zero() {
            return Err(SpoolError::Config("retention must be positive".to_owned()));
        }
        Ok(())
    }
}

/// Counters of one [`SqliteSpool`] handle since it was opened, for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SqliteCounters {
    /// Transactions that committed appends (one per group commit).
    pub append_commits: u64,
    /// Append calls that succeeded.
    pub appends: u64,
    /// Payloads those calls stored.
    pub appended_payloads: u64,
    /// Append calls refused with [`SpoolError::Full`] by a limit.
    pub full_rejections: u64,
}

/// The embedded SQLite spool: one database (WAL) in a directory.
///
/// Share it behind an `Arc`; every method is usable from any task. A dedicated OS thread
/// owns the database connection, so no method blocks the async runtime.
///
/// # Durability
///
/// [`Spool::append`] returns `Ok` only after the transaction holding the payloads committed.
/// With [`SyncMode::Full`] (the default) that commit includes an fsync of the WAL, so an
/// acknowledged payload survives a crash of the process and of the host. With
/// [`SyncMode::Normal`] the WAL is fsynced only at checkpoints: acknowledged payloads
/// survive `kill -9` of the relay (the data is in the OS page cache) but the last commits
/// can be lost if the machine loses power. In both modes the database is consistent after
/// a crash at any moment: a transaction is in it entirely or not at all.
///
/// Appends from concurrent callers are group-committed: one writer thread takes every
/// append waiting in its queue into a single transaction, so the cost of a commit is shared
/// by all the requests that arrived while the previous one was running.
///
/// # Delivery semantics (at least once)
///
/// [`Spool::lease`] hides payloads until `now + lease_for` and returns a receipt
/// `"<id>:<generation>"`, where the generation counts the leases of that payload. Nothing
/// marks a lease in memory: if the relay dies, its leases simply run out and the payloads
/// are handed out again.
///
/// - [`Spool::ack`] deletes the payload even when the receipt is stale (the lease ran out and
///   the payload was leased again): the upstream took it, so removing it only saves a
///   duplicate. Acking a payload that is already gone does nothing.
/// - [`Spool::release`] and [`Spool::dead_letter`] with a stale receipt do nothing: the newer
///   lease holder decides the payload's fate.
/// - A lease that runs out while its holder is still delivering means the payload may be
///   delivered twice; choose `lease_for` well above the upstream timeout with retries.
/// - Receipts and ids that do not parse are [`SpoolError::Unknown`]; well-formed ones that
///   name nothing are skipped, so a forwarder that settles late never fails a whole round.
///
/// # Limits
///
/// [`SqliteConfig::max_payloads`] and [`SqliteConfig::max_bytes`] bound everything the
/// spool holds, pending payloads and dead letters together (bytes are payload bytes,
/// header plus visitors, not file size): the directory stays bounded, and an operator
/// makes room by delivering or purging. An append that would pass a limit fails whole with
/// [`SpoolError::Full`]; what is stored is never touched. Payloads older than
/// [`SqliteConfig::retention`] are moved to the dead letters by [`Spool::maintain`], never
/// deleted.
///
/// # Sharing a directory
///
/// Several handles, in one process or several (the relay and the `tributary spool` CLI), may
/// open the same directory at once: WAL lets readers run beside the writer, and writers take
/// turns, waiting up to [`SqliteConfig::busy_timeout`]. Bulk operations (retention, retry
/// and purge of all dead letters) run in chunks of [`SqliteConfig::chunk`] rows per
/// transaction so that they never hold the write lock for long.
///
/// # Example
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tributary_spool::SpoolError> {
/// use std::time::Duration;
/// use bytes::Bytes;
/// use tributary_spool::{Payload, SqliteConfig, SqliteSpool, Spool};
///
/// let dir = tempfile::tempdir().unwrap();
/// let spool = SqliteSpool::open(dir.path(), SqliteConfig::default())?;
/// let payload = Payload {
///     route: "us".into(),
///     header: Bytes::from_static(br#""account_id":"1""#),
///     visitors: Bytes::from_static(br#"{"visitor_id":"v"}"#),
///     visitor_count: 1,
/// };
/// spool.append(vec![payload.clone()]).await?;
/// let leased = spool.lease(100, 1 << 20, Duration::from_secs(60)).await?;
/// assert_eq!(leased[0].payload, payload);
/// spool.ack(&[leased[0].receipt.clone()]).await?;
/// assert_eq!(spool.stats().await?.pending, 0);
/// spool.close().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct SqliteSpool {
    tx: mpsc::Sender<Command>,
    counters: Arc<Counters>,
    dir: PathBuf,
    config: SqliteConfig,
    accounts: Arc<accounts::AccountReader>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Command")
    }
}

impl SqliteSpool {
    /// Opens the spool in `dir`, creating the directory and the database if missing.
    ///
    /// Blocks the calling thread briefly (file creation, WAL recovery after a crash); the
    /// time does not grow with the number of payloads held.
    pub fn open(dir: &Path, config: SqliteConfig) -> Result<SqliteSpool, SpoolError> {
        std::fs::create_dir_all(dir).map_err(|e| {
            SpoolError::Storage(format!(
                "cannot create spool directory {}: {e}",
                dir.display()
            ))
        })?;
        Self::start(dir, config, true)
    }

    /// Opens an existing spool in `dir`; [`SpoolError::Config`] if there is none. For tools
    /// (`tributary spool stats`) that must not create a spool by mistake.
    pub fn open_existing(dir: &Path, config: SqliteConfig) -> Result<SqliteSpool, SpoolError> {
        if !dir.join(DB_FILE).is_file() {
            return Err(SpoolError::Config(format!(
                "no spool in {} ({DB_FILE} not found)",
                dir.display()
            )));
        }
        Self::start(dir, config, false)
    }

    fn start(dir: &Path, config: SqliteConfig, create: bool) -> Result<SqliteSpool, SpoolError> {
        config.validate()?;
        let store = Store::open(&dir.join(DB_FILE), &config, create)?;
        let (tx, rx) = mpsc::channel(config.queue_capacity);
        let counters = Arc::new(Counters::default());
        let bound = GroupBound {
            payloads: config.max_group_commit_payloads,
            bytes: config.max_group_commit_bytes,
        };
        let thread_counters = counters.clone();
        std::thread::Builder::new()
            .name("tributary-spool".to_owned())
            .spawn(move || writer::run(store, rx, bound, thread_counters))
            .map_err(|e| {
                SpoolError::Storage(format!("cannot start the spool writer thread: {e}"))
            })?;
        tracing::debug!(dir = %dir.display(), "sqlite spool open");
        Ok(SqliteSpool {
            tx,
            counters,
            dir: dir.to_owned(),
            config,
            accounts: Arc::new(accounts::AccountReader::new(&dir.join(DB_FILE))),
        })
    }

    /// The spool directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The settings it was opened with.
    pub fn config(&self) -> &SqliteConfig {
        &self.config
    }

    /// Counters since this handle was opened.
    pub fn counters(&self) -> SqliteCounters {
        let c = &self.counters;
        SqliteCounters {
            append_commits: c.append_commits.load(Ordering::Relaxed),
            appends: c.appends.load(Ordering::Relaxed),
            appended_payloads: c.appended_payloads.load(Ordering::Relaxed),
            full_rejections: c.full_rejections.load(Ordering::Relaxed),
        }
    }

    /// Finishes the commands already queued, then closes the database (checkpointing the
    /// WAL). Later calls on this handle fail with [`SpoolError::Closed`]. Dropping the handle
    /// does the same without waiting. (Also [`Spool::close`].)
    pub async fn close(&self) -> Result<(), SpoolError> {
        let (reply, done) = oneshot::channel();
        self.tx
            .send(Command::Close(reply))
            .await
            .map_err(|_| SpoolError::Closed)?;
        done.await.map_err(|_| SpoolError::Closed)
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, SpoolError>>) -> Command,
    ) -> Result<T, SpoolError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| SpoolError::Closed)?;
        answer.await.map_err(|_| SpoolError::Closed)?
    }

    /// Runs a dead-letter operation in chunks until it is done.
    async fn chunked(
        &self,
        which: Selection,
        op: fn(DeadChunk, oneshot::Sender<Result<u64, SpoolError>>) -> Command,
    ) -> Result<u64, SpoolError> {
        let chunk = self.config.chunk;
        let mut total = 0;
        match which {
            Selection::All => loop {
                let n = self.call(|r| op(DeadChunk::First(chunk), r)).await?;
                total += n;
                if n < chunk as u64 {
                    break;
                }
            },
            Selection::Ids(ids) => {
                let ids = ids
                    .iter()
                    .map(|s| parse_id(s))
                    .collect::<Result<Vec<_>, _>>()?;
                for part in ids.chunks(chunk) {
                    total += self.call(|r| op(DeadChunk::Ids(part.to_vec()), r)).await?;
                }
            }
        }
        Ok(total)
    }
}

/// Runs `work` here when it is about `bytes` small enough not to hold up the runtime's
/// other tasks ([`codec::INLINE_BYTES`]), on a blocking thread otherwise.
async fn off_runtime<T: Send + 'static>(
    bytes: usize,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, SpoolError> {
    if bytes <= codec::INLINE_BYTES {
        return Ok(work());
    }
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| SpoolError::Storage(format!("spool encoding task failed: {e}")))
}

fn parse_receipts(receipts: &[Receipt]) -> Result<Vec<(i64, i64)>, SpoolError> {
    receipts.iter().map(parse_receipt).collect()
}

/// `4d`, `3h`, `90s`, `250ms`: short, for dead-letter reasons.
fn short_duration(d: Duration) -> String {
    let s = d.as_secs();
    if d.subsec_millis() != 0 || s == 0 {
        format!("{}ms", d.as_millis())
    } else if s.is_multiple_of(86_400) {
        format!("{}d", s / 86_400)
    } else if s.is_multiple_of(3600) {
        format!("{}h", s / 3600)
    } else if s.is_multiple_of(60) {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    }
}

#[async_trait]
impl Spool for SqliteSpool {
    async fn append(&self, payloads: Vec<Payload>) -> Result<(), SpoolError> {
        if payloads.is_empty() {
            return Ok(());
        }
        let compression = self.config.compression;
        let bytes = payloads.iter().map(Payload::stored_len).sum();
        let stored = off_runtime(bytes, move || {
            payloads
                .iter()
                .map(|p| StoredPayload::pack(p, compression))
                .collect::<Vec<_>>()
        })
        .await?;
        self.call(|r| Command::Append(stored, r)).await
    }

    async fn lease(
        &self,
        max_payloads: usize,
        max_bytes: usize,
        lease_for: Duration,
    ) -> Result<Vec<Leased>, SpoolError> {
        let rows = self
            .call(|reply| Command::Lease {
                max_payloads,
                max_bytes,
                lease_for,
                reply,
            })
            .await?;
        let bytes = rows.iter().map(|r| r.raw_len).sum();
        let rows = off_runtime(bytes, move || {
            rows.into_iter()
                .map(payloads::LeasedRow::unpack)
                .collect::<Vec<_>>()
        })
        .await?;
        let mut leased = Vec::with_capacity(rows.len());
        for row in rows {
            match row {
                payloads::Unpacked::Readable(l) => leased.push(l),
                // A row that cannot be read back would fail every lease it came in, and
                // hold up every payload after it: it leaves the queue as a dead letter
                // that says why, and the rest goes on.
                payloads::Unpacked::Unreadable(l, why) => {
                    tracing::error!(receipt = %l.receipt.0, %why, "a stored payload cannot be read back: dead-lettering it");
                    let reason = format!("unreadable in the spool: {why}");
                    if let Err(e) = self.dead_letter(&[l.receipt], &reason).await {
                        // It stays leased and comes back when the lease runs out.
                        tracing::warn!(error = %e, "cannot dead-letter the unreadable payload");
                    }
                }
            }
        }
        Ok(leased)
    }

    async fn ack(&self, receipts: &[Receipt]) -> Result<(), SpoolError> {
        let receipts = parse_receipts(receipts)?;
        if receipts.is_empty() {
            return Ok(());
        }
        let wanted = receipts.len();
        let done = self.call(|r| Command::Ack(receipts, r)).await?;
        if done < wanted as u64 {
            tracing::debug!(wanted, done, "ack skipped payloads already gone");
        }
        Ok(())
    }

    async fn release(&self, receipts: &[Receipt], delay: Duration) -> Result<(), SpoolError> {
        let receipts = parse_receipts(receipts)?;
        if receipts.is_empty() {
            return Ok(());
        }
        let wanted = receipts.len();
        let done = self.call(|r| Command::Release(receipts, delay, r)).await?;
        if done < wanted as u64 {
            tracing::debug!(wanted, done, "release skipped stale receipts");
        }
        Ok(())
    }

    async fn dead_letter(&self, receipts: &[Receipt], reason: &str) -> Result<(), SpoolError> {
        let receipts = parse_receipts(receipts)?;
        if receipts.is_empty() {
            return Ok(());
        }
        let wanted = receipts.len();
        let reason = reason.to_owned();
        let done = self
            .call(|r| Command::DeadLetter(receipts, reason, r))
            .await?;
        if done < wanted as u64 {
            tracing::debug!(wanted, done, "dead_letter skipped stale receipts");
        }
        Ok(())
    }

    async fn settle_parts(&self, parts: Vec<PartialSettlement>) -> Result<(), SpoolError> {
        let parts = parts
            .into_iter()
            .map(|p| Ok((parse_receipt(&p.receipt)?, p)))
            .collect::<Result<Vec<_>, SpoolError>>()?;
        if parts.is_empty() {
            return Ok(());
        }
        self.call(|r| Command::Settle(parts, r)).await.map(|_| ())
    }

    async fn stats(&self) -> Result<SpoolStats, SpoolError> {
        self.call(Command::Stats).await
    }

    async fn check_ready(&self) -> Result<(), SpoolError> {
        self.call(Command::CheckReady).await
    }

    async fn close(&self) -> Result<(), SpoolError> {
        SqliteSpool::close(self).await
    }

    async fn account_pending_bytes(&self, account: &str) -> Result<Option<u64>, SpoolError> {
        let reader = self.accounts.clone();
        let account = account.to_owned();
        tokio::task::spawn_blocking(move || reader.pending_bytes(&account))
            .await
            .map_err(|e| SpoolError::Storage(format!("account pending read failed: {e}")))?
            .map(Some)
    }

    async fn totals(&self) -> Result<Option<SpoolTotals>, SpoolError> {
        self.call(Command::Totals).await.map(Some)
    }

    async fn audit(&self) -> Result<SpoolAudit, SpoolError> {
        self.call(Command::Audit).await
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, SpoolError> {
        self.call(|r| Command::DeadLetters(limit, r)).await
    }

    async fn dead_letter_summaries(
        &self,
        limit: usize,
    ) -> Result<Option<Vec<crate::DeadLetterSummary>>, SpoolError> {
        self.call(|r| Command::DeadLetterSummaries(limit, r))
            .await
            .map(Some)
    }

    async fn retry_dead_letters(&self, which: Selection) -> Result<u64, SpoolError> {
        self.chunked(which, Command::Retry).await
    }

    async fn purge_dead_letters(&self, which: Selection) -> Result<u64, SpoolError> {
        self.chunked(which, Command::Purge).await
    }

    /// Moves payloads appended more than [`SqliteConfig::retention`] ago to the dead letters
    /// (reason `expired: not delivered within the retention of 4d`), in chunks. Payloads
    /// leased at that moment are left to their holder.
    async fn maintain(&self) -> Result<u64, SpoolError> {
        let reason = format!(
            "expired: not delivered within the retention of {}",
            short_duration(self.config.retention)
        );
        let chunk = self.config.chunk;
        let mut after = 0i64;
        let mut moved = 0;
        loop {
            let reason = reason.clone();
            let (n, last, done) = self
                .call(|reply| Command::Expire {
                    after,
                    chunk,
                    reason,
                    reply,
                })
                .await?;
            moved += n;
            after = last;
            if done {
                break;
            }
        }
        if moved > 0 {
            tracing::warn!(
                payloads = moved,
                "expired payloads moved to the dead letters"
            );
        }
        Ok(moved)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_durations() {
        assert_eq!(short_duration(Duration::from_secs(4 * 86_400)), "4d");
        assert_eq!(short_duration(Duration::from_secs(7200)), "2h");
        assert_eq!(short_duration(Duration::from_secs(120)), "2m");
        assert_eq!(short_duration(Duration::from_secs(61)), "61s");
        assert_eq!(short_duration(Duration::from_millis(1500)), "1500ms");
    }

    #[test]
    fn receipts_parse() {
        assert_eq!(parse_receipt(&Receipt("12:3".into())).ok(), Some((12, 3)));
        assert!(matches!(
            parse_receipt(&Receipt("12".into())),
            Err(SpoolError::Unknown(_))
        ));
        assert!(matches!(
            parse_receipt(&Receipt("a:b".into())),
            Err(SpoolError::Unknown(_))
        ));
    }
}
