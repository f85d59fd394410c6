//! Shared group commits: the writes the writer thread found queued together (appends of
//! ingest beside leases, acks, releases, dead letters and settlements of the forwarder) run
//! in one transaction with one commit, so that one fsync covers all of them and forwarding
//! does not cut ingest's groups short.
//!
//! Each write runs in its own savepoint, in queue order: a write that fails (a settlement
//! that does not add up, a storage error of its own) is rolled back alone and gets its
//! error, and the others still commit. Every write sees the ones before it. Nothing is
//! answered before the commit (see `super::writer`).
//!
//! A full disk is the exception: the group is rolled back and its writes run again one by
//! one, each as before in a transaction of its own through `Store::with_room`, so that
//! what a full disk does to each of them (the checkpoint and one more try, deliveries
//! going on while appends are refused) is what it always was.

use std::time::Duration;

use super::payloads::batch_bytes;
use super::room::is_disk_full;
use super::store::{Store, storage, to_u64};
use super::totals::Delta;
use crate::{Leased, PartialSettlement, Payload, SpoolError};

/// One write of a group, as the writer thread received it.
pub(super) enum Write {
    Append(Vec<Payload>),
    Lease {
        max_payloads: usize,
        max_bytes: usize,
        lease_for: Duration,
    },
    Ack(Vec<(i64, i64)>),
    Release(Vec<(i64, i64)>, Duration),
    DeadLetter(Vec<(i64, i64)>, String),
    Settle(Vec<((i64, i64), PartialSettlement)>),
}

/// What a write of a group returns; the variant follows the write's (`Append` gives
/// `Stored`, `Lease` gives `Leased`, the others `Count`).
#[derive(Debug)]
pub(super) enum Done {
    Stored,
    Leased(Vec<Leased>),
    Count(u64),
}

impl Done {
    pub(super) fn into_leased(self) -> Vec<Leased> {
        match self {
            Done::Leased(v) => v,
            Done::Stored | Done::Count(_) => Vec::new(),
        }
    }

    pub(super) fn into_count(self) -> u64 {
        match self {
            Done::Count(n) => n,
            Done::Stored | Done::Leased(_) => 0,
        }
    }
}

/// One result per write of a group, in their order.
pub(super) type Results = Vec<Result<Done, SpoolError>>;

/// `base + change`, within `u64`.
fn moved(base: u64, change: i64) -> u64 {
    to_u64(
        i64::try_from(base)
            .unwrap_or(i64::MAX)
            .saturating_add(change),
    )
}

impl Store {
    /// Runs `writes` in one transaction, one result per write in their order. The outer
    /// error means the group's transaction failed and none of them was written.
    pub(super) fn write_group(&mut self, writes: &[Write]) -> Result<Results, SpoolError> {
        self.ease_before();
        match self.try_group(writes) {
            Ok(results) => {
                self.ease_after();
                Ok(results)
            }
            Err(e) if is_disk_full(&e) => {
                tracing::warn!(
                    writes = writes.len(),
                    "spool file system full in a group commit; running its writes one by one"
                );
                self.checkpoint();
                Ok(self.one_by_one(writes))
            }
            Err(e) => Err(self.classify(e)),
        }
    }

    fn try_group(&mut self, writes: &[Write]) -> Result<Results, SpoolError> {
        self.conn
            .execute_batch("BEGIN IMMEDIATE")
            .map_err(storage)?;
        let result = self.members(writes).and_then(|(results, delta, now)| {
            delta.write(&self.conn, now).map_err(storage)?;
            self.conn.execute_batch("COMMIT").map_err(storage)?;
            Ok(results)
        });
        if result.is_err() {
            self.rollback();
        }
        result
    }

