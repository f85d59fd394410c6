//! [`TrackedSpool`]: scheduled mode's spool wrapper, which settles every lease before the
//! invocation answers.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::Notify;
use tributary_spool::{
    DeadLetter, DeadLetterSummary, Leased, PartialSettlement, Payload, Receipt, Selection, Spool,
    SpoolError, SpoolStats,
};

use super::lock;

/// A spool that remembers every lease until it is settled, with receives that finish even
/// when the forwarder abandons them at the deadline (their task runs on). After the drain,
/// [`TrackedSpool::settle_leftovers`] releases what no one settled: the messages of a
/// receive that completed after the forwarder stopped waiting, which the forwarder never
/// saw and so could not release.
pub(super) struct TrackedSpool {
    inner: Arc<dyn Spool>,
    held: Arc<Mutex<std::collections::HashSet<Receipt>>>,
    receiving: Arc<(AtomicUsize, Notify)>,
    /// Payloads acked (deleted) since the last [`TrackedSpool::take_acked`]: unlike the
    /// forwarder's summary, this counts the cycle the deadline cut short too.
    acked: AtomicU64,
}

impl TrackedSpool {
    pub(super) fn new(inner: Arc<dyn Spool>) -> TrackedSpool {
        TrackedSpool {
            inner,
            held: Arc::default(),
            receiving: Arc::new((AtomicUsize::new(0), Notify::new())),
            acked: AtomicU64::new(0),
        }
    }

    pub(super) fn take_acked(&self) -> u64 {
        self.acked.swap(0, Ordering::SeqCst)
    }

    fn forget(&self, receipts: &[Receipt]) {
        let mut held = lock(&self.held);
        for r in receipts {
            held.remove(r);
        }
    }

    /// Waits (until `wait_until`) for receives still running, then releases every lease not
    /// settled and what the spool received but never handed out (its stash). The release
    /// calls are cut off at `give_up`, so the invocation still answers in time; what they
    /// could not release comes back when its lease runs out.
    pub(super) async fn settle_leftovers(
        &self,
        wait_until: Instant,
        give_up: Instant,
    ) -> Result<u64, SpoolError> {
        let (count, done) = &*self.receiving;
        let _ = tokio::time::timeout_at(wait_until.into(), async {
            loop {
                let notified = done.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if count.load(Ordering::SeqCst) == 0 {
                    return;
                }
                notified.await;
            }
        })
        .await;
        let left: Vec<Receipt> = lock(&self.held).drain().collect();
        let release = async {
            if !left.is_empty() {
                tracing::info!(
                    payloads = left.len(),
                    "releasing leases of a receive that ended at the deadline"
                );
                self.inner.release(&left, Duration::ZERO).await?;
            }
            let unhanded = self.inner.release_unhanded().await?;
            Ok::<u64, SpoolError>(left.len() as u64 + unhanded)
        };
        tokio::time::timeout_at(give_up.into(), release)
            .await
            .unwrap_or_else(|_| {
                Err(SpoolError::Storage(
                    "releasing leftover leases did not finish before the deadline".to_owned(),
                ))
            })
    }
}

#[async_trait]
impl Spool for TrackedSpool {
    async fn append(&self, payloads: Vec<Payload>) -> Result<(), SpoolError> {
        self.inner.append(payloads).await
    }

    async fn lease(
        &self,
        max_payloads: usize,
        max_bytes: usize,
        lease_for: Duration,
    ) -> Result<Vec<Leased>, SpoolError> {
        let inner = self.inner.clone();
        let held = self.held.clone();
        let receiving = self.receiving.clone();
        receiving.0.fetch_add(1, Ordering::SeqCst);
        // Spawned: dropping this future (the deadline) does not cut the receive short
        // between SQS hiding the messages and their receipts being recorded.
        let task = tokio::spawn(async move {
            let result = inner.lease(max_payloads, max_bytes, lease_for).await;
            if let Ok(leased) = &result {
                lock(&held).extend(leased.iter().map(|l| l.receipt.clone()));
            }
            receiving.0.fetch_sub(1, Ordering::SeqCst);
            receiving.1.notify_waiters();
            result
        });
        task.await
            .map_err(|e| SpoolError::Storage(format!("receive task failed: {e}")))?
    }

    async fn ack(&self, receipts: &[Receipt]) -> Result<(), SpoolError> {
        self.inner.ack(receipts).await?;
        self.acked
            .fetch_add(receipts.len() as u64, Ordering::SeqCst);
        self.forget(receipts);
        Ok(())
    }

    async fn release(&self, receipts: &[Receipt], delay: Duration) -> Result<(), SpoolError> {
        self.inner.release(receipts, delay).await?;
        self.forget(receipts);
        Ok(())
    }

    async fn dead_letter(&self, receipts: &[Receipt], reason: &str) -> Result<(), SpoolError> {
        self.inner.dead_letter(receipts, reason).await?;
        self.forget(receipts);
        Ok(())
    }

    async fn settle_parts(&self, parts: Vec<PartialSettlement>) -> Result<(), SpoolError> {
        let receipts: Vec<Receipt> = parts.iter().map(|p| p.receipt.clone()).collect();
        self.inner.settle_parts(parts).await?;
        self.forget(&receipts);
        Ok(())
    }

    async fn stats(&self) -> Result<SpoolStats, SpoolError> {
        self.inner.stats().await
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, SpoolError> {
        self.inner.dead_letters(limit).await
    }

    async fn dead_letter_summaries(
        &self,
        limit: usize,
    ) -> Result<Option<Vec<DeadLetterSummary>>, SpoolError> {
        self.inner.dead_letter_summaries(limit).await
    }

    async fn release_unhanded(&self) -> Result<u64, SpoolError> {
        self.inner.release_unhanded().await
    }

    async fn retry_dead_letters(&self, which: Selection) -> Result<u64, SpoolError> {
        self.inner.retry_dead_letters(which).await
    }

    async fn purge_dead_letters(&self, which: Selection) -> Result<u64, SpoolError> {
        self.inner.purge_dead_letters(which).await
    }
}
