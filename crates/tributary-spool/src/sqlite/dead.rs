//! Dead letters: how payloads become them (the forwarder's verdict, retention) and what an
//! operator does with them (list, retry, purge).
//!
//! Apart from `payloads` because these work on the other table, and the bulk ones
//! (retention, retry and purge of all) run in chunks of rows, driven by `super::SqliteSpool`.

use bytes::Bytes;
use rusqlite::{OptionalExtension, Transaction, params};

use super::codec::unpack;
use super::store::{Store, ms, storage, to_i64, to_u64};
use super::totals::Delta;
use crate::{DeadLetter, DeadLetterSummary, Payload, SpoolError};

/// Dead-letter ids are the row id of the payload they were, or for the parts isolation
/// cut out of a payload, a fresh id from the same sequence.
pub(super) fn parse_id(s: &str) -> Result<i64, SpoolError> {
    s.parse::<i64>()
        .map_err(|_| SpoolError::Unknown(s.to_owned()))
}

/// Which dead letters one chunked operation touches.
pub(super) enum DeadChunk {
    /// The oldest `n`.
    First(usize),
    /// These ids.
    Ids(Vec<i64>),
}

impl Store {
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
                    "INSERT INTO dead_letters (id, visitor_count, bytes, appended_at, dead_at, reason, route, header, visitors, encoding)
                     SELECT id, visitor_count, bytes, appended_at, ?3, ?4, route, header, visitors, encoding
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
                    "INSERT INTO dead_letters (id, visitor_count, bytes, appended_at, dead_at, reason, route, header, visitors, encoding)
                     SELECT id, visitor_count, bytes, appended_at, ?2, ?3, route, header, visitors, encoding
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

    /// Up to `limit` dead letters, in id (append) order.
    pub(super) fn dead_letters(&mut self, limit: usize) -> Result<Vec<DeadLetter>, SpoolError> {
        let mut select = self
            .conn
            .prepare_cached(
                "SELECT id, visitor_count, appended_at, dead_at, reason, route, header, visitors,
                     encoding, bytes
                 FROM dead_letters ORDER BY id LIMIT ?1",
            )
            .map_err(storage)?;
        let rows = select
            .query_map(params![to_i64(limit)], |r| {
                let id: i64 = r.get(0)?;
                let header: Vec<u8> = r.get(6)?;
                let stored: Vec<u8> = r.get(7)?;
                let raw_len = usize::try_from(r.get::<_, i64>(9)?)
                    .unwrap_or(0)
                    .saturating_sub(header.len());
                let mut reason: String = r.get(4)?;
                // A listing is how an operator looks at what went wrong: a row that cannot
                // be decoded is listed without its visitors and says why, rather than
                // hiding every other dead letter behind an error.
                let visitors = unpack(r.get(8)?, stored, raw_len).unwrap_or_else(|why| {
                    reason.push_str(&format!(" (and {why})"));
                    Bytes::new()
                });
                Ok(DeadLetter {
                    id: id.to_string(),
                    payload: Payload {
                        route: r.get(5)?,
                        header: Bytes::from(header),
                        visitors,
                        visitor_count: r.get(1)?,
                    },
                    reason,
                    appended_at_ms: to_u64(r.get(2)?),
                    dead_at_ms: to_u64(r.get(3)?),
                })
            })
            .map_err(storage)?;
        rows.collect::<Result<Vec<_>, _>>().map_err(storage)
    }

    /// Up to `limit` dead letters without their bodies: the BLOB columns are not read, and
    /// SQLite cuts the reason, so this stays small whatever the dead letters hold.
    pub(super) fn dead_letter_summaries(
        &mut self,
        limit: usize,
    ) -> Result<Vec<DeadLetterSummary>, SpoolError> {
        let mut select = self
            .conn
            .prepare_cached(
                "SELECT id, visitor_count, bytes, appended_at, dead_at, substr(reason, 1, ?2), route
                 FROM dead_letters ORDER BY id LIMIT ?1",
            )
            .map_err(storage)?;
        let max_reason = to_i64(DeadLetterSummary::MAX_REASON_CHARS);
        let rows = select
            .query_map(params![to_i64(limit), max_reason], |r| {
                let id: i64 = r.get(0)?;
                let bytes: i64 = r.get(2)?;
                let reason: String = r.get(5)?;
                Ok(DeadLetterSummary {
                    id: id.to_string(),
                    visitor_count: r.get(1)?,
                    stored_len: usize::try_from(bytes).unwrap_or(0),
                    appended_at_ms: to_u64(r.get(3)?),
                    dead_at_ms: to_u64(r.get(4)?),
                    reason: DeadLetterSummary::truncate_reason(&reason),
                    route: r.get(6)?,
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
                    "INSERT INTO payloads (visitor_count, bytes, appended_at, visible_at, route, header, visitors, encoding)
                     SELECT visitor_count, bytes, ?2, ?2, route, header, visitors, encoding
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
}