    /// The writes of the group in the open transaction, each in a savepoint; returns their
    /// results and what the successful ones moved, to be written once.
    fn members(&mut self, writes: &[Write]) -> Result<(Results, Delta, i64), SpoolError> {
        let mut total = Delta::default();
        // The limits count what is held as this transaction sees it: the totals row read
        // once here (another process may have changed it), plus what the group moved since.
        let base = if writes.iter().any(|w| matches!(w, Write::Append(_))) {
            self.held()?
        } else {
            (0, 0)
        };
        let mut refusal: Option<Option<SpoolError>> = None;
        let mut latest = self.clock.now_ms();
        let mut results = Vec::with_capacity(writes.len());
        for (i, write) in writes.iter().enumerate() {
            let now = self.clock.now_ms();
            latest = latest.max(now);
            let Write::Append(batch) = write else {
                refusal = None;
                let mut delta = Delta::default();
                let result = self.in_savepoint(|s| s.apply(write, now, &mut delta))?;
                if result.is_ok() {
                    total.add(&delta);
                }
                results.push(result.map_err(|e| self.classify(e)));
                continue;
            };
            // A run of appends is refused or not as one, as a group of appends always was.
            let refused = refusal.get_or_insert_with(|| {
                let incoming = writes[i..]
                    .iter()
                    .map_while(|w| match w {
                        Write::Append(b) => Some(batch_bytes(b)),
                        _ => None,
                    })
                    .sum();
                self.refusal(incoming)
            });
            if let Some(refused) = refused {
                results.push(Err(refused.duplicate()));
                continue;
            }
            let held = (
                moved(base.0, total.pending + total.dead),
                moved(base.1, total.pending_bytes + total.dead_bytes),
            );
            if let Err(full) = self.check_limits(held, batch) {
                results.push(Err(full));
                continue;
            }
            let mut delta = Delta::default();
            let result = self.in_savepoint(|s| s.insert_in(batch, now, &mut delta))?;
            if result.is_ok() {
                total.add(&delta);
            }
            results.push(result.map(|()| Done::Stored).map_err(|e| self.classify(e)));
        }
        Ok((results, total, latest))
    }

    fn apply(&self, write: &Write, now: i64, delta: &mut Delta) -> Result<Done, SpoolError> {
        match write {
            Write::Append(batch) => self.insert_in(batch, now, delta).map(|()| Done::Stored),
            Write::Lease {
                max_payloads,
                max_bytes,
                lease_for,
            } => self
                .lease_in(*max_payloads, *max_bytes, *lease_for, now)
                .map(Done::Leased),
            Write::Ack(receipts) => self.ack_in(receipts, delta).map(Done::Count),
            Write::Release(receipts, delay) => {
                self.release_in(receipts, *delay, now).map(Done::Count)
            }
            Write::DeadLetter(receipts, reason) => self
                .dead_letter_in(receipts, reason, now, delta)
                .map(Done::Count),
            Write::Settle(parts) => self.settle_parts_in(parts, now, delta).map(Done::Count),
        }
    }

    /// Runs `op` in a savepoint: released if it succeeds, rolled back if it fails (the inner
    /// error, for its caller alone). The outer error means the group cannot go on: the
    /// savepoint itself failed, SQLite already rolled the whole transaction back, or the
    /// disk is full.
    fn in_savepoint<T>(
        &self,
        op: impl FnOnce(&Store) -> Result<T, SpoolError>,
    ) -> Result<Result<T, SpoolError>, SpoolError> {
        self.conn
            .prepare_cached("SAVEPOINT member")
            .and_then(|mut s| s.execute([]))
            .map_err(storage)?;
        match op(self) {
            Ok(value) => {
                self.conn
                    .prepare_cached("RELEASE member")
                    .and_then(|mut s| s.execute([]))
                    .map_err(storage)?;
                Ok(Ok(value))
            }
            Err(e) if is_disk_full(&e) || self.conn.is_autocommit() => Err(e),
            Err(e) => {
                self.conn
                    .execute_batch("ROLLBACK TO member; RELEASE member")
                    .map_err(storage)?;
                Ok(Err(e))
            }
        }
    }

    /// The writes as they ran before groups were shared: each run of appends in one
    /// transaction, every other write in one of its own, each through `with_room`.
    fn one_by_one(&mut self, writes: &[Write]) -> Results {
        let mut results = Vec::with_capacity(writes.len());
        let mut i = 0;
        while i < writes.len() {
            let run: Vec<Vec<Payload>> = writes[i..]
                .iter()
                .map_while(|w| match w {
                    Write::Append(b) => Some(b.clone()),
                    _ => None,
                })
                .collect();
            if !run.is_empty() {
                i += run.len();
                match self.with_room(|s| s.append_group(&run)) {
                    Ok(each) => results.extend(each.into_iter().map(|r| r.map(|()| Done::Stored))),
                    Err(e) => results.extend(run.iter().map(|_| Err(e.duplicate()))),
                }
                continue;
            }
            results.push(self.one(&writes[i]));
            i += 1;
        }
        results
    }

