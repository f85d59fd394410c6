//! The synchronous half of the SQLite spool: one connection and the SQL of each operation.
//!
//! Everything here runs on the writer thread (see `super::writer`); nothing here knows about
//! async. Every mutating operation is one `BEGIN IMMEDIATE` transaction, so a crash leaves
//! either all of it or none of it, and another process using the same database (the
//! `tributary spool` CLI) waits on the busy timeout instead of failing half-way.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use rusqlite::{
    Connection, ErrorCode, OpenFlags, OptionalExtension, Transaction, TransactionBehavior, params,
};

use super::{SqliteConfig, SyncMode};
use crate::audit::Counted;
use crate::clock::SpoolClock;
use crate::{
    DeadLetter, Leased, Ledger, PartialSettlement, Payload, Receipt, SpoolAudit, SpoolError,
    SpoolStats, SpoolTotals,
};

/// The on-disk format this code reads and writes (`PRAGMA user_version`). Version 2 added
/// the conservation totals and the spool's clock to `totals`.
const SCHEMA_VERSION: i64 = 2;

/// Readiness asks for room for a request of this size (64 KiB) beyond the reserve, so that a
/// relay that just refused a request for lack of space does not call itself ready.
const READY_MARGIN: u64 = 64 << 10;

/// The reason of [`SpoolError::Full`] when the file system itself is full.
pub(super) const DISK_FULL: &str = "disk full";

/// Small columns come first in both tables: SQLite reads a row's columns in order, and the
/// scans that only need ids, sizes and times (retention, stats) then never touch the blob
/// overflow pages.
///
/// `AUTOINCREMENT` because receipts and dead-letter ids name rows by id: a plain rowid may
/// be reused after the highest row is deleted, and a stale receipt would then hit a newer
/// payload.
///
/// `leases` counts how many times a row was leased; it is also the generation a receipt
/// carries, so a receipt whose lease expired and was handed to someone else is detected.
/// `leased` is 1 from a lease until a release, so that the partial index holds only leased
/// rows and counting them stays cheap whatever the backlog.
///
/// `totals` holds running sums updated in the same transaction as every change, so opening
/// and the full check never scan the payloads.
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS payloads (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    visitor_count INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    appended_at INTEGER NOT NULL,
    visible_at INTEGER NOT NULL,
    leases INTEGER NOT NULL DEFAULT 0,
    leased INTEGER NOT NULL DEFAULT 0,
    route TEXT NOT NULL,
    header BLOB NOT NULL,
    visitors BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS payloads_visible ON payloads(visible_at);
CREATE INDEX IF NOT EXISTS payloads_leased ON payloads(visible_at) WHERE leased = 1;
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY,
    visitor_count INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    appended_at INTEGER NOT NULL,
    dead_at INTEGER NOT NULL,
    reason TEXT NOT NULL,
    route TEXT NOT NULL,
    header BLOB NOT NULL,
    visitors BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS totals (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    pending INTEGER NOT NULL,
    pending_bytes INTEGER NOT NULL,
    pending_events INTEGER NOT NULL,
    dead INTEGER NOT NULL,
    dead_bytes INTEGER NOT NULL
);
INSERT OR IGNORE INTO totals (id, pending, pending_bytes, pending_events, dead, dead_bytes)
    VALUES (0, 0, 0, 0, 0, 0);
";

/// Version 1 to 2. What a version-1 spool had accepted before is not known: it is taken to
/// be what it holds, so the totals balance from the upgrade on.
const MIGRATE_TO_2: &str = "
ALTER TABLE totals ADD COLUMN dead_events INTEGER NOT NULL DEFAULT 0;
ALTER TABLE totals ADD COLUMN accepted INTEGER NOT NULL DEFAULT 0;
ALTER TABLE totals ADD COLUMN accepted_events INTEGER NOT NULL DEFAULT 0;
ALTER TABLE totals ADD COLUMN delivered INTEGER NOT NULL DEFAULT 0;
ALTER TABLE totals ADD COLUMN delivered_events INTEGER NOT NULL DEFAULT 0;
ALTER TABLE totals ADD COLUMN purged INTEGER NOT NULL DEFAULT 0;
ALTER TABLE totals ADD COLUMN purged_events INTEGER NOT NULL DEFAULT 0;
ALTER TABLE totals ADD COLUMN split INTEGER NOT NULL DEFAULT 0;
ALTER TABLE totals ADD COLUMN clock_ms INTEGER NOT NULL DEFAULT 0;
UPDATE totals SET
    dead_events = (SELECT COALESCE(SUM(visitor_count), 0) FROM dead_letters),
    accepted = pending + dead,
    accepted_events = pending_events + (SELECT COALESCE(SUM(visitor_count), 0) FROM dead_letters)
    WHERE id = 0;
";

/// What to do about a spool file that cannot be used, for every such error.
const WHAT_TO_DO: &str = "the relay will not use it and has not changed it. Stop every \
     process using this spool, move the file aside with its -wal and -shm files (mv spool.db \
     spool.db.damaged), start again to begin an empty spool, and salvage what the old file \
     holds with `sqlite3 spool.db.damaged .recover`";

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

fn is_disk_full(e: &SpoolError) -> bool {
    matches!(e, SpoolError::Full { reason } if reason == DISK_FULL)
}

pub(super) fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn to_i64(v: usize) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A receipt is `"<row id>:<lease generation>"`.
pub(super) fn parse_receipt(r: &Receipt) -> Result<(i64, i64), SpoolError> {
    let (id, generation) =
        r.0.split_once(':')
            .ok_or_else(|| SpoolError::Unknown(r.0.clone()))?;
    match (id.parse::<i64>(), generation.parse::<i64>()) {
        (Ok(id), Ok(generation)) => Ok((id, generation)),
        _ => Err(SpoolError::Unknown(r.0.clone())),
    }
}

/// Proves through a read-only connection that `path` is a spool this build can use: a
/// SQLite database, of no other program, of a format not newer than this build's, and (with
/// [`SqliteConfig::check_on_open`]) whole. The error says what is wrong and what to do.
fn precheck(path: &Path, config: &SqliteConfig) -> Result<(), String> {
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags)
        .map_err(|e| format!("cannot be opened ({e}); {WHAT_TO_DO}"))?;
    let _ = conn.busy_timeout(config.busy_timeout);
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(|e| format!("not a readable SQLite database ({e}); {WHAT_TO_DO}"))?;
    if version > SCHEMA_VERSION {
        return Err(format!(
            "written by a newer version of Tributary (spool format {version}, this build \
             reads up to {SCHEMA_VERSION}); run the newer version, or move the file aside \
             to start an empty spool. It has not been changed"
        ));
    }
    if version == 0 {
        let tables: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'",
                [],
                |r| r.get(0),
            )
            .map_err(|e| format!("cannot read its schema ({e}); {WHAT_TO_DO}"))?;
        if tables > 0 {
            return Err(format!(
                "a SQLite database of another program ({tables} tables, no spool format), \
                 not a Tributary spool; point --spool at another directory. It has not \
                 been changed"
            ));
        }
    }
    if config.check_on_open {
        quick_check(&conn).map_err(|detail| format!("{detail}; {WHAT_TO_DO}"))?;
    }
    Ok(())
}

