//! The writer thread: owns the connection, runs one command at a time, and group-commits
//! appends.
//!
//! Async callers never touch SQLite: they send a [`Command`] over a bounded channel and
//! await a oneshot reply. While the thread is busy committing (an fsync costs milliseconds),
//! appends queue up; the next turn takes all of them (up to the group bound) into one
//! transaction, so one fsync covers many requests without any added wait.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::codec::StoredPayload;
use super::dead::DeadChunk;
use super::payloads::LeasedRow;
use super::store::Store;
use crate::{DeadLetter, PartialSettlement, SpoolAudit, SpoolError, SpoolStats, SpoolTotals};

type Reply<T> = oneshot::Sender<Result<T, SpoolError>>;

/// One request to the writer thread.
pub(super) enum Command {
    Append(Vec<StoredPayload>, Reply<()>),
    Lease {
        max_payloads: usize,
        max_bytes: usize,
        lease_for: Duration,
        reply: Reply<Vec<LeasedRow>>,
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
        match command {
            Command::Append(first, reply) => {
                let mut payloads = first.len();
                let mut bytes: usize = first.iter().map(|p| p.len).sum();
                let mut batches = vec![first];
                let mut replies = vec![reply];
                while payloads < bound.payloads && bytes < bound.bytes {
                    match rx.try_recv() {
                        Ok(Command::Append(more, reply)) => {
                            payloads += more.len();
                            bytes += more.iter().map(|p| p.len).sum::<usize>();
                            batches.push(more);
                            replies.push(reply);
                        }
                        // Keep the order: anything else runs right after this group.
                        Ok(other) => {
                            next = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                commit_group(&mut store, &batches, replies, &counters);
            }
            Command::Lease {
                max_payloads,
                max_bytes,
                lease_for,
                reply,
            } => {
                let _ =
                    reply.send(store.with_room(|s| s.lease(max_payloads, max_bytes, lease_for)));
            }
            Command::Ack(receipts, reply) => {
                let _ = reply.send(store.with_room_chunked(&receipts, |s, r| s.ack(r)));
            }
            Command::Release(receipts, delay, reply) => {
                let _ = reply.send(store.with_room_chunked(&receipts, |s, r| s.release(r, delay)));
            }
            Command::DeadLetter(receipts, reason, reply) => {
                let _ = reply
                    .send(store.with_room_chunked(&receipts, |s, r| s.dead_letter(r, &reason)));
            }
            Command::Settle(parts, reply) => {
                let _ = reply.send(store.with_room_chunked(&parts, |s, p| s.settle_parts(p)));
            }
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
            Command::Close(reply) => {
                drop(store);
                let _ = reply.send(());
                return;
            }
        }
    }
}

fn commit_group(
    store: &mut Store,
    batches: &[Vec<StoredPayload>],
    replies: Vec<oneshot::Sender<Result<(), SpoolError>>>,
    counters: &Counters,
) {
    match store.with_room(|s| s.append_group(batches)) {
        Ok(results) => {
            counters.append_commits.fetch_add(1, Ordering::Relaxed);
            for ((result, reply), batch) in results.into_iter().zip(replies).zip(batches) {
                match &result {
                    Ok(()) => {
                        counters.appends.fetch_add(1, Ordering::Relaxed);
                        counters
                            .appended_payloads
                            .fetch_add(batch.len() as u64, Ordering::Relaxed);
                    }
                    Err(_) => {
                        counters.full_rejections.fetch_add(1, Ordering::Relaxed);
                    }
                }
                // The caller may have gone (client disconnected); the payload stays stored.
                let _ = reply.send(result);
            }
        }
        Err(e) => {
            tracing::error!(error = %e, appends = replies.len(), "spool append transaction failed");
            for reply in replies {
                let _ = reply.send(Err(e.duplicate()));
            }
        }
    }
}
