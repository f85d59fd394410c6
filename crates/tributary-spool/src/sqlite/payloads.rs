//! The operations on pending payloads: the append of a group commit, lease, ack, release,
//! and the settlement of a leased payload part by part after isolation.
//!
//! The path of ingest and delivery, apart from the upkeep of the dead letters (`dead`);
//! each operation is one transaction that also moves the running totals (`totals`).

use std::time::Duration;

use bytes::Bytes;
use rusqlite::{OptionalExtension, params};

use super::codec::{StoredPayload, unpack};
use super::store::{Store, ms, storage, to_i64, to_u64};
use super::totals::Delta;
use crate::{Leased, PartialSettlement, Payload, Receipt, SpoolError};

/// A leased row as the writer thread read it: its visitors still as stored, so that
/// decoding them happens on the caller's side and not on the one thread every write
/// waits for.
#[derive(Debug)]
pub(super) struct LeasedRow {
    /// `payload.visitors` holds the run as `encoding` stores it.
    pub(super) leased: Leased,
    pub(super) encoding: i64,
    /// The visitor run's length as received.
    pub(super) raw_len: usize,
}

/// A [`LeasedRow`] decoded.
pub(super) enum Unpacked {
    /// The payload as appended.
    Readable(Leased),
    /// The row cannot be decoded: its lease (to dead-letter it) and what is wrong.
    Unreadable(Leased, String),
}

impl LeasedRow {
    /// The payload as appended, or why it cannot be.
    pub(super) fn unpack(self) -> Unpacked {
        let LeasedRow {
            mut leased,
            encoding,
            raw_len,
        } = self;
        let stored = std::mem::take(&mut leased.payload.visitors);
        match unpack(encoding, Vec::from(stored), raw_len) {
            Ok(visitors) => {
                leased.payload.visitors = visitors;
                Unpacked::Readable(leased)
            }
            Err(why) => Unpacked::Unreadable(leased, why),
        }
    }
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

impl Store {
    /// Appends each batch all-or-nothing, in one transaction for all of them. A batch that
    /// would pass a limit gets `Full` and the others still go in. The outer error means the
    /// transaction failed and none went in.
    pub(super) fn append_group(
        &mut self,
        batches: &[Vec<StoredPayload>],
    ) -> Result<Vec<Result<(), SpoolError>>, SpoolError> {
        let (max_bytes, max_payloads) = (self.max_bytes, self.max_payloads);
        let incoming: u64 = batches.iter().flatten().map(|p| p.len as u64).sum();
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
                    "INSERT INTO payloads (visitor_count, bytes, appended_at, visible_at, route, header, visitors, encoding)
                     VALUES (?1, ?2, ?3, ?3, ?4, ?5, ?6, ?7)",
                )
                .map_err(storage)?;
            for batch in batches {
                let count = batch.len() as u64;
                let bytes: u64 = batch.iter().map(|p| p.len as u64).sum();
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
                            to_i64(p.len),
                            now,
                            p.route,
                            &p.header[..],
                            &p.visitors[..],
                            p.encoding
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
    ) -> Result<Vec<LeasedRow>, SpoolError> {
        if max_payloads == 0 {
            return Ok(Vec::new());
        }
        // A lease rewrites the pages of what it leases into the WAL, and the acks that follow
        // rewrite them again before a checkpoint can reset it: on a nearly full disk, lease
        // no more bytes than a quarter of the room left and no more rows than that carries
        // through the WAL, so delivery can always go on (at least one payload, whatever its
        // size, as ever).
        let (max_payloads, max_bytes) = match self.write_budget() {
            Some(budget) => {
                let rows = max_payloads.min(self.rows_within(budget));
                let cut = max_bytes.min(usize::try_from(budget).unwrap_or(usize::MAX));
                tracing::debug!(
                    budget,
                    max_payloads = rows,
                    max_bytes = cut,
                    "low on disk space: leasing less"
                );
                (rows, cut)
            }
            None => (max_payloads, max_bytes),
        };
        let now = self.clock.now_ms();
        let until = now.saturating_add(ms(lease_for));
        let tx = self.begin().map_err(storage)?;
        let mut out = Vec::new();
        let mut ids = Vec::new();
        {
            let mut select = tx
                .prepare_cached(
                    "SELECT id, visitor_count, bytes, appended_at, leases, route, header, visitors, encoding
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
                let raw_len = usize::try_from(bytes)
                    .unwrap_or(usize::MAX)
                    .saturating_sub(header.len());
                out.push(LeasedRow {
                    leased: Leased {
                        receipt: Receipt(format!("{id}:{}", leases + 1)),
                        payload: Payload {
                            route: row.get(5).map_err(storage)?,
                            header: Bytes::from(header),
                            visitors: Bytes::from(visitors),
                            visitor_count: row.get(1).map_err(storage)?,
                        },
                        attempts: u32::try_from(leases).unwrap_or(u32::MAX),
                        appended_at_ms: to_u64(row.get(3).map_err(storage)?),
                    },
                    encoding: row.get(8).map_err(storage)?,
                    raw_len,
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

    /// Settles leased payloads piece by piece (see [`PartialSettlement`]), each in full or
    /// not at all, all in one transaction. A stale receipt is skipped. A settlement whose
    /// visitors do not add up to the payload's is refused, and nothing of the transaction
    /// is written. Returns how many payloads it settled.
    pub(super) fn settle_parts(
        &mut self,
        parts: &[((i64, i64), PartialSettlement)],
    ) -> Result<u64, SpoolError> {
        let now = self.clock.now_ms();
        let compression = self.compression;
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
                    "INSERT INTO dead_letters (id, visitor_count, bytes, appended_at, dead_at, reason, route, header, visitors, encoding)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                )
                .map_err(storage)?;
            let mut shrink = tx
                .prepare_cached(
                    "UPDATE payloads SET visitor_count = ?2, bytes = ?3, visible_at = ?4, leased = 0,
                         route = ?5, header = ?6, visitors = ?7, encoding = ?8 WHERE id = ?1",
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
                    let stored = StoredPayload::pack(payload, compression);
                    let len = to_i64(stored.len);
                    bury.execute(params![
                        dead_id,
                        stored.visitor_count,
                        len,
                        appended_at,
                        now,
                        reason,
                        stored.route,
                        &stored.header[..],
                        &stored.visitors[..],
                        stored.encoding
                    ])
                    .map_err(storage)?;
                    delta.bury(len, i64::from(payload.visitor_count));
                }
                let fragments = to_i64(part.dead.len());
                match &part.remainder {
                    Some(rest) => {
                        let rest = StoredPayload::pack(rest, compression);
                        let len = to_i64(rest.len);
                        shrink
                            .execute(params![
                                id,
                                rest.visitor_count,
                                len,
                                now.saturating_add(ms(part.delay)),
                                rest.route,
                                &rest.header[..],
                                &rest.visitors[..],
                                rest.encoding
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
}