/// `PRAGMA quick_check` (every page of the database and of the WAL, not the index contents
/// against the rows): a file cut short, or overwritten, fails it.
fn quick_check(conn: &Connection) -> Result<(), String> {
    let rows: rusqlite::Result<Vec<String>> = conn
        .prepare("PRAGMA quick_check(5)")
        .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect());
    match rows {
        Ok(rows) if rows.len() == 1 && rows[0] == "ok" => Ok(()),
        Ok(rows) => Err(format!("damaged: its check found {}", rows.join("; "))),
        Err(e) => Err(format!("damaged: it cannot be read through ({e})")),
    }
}

/// Dead-letter ids are the row id of the payload they were, or for the parts isolation
/// cut out of a payload, a fresh id from the same sequence.
pub(super) fn parse_id(s: &str) -> Result<i64, SpoolError> {
    s.parse::<i64>()
        .map_err(|_| SpoolError::Unknown(s.to_owned()))
}

/// Changes to the running totals within one transaction.
///
/// Every transaction that writes also moves `clock_ms`, the latest time the spool wrote,
/// which the next process's clock never starts before (see [`crate::clock`]). It lives in
/// the totals row, which these transactions write anyway, so it costs no extra page.
#[derive(Debug, Default, Clone, Copy)]
struct Delta {
    pending: i64,
    pending_bytes: i64,
    pending_events: i64,
    dead: i64,
    dead_bytes: i64,
    dead_events: i64,
    accepted: i64,
    accepted_events: i64,
    delivered: i64,
    delivered_events: i64,
    purged: i64,
    purged_events: i64,
    split: i64,
}

impl Delta {
    fn write(&self, tx: &Transaction<'_>, now: i64) -> rusqlite::Result<()> {
        tx.prepare_cached(
            "UPDATE totals SET pending = pending + ?1, pending_bytes = pending_bytes + ?2,
                 pending_events = pending_events + ?3, dead = dead + ?4,
                 dead_bytes = dead_bytes + ?5, dead_events = dead_events + ?6,
                 accepted = accepted + ?7, accepted_events = accepted_events + ?8,
                 delivered = delivered + ?9, delivered_events = delivered_events + ?10,
                 purged = purged + ?11, purged_events = purged_events + ?12,
                 split = split + ?13, clock_ms = MAX(clock_ms, ?14) WHERE id = 0",
        )?
        .execute(params![
            self.pending,
            self.pending_bytes,
            self.pending_events,
            self.dead,
            self.dead_bytes,
            self.dead_events,
            self.accepted,
            self.accepted_events,
            self.delivered,
            self.delivered_events,
            self.purged,
            self.purged_events,
            self.split,
            now
        ])?;
        Ok(())
    }

    /// A payload row of `bytes` and `events` leaves the pending table.
    fn unpend(&mut self, bytes: i64, events: i64) {
        self.pending -= 1;
        self.pending_bytes -= bytes;
        self.pending_events -= events;
    }

    /// A dead-letter row of `bytes` and `events` appears.
    fn bury(&mut self, bytes: i64, events: i64) {
        self.dead += 1;
        self.dead_bytes += bytes;
        self.dead_events += events;
    }
}

/// Which dead letters one chunked operation touches.
pub(super) enum DeadChunk {
    /// The oldest `n`.
    First(usize),
    /// These ids.
    Ids(Vec<i64>),
}

