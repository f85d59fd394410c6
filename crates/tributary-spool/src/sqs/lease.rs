//! Leasing from SQS: parallel receives, the table of held messages, and the overflow stash.
//!
//! A lease is one or more rounds of `ReceiveMessage` calls run in parallel (each returns at
//! most 10 messages). The first round long-polls ([`SqsConfig::wait_time`]) so an idle
//! drain node does not spin; later rounds do not wait, and leasing stops at the first
//! round that finds nothing, or when the caller's limits are reached.
//!
//! SQS cannot be asked for "at most N bytes", so a round may bring more than fits. Those
//! messages are kept in a small stash (at most one round's worth: `receivers` × 10) and
//! handed out first by the next lease, their visibility extended then. Giving them back
//! to the queue instead would count a receive against them.
//! A process about to stop (a Lambda invocation answering) gives the stash back with
//! [`Spool::release_unhanded`](crate::Spool::release_unhanded).
//!
//! [`Spool::dead_letter`](crate::Spool::dead_letter) gets only receipts, but moving a
//! message to the dead-letter queue needs its body: the table of held messages keeps each
//! leased message's body until it is settled or its lease has run out (so it is bounded by
//! what is leased).
//!
//! [`SqsConfig::wait_time`]: super::SqsConfig::wait_time

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use aws_sdk_sqs::types::{Message, MessageSystemAttributeName};
use tokio::task::JoinSet;

use super::message::{Outgoing, Received};
use super::{Inner, calls, dead, sdk_error, visibility_secs};
use crate::{Leased, Receipt, SpoolError};

/// Most messages one `ReceiveMessage` returns.
const MAX_PER_RECEIVE: usize = 10;

/// A stashed message handed out with less than this left of its visibility is dropped
/// instead (SQS will deliver it again): extending it could race its expiry.
const STASH_MARGIN: Duration = Duration::from_secs(2);

/// A leased message's body, kept to dead-letter it.
#[derive(Debug, Clone)]
pub(super) struct Held {
    pub receipt: String,
    pub message: Outgoing,
    /// When it was received: SQS caps a message's visibility at 12 hours from then.
    pub received_at: Instant,
    until: Instant,
}

#[derive(Default)]
struct State {
    held: HashMap<String, Held>,
    stash: VecDeque<Leased>,
    /// Running average of message sizes, to size receive rounds by bytes.
    avg_bytes: usize,
}

/// Messages this spool holds leases on. See the module docs.
#[derive(Default)]
pub(super) struct Leases {
    state: Mutex<State>,
}

impl Leases {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The table stays consistent even if a holder panicked: plain inserts and removes.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Forgets settled receipts; returns when each was received, if known.
    pub fn forget(&self, receipts: &[Receipt]) -> Vec<Option<Instant>> {
        let mut s = self.lock();
        receipts
            .iter()
            .map(|r| s.held.remove(&r.0).map(|h| h.received_at))
            .collect()
    }

    /// Removes and returns the held messages of `receipts`; unknown ones (stale, or never
    /// leased here) are skipped: whoever holds the message now decides its fate.
    pub fn take(&self, receipts: &[Receipt]) -> Vec<Held> {
        let mut s = self.lock();
        let mut out = Vec::with_capacity(receipts.len());
        for r in receipts {
            match s.held.remove(&r.0) {
                Some(h) => out.push(h),
                None => tracing::debug!("dead-letter of an unknown or expired SQS lease skipped"),
            }
        }
        out
    }

    /// Empties the stash: the receipts of messages received but never handed out, which the
    /// caller gives back to the queue (they are forgotten here).
    pub fn take_stash(&self) -> Vec<Receipt> {
        let mut s = self.lock();
        let State { held, stash, .. } = &mut *s;
        stash
            .drain(..)
            .filter(|l| held.remove(&l.receipt.0).is_some())
            .map(|l| l.receipt)
            .collect()
    }

    /// Drops entries whose lease has run out.
    pub fn prune(&self) {
        let now = Instant::now();
        let mut s = self.lock();
        s.held.retain(|_, h| h.until > now);
        let State { held, stash, .. } = &mut *s;
        stash.retain(|l| held.contains_key(&l.receipt.0));
    }

    fn hold(&self, received: &Received, received_at: Instant, until: Instant) {
        let held = Held {
            receipt: received.receipt.clone(),
            message: received.outgoing(None),
            received_at,
            until,
        };
        self.lock().held.insert(received.receipt.clone(), held);
    }

