//! The synchronous half of the SQLite spool: one connection and the SQL of each operation.
//!
//! Everything here runs on the writer thread (see `super::writer`); nothing here knows about
//! async. Every mutating operation is one `BEGIN IMMEDIATE` transaction, so a crash leaves
//! either all of it or none of it, and another process using the same database (the
//! `tributary spool` CLI) waits on the busy timeout instead of failing half-way.
//!
//! This file holds the [`Store`] itself: opening the connection, its transactions, and how
//! SQLite errors become the trait's. The operations are `impl Store` blocks in the sibling
//! files, one concern each: `schema` (the format, its migration, and the check of a file
//! before use), `payloads` (append, lease, ack, release, settle), `dead` (dead letters and
//! retention), `totals` (the running sums, stats and audit) and `room` (the disk reserve).

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, ErrorCode, OpenFlags, Transaction, TransactionBehavior};

use super::schema::{SCHEMA_VERSION, WHAT_TO_DO, migrate, precheck};
use super::{Compression, SqliteConfig, SyncMode};
use crate::SpoolError;
use crate::clock::SpoolClock;

/// The reason of [`SpoolError::Full`] when the file system itself is full.
pub(super) const DISK_FULL: &str = "disk full";

/// Maps a SQLite error to the trait's error. A full disk is reported as a full spool: the
/// relay then answers 503 with `Retry-After`, which is what the client should do. A damaged
/// file is [`SpoolError::Damaged`] (by [`Store::classify`], which knows the path).
pub(super) fn storage(e: rusqlite::Error) -> SpoolError {
    match e.sqlite_error_code() {
        Some(ErrorCode::DiskFull) => SpoolError::Full {
            reason: DISK_FULL.to_owned(),
        },
        Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase) => SpoolError::Damaged {
            path: String::new(),
            detail: e.to_string(),
        },
        _ => SpoolError::Storage(e.to_string()),
    }
}

pub(super) fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

pub(super) fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

pub(super) fn to_i64(v: usize) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// One connection, opened in read-write mode on `<dir>/spool.db`.
pub(super) struct Store {
    pub(super) conn: Connection,
    pub(super) path: PathBuf,
    pub(super) max_bytes: u64,
    pub(super) max_payloads: u64,
    /// Bytes of free space kept for the forwarder (leases, acks, checkpoints).
    pub(super) reserve_bytes: u64,
    pub(super) retention: Duration,
    /// How the rows this connection writes store their visitors (the settlement of a split
    /// payload writes new rows here; appends arrive packed).
    pub(super) compression: Compression,
    pub(super) page_size: u64,
    /// Free pages can be given back to the file system (spools created since format 2).
    pub(super) incremental_vacuum: bool,
    pub(super) clock: SpoolClock,
    /// Set when an operation found the file damaged: from then on nothing is appended
    /// (a 2xx into a spool that cannot be forwarded from would be a lie).
    pub(super) damaged: Option<String>,
}

impl Store {
    /// Opens (and with `create`, creates) the database, proves it is a readable spool, and
    /// brings its schema up to date. Refuses a file that is not a spool, is damaged, or was
    /// written by a newer version, naming the file and what to do; it never changes or
    /// deletes such a file.
    pub(super) fn open(
        path: &Path,
        config: &SqliteConfig,
        create: bool,
    ) -> Result<Store, SpoolError> {
        let damaged = |detail: String| SpoolError::Damaged {
            path: path.display().to_string(),
            detail,
        };
        // An existing file is first proven to be a readable spool through a read-only
        // connection: a read-write one would write to it (the journal mode) and, when
        // closed, checkpoint its WAL into it, changing a file we are about to refuse.
        let existed = path.exists();
        if existed {
            precheck(path, config).map_err(damaged)?;
        }
        let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        if create {
            flags |= OpenFlags::SQLITE_OPEN_CREATE;
        }
        let conn = Connection::open_with_flags(path, flags)
            .map_err(|e| SpoolError::Storage(format!("cannot open {}: {e}", path.display())))?;
        conn.busy_timeout(config.busy_timeout).map_err(storage)?;
        if !existed {
            // A new spool gives the pages of delivered payloads back to the file system when
            // the disk runs low (see `Store::give_back`); SQLite allows switching this on
            // only before the file is first written.
            conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")
                .map_err(storage)?;
        }
        // WAL: readers (the CLI, stats) never block the writer and a crash at any point
        // leaves the last committed transaction intact.
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
            .map_err(|e| damaged(format!("cannot switch to WAL ({e}); {WHAT_TO_DO}")))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(SpoolError::Storage(format!(
                "cannot use WAL journal mode (got {mode}); is the spool on a network filesystem?"
            )));
        }
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(storage)?;

        let sync = match config.sync {
            SyncMode::Full => "FULL",
            SyncMode::Normal => "NORMAL",
        };
        conn.pragma_update(None, "synchronous", sync)
            .map_err(storage)?;
        // Negative cache_size is in KiB.
        let cache_kib = i64::try_from(config.cache_bytes / 1024)
            .unwrap_or(i64::MAX)
            .max(64);
        conn.pragma_update(None, "cache_size", -cache_kib)
            .map_err(storage)?;
        // Without a limit, the WAL file keeps the size of its largest burst.
        conn.pragma_update(None, "journal_size_limit", 64 * 1024 * 1024)
            .map_err(storage)?;
        conn.set_prepared_statement_cache_capacity(32);
        let page_size: i64 = conn
            .pragma_query_value(None, "page_size", |r| r.get(0))
            .map_err(storage)?;
        let auto_vacuum: i64 = conn
            .pragma_query_value(None, "auto_vacuum", |r| r.get(0))
            .map_err(storage)?;

        let mut store = Store {
            conn,
            path: path.to_owned(),
            max_bytes: config.max_bytes,
            max_payloads: config.max_payloads,
            reserve_bytes: config.reserve_bytes,
            retention: config.retention,
            compression: config.compression,
            page_size: to_u64(page_size),
            incremental_vacuum: auto_vacuum == 2,
            clock: SpoolClock::new(config.clock.clone(), 0),
            damaged: None,
        };
        if version < SCHEMA_VERSION {
            let tx = store.begin().map_err(storage)?;
            // Read again under the write lock: another process may have upgraded it since.
            let version: i64 = tx
                .pragma_query_value(None, "user_version", |r| r.get(0))
                .map_err(storage)?;
            if version < SCHEMA_VERSION {
                migrate(&tx, version).map_err(storage)?;
            }
            tx.commit().map_err(storage)?;
        }
        let floor: i64 = store
            .conn
            .query_row("SELECT clock_ms FROM totals WHERE id = 0", [], |r| r.get(0))
            .map_err(|e| damaged(format!("cannot read its totals ({e}); {WHAT_TO_DO}")))?;
        store.clock = SpoolClock::new(config.clock.clone(), floor);
        Ok(store)
    }

    /// Adds the file's path to a damaged-file error and remembers it, so that appends stop
    /// and readiness says why.
    pub(super) fn classify(&mut self, e: SpoolError) -> SpoolError {
        match e {
            SpoolError::Damaged { detail, .. } => {
                let detail = format!("{detail}; {WHAT_TO_DO}");
                if self.damaged.is_none() {
                    tracing::error!(path = %self.path.display(), %detail, "the spool file is damaged");
                }
                self.damaged = Some(detail.clone());
                SpoolError::Damaged {
                    path: self.path.display().to_string(),
                    detail,
                }
            }
            other => other,
        }
    }

    pub(super) fn begin(&mut self) -> rusqlite::Result<Transaction<'_>> {
        self.conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
    }
}
