//! The running totals: the [`Delta`] every writing transaction adds to the one `totals` row
//! (with the spool's clock), and the reads of that row: stats, totals, and the audit of
//! them against a count of every row.
//!
//! Apart so that the columns of the totals row and the statements that move and read them
//! are in one place; the operations only say, through a `Delta`, what moved.

use rusqlite::{OptionalExtension, Transaction, TransactionBehavior, params};

use super::store::{Store, storage, to_u64};
use crate::audit::Counted;
use crate::{Ledger, SpoolAudit, SpoolError, SpoolStats, SpoolTotals};

/// Changes to the running totals within one transaction.
///
/// Every transaction that writes also moves `clock_ms`, the latest time the spool wrote,
/// which the next process's clock never starts before (see [`crate::clock`]). It lives in
/// the totals row, which these transactions write anyway, so it costs no extra page.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Delta {
    pub(super) pending: i64,
    pub(super) pending_bytes: i64,
    pub(super) pending_events: i64,
    pub(super) dead: i64,
    pub(super) dead_bytes: i64,
    pub(super) dead_events: i64,
    pub(super) accepted: i64,
    pub(super) accepted_events: i64,
    pub(super) delivered: i64,
    pub(super) delivered_events: i64,
    pub(super) purged: i64,
    pub(super) purged_events: i64,
    pub(super) split: i64,
}

impl Delta {
    pub(super) fn write(&self, tx: &Transaction<'_>, now: i64) -> rusqlite::Result<()> {
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
    pub(super) fn unpend(&mut self, bytes: i64, events: i64) {
        self.pending -= 1;
        self.pending_bytes -= bytes;
        self.pending_events -= events;
    }

    /// A dead-letter row of `bytes` and `events` appears.
    pub(super) fn bury(&mut self, bytes: i64, events: i64) {
        self.dead += 1;
        self.dead_bytes += bytes;
        self.dead_events += events;
    }
}

impl Store {
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
                "SELECT pending, pending_bytes, pending_events, dead, dead_bytes FROM totals WHERE id = 0",
            )
            .and_then(|mut s| {
                s.query_row([], |r| {
                    Ok(SpoolStats {
                        pending: to_u64(r.get(0)?),
                        pending_bytes: to_u64(r.get(1)?),
                        pending_events: to_u64(r.get(2)?),
                        dead_letters: to_u64(r.get(3)?),
                        dead_bytes: to_u64(r.get(4)?),
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
