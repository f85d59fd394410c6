//! SQS-trigger mode: the event an event source mapping sends, the `batchItemFailures`
//! answer, and [`InvocationSpool`], the invocation's messages as a spool the forwarder drains.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tributary::RawBatch;
use tributary_spool::forward::ForwardSummary;
use tributary_spool::{
    DeadLetter, Leased, PartialSettlement, Payload, Receipt, Selection, Spool, SpoolError,
    SpoolStats,
};

use super::{ROUTE_ATTRIBUTE, lock, now_ms};

/// The event an SQS event source mapping sends (the fields used).
#[derive(Debug, serde::Deserialize)]
pub struct SqsEvent {
    /// The messages.
    #[serde(rename = "Records", default)]
    pub records: Vec<SqsRecord>,
}

/// One message of an [`SqsEvent`].
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SqsRecord {
    /// What `batchItemFailures` names it by.
    pub message_id: String,
    /// The message body: an Event API payload, as the SQS spool wrote it.
    #[serde(default)]
    pub body: String,
    /// Message attributes (the spool's `route`).
    #[serde(default)]
    pub message_attributes: HashMap<String, SqsAttribute>,
    /// System attributes (`ApproximateReceiveCount`, `SentTimestamp`).
    #[serde(default)]
    pub attributes: HashMap<String, String>,
}

/// A message attribute of an [`SqsRecord`].
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SqsAttribute {
    /// Its value, for `String` and `Number` attributes.
    pub string_value: Option<String>,
}

/// The answer to an SQS event: the messages SQS must deliver again.
#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BatchResponse {
    /// The messages not delivered.
    pub batch_item_failures: Vec<BatchItemFailure>,
    /// What the forwarder did (ignored by Lambda; in the function's logs and test output).
    pub summary: ForwardSummary,
}

/// One entry of `batchItemFailures`.
#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BatchItemFailure {
    /// The `messageId` of the record.
    pub item_identifier: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ItemState {
    Visible,
    Leased,
    Delivered,
    Failed,
}

struct Item {
    message_id: String,
    leased: Leased,
    state: ItemState,
}

/// The messages of one SQS-triggered invocation as a spool the forwarder can drain: each is
/// handed out once; an ack delivers it; a release, a dead letter or a partial settlement
/// fails it (SQS delivers it again, or moves it to the dead-letter queue).
pub(super) struct InvocationSpool {
    items: Mutex<Vec<Item>>,
}

impl InvocationSpool {
    /// The spool, and the ids of records whose body is not an Event API payload (failed at
    /// once: their redrive policy takes them to the dead-letter queue).
    pub(super) fn from_records(records: Vec<SqsRecord>) -> (InvocationSpool, Vec<String>) {
        let mut items = Vec::with_capacity(records.len());
        let mut unreadable = Vec::new();
        for (i, r) in records.into_iter().enumerate() {
            let route = r
                .message_attributes
                .get(ROUTE_ATTRIBUTE)
                .and_then(|a| a.string_value.clone())
                .unwrap_or_else(|| "us".to_owned());
            match RawBatch::parse(Bytes::from(r.body.into_bytes())) {
                Ok(batch) => {
                    let attempts = r
                        .attributes
                        .get("ApproximateReceiveCount")
                        .and_then(|n| n.parse::<u32>().ok())
                        .unwrap_or(1)
                        .saturating_sub(1);
                    let appended_at_ms = r
                        .attributes
                        .get("SentTimestamp")
                        .and_then(|n| n.parse().ok())
                        .unwrap_or_else(now_ms);
                    items.push(Item {
                        leased: Leased {
                            receipt: Receipt(i.to_string()),
                            payload: Payload::from_batch(route.as_str(), &batch),
                            attempts,
                            appended_at_ms,
                        },
                        message_id: r.message_id,
                        state: ItemState::Visible,
                    });
                }
                Err(e) => {
                    tracing::warn!(message_id = %r.message_id, error = %e, "SQS message is not an Event API payload");
                    unreadable.push(r.message_id);
                }
            }
        }
        (
            InvocationSpool {
                items: Mutex::new(items),
            },
            unreadable,
        )
    }