/// One connection, opened in read-write mode on `<dir>/spool.db`.
pub(super) struct Store {
    conn: Connection,
    path: PathBuf,
    max_bytes: u64,
    max_payloads: u64,
    /// Bytes of free space kept for the forwarder (leases, acks, checkpoints).
    reserve_bytes: u64,
    retention: Duration,
    page_size: u64,
    /// Free pages can be given back to the file system (spools created since format 2).
    incremental_vacuum: bool,
    clock: SpoolClock,
    /// Set when an operation found the file damaged: from then on nothing is appended
    /// (a 2xx into a spool that cannot be forwarded from would be a lie).
    damaged: Option<String>,
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
            page_size: to_u64(page_size),
            incremental_vacuum: auto_vacuum == 2,
            clock: SpoolClock::new(config.clock.clone(), 0),
            damaged: None,
        };
        if version < SCHEMA_VERSION {
            let tx = store.begin().map_err(storage)?;
            if version < 1 {
                tx.execute_batch(SCHEMA).map_err(storage)?;
            }
            tx.execute_batch(MIGRATE_TO_2).map_err(storage)?;
            tx.pragma_update(None, "user_version", SCHEMA_VERSION)
                .map_err(storage)?;
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
    fn classify(&mut self, e: SpoolError) -> SpoolError {
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

    /// Runs `op`; if the file system is full, checkpoints the WAL (which gives back its
    /// space once the pages are in the database) and tries once more. The forwarder's
    /// writes (lease, ack, release, settle) go through here, so a full disk cannot stop
    /// the deliveries that free it.
    pub(super) fn with_room<T>(
        &mut self,
        op: impl Fn(&mut Store) -> Result<T, SpoolError>,
    ) -> Result<T, SpoolError> {
        if self.room() < self.reserve_bytes.saturating_mul(2) {
            // Low on space: start from an empty WAL.
            self.checkpoint();
        }
        let result = match op(self) {
            Err(e) if is_disk_full(&e) => {
                tracing::warn!("spool file system full; checkpointing the WAL and trying again");
                self.checkpoint();
                op(self)
            }
            other => other,
        };
        if result.is_ok() && self.room() < self.reserve_bytes.saturating_mul(2) {
            // Low on space: keep the WAL small and give the pages of what was delivered back
            // to the file system, so that ingest can resume by itself.
            self.checkpoint();
            self.give_back();
        }
        result.map_err(|e| self.classify(e))
    }

    /// Moves the WAL into the database and truncates it.
    fn checkpoint(&mut self) {
        match self
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                r.get::<_, i64>(0)
            }) {
            Ok(0) => {}
            Ok(_) => tracing::debug!("WAL checkpoint could not finish (a reader holds it)"),
            Err(e) => tracing::warn!(error = %e, "WAL checkpoint failed"),
        }
    }

    /// Returns free pages of the database to the file system (`incremental_vacuum`), as many
    /// as a quarter of the free space can carry through the WAL, then resets the WAL.
    fn give_back(&mut self) {
        if !self.incremental_vacuum {
            return;
        }
        let free_pages: i64 = self
            .conn
            .pragma_query_value(None, "freelist_count", |r| r.get(0))
            .unwrap_or(0);
        let budget = (self.fs_free() / 4) / self.page_size.max(1);
        let pages = to_u64(free_pages).min(budget);
        if pages == 0 {
            return;
        }
        let vacuum = format!("PRAGMA incremental_vacuum({pages})");
        // The pragma returns a row per page; run it to the end.
        let done = self.conn.prepare(&vacuum).and_then(|mut s| {
            let mut rows = s.query([])?;
            while rows.next()?.is_some() {}
            Ok(())
        });
        if let Err(e) = done {
            tracing::warn!(error = %e, "could not give free pages back to the file system");
        }
        self.checkpoint();
    }

    /// Free bytes of the spool's file system, less the WAL (every WAL write needs real disk
    /// space, whatever the database has free inside).
    fn fs_free(&self) -> u64 {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let free = match rustix::fs::statvfs(dir) {
            Ok(st) => st.f_bavail.saturating_mul(st.f_frsize),
            Err(_) => return u64::MAX,
        };
        let mut wal = self.path.clone().into_os_string();
        wal.push("-wal");
        free.saturating_sub(std::fs::metadata(&wal).map_or(0, |m| m.len()))
    }

    /// Bytes the spool can still grow into: free space on its file system, less the WAL (a
    /// checkpoint may copy every page of it into the database, and must never be the write
    /// that fills the disk, or the WAL could not be reset and nothing could be freed). A
    /// spool that cannot give free pages back (created before format 2) also counts them,
    /// since it reuses them before it grows.
    fn room(&self) -> u64 {
        // Unknown free space (statvfs failed) is u64::MAX: do not refuse on a guess;
        // SQLITE_FULL still stops appends.
        let fs_free = self.fs_free();
        if self.incremental_vacuum {
            return fs_free;
        }
        let free_pages: i64 = self
            .conn
            .pragma_query_value(None, "freelist_count", |r| r.get(0))
            .unwrap_or(0);
        fs_free.saturating_add(to_u64(free_pages).saturating_mul(self.page_size))
    }

    /// Why appends are refused now, if they are: a damaged file, or less room than the
    /// reserve plus `incoming` bytes (twice: the WAL holds a copy until it is checkpointed).
    fn refusal(&self, incoming: u64) -> Option<SpoolError> {
        if let Some(detail) = &self.damaged {
            return Some(SpoolError::Damaged {
                path: self.path.display().to_string(),
                detail: detail.clone(),
            });
        }
        let room = self.room();
        let need = self
            .reserve_bytes
            .saturating_add(incoming.saturating_mul(2));
        (room < need).then(|| SpoolError::Full {
            reason: format!(
                "{DISK_FULL}: {room} bytes left for the spool, under the {} kept free for \
                 delivery (--spool-reserve-bytes) plus this request",
                self.reserve_bytes
            ),
        })
    }

    /// Whether appends of a usual size would be taken now: the file is sound, the disk has
    /// room, and a write commits (a one-row write of the spool's clock, so that a file made
    /// read-only or immutable under the relay shows here, not only in failed appends).
    pub(super) fn check_ready(&mut self) -> Result<(), SpoolError> {
        if let Some(e) = self.refusal(READY_MARGIN) {
            return Err(e);
        }
        let now = self.clock.now_ms();
        let probe = (|| {
            let tx = self.begin()?;
            Delta::default().write(&tx, now)?;
            tx.commit()
        })()
        .map_err(storage);
        probe.map_err(|e| match self.classify(e) {
            SpoolError::Storage(m) => SpoolError::Storage(format!("cannot write: {m}")),
            other => other,
        })
    }

    fn begin(&mut self) -> rusqlite::Result<Transaction<'_>> {
        self.conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
    }

    /// Appends each batch all-or-nothing, in one transaction for all of them. A batch that
    /// would pass a limit gets `Full` and the others still go in. The outer error means the
    /// transaction failed and none went in.
    pub(super) fn append_group(
        &mut self,
        batches: &[Vec<Payload>],
    ) -> Result<Vec<Result<(), SpoolError>>, SpoolError> {
        let (max_bytes, max_payloads) = (self.max_bytes, self.max_payloads);
        let incoming: u64 = batches
            .iter()
            .flatten()
            .map(|p| p.stored_len() as u64)
            .sum();
        if let Some(refusal) = self.refusal(incoming) {
            return Ok(batches.iter().map(|_| Err(refusal.duplicate())).collect());
        }
        let now = self.clock.now_ms();
        let tx = self.begin().map_err(storage)?;
        // Read inside the write transaction: another process may have changed the totals.
        let (mut held, mut held_bytes): (u64, u64) = tx
            .prepare_cached(
                "SELECT pending + dead, pending_bytes + dead_bytes FROM totals WHERE id = 0",
            )
            .and_then(|mut s| s.query_row([], |r| Ok((to_u64(r.get(0)?), to_u64(r.get(1)?)))))
            .map_err(storage)?;
        let mut delta = Delta::default();
        let mut results = Vec::with_capacity(batches.len());
        {
            let mut insert = tx
                .prepare_cached(
                    "INSERT INTO payloads (visitor_count, bytes, appended_at, visible_at, route, header, visitors)
                     VALUES (?1, ?2, ?3, ?3, ?4, ?5, ?6)",
                )
                .map_err(storage)?;
            for batch in batches {
                let count = batch.len() as u64;
                let bytes: u64 = batch.iter().map(|p| p.stored_len() as u64).sum();
                if held.saturating_add(count) > max_payloads {
                    results.push(Err(SpoolError::Full {
                        reason: format!(
                            "{held} payloads held (pending and dead letters), limit {max_payloads}"
                        ),
                    }));
                    continue;
                }
                if held_bytes.saturating_add(bytes) > max_bytes {
                    results.push(Err(SpoolError::Full {
                        reason: format!(
                            "{held_bytes} bytes held (pending and dead letters), limit {max_bytes}"
                        ),
                    }));
                    continue;
                }
                for p in batch {
                    insert
                        .execute(params![
                            p.visitor_count,
                            to_i64(p.stored_len()),
                            now,
                            p.route,
                            &p.header[..],
                            &p.visitors[..]
                        ])
                        .map_err(storage)?;
                    delta.pending_events += i64::from(p.visitor_count);
                }
                held += count;
                held_bytes += bytes;
                delta.pending += i64::try_from(count).unwrap_or(i64::MAX);
                delta.pending_bytes += i64::try_from(bytes).unwrap_or(i64::MAX);
                results.push(Ok(()));
            }
        }
        delta.accepted = delta.pending;
        delta.accepted_events = delta.pending_events;
        delta.write(&tx, now).map_err(storage)?;
        tx.commit().map_err(storage)?;
        Ok(results)
    }

    /// Hands out visible payloads in the order they became visible and hides them until
    /// `now + lease_for`.
    pub(super) fn lease(
        &mut self,
        max_payloads: usize,
        max_bytes: usize,
        lease_for: Duration,
    ) -> Result<Vec<Leased>, SpoolError> {
        if max_payloads == 0 {
            return Ok(Vec::new());
        }
        // A lease rewrites the pages of what it leases into the WAL, and the acks that follow
        // rewrite them again before a checkpoint can reset it: on a nearly full disk, lease
        // no more than a quarter of the room left, so delivery can always go on (at least
        // one payload, whatever its size, as ever).
        let room = self.room();
        let max_bytes = if room < self.reserve_bytes.saturating_mul(4) {
            let cut = max_bytes.min(usize::try_from(room / 4).unwrap_or(usize::MAX));
            tracing::debug!(room, max_bytes = cut, "low on disk space: leasing less");
            cut
        } else {
            max_bytes
        };
        let now = self.clock.now_ms();
        let until = now.saturating_add(ms(lease_for));
        let tx = self.begin().map_err(storage)?;
        let mut out = Vec::new();
        let mut ids = Vec::new();
        {
            let mut select = tx
                .prepare_cached(
                    "SELECT id, visitor_count, bytes, appended_at, leases, route, header, visitors
                     FROM payloads WHERE visible_at <= ?1 ORDER BY visible_at, id LIMIT ?2",
                )
                .map_err(storage)?;
            let mut rows = select
                .query(params![now, to_i64(max_payloads)])
                .map_err(storage)?;
            let mut total: u64 = 0;
            while let Some(row) = rows.next().map_err(storage)? {
                let bytes = to_u64(row.get(2).map_err(storage)?);
                if !out.is_empty() && total.saturating_add(bytes) > max_bytes as u64 {
                    break;
                }
                total = total.saturating_add(bytes);
                let id: i64 = row.get(0).map_err(storage)?;
                ids.push(id);
                let leases: i64 = row.get(4).map_err(storage)?;
                let header: Vec<u8> = row.get(6).map_err(storage)?;
                let visitors: Vec<u8> = row.get(7).map_err(storage)?;
                out.push(Leased {
                    receipt: Receipt(format!("{id}:{}", leases + 1)),
                    payload: Payload {
                        route: row.get(5).map_err(storage)?,
                        header: Bytes::from(header),
                        visitors: Bytes::from(visitors),
                        visitor_count: row.get(1).map_err(storage)?,
                    },
                    attempts: u32::try_from(leases).unwrap_or(u32::MAX),
                    appended_at_ms: to_u64(row.get(3).map_err(storage)?),
                });
            }
        }
        {
            let mut hide = tx
                .prepare_cached(
                    "UPDATE payloads SET visible_at = ?1, leases = leases + 1, leased = 1 WHERE id = ?2",
                )
                .map_err(storage)?;
            for id in ids {
                hide.execute(params![until, id]).map_err(storage)?;
            }
        }
        Delta::default().write(&tx, now).map_err(storage)?;
        tx.commit().map_err(storage)?;
        Ok(out)
    }

    /// Deletes the payloads, whatever the lease generation: a stale receipt still means the
    /// upstream took the payload. Rows already gone are skipped. Returns how many it deleted.
    pub(super) fn ack(&mut self, receipts: &[(i64, i64)]) -> Result<u64, SpoolError> {
        let now = self.clock.now_ms();
        let tx = self.begin().map_err(storage)?;
        let mut delta = Delta::default();
        {
            let mut delete = tx
                .prepare_cached("DELETE FROM payloads WHERE id = ?1 RETURNING bytes, visitor_count")
                .map_err(storage)?;
            for (id, _) in receipts {
                let gone: Option<(i64, i64)> = delete
                    .query_row(params![id], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()
                    .map_err(storage)?;
                if let Some((bytes, events)) = gone {
                    delta.unpend(bytes, events);
                    delta.delivered += 1;
                    delta.delivered_events += events;
                }
            }
        }
        delta.write(&tx, now).map_err(storage)?;
        tx.commit().map_err(storage)?;
        Ok(u64::try_from(-delta.pending).unwrap_or(0))
    }

    /// Makes leased payloads visible at `now + delay`. A stale receipt (the lease expired and
    /// someone else leased the payload since) is skipped: the newer holder decides. Returns
    /// how many it released.
    pub(super) fn release(
        &mut self,
        receipts: &[(i64, i64)],
        delay: Duration,
    ) -> Result<u64, SpoolError> {
        let now = self.clock.now_ms();
        let at = now.saturating_add(ms(delay));
        let tx = self.begin().map_err(storage)?;
        let mut n = 0;
        {
            let mut update = tx
                .prepare_cached(
                    "UPDATE payloads SET visible_at = ?1, leased = 0 WHERE id = ?2 AND leases = ?3",
                )
                .map_err(storage)?;
            for (id, generation) in receipts {
                n += update
                    .execute(params![at, id, generation])
                    .map_err(storage)? as u64;
            }
        }
        Delta::default().write(&tx, now).map_err(storage)?;
        tx.commit().map_err(storage)?;
        Ok(n)
    }

    /// Moves leased payloads to the dead letters. Stale receipts are skipped, as in
    /// [`Store::release`]. Returns how many it moved.
    pub(super) fn dead_letter(
        &mut self,
        receipts: &[(i64, i64)],
        reason: &str,
    ) -> Result<u64, SpoolError> {
        let now = self.clock.now_ms();
        let tx = self.begin().map_err(storage)?;
        let mut delta = Delta::default();
        {
            let mut copy = tx
                .prepare_cached(
                    "INSERT INTO dead_letters (id, visitor_count, bytes, appended_at, dead_at, reason, route, header, visitors)
                     SELECT id, visitor_count, bytes, appended_at, ?3, ?4, route, header, visitors
                     FROM payloads WHERE id = ?1 AND leases = ?2",
                )
                .map_err(storage)?;
            let mut delete = tx
                .prepare_cached("DELETE FROM payloads WHERE id = ?1 RETURNING bytes, visitor_count")
                .map_err(storage)?;
            for (id, generation) in receipts {
                if copy
                    .execute(params![id, generation, now, reason])
                    .map_err(storage)?
                    == 0
                {
                    continue;
                }
                let (bytes, events): (i64, i64) = delete
                    .query_row(params![id], |r| Ok((r.get(0)?, r.get(1)?)))
                    .map_err(storage)?;
                delta.unpend(bytes, events);
                delta.bury(bytes, events);
            }
        }
        delta.write(&tx, now).map_err(storage)?;
        tx.commit().map_err(storage)?;
        Ok(u64::try_from(delta.dead).unwrap_or(0))
    }

    /// Settles leased payloads piece by piece (see [`PartialSettlement`]), each in full or
    /// not at all, all in one transaction. A stale receipt is skipped. A settlement whose
    /// visitors do not add up to the payload's is refused, and nothing of the transaction
    /// is written. Returns how many payloads it settled.
    pub(super) fn settle_parts(
        &mut self,
        parts: &[((i64, i64), PartialSettlement)],
    ) -> Result<u64, SpoolError> {
        let now = self.clock.now_ms();
        let tx = self.begin().map_err(storage)?;
        let mut delta = Delta::default();
        let mut settled = 0;
        {
            let mut current = tx
                .prepare_cached(
                    "SELECT visitor_count, bytes, appended_at FROM payloads
                     WHERE id = ?1 AND leases = ?2",
                )
                .map_err(storage)?;
            let mut next_id = tx
                .prepare_cached(
                    "UPDATE sqlite_sequence SET seq = seq + 1 WHERE name = 'payloads' RETURNING seq",
                )
                .map_err(storage)?;
            let mut bury = tx
                .prepare_cached(
                    "INSERT INTO dead_letters (id, visitor_count, bytes, appended_at, dead_at, reason, route, header, visitors)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                )
                .map_err(storage)?;
            let mut shrink = tx
                .prepare_cached(
                    "UPDATE payloads SET visitor_count = ?2, bytes = ?3, visible_at = ?4, leased = 0,
                         route = ?5, header = ?6, visitors = ?7 WHERE id = ?1",
                )
                .map_err(storage)?;
            let mut delete = tx
                .prepare_cached("DELETE FROM payloads WHERE id = ?1")
                .map_err(storage)?;
            for ((id, generation), part) in parts {
                let Some((events, bytes, appended_at)): Option<(i64, i64, i64)> = current
                    .query_row(params![id, generation], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                    })
                    .optional()
                    .map_err(storage)?
                else {
                    continue;
                };
                let dead_events: i64 = part
                    .dead
                    .iter()
                    .map(|(p, _)| i64::from(p.visitor_count))
                    .sum();
                let kept_events = part
                    .remainder
                    .as_ref()
                    .map_or(0, |p| i64::from(p.visitor_count));
                let delivered = i64::from(part.delivered_events);
                if delivered + dead_events + kept_events != events {
                    return Err(SpoolError::Config(format!(
                        "settlement of payload {id} accounts for {} of its {events} visitors",
                        delivered + dead_events + kept_events
                    )));
                }
                for (payload, reason) in &part.dead {
                    let dead_id: i64 = next_id.query_row([], |r| r.get(0)).map_err(storage)?;
                    let len = to_i64(payload.stored_len());
                    bury.execute(params![
                        dead_id,
                        payload.visitor_count,
                        len,
                        appended_at,
                        now,
                        reason,
                        payload.route,
                        &payload.header[..],
                        &payload.visitors[..]
                    ])
                    .map_err(storage)?;
                    delta.bury(len, i64::from(payload.visitor_count));
                }
                let fragments = to_i64(part.dead.len());
                match &part.remainder {
                    Some(rest) => {
                        let len = to_i64(rest.stored_len());
                        shrink
                            .execute(params![
                                id,
                                rest.visitor_count,
                                len,
                                now.saturating_add(ms(part.delay)),
                                rest.route,
                                &rest.header[..],
                                &rest.visitors[..]
                            ])
                            .map_err(storage)?;
                        delta.pending_bytes += len - bytes;
                        delta.pending_events += kept_events - events;
                        delta.split += fragments;
                    }
                    None => {
                        delete.execute(params![id]).map_err(storage)?;
                        delta.unpend(bytes, events);
                        if delivered > 0 {
                            delta.delivered += 1;
                            delta.split += fragments;
                        } else {
                            // The row itself became its first dead letter.
                            delta.split += (fragments - 1).max(0);
                        }
                    }
                }
                delta.delivered_events += delivered;
                settled += 1;
            }
        }
        delta.write(&tx, now).map_err(storage)?;
        tx.commit().map_err(storage)?;
        Ok(settled)
    }

    /// Moves up to `chunk` payloads appended before `cutoff` (and not currently leased) to
    /// the dead letters, scanning in id order from `after`. Returns how many it moved, the
    /// last id it looked at, and whether the scan is finished.
    pub(super) fn expire_chunk(
        &mut self,
        after: i64,
        chunk: usize,
        reason: &str,
    ) -> Result<(u64, i64, bool), SpoolError> {
        let now = self.clock.now_ms();
        let cutoff = now.saturating_sub(ms(self.retention));
        let tx = self.begin().map_err(storage)?;
        let mut candidates = Vec::new();
        let mut last = after;
        let mut reached_unexpired = false;
        let mut seen = 0usize;
        {
            // Ids grow with append time, so the expired payloads are a prefix in id order
            // (a clock stepping back can only delay an expiry, never cause an early one).
            let mut scan = tx
                .prepare_cached(
                    "SELECT id, appended_at, leased, visible_at FROM payloads
                     WHERE id > ?1 ORDER BY id LIMIT ?2",
                )
                .map_err(storage)?;
            let mut rows = scan.query(params![after, to_i64(chunk)]).map_err(storage)?;
            while let Some(row) = rows.next().map_err(storage)? {
                let id: i64 = row.get(0).map_err(storage)?;
                let appended_at: i64 = row.get(1).map_err(storage)?;
                if appended_at >= cutoff {
                    reached_unexpired = true;
                    break;
                }
                seen += 1;
                last = id;
                let leased: i64 = row.get(2).map_err(storage)?;
                let visible_at: i64 = row.get(3).map_err(storage)?;
                // Being delivered right now: its holder decides; a later pass gets it if
                // the delivery fails.
                if leased == 1 && visible_at > now {
                    continue;
                }
                candidates.push(id);
            }
        }
        let done = reached_unexpired || seen < chunk;
        let mut delta = Delta::default();
        {
            let mut copy = tx
                .prepare_cached(
                    "INSERT INTO dead_letters (id, visitor_count, bytes, appended_at, dead_at, reason, route, header, visitors)
                     SELECT id, visitor_count, bytes, appended_at, ?2, ?3, route, header, visitors
                     FROM payloads WHERE id = ?1",
                )
                .map_err(storage)?;
            let mut delete = tx
                .prepare_cached("DELETE FROM payloads WHERE id = ?1 RETURNING bytes, visitor_count")
                .map_err(storage)?;
            for id in candidates {
                copy.execute(params![id, now, reason]).map_err(storage)?;
                let (bytes, events): (i64, i64) = delete
                    .query_row(params![id], |r| Ok((r.get(0)?, r.get(1)?)))
                    .map_err(storage)?;
                delta.unpend(bytes, events);
                delta.bury(bytes, events);
            }
        }
        delta.write(&tx, now).map_err(storage)?;
        tx.commit().map_err(storage)?;
        Ok((u64::try_from(delta.dead).unwrap_or(0), last, done))
    }

    /// Counts from the totals row, the oldest payload and the leased index: no full scan.
    pub(super) fn stats(&mut self) -> Result<SpoolStats, SpoolError> {
        // A read transaction so that the three reads see one snapshot.
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Deferred)
            .map_err(storage)?;
        let now = self.clock.now_ms();
        let mut stats = tx
            .prepare_cached(
                "SELECT pending, pending_bytes, pending_events, dead FROM totals WHERE id = 0",
            )
            .and_then(|mut s| {
                s.query_row([], |r| {
                    Ok(SpoolStats {
                        pending: to_u64(r.get(0)?),
                        pending_bytes: to_u64(r.get(1)?),
                        pending_events: to_u64(r.get(2)?),
                        dead_letters: to_u64(r.get(3)?),
                        ..SpoolStats::default()
                    })
                })
            })
            .map_err(storage)?;
        let oldest: Option<i64> = tx
            .prepare_cached("SELECT appended_at FROM payloads ORDER BY id LIMIT 1")
            .and_then(|mut s| s.query_row([], |r| r.get(0)).optional())
            .map_err(storage)?;
        stats.oldest_age_ms = oldest.map_or(0, |t| to_u64(now.saturating_sub(t)));
        stats.leased = tx
            .prepare_cached("SELECT COUNT(*) FROM payloads WHERE leased = 1 AND visible_at > ?1")
            .and_then(|mut s| s.query_row(params![now], |r| r.get::<_, i64>(0)))
            .map(to_u64)
            .map_err(storage)?;
        tx.commit().map_err(storage)?;
        Ok(stats)
    }

    /// Up to `limit` dead letters, in id (append) order.
    pub(super) fn dead_letters(&mut self, limit: usize) -> Result<Vec<DeadLetter>, SpoolError> {
        let mut select = self
            .conn
            .prepare_cached(
                "SELECT id, visitor_count, appended_at, dead_at, reason, route, header, visitors
                 FROM dead_letters ORDER BY id LIMIT ?1",
            )
            .map_err(storage)?;
        let rows = select
            .query_map(params![to_i64(limit)], |r| {
                let id: i64 = r.get(0)?;
                let header: Vec<u8> = r.get(6)?;
                let visitors: Vec<u8> = r.get(7)?;
                Ok(DeadLetter {
                    id: id.to_string(),
                    payload: Payload {
                        route: r.get(5)?,
                        header: Bytes::from(header),
                        visitors: Bytes::from(visitors),
                        visitor_count: r.get(1)?,
                    },
                    reason: r.get(4)?,
                    appended_at_ms: to_u64(r.get(2)?),
                    dead_at_ms: to_u64(r.get(3)?),
                })
            })
            .map_err(storage)?;
        rows.collect::<Result<Vec<_>, _>>().map_err(storage)
    }

    fn dead_ids(tx: &Transaction<'_>, which: &DeadChunk) -> rusqlite::Result<Vec<i64>> {
        match which {
            DeadChunk::Ids(ids) => Ok(ids.clone()),
            DeadChunk::First(n) => {
                let mut s =
                    tx.prepare_cached("SELECT id FROM dead_letters ORDER BY id LIMIT ?1")?;
                let ids = s.query_map(params![to_i64(*n)], |r| r.get(0))?;
                ids.collect()
            }
        }
    }

    /// Puts dead letters back as new pending payloads (new id, no attempts, appended now so
    /// that retention counts from the retry). Returns how many.
    pub(super) fn retry_dead(&mut self, which: &DeadChunk) -> Result<u64, SpoolError> {
        let now = self.clock.now_ms();
        let tx = self.begin().map_err(storage)?;
        let ids = Self::dead_ids(&tx, which).map_err(storage)?;
        let mut delta = Delta::default();
        {
            let mut copy = tx
                .prepare_cached(
                    "INSERT INTO payloads (visitor_count, bytes, appended_at, visible_at, route, header, visitors)
                     SELECT visitor_count, bytes, ?2, ?2, route, header, visitors
                     FROM dead_letters WHERE id = ?1",
                )
                .map_err(storage)?;
            let mut delete = tx
                .prepare_cached(
                    "DELETE FROM dead_letters WHERE id = ?1 RETURNING bytes, visitor_count",
                )
                .map_err(storage)?;
            for id in ids {
                if copy.execute(params![id, now]).map_err(storage)? == 0 {
                    continue;
                }
                let (bytes, events): (i64, i64) = delete
                    .query_row(params![id], |r| Ok((r.get(0)?, r.get(1)?)))
                    .map_err(storage)?;
                delta.dead -= 1;
                delta.dead_bytes -= bytes;
                delta.dead_events -= events;
                delta.pending += 1;
                delta.pending_bytes += bytes;
                delta.pending_events += events;
            }
        }
        delta.write(&tx, now).map_err(storage)?;
        tx.commit().map_err(storage)?;
        Ok(u64::try_from(delta.pending).unwrap_or(0))
    }

    /// Deletes dead letters for good. Returns how many.
    pub(super) fn purge_dead(&mut self, which: &DeadChunk) -> Result<u64, SpoolError> {
        let now = self.clock.now_ms();
        let tx = self.begin().map_err(storage)?;
        let ids = Self::dead_ids(&tx, which).map_err(storage)?;
        let mut delta = Delta::default();
        {
            let mut delete = tx
                .prepare_cached(
                    "DELETE FROM dead_letters WHERE id = ?1 RETURNING bytes, visitor_count",
                )
                .map_err(storage)?;
            for id in ids {
                let gone: Option<(i64, i64)> = delete
                    .query_row(params![id], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()
                    .map_err(storage)?;
                if let Some((bytes, events)) = gone {
                    delta.dead -= 1;
                    delta.dead_bytes -= bytes;
                    delta.dead_events -= events;
                    delta.purged += 1;
                    delta.purged_events += events;
                }
            }
        }
        delta.write(&tx, now).map_err(storage)?;
        tx.commit().map_err(storage)?;
        Ok(u64::try_from(-delta.dead).unwrap_or(0))
    }

    /// The durable totals.
    pub(super) fn totals(&mut self) -> Result<SpoolTotals, SpoolError> {
        self.conn
            .prepare_cached(
                "SELECT accepted, delivered, dead, purged, pending,
                        accepted_events, delivered_events, dead_events, purged_events,
                        pending_events, split
                 FROM totals WHERE id = 0",
            )
            .and_then(|mut s| {
                s.query_row([], |r| {
                    let g = |i: usize| r.get::<_, i64>(i).map(to_u64);
                    Ok(SpoolTotals {
                        payloads: Ledger {
                            accepted: g(0)?,
                            delivered: g(1)?,
                            dead: g(2)?,
                            purged: g(3)?,
                            pending: g(4)?,
                        },
                        events: Ledger {
                            accepted: g(5)?,
                            delivered: g(6)?,
                            dead: g(7)?,
                            purged: g(8)?,
                            pending: g(9)?,
                        },
                        split_payloads: g(10)?,
                    })
                })
            })
            .map_err(storage)
    }

    /// The totals against a count of every row, in one read snapshot.
    pub(super) fn audit(&mut self) -> Result<SpoolAudit, SpoolError> {
        self.conn.execute_batch("BEGIN DEFERRED").map_err(storage)?;
        let result = (|| {
            let totals = self.totals()?;
            let count = |table: &str| -> Result<(u64, u64), SpoolError> {
                self.conn
                    .query_row(
                        &format!("SELECT COUNT(*), COALESCE(SUM(visitor_count), 0) FROM {table}"),
                        [],
                        |r| Ok((to_u64(r.get(0)?), to_u64(r.get(1)?))),
                    )
                    .map_err(storage)
            };
            let (pending, pending_events) = count("payloads")?;
            let (dead, dead_events) = count("dead_letters")?;
            Ok(SpoolAudit::new(
                totals,
                Counted {
                    pending,
                    pending_events,
                    dead,
                    dead_events,
                },
            ))
        })();
        let _ = self.conn.execute_batch("COMMIT");
        result.map_err(|e| self.classify(e))
    }
}
