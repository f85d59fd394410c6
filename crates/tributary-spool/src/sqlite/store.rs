//! The synchronous half of the SQLite spool: one connection and the SQL of each operation.
//!
//! Everything here runs on the writer thread (see `super::writer`); nothing here knows about
//! async. Every mutating operation is one `BEGIN IMMEDIATE` transaction, so a crash leaves
//! either all of it or none of it, and another process using the same database (the
//! `tributary spool` CLI) waits on the busy timeout instead of failing half-way.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use rusqlite::{
    Connection, ErrorCode, OpenFlags, OptionalExtension, Transaction, TransactionBehavior, params,
};

use super::{SqliteConfig, SyncMode};
use crate::{DeadLetter, Leased, Payload, Receipt, SpoolError, SpoolStats};

/// The on-disk format this code reads and writes (`PRAGMA user_version`).
const SCHEMA_VERSION: i64 = 1;

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

/// Maps a SQLite error to the trait's error. A full disk is reported as a full spool: the
/// relay then answers 503 with `Retry-After`, which is what the client should do.
pub(super) fn storage(e: rusqlite::Error) -> SpoolError {
    if e.sqlite_error_code() == Some(ErrorCode::DiskFull) {
        SpoolError::Full {
            reason: "disk full".to_owned(),
        }
    } else {
        SpoolError::Storage(e.to_string())
    }
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub(super) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
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

/// Dead-letter ids are the row id of the payload they were.
pub(super) fn parse_id(s: &str) -> Result<i64, SpoolError> {
    s.parse::<i64>()
        .map_err(|_| SpoolError::Unknown(s.to_owned()))
}

/// Changes to the running totals within one transaction.
#[derive(Debug, Default, Clone, Copy)]
struct Delta {
    pending: i64,
    pending_bytes: i64,
    pending_events: i64,
    dead: i64,
    dead_bytes: i64,
}

impl Delta {
    fn is_zero(&self) -> bool {
        self.pending == 0
            && self.pending_bytes == 0
            && self.pending_events == 0
            && self.dead == 0
            && self.dead_bytes == 0
    }

    fn write(&self, tx: &Transaction<'_>) -> rusqlite::Result<()> {
        if self.is_zero() {
            return Ok(());
        }
        tx.prepare_cached(
            "UPDATE totals SET pending = pending + ?1, pending_bytes = pending_bytes + ?2,
                 pending_events = pending_events + ?3, dead = dead + ?4,
                 dead_bytes = dead_bytes + ?5 WHERE id = 0",
        )?
        .execute(params![
            self.pending,
            self.pending_bytes,
            self.pending_events,
            self.dead,
            self.dead_bytes
        ])?;
        Ok(())
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
    max_bytes: u64,
    max_payloads: u64,
}

impl Store {
    /// Opens (and with `create`, creates) the database and brings its schema up to date.
    /// Reads nothing proportional to the number of payloads.
    pub(super) fn open(
        path: &Path,
        config: &SqliteConfig,
        create: bool,
    ) -> Result<Store, SpoolError> {
        let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        if create {
            flags |= OpenFlags::SQLITE_OPEN_CREATE;
        }
        let conn = Connection::open_with_flags(path, flags)
            .map_err(|e| SpoolError::Storage(format!("cannot open {}: {e}", path.display())))?;
        conn.busy_timeout(config.busy_timeout).map_err(storage)?;
        // WAL: readers (the CLI, stats) never block the writer and a crash at any point
        // leaves the last committed transaction intact.
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
            .map_err(storage)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(SpoolError::Storage(format!(
                "cannot use WAL journal mode (got {mode}); is the spool on a network filesystem?"
            )));
        }
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

        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(storage)?;
        if version > SCHEMA_VERSION {
            return Err(SpoolError::Config(format!(
                "{} has spool format {version}, this build reads up to {SCHEMA_VERSION}",
                path.display()
            )));
        }
        let mut store = Store {
            conn,
            max_bytes: config.max_bytes,
            max_payloads: config.max_payloads,
        };
        if version < SCHEMA_VERSION {
            let tx = store.begin().map_err(storage)?;
            tx.execute_batch(SCHEMA).map_err(storage)?;
            tx.pragma_update(None, "user_version", SCHEMA_VERSION)
                .map_err(storage)?;
            tx.commit().map_err(storage)?;
        }
        Ok(store)
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
        let tx = self.begin().map_err(storage)?;
        // Read inside the write transaction: another process may have changed the totals.
        let (mut held, mut held_bytes): (u64, u64) = tx
            .prepare_cached(
                "SELECT pending + dead, pending_bytes + dead_bytes FROM totals WHERE id = 0",
            )
            .and_then(|mut s| s.query_row([], |r| Ok((to_u64(r.get(0)?), to_u64(r.get(1)?)))))
            .map_err(storage)?;
        let now = now_ms();
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
        delta.write(&tx).map_err(storage)?;
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
        let tx = self.begin().map_err(storage)?;
        let now = now_ms();
        let until = now.saturating_add(ms(lease_for));
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
        tx.commit().map_err(storage)?;
        Ok(out)
    }

    /// Deletes the payloads, whatever the lease generation: a stale receipt still means the
    /// upstream took the payload. Rows already gone are skipped. Returns how many it deleted.
    pub(super) fn ack(&mut self, receipts: &[(i64, i64)]) -> Result<u64, SpoolError> {
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
                    delta.pending -= 1;
                    delta.pending_bytes -= bytes;
                    delta.pending_events -= events;
                }
            }
        }
        delta.write(&tx).map_err(storage)?;
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
        let tx = self.begin().map_err(storage)?;
        let at = now_ms().saturating_add(ms(delay));
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
        let tx = self.begin().map_err(storage)?;
        let now = now_ms();
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
                delta.pending -= 1;
                delta.pending_bytes -= bytes;
                delta.pending_events -= events;
                delta.dead += 1;
                delta.dead_bytes += bytes;
            }
        }
        delta.write(&tx).map_err(storage)?;
        tx.commit().map_err(storage)?;
        Ok(u64::try_from(delta.dead).unwrap_or(0))
    }

    /// Moves up to `chunk` payloads appended before `cutoff` (and not currently leased) to
    /// the dead letters, scanning in id order from `after`. Returns how many it moved, the
    /// last id it looked at, and whether the scan is finished.
    pub(super) fn expire_chunk(
        &mut self,
        cutoff: i64,
        after: i64,
        chunk: usize,
        reason: &str,
    ) -> Result<(u64, i64, bool), SpoolError> {
        let tx = self.begin().map_err(storage)?;
        let now = now_ms();
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
                delta.pending -= 1;
                delta.pending_bytes -= bytes;
                delta.pending_events -= events;
                delta.dead += 1;
                delta.dead_bytes += bytes;
            }
        }
        delta.write(&tx).map_err(storage)?;
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
        let now = now_ms();
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
        let tx = self.begin().map_err(storage)?;
        let now = now_ms();
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
                delta.pending += 1;
                delta.pending_bytes += bytes;
                delta.pending_events += events;
            }
        }
        delta.write(&tx).map_err(storage)?;
        tx.commit().map_err(storage)?;
        Ok(u64::try_from(delta.pending).unwrap_or(0))
    }

    /// Deletes dead letters for good. Returns how many.
    pub(super) fn purge_dead(&mut self, which: &DeadChunk) -> Result<u64, SpoolError> {
        let tx = self.begin().map_err(storage)?;
        let ids = Self::dead_ids(&tx, which).map_err(storage)?;
        let mut delta = Delta::default();
        {
            let mut delete = tx
                .prepare_cached("DELETE FROM dead_letters WHERE id = ?1 RETURNING bytes")
                .map_err(storage)?;
            for id in ids {
                let gone: Option<i64> = delete
                    .query_row(params![id], |r| r.get(0))
                    .optional()
                    .map_err(storage)?;
                if let Some(bytes) = gone {
                    delta.dead -= 1;
                    delta.dead_bytes -= bytes;
                }
            }
        }
        delta.write(&tx).map_err(storage)?;
        tx.commit().map_err(storage)?;
        Ok(u64::try_from(-delta.dead).unwrap_or(0))
    }
}
