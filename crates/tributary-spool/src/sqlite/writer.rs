//! The writer thread: owns the connection, runs the commands in the order they came, and
//! group-commits the writes.
//!
//! Async callers never touch SQLite: they send a [`Command`] over a bounded channel and
//! await a oneshot reply. While the thread is busy committing (an fsync costs milliseconds),
//! commands queue up; the next turn takes every write among them (appends, leases, acks,
//! releases, dead letters, settlements; up to the group bound) into one transaction (see
//! `super::group`), so one fsync covers many requests without any added wait, and the
//! forwarder's writes do not cut ingest's groups short. Any other command ends the group
//! and runs after it, alone. Replies of a group are sent only once it committed.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::dead::DeadChunk;
use super::group::{Done, Write, Written};
use super::store::Store;
use crate::{
    DeadLetter, Leased, PartialSettlement, Payload, SpoolAudit, SpoolError, SpoolStats, SpoolTotals,
};

type Reply<T> = oneshot::Sender<Result<T, SpoolError>>;

/// One request to the writer thread.
pub(super) enum Command {
    Append(Vec<Payload>, Reply<()>),
    Lease {
        max_payloads: usize,
        max_bytes: usize,
        lease_for: Duration,
        reply: Reply<Vec<Leased>>,
    },
    Ack(Vec<(i64, i64)>, Reply<u64>),
    Release(Vec<(i64, i64)>, Duration, Reply<u64>),
    DeadLetter(Vec<(i64, i64)>, String, Reply<u64>),
    Settle(Vec<((i64, i64), PartialSettlement)>, Reply<u64>),
    Stats(Reply<SpoolStats>),
    Totals(Reply<SpoolTotals>),
    Audit(Reply<SpoolAudit>),
    CheckReady(Reply<()>),
    DeadLetters(usize, Reply<Vec<DeadLetter>>),
    DeadLetterSummaries(usize, Reply<Vec<crate::DeadLetterSummary>>),
    Retry(DeadChunk, Reply<u64>),
    Purge(DeadChunk, Reply<u64>),
    Expire {
        after: i64,
        chunk: usize,
        reason: String,
        reply: Reply<(u64, i64, bool)>,
    },
    Close(oneshot::Sender<()>),
}

/// Counters the writer thread keeps, read by [`super::SqliteSpool::counters`].
#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) append_commits: AtomicU64,
    pub(super) write_commits: AtomicU64,
    pub(super) appends: AtomicU64,
    pub(super) appended_payloads: AtomicU64,
    pub(super) full_rejections: AtomicU64,
}

/// Bounds on one group commit.
#[derive(Debug, Clone, Copy)]
pub(super) struct GroupBound {
    pub(super) payloads: usize,
    pub(super) bytes: usize,
}

/// Where the result of one write of a group goes.
enum Waiter {
    Stored(Reply<()>),
    Leased(Reply<Vec<Leased>>),
    Count(Reply<u64>),
}

impl Waiter {
    fn send(self, result: Result<Done, SpoolError>) {
        // The caller may have gone (client disconnected); what it asked for stays done.
        match self {
            Waiter::Stored(r) => {
                let _ = r.send(result.map(|_| ()));
            }
            Waiter::Leased(r) => {
                let _ = r.send(result.map(Done::into_leased));
            }
            Waiter::Count(r) => {
                let _ = r.send(result.map(Done::into_count));
            }
        }
    }
}

/// The write of a command and where its result goes, or the command itself if it is not a
/// write that can share a group.
fn as_write(command: Command) -> Result<(Write, Waiter), Command> {
    Ok(match command {
        Command::Append(batch, reply) => (Write::Append(batch), Waiter::Stored(reply)),
        Command::Lease {
            max_payloads,
            max_bytes,
            lease_for,
            reply,
        } => (
            Write::Lease {
                max_payloads,
                max_bytes,
                lease_for,
            },
            Waiter::Leased(reply),
        ),
        Command::Ack(receipts, reply) => (Write::Ack(receipts), Waiter::Count(reply)),
        Command::Release(receipts, delay, reply) => {
            (Write::Release(receipts, delay), Waiter::Count(reply))
        }
        Command::DeadLetter(receipts, reason, reply) => {
            (Write::DeadLetter(receipts, reason), Waiter::Count(reply))
        }
        Command::Settle(parts, reply) => (Write::Settle(parts), Waiter::Count(reply)),
        other => return Err(other),
    })
}

