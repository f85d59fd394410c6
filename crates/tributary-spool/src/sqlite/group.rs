//! Shared group commits: the writes the writer thread found queued together (appends of
//! ingest beside leases, acks, releases, dead letters and settlements of the forwarder) run
//! in one transaction with one commit, so that one fsync covers all of them and forwarding
//! does not cut ingest's groups short.
//!
//! Each write runs in its own savepoint, in queue order: a write refused on its own (a
//! settlement that does not add up, an append past a limit) is rolled back alone and gets
//! its error, and the others still commit. Every write sees the ones before it. Nothing is
//! answered before the commit (see `super::writer`).
//!
//! A full disk, or a storage error or damaged file met by any write, is the exception: the
//! group is rolled back and its writes run again one by one, each as before in a
//! transaction of its own through `Store::with_room`, so that what such an error does to
//! each of them (the checkpoint and one more try, deliveries going on while appends are
//! refused, the whole run of appends failing, no append once the file is damaged) is what
//! it always was.

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
            Done::Stored | Done::Count(_) => {
                debug_assert!(false, "a lease answered with {self:?}");
                Vec::new()
            }
        }
    }

    pub(super) fn into_count(self) -> u64 {
        match self {
            Done::Count(n) => n,
            Done::Stored | Done::Leased(_) => {
                debug_assert!(false, "a count answered with {self:?}");
                0
            }
        }
    }
}

/// One result per write of a group, in their order.
pub(super) type Results = Vec<Result<Done, SpoolError>>;

/// What a group wrote: one result per write, and how many transactions committed (none when
/// every write was refused before one was opened, several when it ran one by one).
pub(super) struct Written {
    pub(super) results: Results,
    pub(super) commits: u64,
}

/// Why a group's transaction was given up.
enum Abort {
    /// The disk is full, or one write met a storage error or a damaged file: run the writes
    /// one by one, as before groups were shared, so that each fails (or not) as it always
    /// did (the whole run of appends with the error, later appends refused once the file is
    /// known damaged).
    OneByOne(SpoolError),
    /// The transaction itself (its BEGIN, the totals, the COMMIT) failed: every caller gets
    /// the error.
    Fail(SpoolError),
}

/// `base + change`, within `u64`.
fn moved(base: u64, change: i64) -> u64 {
    to_u64(
        i64::try_from(base)
            .unwrap_or(i64::MAX)
            .saturating_add(change),
    )
}

/// Errors that belong to one write alone: a refusal by the limits, a settlement that does
/// not add up, a receipt not understood. Anything of the storage (a full disk, an I/O
/// error, a damaged file) gives up the group.
fn per_write(e: &SpoolError) -> bool {
    !is_disk_full(e) && !matches!(e, SpoolError::Storage(_) | SpoolError::Damaged { .. })
}

impl Store {
    /// Runs `writes` in one transaction, one result per write in their order. The outer
    /// error means the group's transaction failed and none of them was written.
    pub(super) fn write_group(&mut self, writes: &[Write]) -> Result<Written, SpoolError> {
        self.ease_before();
        match self.try_group(writes) {
            Ok((results, commits)) => {
                self.ease_after();
                Ok(Written { results, commits })
            }
            Err(Abort::OneByOne(e) | Abort::Fail(e)) if is_disk_full(&e) => {
                tracing::warn!(
                    writes = writes.len(),
                    "spool file system full in a group commit; running its writes one by one"
                );
                self.checkpoint();
                Ok(self.one_by_one(writes))
            }
            Err(Abort::OneByOne(e)) => {
                tracing::warn!(
                    writes = writes.len(),
                    error = %e,
                    "a write of a group commit failed; running its writes one by one"
                );
                Ok(self.one_by_one(writes))
            }
            Err(Abort::Fail(e)) => Err(self.classify(e)),
        }
    }

