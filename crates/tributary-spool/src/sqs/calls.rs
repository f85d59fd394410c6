//! The batch calls (`SendMessageBatch`, `DeleteMessageBatch`, `ChangeMessageVisibilityBatch`)
//! with what SQS makes the caller do: at most 10 entries and a byte limit per call, and
//! entries that fail on their own while the call succeeds.
//!
//! Each operation packs its entries into calls, runs up to `concurrency` calls at once, and
//! retries the entries that failed for a reason that may pass (`SenderFault = false`, or the
//! whole call failed after the SDK's own retries) up to `attempts` times with a growing
//! pause. Entries SQS refuses as the sender's fault are not retried.

use std::time::Duration;

use aws_sdk_sqs::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_sqs::types::{
    BatchResultErrorEntry, ChangeMessageVisibilityBatchRequestEntry, DeleteMessageBatchRequestEntry,
};
use tokio::task::JoinSet;
use tributary::retry::{Jitter, RetryPolicy};

use super::Inner;
use super::message::Outgoing;
use crate::SpoolError;
use crate::sqs::sdk_error;

/// Most entries SQS takes in one batch call.
const MAX_ENTRIES: usize = 10;

/// Error code of a receipt handle that no longer names a lease: the message was deleted,
/// or its visibility ran out and someone else received it.
const INVALID_RECEIPT: &str = "ReceiptHandleIsInvalid";

/// The pause before retrying entries after failed round `n` (1-based): from 50 ms, doubled,
/// at most 1.6 s, with equal jitter so that forwarders retrying together spread out.
fn pause_policy() -> RetryPolicy {
    RetryPolicy {
        initial_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(1600),
        multiplier: 2.0,
        jitter: Jitter::Equal,
        ..RetryPolicy::default()
    }
}

/// What became of one call's entries: indices (into the call's items) to retry, and a
/// permanent failure, if any.
struct CallOutcome {
    retry: Vec<usize>,
    refused: Option<String>,
}

impl CallOutcome {
    /// Sorts the failed entries of a call whose entry ids are indices.
    fn from_failed(failed: &[BatchResultErrorEntry], what: &str) -> Self {
        let mut out = CallOutcome {
            retry: Vec::new(),
            refused: None,
        };
        for f in failed {
            let Ok(i) = f.id().parse::<usize>() else {
                continue;
            };
            if f.code() == INVALID_RECEIPT {
                // Gone or re-leased: nothing to do, and retrying cannot help.
                tracing::debug!(what, "stale SQS receipt handle skipped");
            } else if f.sender_fault() {
                out.refused = Some(format!(
                    "SQS refused {what}: {}: {}",
                    f.code(),
                    f.message().unwrap_or_default()
                ));
            } else {
                out.retry.push(i);
            }
        }
        out
    }
}

/// What an entry SQS refuses as the sender's fault does to the operation.
#[derive(Debug, Clone, Copy)]
enum Refusal {
    /// The operation fails (a message that cannot be stored).
    Fails,
    /// Logged and skipped (a visibility change: the lease runs out by itself).
    Logged,
}

/// A whole call that failed, after the SDK's own retries.
pub(super) struct CallError {
    error: SpoolError,
    /// SQS refused the request itself (bad parameter, ...): retrying cannot help.
    sender_fault: bool,
}

impl CallError {
    fn new<E>(what: &str, e: SdkError<E>) -> Self
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let status = e.raw_response().map(|r| r.status().as_u16()).unwrap_or(0);
        let throttled = e.code().is_some_and(|c| c.contains("Throttl")) || status == 429;
        let sender_fault =
            e.as_service_error().is_some() && (400..500).contains(&status) && !throttled;
        CallError {
            error: sdk_error(what, e),
            sender_fault,
        }
    }

    fn local(error: SpoolError) -> Self {
        CallError {
            error,
            sender_fault: true,
        }
    }
}