/// The thread body. Returns when the channel closes (every handle dropped) or on `Close`;
/// the connection closes when `store` drops, which also checkpoints the WAL.
pub(super) fn run(
    mut store: Store,
    mut rx: mpsc::Receiver<Command>,
    bound: GroupBound,
    counters: Arc<Counters>,
) {
    let mut next: Option<Command> = None;
    loop {
        let command = match next.take() {
            Some(c) => c,
            None => match rx.blocking_recv() {
                Some(c) => c,
                None => break,
            },
        };
        let first = match as_write(command) {
            Ok(first) => first,
            Err(other) => {
                if let Some(closed) = run_alone(&mut store, other, &counters) {
                    drop(store);
                    log_counters(&counters);
                    let _ = closed.send(());
                    return;
                }
                continue;
            }
        };
        let mut group = Vec::new();
        let (mut payloads, mut bytes) = (0usize, 0usize);
        let mut add = |(write, waiter): (Write, Waiter), group: &mut Vec<(Write, Waiter)>| {
            if let Write::Append(batch) = &write {
                payloads += batch.len();
                bytes += batch.iter().map(Payload::stored_len).sum::<usize>();
            }
            group.push((write, waiter));
            // One bound for the whole group: what it appends, and how many writes it holds.
            payloads.max(group.len()) < bound.payloads && bytes < bound.bytes
        };
        let mut room = add(first, &mut group);
        while room {
            match rx.try_recv() {
                Ok(command) => match as_write(command) {
                    Ok(write) => room = add(write, &mut group),
                    // Keep the order: anything else runs right after this group.
                    Err(other) => {
                        next = Some(other);
                        break;
                    }
                },
                Err(_) => break,
            }
        }
        commit_group(&mut store, group, &counters);
    }
    log_counters(&counters);
}

/// How well the groups shared their commits, once the spool closes (for benchmarks).
fn log_counters(c: &Counters) {
    tracing::debug!(
        write_commits = c.write_commits.load(Ordering::Relaxed),
        append_commits = c.append_commits.load(Ordering::Relaxed),
        appends = c.appends.load(Ordering::Relaxed),
        appended_payloads = c.appended_payloads.load(Ordering::Relaxed),
        "spool writer closed"
    );
}

/// Runs a command that does not share a group. Returns the reply of `Close`, which the
/// caller sends once the connection is closed.
fn run_alone(
    store: &mut Store,
    command: Command,
    counters: &Counters,
) -> Option<oneshot::Sender<()>> {
    match command {
        Command::Stats(reply) => {
            let _ = reply.send(store.stats());
        }
        Command::Totals(reply) => {
            let _ = reply.send(store.totals());
        }
        Command::Audit(reply) => {
            let _ = reply.send(store.audit());
        }
        Command::CheckReady(reply) => {
            let _ = reply.send(store.check_ready());
        }
        Command::DeadLetters(limit, reply) => {
            let _ = reply.send(store.dead_letters(limit));
        }
        Command::DeadLetterSummaries(limit, reply) => {
            let _ = reply.send(store.dead_letter_summaries(limit));
        }
        Command::Retry(which, reply) => {
            let _ = reply.send(store.with_room(|s| s.retry_dead(&which)));
        }
        Command::Purge(which, reply) => {
            let _ = reply.send(store.with_room(|s| s.purge_dead(&which)));
        }
        Command::Expire {
            after,
            chunk,
            reason,
            reply,
        } => {
            let _ = reply.send(store.with_room(|s| s.expire_chunk(after, chunk, &reason)));
        }
        Command::Close(reply) => return Some(reply),
        // Writes come here only if a caller passes one by mistake: a group of one.
        write => {
            if let Ok(write) = as_write(write) {
                commit_group(store, vec![write], counters);
            }
        }
    }
    None
}

/// Commits one group and answers its callers, only once it is on disk.
fn commit_group(store: &mut Store, group: Vec<(Write, Waiter)>, counters: &Counters) {
    let (writes, waiters): (Vec<Write>, Vec<Waiter>) = group.into_iter().unzip();
    match store.write_group(&writes) {
        Ok(Written { results, commits }) => {
            counters.write_commits.fetch_add(commits, Ordering::Relaxed);
            if commits > 0 && writes.iter().any(|w| matches!(w, Write::Append(_))) {
                counters.append_commits.fetch_add(1, Ordering::Relaxed);
            }
            for ((result, waiter), write) in results.into_iter().zip(waiters).zip(&writes) {
                if let Write::Append(batch) = write {
                    match &result {
                        Ok(_) => {
                            counters.appends.fetch_add(1, Ordering::Relaxed);
                            counters
                                .appended_payloads
                                .fetch_add(batch.len() as u64, Ordering::Relaxed);
                        }
                        Err(_) => {
                            counters.full_rejections.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                waiter.send(result);
            }
        }
        Err(e) => {
            tracing::error!(error = %e, writes = waiters.len(), "spool write transaction failed");
            for waiter in waiters {
                waiter.send(Err(e.duplicate()));
            }
        }
    }
}
