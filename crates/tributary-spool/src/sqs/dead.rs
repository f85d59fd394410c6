//! Dead letters on SQS, and the queue counts.
//!
//! Dead letters live in a second SQS queue: the configured one, or the target of the
//! queue's redrive policy. A message is dead-lettered by sending a copy with `reason` and
//! `dead_at_ms` attributes there, then deleting the original (in that order: a crash in
//! between leaves a duplicate, never a loss). Messages SQS's own redrive moved there have
//! no `reason`; they are listed as moved by the redrive policy.
//!
//! Listing, retrying and purging receive from the dead-letter queue, since SQS has no
//! other way to read a queue: what is received and not acted on is made visible again at
//! once. SQS receives sample a queue, so a listing of a large dead-letter queue is a sample
//! too, not a strict "oldest first".

use aws_sdk_sqs::types::{MessageSystemAttributeName, QueueAttributeName};
use std::collections::HashSet;

use super::lease::Held;
use super::message::{self, Received, now_ms, short_reason};
use super::{Inner, MAX_VISIBILITY_SECS, calls, capped, sdk_error};
use crate::{DeadLetter, PartialSettlement, Payload, Receipt, Selection, SpoolError, SpoolStats};

/// How long dead letters being listed, retried or purged stay hidden from other readers.
const SCAN_VISIBILITY_SECS: i32 = 30;

/// Reason shown for a message SQS's redrive policy moved (it carries none of ours).
const REDRIVEN: &str = "moved by the queue's redrive policy (maxReceiveCount)";

/// Moves `held` messages to the dead letters with `reason`. Without a dead-letter queue
/// they are hidden for 12 hours instead, each time they come back, until SQS's retention
/// deletes them: configure one.
pub(super) async fn bury(inner: &Inner, held: Vec<Held>, reason: &str) -> Result<(), SpoolError> {
    if held.is_empty() {
        return Ok(());
    }
    let receipts: Vec<String> = held.iter().map(|h| h.receipt.clone()).collect();
    let Some(dlq) = &inner.dead_letter_url else {
        tracing::warn!(
            messages = held.len(),
            reason,
            "no SQS dead-letter queue configured; hiding the messages for 12 hours instead"
        );
        let hidden = held
            .iter()
            .map(|h| {
                (
                    h.receipt.clone(),
                    capped(MAX_VISIBILITY_SECS, Some(h.received_at)),
                )
            })
            .collect();
        return calls::change_visibility(inner, &inner.queue_url, hidden).await;
    };
    let reason = short_reason(reason);
    let now = now_ms();
    let copies = held
        .into_iter()
        .map(|h| {
            let mut m = h.message;
            m.dead = Some((reason.clone(), now));
            m
        })
        .collect();
    calls::send(inner, dlq, copies).await?;
    calls::delete(inner, &inner.queue_url, receipts).await
}

/// Settles leased messages piece by piece: the remainders go back to the queue as new
/// messages (with their delay, at most SQS's 15 minutes), the visitors refused alone go to
/// the dead-letter queue, and only then are the originals deleted, so a crash in between
/// duplicates and never loses. Without a dead-letter queue the refused visitors have
/// nowhere to go: the originals are hidden for 12 hours instead, as in [`bury`], and come
/// back whole (their delivered visitors are then sent again).
pub(super) async fn settle_parts(
    inner: &Inner,
    parts: Vec<PartialSettlement>,
) -> Result<(), SpoolError> {
    let receipts: Vec<Receipt> = parts.iter().map(|p| p.receipt.clone()).collect();
    let mut held = inner.leases.take(&receipts);
    if held.is_empty() {
        return Ok(());
    }
    if inner.dead_letter_url.is_none() {
        // Refused visitors have nowhere to go: those messages are hidden whole, as `bury`
        // does. The others (delivered in part, the rest still to send) settle as usual.
        let has_dead = |h: &Held| {
            parts
                .iter()
                .any(|p| p.receipt.0 == h.receipt && !p.dead.is_empty())
        };
        let (doomed, rest): (Vec<Held>, Vec<Held>) = held.into_iter().partition(has_dead);
        bury(
            inner,
            doomed,
            "refused by the upstream (no dead-letter queue configured)",
        )
        .await?;
        held = rest;
        if held.is_empty() {
            return Ok(());
        }
    }
    let now = now_ms();
    let max = inner.config.max_message_bytes;
    let (mut requeue, mut dead) = (Vec::new(), Vec::new());
    for h in &held {
        let Some(part) = parts.iter().find(|p| p.receipt.0 == h.receipt) else {
            continue;
        };
        let appended_at = h.message.appended_at_ms;
        if let Some(rest) = &part.remainder {
            let delay_secs = i32::try_from(part.delay.as_secs()).unwrap_or(900).min(900);
            for mut m in message::encode(rest, max, appended_at)? {
                m.delay_secs = delay_secs;
                requeue.push(m);
            }
        }
        for (payload, reason) in &part.dead {
            for mut m in message::encode(payload, max, appended_at)? {
                m.dead = Some((short_reason(reason), now));
                dead.push(m);
            }
        }
    }
    if !requeue.is_empty() {
        calls::send(inner, &inner.queue_url, requeue).await?;
    }
    if let (false, Some(dlq)) = (dead.is_empty(), &inner.dead_letter_url) {
        calls::send(inner, dlq, dead).await?;
    }
    let handles = held.into_iter().map(|h| h.receipt).collect();
    calls::delete(inner, &inner.queue_url, handles).await
}