/// Runs `call` over `items` in groups made by `pack`, with retries (see the module docs).
async fn run_batched<T, F, Fut>(
    inner: &Inner,
    what: &'static str,
    refusal: Refusal,
    mut items: Vec<T>,
    pack: impl Fn(&[T]) -> Vec<std::ops::Range<usize>>,
    call: F,
) -> Result<(), SpoolError>
where
    T: Clone + Send + 'static,
    F: Fn(Vec<T>) -> Fut,
    Fut: std::future::Future<Output = (Vec<T>, Result<CallOutcome, CallError>)> + Send + 'static,
{
    let mut last_error = None;
    for attempt in 1..=inner.config.attempts {
        if items.is_empty() {
            return Ok(());
        }
        if attempt > 1 {
            let pause = pause_policy().backoff(attempt - 1, &mut rand::rng());
            tokio::time::sleep(pause).await;
            tracing::debug!(
                what,
                entries = items.len(),
                attempt,
                "retrying SQS batch entries"
            );
        }
        let mut pending = pack(&items)
            .into_iter()
            .map(|r| items[r].to_vec())
            .collect::<Vec<_>>()
            .into_iter();
        let mut tasks = JoinSet::new();
        let mut retry = Vec::new();
        loop {
            while tasks.len() < inner.config.concurrency {
                let Some(group) = pending.next() else { break };
                tasks.spawn(call(group));
            }
            let Some(done) = tasks.join_next().await else {
                break;
            };
            let (group, result) =
                done.map_err(|e| SpoolError::Storage(format!("an SQS {what} task failed: {e}")))?;
            let refused = match result {
                Ok(outcome) => {
                    retry.extend(
                        outcome
                            .retry
                            .into_iter()
                            .filter_map(|i| group.get(i).cloned()),
                    );
                    outcome.refused.map(SpoolError::Storage)
                }
                Err(CallError {
                    error,
                    sender_fault: true,
                }) => Some(error),
                Err(CallError {
                    error,
                    sender_fault: false,
                }) => {
                    tracing::warn!(what, error = %error, "SQS batch call failed");
                    last_error = Some(error);
                    retry.extend(group);
                    None
                }
            };
            if let Some(refused) = refused {
                match refusal {
                    Refusal::Fails => return Err(refused),
                    Refusal::Logged => tracing::warn!(
                        error = %refused,
                        "SQS refused a visibility change; the lease will run out instead"
                    ),
                }
            }
        }
        items = retry;
    }
    if items.is_empty() {
        return Ok(());
    }
    Err(last_error.unwrap_or_else(|| {
        SpoolError::Storage(format!(
            "SQS {what}: {} entries still failing after {} attempts",
            items.len(),
            inner.config.attempts
        ))
    }))
}

/// Groups of at most 10 items whose sizes add up to at most `max_bytes` (an item larger
/// than that alone gets a group of its own, and SQS decides).
fn pack_by_size(
    sizes: impl Iterator<Item = usize>,
    max_bytes: usize,
) -> Vec<std::ops::Range<usize>> {
    let mut groups = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    let mut end = 0;
    for size in sizes {
        if end > start && (end - start == MAX_ENTRIES || bytes + size > max_bytes) {
            groups.push(start..end);
            (start, bytes) = (end, 0);
        }
        bytes += size;
        end += 1;
    }
    if end > start {
        groups.push(start..end);
    }
    groups
}

fn pack_by_count<T>(items: &[T]) -> Vec<std::ops::Range<usize>> {
    (0..items.len())
        .step_by(MAX_ENTRIES)
        .map(|s| s..(s + MAX_ENTRIES).min(items.len()))
        .collect()
}

/// Stores `messages` in the queue at `url`: `Ok` once SQS has every one of them.
pub(super) async fn send(
    inner: &Inner,
    url: &str,
    messages: Vec<Outgoing>,
) -> Result<(), SpoolError> {
    let max_bytes = inner.config.max_message_bytes;
    run_batched(
        inner,
        "SendMessageBatch",
        Refusal::Fails,
        messages,
        |items| pack_by_size(items.iter().map(Outgoing::size), max_bytes),
        |group| {
            let client = inner.client.clone();
            let url = url.to_owned();
            async move {
                let entries: Result<Vec<_>, _> =
                    group.iter().enumerate().map(|(i, m)| m.entry(i)).collect();
                let result = match entries {
                    Err(e) => Err(CallError::local(e)),
                    Ok(entries) => client
                        .send_message_batch()
                        .queue_url(url)
                        .set_entries(Some(entries))
                        .send()
                        .await
                        .map(|out| CallOutcome::from_failed(out.failed(), "a message"))
                        .map_err(|e| CallError::new("SendMessageBatch", e)),
                };
                (group, result)
            }
        },
    )
    .await
}