    fn try_group(&mut self, writes: &[Write]) -> Result<(Results, u64), Abort> {
        // A group of appends alone is refused before any transaction, as it always was: a
        // damaged file or a disk short of the reserve gets no BEGIN, totals row or fsync.
        let checked = writes.iter().all(|w| matches!(w, Write::Append(_)));
        if checked {
            let incoming = writes
                .iter()
                .map(|w| match w {
                    Write::Append(b) => batch_bytes(b),
                    _ => 0,
                })
                .sum();
            if let Some(refused) = self.refusal(incoming) {
                let results = writes.iter().map(|_| Err(refused.duplicate())).collect();
                return Ok((results, 0));
            }
        }
        self.conn
            .execute_batch("BEGIN IMMEDIATE")
            .map_err(|e| Abort::Fail(storage(e)))?;
        let result = self
            .members(writes, checked)
            .map_err(Abort::OneByOne)
            .and_then(|(results, delta, now)| {
                delta
                    .write(&self.conn, now)
                    .and_then(|()| self.conn.execute_batch("COMMIT"))
                    .map_err(|e| Abort::Fail(storage(e)))?;
                Ok((results, 1))
            });
        if result.is_err() {
            self.rollback();
        }
        result
    }

    /// The writes of the group in the open transaction, each in a savepoint; returns their
    /// results and what the successful ones moved, to be written once. `checked`: the
    /// first run of appends already passed `refusal`. The error means the group must be
    /// given up (see [`Abort::OneByOne`]).
    fn members(
        &mut self,
        writes: &[Write],
        checked: bool,
    ) -> Result<(Results, Delta, i64), SpoolError> {
        let mut total = Delta::default();
        // The limits count what is held as this transaction sees it: the totals row read
        // once here (another process may have changed it), plus what the group moved since.
        let base = if writes.iter().any(|w| matches!(w, Write::Append(_))) {
            self.held()?
        } else {
            (0, 0)
        };
        let mut refusal: Option<Option<SpoolError>> = checked.then_some(None);
        // Bytes appended so far: not committed, so not yet out of `room()`, but they will
        // be on disk with everything after them.
        let mut appended: u64 = 0;
        let mut latest = self.clock.now_ms();
        let mut results = Vec::with_capacity(writes.len());
        for (i, write) in writes.iter().enumerate() {
            let now = self.clock.now_ms();
            latest = latest.max(now);
            let Write::Append(batch) = write else {
                refusal = None;
                let mut delta = Delta::default();
                let result = self.in_savepoint(|s| s.apply(write, now, appended, &mut delta))?;
                if result.is_ok() {
                    total.add(&delta);
                }
                results.push(result);
                continue;
            };
            // A run of appends is refused or not as one, as a group of appends always was,
            // counting what the runs before it in the group appended.
            let refused = refusal.get_or_insert_with(|| {
                let incoming: u64 = writes[i..]
                    .iter()
                    .map_while(|w| match w {
                        Write::Append(b) => Some(batch_bytes(b)),
                        _ => None,
                    })
                    .sum();
                self.refusal(incoming.saturating_add(appended))
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
                appended = appended.saturating_add(batch_bytes(batch));
            }
            results.push(result.map(|()| Done::Stored));
        }
        Ok((results, total, latest))
    }

    /// `appended`: bytes the group appended before this write (see [`Store::lease_in`]).
    fn apply(
        &self,
        write: &Write,
        now: i64,
        appended: u64,
        delta: &mut Delta,
    ) -> Result<Done, SpoolError> {
        match write {
            Write::Append(batch) => self.insert_in(batch, now, delta).map(|()| Done::Stored),
            Write::Lease {
                max_payloads,
                max_bytes,
                lease_for,
            } => self
                .lease_in(*max_payloads, *max_bytes, *lease_for, now, appended)
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

    /// Runs `op` in a savepoint: released if it succeeds, rolled back if it fails with an
    /// error of its own (the inner error, for its caller alone, see `per_write`). The outer
    /// error means the group cannot go on: the savepoint itself failed, SQLite already
    /// rolled the whole transaction back, or `op` met the storage (a full disk, an I/O
    /// error, a damaged file).
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
            Err(e) if !per_write(&e) || self.conn.is_autocommit() => Err(e),
            Err(e) => {
                self.conn
                    .execute_batch("ROLLBACK TO member; RELEASE member")
                    .map_err(storage)?;
                Ok(Err(e))
            }
        }
    }

    /// The writes as they ran before groups were shared: each run of appends in one
    /// transaction, every other write in one of its own, each through `with_room`. Counts as
    /// a commit each transaction that wrote something.
    fn one_by_one(&mut self, writes: &[Write]) -> Written {
        let mut results = Vec::with_capacity(writes.len());
        let mut commits = 0;
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
                    Ok(each) => {
                        if each.iter().any(Result::is_ok) {
                            commits += 1;
                        }
                        results.extend(each.into_iter().map(|r| r.map(|()| Done::Stored)));
                    }
                    Err(e) => results.extend(run.iter().map(|_| Err(e.duplicate()))),
                }
                continue;
            }
            let result = self.one(&writes[i]);
            if result.is_ok() {
                commits += 1;
            }
            results.push(result);
            i += 1;
        }
        Written { results, commits }
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
        let mut results = store.write_group(&writes).unwrap().results.into_iter();
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
        let results = store.write_group(&writes).unwrap().results;
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
        let results = store.write_group(&writes).unwrap().results;
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
            // A receipt of an older lease still acks its row, as alone.
            Write::Ack(vec![(receipt(&held[1].receipt).0, 99)]),
            Write::Append(vec![payload(10)]),
        ];
        let results = store.write_group(&writes).unwrap().results;
        assert!(matches!(results[0], Ok(Done::Count(1))));
        assert!(matches!(results[1], Ok(Done::Count(1))));
        assert!(matches!(results[2], Ok(Done::Stored)));
        let totals = store.totals().unwrap();
        assert_eq!(totals.payloads.dead, 1);
        assert_eq!(totals.payloads.delivered, 1);
        assert_eq!(totals.payloads.pending, 1);
        assert_balanced(&mut store);
    }

    fn is_disk_refusal(r: &Result<Done, SpoolError>) -> bool {
        matches!(r, Err(e) if is_disk_full(e) || matches!(e, SpoolError::Full { reason } if reason.starts_with(crate::sqlite::store::DISK_FULL)))
    }

    #[test]
    fn the_reserve_counts_what_earlier_runs_of_the_group_appended() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(&dir, &SqliteConfig::default());
        let held = leased(&mut store, 1);
        let b = batch_bytes(&[payload(10)]);
        // Room for one run of `b` bytes beside the reserve (twice, for the WAL), not two.
        let room = 1 << 20;
        store.room_override = Some(room);
        store.reserve_bytes = room - 3 * b;
        let writes = vec![
            Write::Append(vec![payload(10)]),
            Write::Ack(vec![receipt(&held[0].receipt)]),
            Write::Append(vec![payload(11)]),
        ];
        let results = store.write_group(&writes).unwrap().results;
        assert!(matches!(results[0], Ok(Done::Stored)), "{:?}", results[0]);
        assert!(matches!(results[1], Ok(Done::Count(1))), "{:?}", results[1]);
        assert!(is_disk_refusal(&results[2]), "{:?}", results[2]);
        assert_eq!(store.totals().unwrap().payloads.pending, 1);
        assert_balanced(&mut store);
    }

    #[test]
    fn a_lease_on_a_low_disk_counts_what_the_group_appended() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(&dir, &SqliteConfig::default());
        for r in store
            .append_group(&[vec![payload(10)], vec![payload(11)]])
            .unwrap()
        {
            r.unwrap();
        }
        let s = batch_bytes(&[payload(10)]);
        let appended = batch_bytes(&[payload(12), payload(13), payload(14), payload(15)]);
        // Low on space (room under four reserves), with just room for the appends: the lease
        // may take a quarter of what is left once they are on disk, 1.5 payloads, so one.
        // Seen without the appends it would be 3.5 payloads.
        store.reserve_bytes = 6 * s;
        store.room_override = Some(6 * s + 2 * appended);
        let writes = vec![
            Write::Append(vec![payload(12), payload(13), payload(14), payload(15)]),
            Write::Lease {
                max_payloads: 10,
                max_bytes: usize::MAX,
                lease_for: LONG,
            },
        ];
        let mut results = store.write_group(&writes).unwrap().results.into_iter();
        assert!(matches!(results.next(), Some(Ok(Done::Stored))));
        let lease = results.next().unwrap().unwrap().into_leased();
        assert_eq!(lease.len(), 1);
        assert_balanced(&mut store);
    }

    #[test]
    fn a_storage_error_of_one_append_fails_its_run_as_before() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(&dir, &SqliteConfig::default());
        let held = leased(&mut store, 1);
        let bad = payload(666);
        store
            .conn
            .execute_batch(
                r#"CREATE TEMP TRIGGER boom BEFORE INSERT ON payloads
                   WHEN NEW.visitors = CAST('{"visitor_id":"v666"}' AS BLOB)
                   BEGIN SELECT RAISE(ABORT, 'boom'); END"#,
            )
            .unwrap();
        let writes = vec![
            Write::Append(vec![payload(10)]),
            Write::Append(vec![bad]),
            Write::Append(vec![payload(11)]),
            Write::Ack(vec![receipt(&held[0].receipt)]),
        ];
        let written = store.write_group(&writes).unwrap();
        let results = &written.results;
        // As one transaction of appends always did: the run fails together, the ack does not.
        for r in &results[..3] {
            assert!(matches!(r, Err(SpoolError::Storage(_))), "{r:?}");
        }
        assert!(matches!(results[3], Ok(Done::Count(1))), "{:?}", results[3]);
        let totals = store.totals().unwrap();
        assert_eq!(totals.payloads.pending, 0);
        assert_eq!(totals.payloads.delivered, 1);
        assert_balanced(&mut store);
    }

    #[test]
    fn refused_appends_alone_open_no_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(&dir, &SqliteConfig::default());
        leased(&mut store, 1);
        store.checkpoint();
        store.damaged = Some("test".to_owned());
        let wal = dir.path().join(format!("{DB_FILE}-wal"));
        let before = std::fs::metadata(&wal).map_or(0, |m| m.len());
        let writes = vec![
            Write::Append(vec![payload(10)]),
            Write::Append(vec![payload(11)]),
        ];
        let written = store.write_group(&writes).unwrap();
        for r in &written.results {
            assert!(matches!(r, Err(SpoolError::Damaged { .. })), "{r:?}");
        }
        assert_eq!(written.commits, 0);
        assert_eq!(std::fs::metadata(&wal).map_or(0, |m| m.len()), before);
    }

    #[test]
    fn a_full_disk_runs_the_group_one_by_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(&dir, &SqliteConfig::default());
        let held = leased(&mut store, 1);
        let pages: i64 = store
            .conn
            .pragma_query_value(None, "page_count", |r| r.get(0))
            .unwrap();
        store
            .conn
            .pragma_update(None, "max_page_count", pages + 1)
            .unwrap();
        let big = Payload {
            visitors: Bytes::from(vec![b'x'; 256 << 10]),
            ..payload(10)
        };
        let writes = vec![
            Write::Append(vec![big]),
            Write::Ack(vec![receipt(&held[0].receipt)]),
        ];
        let written = store.write_group(&writes).unwrap();
        let results = &written.results;
        assert!(
            matches!(&results[0], Err(e) if is_disk_full(e)),
            "{:?}",
            results[0]
        );
        assert!(matches!(results[1], Ok(Done::Count(1))), "{:?}", results[1]);
        assert_eq!(written.commits, 1);
        let totals = store.totals().unwrap();
        assert_eq!(totals.payloads.pending, 0);
        assert_eq!(totals.payloads.delivered, 1);
        assert_balanced(&mut store);
    }

    #[test]
    fn each_run_of_appends_is_refused_on_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(&dir, &SqliteConfig::default());
        let held = leased(&mut store, 1);
        store.reserve_bytes = u64::MAX / 4;
        let writes = vec![
            Write::Append(vec![payload(10)]),
            Write::Ack(vec![receipt(&held[0].receipt)]),
            Write::Append(vec![payload(11)]),
        ];
        let results = store.write_group(&writes).unwrap().results;
        assert!(is_disk_refusal(&results[0]), "{:?}", results[0]);
        assert!(matches!(results[1], Ok(Done::Count(1))), "{:?}", results[1]);
        assert!(is_disk_refusal(&results[2]), "{:?}", results[2]);
        let totals = store.totals().unwrap();
        assert_eq!(totals.payloads.pending, 0);
        assert_eq!(totals.payloads.delivered, 1);
        assert_balanced(&mut store);
    }
}