    fn items(&self) -> std::sync::MutexGuard<'_, Vec<Item>> {
        lock(&self.items)
    }

    fn set(&self, receipts: &[Receipt], from: &[ItemState], to: ItemState) {
        let mut items = self.items();
        for r in receipts {
            if let Some(item) = items.iter_mut().find(|i| &i.leased.receipt == r)
                && from.contains(&item.state)
            {
                item.state = to;
            }
        }
    }

    /// Every message not delivered (failed, or never sent before the deadline).
    pub(super) fn undelivered(&self) -> Vec<String> {
        self.items()
            .iter()
            .filter(|i| i.state != ItemState::Delivered)
            .map(|i| i.message_id.clone())
            .collect()
    }
}

#[async_trait]
impl Spool for InvocationSpool {
    async fn append(&self, _payloads: Vec<Payload>) -> Result<(), SpoolError> {
        Err(SpoolError::Unsupported(
            "an SQS-triggered invocation only forwards".to_owned(),
        ))
    }

    async fn lease(
        &self,
        max_payloads: usize,
        max_bytes: usize,
        _lease_for: Duration,
    ) -> Result<Vec<Leased>, SpoolError> {
        let mut items = self.items();
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for item in items.iter_mut().filter(|i| i.state == ItemState::Visible) {
            let size = item.leased.payload.stored_len();
            if out.len() >= max_payloads || (!out.is_empty() && bytes + size > max_bytes) {
                break;
            }
            bytes += size;
            item.state = ItemState::Leased;
            out.push(item.leased.clone());
        }
        Ok(out)
    }

    async fn ack(&self, receipts: &[Receipt]) -> Result<(), SpoolError> {
        self.set(receipts, &[ItemState::Leased], ItemState::Delivered);
        Ok(())
    }

    async fn release(&self, receipts: &[Receipt], _delay: Duration) -> Result<(), SpoolError> {
        // Not visible again in this invocation: SQS redelivers it after its visibility timeout.
        self.set(receipts, &[ItemState::Leased], ItemState::Failed);
        Ok(())
    }

    async fn dead_letter(&self, receipts: &[Receipt], reason: &str) -> Result<(), SpoolError> {
        tracing::warn!(
            messages = receipts.len(),
            reason,
            "refused by the upstream; reported failed for the queue's redrive policy"
        );
        self.set(receipts, &[ItemState::Leased], ItemState::Failed);
        Ok(())
    }

    async fn settle_parts(&self, parts: Vec<PartialSettlement>) -> Result<(), SpoolError> {
        for part in parts {
            let whole = part.dead.is_empty() && part.remainder.is_none();
            let to = if whole {
                ItemState::Delivered
            } else {
                ItemState::Failed
            };
            self.set(&[part.receipt], &[ItemState::Leased], to);
        }
        Ok(())
    }

    async fn stats(&self) -> Result<SpoolStats, SpoolError> {
        let items = self.items();
        let open = items
            .iter()
            .filter(|i| matches!(i.state, ItemState::Visible | ItemState::Leased));
        let mut s = SpoolStats::default();
        for i in open {
            s.pending += 1;
            s.pending_bytes += i.leased.payload.stored_len() as u64;
            s.pending_events += u64::from(i.leased.payload.visitor_count);
            s.leased += u64::from(i.state == ItemState::Leased);
        }
        Ok(s)
    }

    async fn dead_letters(&self, _limit: usize) -> Result<Vec<DeadLetter>, SpoolError> {
        Ok(Vec::new())
    }

    async fn retry_dead_letters(&self, _which: Selection) -> Result<u64, SpoolError> {
        Ok(0)
    }

    async fn purge_dead_letters(&self, _which: Selection) -> Result<u64, SpoolError> {
        Ok(0)
    }
}