/// Deletes the messages of `receipts` from the queue at `url`. Stale receipts are skipped.
pub(super) async fn delete(
    inner: &Inner,
    url: &str,
    receipts: Vec<String>,
) -> Result<(), SpoolError> {
    run_batched(
        inner,
        "DeleteMessageBatch",
        Refusal::Fails,
        receipts,
        pack_by_count,
        |group| {
            let client = inner.client.clone();
            let url = url.to_owned();
            async move {
                let entries: Result<Vec<_>, _> = group
                    .iter()
                    .enumerate()
                    .map(|(i, r)| {
                        DeleteMessageBatchRequestEntry::builder()
                            .id(i.to_string())
                            .receipt_handle(r)
                            .build()
                    })
                    .collect();
                let result = match entries {
                    Err(e) => Err(CallError::local(SpoolError::Storage(format!(
                        "cannot build a delete entry: {e}"
                    )))),
                    Ok(entries) => client
                        .delete_message_batch()
                        .queue_url(url)
                        .set_entries(Some(entries))
                        .send()
                        .await
                        .map(|out| CallOutcome::from_failed(out.failed(), "a delete"))
                        .map_err(|e| CallError::new("DeleteMessageBatch", e)),
                };
                (group, result)
            }
        },
    )
    .await
}

/// Makes each message of `receipts` visible again in its number of seconds. Entries SQS
/// refuses (a visibility past the 12-hour cap, a stale receipt) are logged and left: their
/// lease runs out by itself, so nothing is lost.
pub(super) async fn change_visibility(
    inner: &Inner,
    url: &str,
    receipts: Vec<(String, i32)>,
) -> Result<(), SpoolError> {
    run_batched(
        inner,
        "ChangeMessageVisibilityBatch",
        Refusal::Logged,
        receipts,
        pack_by_count,
        |group| {
            let client = inner.client.clone();
            let url = url.to_owned();
            async move {
                let entries: Result<Vec<_>, _> = group
                    .iter()
                    .enumerate()
                    .map(|(i, (r, secs))| {
                        ChangeMessageVisibilityBatchRequestEntry::builder()
                            .id(i.to_string())
                            .receipt_handle(r)
                            .visibility_timeout(*secs)
                            .build()
                    })
                    .collect();
                let result = match entries {
                    Err(e) => Err(CallError::local(SpoolError::Storage(format!(
                        "cannot build a visibility entry: {e}"
                    )))),
                    Ok(entries) => client
                        .change_message_visibility_batch()
                        .queue_url(url)
                        .set_entries(Some(entries))
                        .send()
                        .await
                        .map(|out| CallOutcome::from_failed(out.failed(), "a visibility change"))
                        .map_err(|e| CallError::new("ChangeMessageVisibilityBatch", e)),
                };
                (group, result)
            }
        },
    )
    .await
}

/// Like [`change_visibility`], but says which receipts SQS took (for extending a lease:
/// a receipt whose change failed must not be handed out).
pub(super) async fn change_visibility_each(
    inner: &Inner,
    url: &str,
    receipts: &[String],
    secs: i32,
) -> Vec<bool> {
    let mut ok = vec![false; receipts.len()];
    for range in pack_by_count(receipts) {
        let entries: Result<Vec<_>, _> = receipts[range.clone()]
            .iter()
            .enumerate()
            .map(|(i, r)| {
                ChangeMessageVisibilityBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(r)
                    .visibility_timeout(secs)
                    .build()
            })
            .collect();
        let Ok(entries) = entries else { continue };
        match inner
            .client
            .change_message_visibility_batch()
            .queue_url(url)
            .set_entries(Some(entries))
            .send()
            .await
        {
            Ok(out) => {
                for s in out.successful() {
                    if let Ok(i) = s.id().parse::<usize>()
                        && let Some(slot) = ok.get_mut(range.start + i)
                    {
                        *slot = true;
                    }
                }
            }
            Err(e) => {
                tracing::debug!(error = %sdk_error("ChangeMessageVisibilityBatch", e), "lease not extended")
            }
        }
    }
    ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_by_count_and_bytes() {
        let groups = pack_by_size([100usize; 25].into_iter(), 10_000);
        assert_eq!(groups, vec![0..10, 10..20, 20..25]);
        let groups = pack_by_size([6_000usize, 6_000, 3_000, 20_000, 1].into_iter(), 10_000);
        assert_eq!(groups, vec![0..1, 1..3, 3..4, 4..5]);
        assert!(pack_by_size(std::iter::empty(), 10).is_empty());
        assert_eq!(pack_by_count(&[0u8; 11]), vec![0..10, 10..11]);
    }

    #[test]
    fn pauses_grow_and_are_capped() {
        let policy = pause_policy();
        assert_eq!(policy.backoff_ceiling(1), Duration::from_millis(50));
        assert_eq!(policy.backoff_ceiling(2), Duration::from_millis(100));
        assert_eq!(policy.backoff_ceiling(30), Duration::from_millis(1600));
        let pause = policy.backoff(3, &mut rand::rng());
        assert!(pause >= Duration::from_millis(100) && pause <= Duration::from_millis(200));
    }
}