/// Approximate counts from `GetQueueAttributes`.
pub(super) async fn stats(inner: &Inner) -> Result<SpoolStats, SpoolError> {
    let main = counts(inner, &inner.queue_url).await?;
    let dead = match &inner.dead_letter_url {
        Some(url) => counts(inner, url).await?,
        None => Counts::default(),
    };
    Ok(SpoolStats {
        pending: main.visible + main.in_flight + main.delayed,
        // Unknown on SQS: 0 (documented).
        pending_bytes: 0,
        pending_events: 0,
        leased: main.in_flight,
        oldest_age_ms: 0,
        dead_letters: dead.visible + dead.in_flight + dead.delayed,
        dead_bytes: 0,
    })
}

#[derive(Debug, Default)]
struct Counts {
    visible: u64,
    in_flight: u64,
    delayed: u64,
}

async fn counts(inner: &Inner, url: &str) -> Result<Counts, SpoolError> {
    let out = inner
        .client
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesDelayed)
        .send()
        .await
        .map_err(|e| sdk_error("GetQueueAttributes", e))?;
    let get = |name: QueueAttributeName| -> u64 {
        out.attributes()
            .and_then(|a| a.get(&name))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Ok(Counts {
        visible: get(QueueAttributeName::ApproximateNumberOfMessages),
        in_flight: get(QueueAttributeName::ApproximateNumberOfMessagesNotVisible),
        delayed: get(QueueAttributeName::ApproximateNumberOfMessagesDelayed),
    })
}

fn no_dlq() -> SpoolError {
    SpoolError::Config(
        "this SQS queue has no dead-letter queue: set --sqs-dead-letter-queue or give the \
         queue a redrive policy"
            .into(),
    )
}

/// Receives up to `max` dead letters (hidden for [`SCAN_VISIBILITY_SECS`]).
async fn receive(inner: &Inner, url: &str, max: usize) -> Result<Vec<Received>, SpoolError> {
    let out = inner
        .client
        .receive_message()
        .queue_url(url)
        .max_number_of_messages(i32::try_from(max.clamp(1, 10)).unwrap_or(10))
        .wait_time_seconds(0)
        .visibility_timeout(SCAN_VISIBILITY_SECS)
        .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
        .message_system_attribute_names(MessageSystemAttributeName::SentTimestamp)
        .message_attribute_names("All")
        .send()
        .await
        .map_err(|e| sdk_error("ReceiveMessage (dead letters)", e))?;
    Ok(out.messages().iter().filter_map(Received::read).collect())
}

/// Makes scanned but untouched dead letters visible again.
async fn unhide(inner: &Inner, url: &str, seen: Vec<Received>) {
    let receipts = seen.into_iter().map(|r| (r.receipt, 0)).collect::<Vec<_>>();
    if let Err(e) = calls::change_visibility(inner, url, receipts).await {
        tracing::warn!(error = %e, "dead letters stay hidden until their scan lease runs out");
    }
}

