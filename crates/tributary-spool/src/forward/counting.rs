//! Tests' spool: a real SQLite spool that records every lease, ack and release the
//! forwarder sends it, and can fail one lease, so tests can see how the forwarder cuts its
//! work into turns.
#![allow(clippy::unwrap_used)]

use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::{
    DeadLetter, Leased, PartialSettlement, Payload, Receipt, Selection, Spool, SpoolError,
    SpoolStats, SqliteConfig, SqliteSpool,
};

/// One command the forwarder sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Call {
    /// `lease(_, max_bytes, _)` and the stored bytes it handed out.
    Lease { max_bytes: usize, got_bytes: usize },
    /// `ack` of this many receipts.
    Ack(usize),
    /// `release` of this many receipts.
    Release(usize),
}

pub(crate) struct CountingSpool {
    pub(crate) inner: SqliteSpool,
    pub(crate) calls: Mutex<Vec<Call>>,
    /// The 1-based lease call that fails with a storage error.
    pub(crate) fail_lease: Option<usize>,
    _dir: tempfile::TempDir,
}

impl CountingSpool {
    /// An empty spool in a temporary directory.
    pub(crate) fn open(fail_lease: Option<usize>) -> CountingSpool {
        let dir = tempfile::tempdir().unwrap();
        let inner = SqliteSpool::open(dir.path(), SqliteConfig::default()).unwrap();
        CountingSpool {
            inner,
            calls: Mutex::default(),
            fail_lease,
            _dir: dir,
        }
    }

    pub(crate) fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    pub(crate) fn leases(&self) -> Vec<(usize, usize)> {
        self.calls()
            .into_iter()
            .filter_map(|c| match c {
                Call::Lease {
                    max_bytes,
                    got_bytes,
                } => Some((max_bytes, got_bytes)),
                _ => None,
            })
            .collect()
    }
}

/// A US payload of one visitor whose stored size is about `bytes`.
pub(crate) fn payload(bytes: usize) -> Payload {
    Payload {
        route: crate::Route::US,
        header: Bytes::from_static(br#""account_id":"1""#),
        visitors: Bytes::from(vec![b' '; bytes]),
        visitor_count: 1,
    }
}

#[async_trait]
impl Spool for CountingSpool {
    async fn append(&self, payloads: Vec<Payload>) -> Result<(), SpoolError> {
        self.inner.append(payloads).await
    }
    async fn lease(
        &self,
        max_payloads: usize,
        max_bytes: usize,
        lease_for: Duration,
    ) -> Result<Vec<Leased>, SpoolError> {
        let n = {
            let calls = self.calls.lock().unwrap();
            calls
                .iter()
                .filter(|c| matches!(c, Call::Lease { .. }))
                .count()
                + 1
        };
        if self.fail_lease == Some(n) {
            self.calls.lock().unwrap().push(Call::Lease {
                max_bytes,
                got_bytes: 0,
            });
            return Err(SpoolError::Storage("lease failed on purpose".into()));
        }
        let got = self.inner.lease(max_payloads, max_bytes, lease_for).await?;
        let got_bytes = got.iter().map(|l| l.payload.stored_len()).sum();
        self.calls.lock().unwrap().push(Call::Lease {
            max_bytes,
            got_bytes,
        });
        Ok(got)
    }
    async fn ack(&self, receipts: &[Receipt]) -> Result<(), SpoolError> {
        self.calls.lock().unwrap().push(Call::Ack(receipts.len()));
        self.inner.ack(receipts).await
    }
    async fn release(&self, receipts: &[Receipt], delay: Duration) -> Result<(), SpoolError> {
        self.calls
            .lock()
            .unwrap()
            .push(Call::Release(receipts.len()));
        self.inner.release(receipts, delay).await
    }
    async fn dead_letter(&self, receipts: &[Receipt], reason: &str) -> Result<(), SpoolError> {
        self.inner.dead_letter(receipts, reason).await
    }
    async fn settle_parts(&self, parts: Vec<PartialSettlement>) -> Result<(), SpoolError> {
        self.inner.settle_parts(parts).await
    }
    async fn stats(&self) -> Result<SpoolStats, SpoolError> {
        self.inner.stats().await
    }
    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, SpoolError> {
        self.inner.dead_letters(limit).await
    }
    async fn retry_dead_letters(&self, which: Selection) -> Result<u64, SpoolError> {
        self.inner.retry_dead_letters(which).await
    }
    async fn purge_dead_letters(&self, which: Selection) -> Result<u64, SpoolError> {
        self.inner.purge_dead_letters(which).await
    }
}