    fn note_size(&self, bytes: usize) {
        let mut s = self.lock();
        s.avg_bytes = if s.avg_bytes == 0 {
            bytes
        } else {
            (s.avg_bytes * 7 + bytes) / 8
        };
    }
}

/// Fills a lease: stash first, then receive rounds. See the module docs.
pub(super) async fn lease(
    inner: &Inner,
    max_payloads: usize,
    max_bytes: usize,
    lease_for: Duration,
) -> Result<Vec<Leased>, SpoolError> {
    let visibility = visibility_secs(lease_for, 1);
    let mut out = Lease {
        items: Vec::new(),
        bytes: 0,
        max_payloads,
        max_bytes,
    };
    if max_payloads == 0 {
        return Ok(out.items);
    }
    inner.leases.prune();
    let stash_left = from_stash(inner, &mut out, visibility, lease_for).await;
    if stash_left {
        return Ok(out.finish());
    }

    let wait = i32::try_from(inner.config.wait_time.as_secs()).unwrap_or(20);
    let mut first = true;
    while !out.full() {
        let want = max_payloads - out.items.len();
        let avg = inner.leases.lock().avg_bytes.max(1);
        let by_bytes = (max_bytes.saturating_sub(out.bytes) / (avg * MAX_PER_RECEIVE)).max(1);
        let calls = inner
            .config
            .receivers
            .min(want.div_ceil(MAX_PER_RECEIVE))
            .min(by_bytes);
        let round_wait = if first && out.items.is_empty() {
            wait
        } else {
            0
        };
        first = false;
        let messages = receive_round(inner, calls, want, round_wait, visibility).await?;
        if messages.is_empty() {
            break;
        }
        let received_at = Instant::now();
        let until = received_at + Duration::from_secs(u64::try_from(visibility).unwrap_or(0));
        let mut doomed: Vec<(Received, String)> = Vec::new();
        for received in distinct(&messages) {
            inner.leases.note_size(received.body.len());
            let max_receives = inner.config.max_receives;
            let payload = match &received.payload {
                Err(why) => {
                    let why = why.clone();
                    doomed.push((received, why));
                    continue;
                }
                Ok(_) if max_receives > 0 && received.receive_count > max_receives => {
                    let why = format!(
                        "received {} times without being delivered (max receives {max_receives})",
                        received.receive_count
                    );
                    doomed.push((received, why));
                    continue;
                }
                Ok(p) => p.clone(),
            };
            inner.leases.hold(&received, received_at, until);
            let leased = Leased {
                receipt: Receipt(received.receipt.clone()),
                payload,
                attempts: received.receive_count.saturating_sub(1),
                appended_at_ms: received.appended_at_ms,
            };
            if !out.push(&leased) {
                inner.leases.lock().stash.push_back(leased);
            }
        }
        set_aside(inner, doomed).await;
        if !inner.leases.lock().stash.is_empty() {
            break;
        }
    }
    Ok(out.finish())
}

/// The messages of one round, read, each message once. Parallel receives can return the
/// same message twice (SQS standard queues rarely do; moto's server does under load): the
/// copy received last (highest receive count) holds the receipt that counts.
fn distinct(messages: &[Message]) -> Vec<Received> {
    let mut by_id: HashMap<String, Received> = HashMap::new();
    let mut order = Vec::new();
    for r in messages.iter().filter_map(Received::read) {
        match by_id.get(&r.message_id) {
            Some(seen) if seen.receive_count >= r.receive_count => {}
            Some(_) => {
                by_id.insert(r.message_id.clone(), r);
            }
            None => {
                order.push(r.message_id.clone());
                by_id.insert(r.message_id.clone(), r);
            }
        }
    }
    order
        .into_iter()
        .filter_map(|id| by_id.remove(&id))
        .collect()
}

/// A lease being filled.
struct Lease {
    items: Vec<Leased>,
    bytes: usize,
    max_payloads: usize,
    max_bytes: usize,
}

impl Lease {
    fn full(&self) -> bool {
        self.items.len() >= self.max_payloads || self.bytes >= self.max_bytes
    }

    /// Takes `l` if it fits (the first one always does).
    fn push(&mut self, l: &Leased) -> bool {
        let size = l.payload.stored_len();
        let fits = self.items.is_empty()
            || (self.items.len() < self.max_payloads && self.bytes + size <= self.max_bytes);
        if fits {
            self.bytes += size;
            self.items.push(l.clone());
        }
        fits
    }