/// Up to `limit` dead letters, oldest first among those received.
pub(super) async fn list(inner: &Inner, limit: usize) -> Result<Vec<DeadLetter>, SpoolError> {
    let url = inner.dead_letter_url.as_deref().ok_or_else(no_dlq)?;
    let mut seen = Vec::new();
    while seen.len() < limit {
        let batch = receive(inner, url, limit - seen.len()).await?;
        if batch.is_empty() {
            break;
        }
        seen.extend(batch);
    }
    let mut out: Vec<DeadLetter> = seen.iter().map(to_dead_letter).collect();
    unhide(inner, url, seen).await;
    out.sort_by_key(|d| d.appended_at_ms);
    Ok(out)
}

fn to_dead_letter(r: &Received) -> DeadLetter {
    let (reason, dead_at_ms) = r
        .dead
        .clone()
        .unwrap_or_else(|| (REDRIVEN.to_owned(), r.appended_at_ms));
    let (payload, reason) = match &r.payload {
        Ok(p) => (p.clone(), reason),
        // Keep the body visible to the operator as is.
        Err(why) => (
            Payload {
                route: r.route.as_str().into(),
                header: bytes::Bytes::new(),
                visitors: bytes::Bytes::from(r.body.clone().into_bytes()),
                visitor_count: 0,
            },
            format!("{reason} ({why})"),
        ),
    };
    DeadLetter {
        id: r.message_id.clone(),
        payload,
        reason,
        appended_at_ms: r.appended_at_ms,
        dead_at_ms,
    }
}

/// Walks the dead-letter queue, handing the selected messages to `act` in groups and
/// making the others visible again. Stops at the first empty receive, when every named
/// id was found, or after looking at `2 × (count at start) + 100` messages, so a
/// dead-letter queue that keeps filling cannot keep it going forever.
async fn sweep<F, Fut>(inner: &Inner, which: Selection, act: F) -> Result<u64, SpoolError>
where
    F: Fn(Vec<Received>) -> Fut,
    Fut: std::future::Future<Output = Result<(), SpoolError>>,
{
    let url = inner.dead_letter_url.as_deref().ok_or_else(no_dlq)?;
    let start = counts(inner, url).await?;
    let budget = (start.visible + start.in_flight + start.delayed).saturating_mul(2) + 100;
    let mut wanted: Option<HashSet<String>> = match which {
        Selection::All => None,
        Selection::Ids(ids) => Some(ids.into_iter().collect()),
    };
    let (mut looked, mut done) = (0u64, 0u64);
    let mut skipped = Vec::new();
    let result = async {
        while looked < budget && wanted.as_ref().is_none_or(|w| !w.is_empty()) {
            let batch = receive(inner, url, 10).await?;
            if batch.is_empty() {
                break;
            }
            looked += batch.len() as u64;
            let mut chosen = Vec::new();
            for r in batch {
                let pick = match &mut wanted {
                    None => true,
                    Some(w) => w.remove(&r.message_id),
                };
                if pick {
                    chosen.push(r);
                } else {
                    skipped.push(r);
                }
            }
            let n = chosen.len() as u64;
            if n > 0 {
                act(chosen).await?;
                done += n;
            }
        }
        Ok::<(), SpoolError>(())
    }
    .await;
    unhide(inner, url, skipped).await;
    result.map(|()| done)
}

/// Puts the selected dead letters back in the queue (with their original append time),
/// then deletes them from the dead-letter queue.
pub(super) async fn retry(inner: &Inner, which: Selection) -> Result<u64, SpoolError> {
    let url = inner.dead_letter_url.clone().ok_or_else(no_dlq)?;
    sweep(inner, which, |chosen| {
        let url = url.clone();
        async move {
            let copies = chosen.iter().map(|r| r.outgoing(None)).collect();
            calls::send(inner, &inner.queue_url, copies).await?;
            let receipts = chosen.into_iter().map(|r| r.receipt).collect();
            calls::delete(inner, &url, receipts).await
        }
    })
    .await
}

/// Deletes the selected dead letters.
pub(super) async fn purge(inner: &Inner, which: Selection) -> Result<u64, SpoolError> {
    let url = inner.dead_letter_url.clone().ok_or_else(no_dlq)?;
    sweep(inner, which, |chosen| {
        let url = url.clone();
        async move {
            let receipts = chosen.into_iter().map(|r| r.receipt).collect();
            calls::delete(inner, &url, receipts).await
        }
    })
    .await
}