    fn one(&mut self, write: &Write) -> Result<Done, SpoolError> {
        match write {
            Write::Append(batch) => self
                .with_room(|s| s.append_group(std::slice::from_ref(batch)))
                .and_then(|mut each| each.pop().unwrap_or(Ok(())))
                .map(|()| Done::Stored),
            Write::Lease {
                max_payloads,
                max_bytes,
                lease_for,
            } => self
                .with_room(|s| s.lease(*max_payloads, *max_bytes, *lease_for))
                .map(Done::Leased),
            Write::Ack(receipts) => self.with_room(|s| s.ack(receipts)).map(Done::Count),
            Write::Release(receipts, delay) => self
                .with_room(|s| s.release(receipts, *delay))
                .map(Done::Count),
            Write::DeadLetter(receipts, reason) => self
                .with_room(|s| s.dead_letter(receipts, reason))
                .map(Done::Count),
            Write::Settle(parts) => self.with_room(|s| s.settle_parts(parts)).map(Done::Count),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::sqlite::SqliteConfig;
    use crate::{DB_FILE, Receipt};
    use bytes::Bytes;

    const LONG: Duration = Duration::from_secs(600);

    fn payload(n: u64) -> Payload {
        Payload {
            route: "us".into(),
            header: Bytes::from_static(br#""account_id":"1""#),
            visitors: Bytes::from(format!(r#"{{"visitor_id":"v{n}"}}"#)),
            visitor_count: 1,
        }
    }

    fn open(dir: &tempfile::TempDir, config: &SqliteConfig) -> Store {
        Store::open(&dir.path().join(DB_FILE), config, true).unwrap()
    }

    fn receipt(r: &Receipt) -> (i64, i64) {
        super::super::payloads::parse_receipt(r).unwrap()
    }

    /// Appends `n` payloads and leases them all.
    fn leased(store: &mut Store, n: u64) -> Vec<Leased> {
        let batches: Vec<_> = (0..n).map(|i| vec![payload(i)]).collect();
        for r in store.append_group(&batches).unwrap() {
            r.unwrap();
        }
        store.lease(usize::MAX, usize::MAX, LONG).unwrap()
    }

    fn assert_balanced(store: &mut Store) {
        let audit = store.audit().unwrap();
        assert!(audit.is_balanced(), "{:?}", audit.problems);
    }

    #[test]
    fn a_mixed_group_commits_every_write() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(&dir, &SqliteConfig::default());
        let held = leased(&mut store, 3);
        let writes = vec![
            Write::Append(vec![payload(10), payload(11)]),
            Write::Ack(vec![receipt(&held[0].receipt)]),
            Write::Lease {
                max_payloads: 10,
                max_bytes: usize::MAX,
                lease_for: LONG,
            },
            Write::Ack(vec![receipt(&held[1].receipt)]),
            Write::Release(vec![receipt(&held[2].receipt)], Duration::ZERO),
            Write::Append(vec![payload(12)]),
        ];
        let mut results = store.write_group(&writes).unwrap().into_iter();
        assert!(matches!(results.next(), Some(Ok(Done::Stored))));
        assert!(matches!(results.next(), Some(Ok(Done::Count(1)))));
        // The lease sees the append before it in the same transaction, not the release after.
        let lease = results.next().unwrap().unwrap().into_leased();
        assert_eq!(lease.len(), 2);
        assert!(matches!(results.next(), Some(Ok(Done::Count(1)))));
        assert!(matches!(results.next(), Some(Ok(Done::Count(1)))));
        assert!(matches!(results.next(), Some(Ok(Done::Stored))));
        assert!(results.next().is_none());

        let totals = store.totals().unwrap();
        assert_eq!(totals.payloads.accepted, 6);
        assert_eq!(totals.payloads.delivered, 2);
        assert_eq!(totals.payloads.pending, 4);
        // Visible now: the released payload and the last append.
        let visible = store.lease(10, usize::MAX, LONG).unwrap();
        assert_eq!(visible.len(), 2);
        assert_balanced(&mut store);
    }

    #[test]
    fn a_refused_settlement_is_rolled_back_alone() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(&dir, &SqliteConfig::default());
        let held = leased(&mut store, 3);
        let settle = |l: &Leased, delivered_events| {
            (
                receipt(&l.receipt),
                PartialSettlement {
                    receipt: l.receipt.clone(),
                    delivered_events,
                    dead: Vec::new(),
                    remainder: None,
                    delay: Duration::ZERO,
                },
            )
        };
        let writes = vec![
            Write::Append(vec![payload(10)]),
            // The first part is sound and deletes its row; the second does not add up, so
            // the whole settlement, its first part too, must be undone.
            Write::Settle(vec![settle(&held[0], 1), settle(&held[1], 5)]),
            Write::Ack(vec![receipt(&held[2].receipt)]),
            Write::Append(vec![payload(11)]),
        ];
        let results = store.write_group(&writes).unwrap();
        assert!(matches!(results[0], Ok(Done::Stored)));
        assert!(
            matches!(results[1], Err(SpoolError::Config(_))),
            "{:?}",
            results[1]
        );
        assert!(matches!(results[2], Ok(Done::Count(1))));
        assert!(matches!(results[3], Ok(Done::Stored)));
        let totals = store.totals().unwrap();
        assert_eq!(totals.payloads.delivered, 1);
        assert_eq!(totals.payloads.pending, 4);
        // The refused settlement left both of its payloads leased, as they were.
        let settled_again = store
            .settle_parts(&[settle(&held[0], 1), settle(&held[1], 1)])
            .unwrap();
        assert_eq!(settled_again, 2);
        assert_balanced(&mut store);
    }

    #[test]
    fn limits_count_what_the_group_already_moved() {
        let dir = tempfile::tempdir().unwrap();
        let config = SqliteConfig {
            max_payloads: 3,
            ..SqliteConfig::default()
        };
        let mut store = open(&dir, &config);
        let held = leased(&mut store, 2);
        let writes = vec![
            Write::Append(vec![payload(10)]),
            // Full: three held.
            Write::Append(vec![payload(11)]),
            Write::Ack(vec![receipt(&held[0].receipt)]),
            // Room again after the ack before it.
            Write::Append(vec![payload(12)]),
            Write::Append(vec![payload(13)]),
        ];
        let results = store.write_group(&writes).unwrap();
        assert!(matches!(results[0], Ok(Done::Stored)));
        assert!(
            matches!(results[1], Err(SpoolError::Full { .. })),
            "{:?}",
            results[1]
        );
        assert!(matches!(results[2], Ok(Done::Count(1))));
        assert!(matches!(results[3], Ok(Done::Stored)));
        assert!(
            matches!(results[4], Err(SpoolError::Full { .. })),
            "{:?}",
            results[4]
        );
        assert_eq!(store.totals().unwrap().payloads.pending, 3);
        assert_balanced(&mut store);
    }

    #[test]
    fn dead_letters_in_a_group_move_the_totals() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(&dir, &SqliteConfig::default());
        let held = leased(&mut store, 2);
        let writes = vec![
            Write::DeadLetter(vec![receipt(&held[0].receipt)], "400".to_owned()),
            // A stale receipt is skipped, as alone.
            Write::Ack(vec![(receipt(&held[1].receipt).0, 99)]),
            Write::Append(vec![payload(10)]),
        ];
        let results = store.write_group(&writes).unwrap();
        assert!(matches!(results[0], Ok(Done::Count(1))));
        assert!(matches!(results[1], Ok(Done::Count(1))));
        assert!(matches!(results[2], Ok(Done::Stored)));
        let totals = store.totals().unwrap();
        assert_eq!(totals.payloads.dead, 1);
        assert_eq!(totals.payloads.delivered, 1);
        assert_eq!(totals.payloads.pending, 1);
        assert_balanced(&mut store);
    }
}