    /// Oldest first, as the trait promises (receives come back in no particular order).
    fn finish(mut self) -> Vec<Leased> {
        self.items.sort_by_key(|l| l.appended_at_ms);
        self.items
    }
}

/// Moves stashed messages into `out`, extending their visibility to the new lease.
/// Returns whether the stash still holds messages (the lease is full).
async fn from_stash(inner: &Inner, out: &mut Lease, visibility: i32, lease_for: Duration) -> bool {
    let taken: Vec<Leased> = {
        let mut s = inner.leases.lock();
        let now = Instant::now();
        let mut taken = Vec::new();
        let mut probe = Lease {
            items: Vec::new(),
            bytes: out.bytes,
            max_payloads: out.max_payloads,
            max_bytes: out.max_bytes,
        };
        while let Some(l) = s.stash.pop_front() {
            let fresh = s
                .held
                .get(&l.receipt.0)
                .is_some_and(|h| h.until > now + STASH_MARGIN);
            if !fresh {
                s.held.remove(&l.receipt.0);
                continue;
            }
            if !probe.push(&l) {
                s.stash.push_front(l);
                break;
            }
            taken.push(l);
        }
        taken
    };
    if !taken.is_empty() {
        let receipts: Vec<String> = taken.iter().map(|l| l.receipt.0.clone()).collect();
        let extended =
            calls::change_visibility_each(inner, &inner.queue_url, &receipts, visibility).await;
        let until = Instant::now() + lease_for;
        let mut s = inner.leases.lock();
        for (l, ok) in taken.into_iter().zip(extended) {
            if ok {
                if let Some(h) = s.held.get_mut(&l.receipt.0) {
                    h.until = until;
                }
                out.push(&l);
            } else {
                s.held.remove(&l.receipt.0);
            }
        }
    }
    !inner.leases.lock().stash.is_empty()
}

/// `calls` parallel receives asking for `want` messages in all.
async fn receive_round(
    inner: &Inner,
    calls: usize,
    want: usize,
    wait: i32,
    visibility: i32,
) -> Result<Vec<Message>, SpoolError> {
    let mut tasks = JoinSet::new();
    let mut left = want;
    for _ in 0..calls.max(1) {
        if left == 0 {
            break;
        }
        let n = left.min(MAX_PER_RECEIVE);
        left -= n;
        let request = inner
            .client
            .receive_message()
            .queue_url(&inner.queue_url)
            .max_number_of_messages(i32::try_from(n).unwrap_or(10))
            .wait_time_seconds(wait)
            .visibility_timeout(visibility)
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .message_system_attribute_names(MessageSystemAttributeName::SentTimestamp)
            .message_attribute_names("All");
        tasks.spawn(async move { request.send().await });
    }
    let mut messages = Vec::new();
    let mut error = None;
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok(Ok(out)) => messages.extend(out.messages().iter().cloned()),
            Ok(Err(e)) => error = Some(sdk_error("ReceiveMessage", e)),
            Err(e) => error = Some(SpoolError::Storage(format!("a receive task failed: {e}"))),
        }
    }
    // Messages received by the calls that worked are leased now: hand them out even if
    // another call failed (their leases would otherwise just run out).
    match error {
        Some(e) if messages.is_empty() => Err(e),
        Some(e) => {
            tracing::warn!(error = %e, "an SQS receive failed; continuing with what arrived");
            Ok(messages)
        }
        None => Ok(messages),
    }
}

/// Dead-letters messages that cannot or must not be delivered. Failures are logged: the
/// messages stay in the queue and come back after their lease, nothing is lost.
async fn set_aside(inner: &Inner, doomed: Vec<(Received, String)>) {
    for (received, why) in doomed {
        tracing::warn!(
            message_id = %received.message_id,
            receives = received.receive_count,
            reason = %why,
            "SQS message set aside as a dead letter"
        );
        let held = Held {
            receipt: received.receipt.clone(),
            message: received.outgoing(None),
            received_at: Instant::now(),
            until: Instant::now(),
        };
        if let Err(e) = dead::bury(inner, vec![held], &why).await {
            tracing::error!(error = %e, "could not dead-letter an SQS message; it will come back");
        }
    }
}
