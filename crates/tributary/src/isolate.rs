//! Isolating refused items: when a destination refuses a whole batch for the content of a
//! few of its items (the Event API answers `400` for a request holding one bad event), split
//! the batch until the refused items are alone, and deliver everything else.
//!
//! Nothing here knows about HTTP: [`bisect`] and [`isolate`] drive a caller's `send`
//! function over ranges of item indexes, so the library's [`HttpTransport`] uses them over
//! the visitors of one request and the relay's forwarder over the visitors of many merged
//! client payloads.
//!
//! The rules, which every caller inherits:
//!
//! - an item is reported **rejected** only after it was refused when sent **alone**;
//! - a refusal that blames the content (400, 422) lets a right half be inferred bad without
//!   sending it when its left sibling was delivered; a `413` (too large, which both halves
//!   may be) never does;
//! - a failure that is not the content's (transient after retries, 401, 403, 404, ...)
//!   stops at once: what was not delivered is **undelivered**, to try again later;
//! - an [`IsolationBudget`] bounds the requests spent on isolation; when it runs out, what is
//!   not yet isolated is **unresolved**, never rejected: the caller sends it again later in
//!   smaller groups (the relay releases it to its spool).
//!
//! [`HttpTransport`]: crate::dispatcher::transport::HttpTransport

use std::future::Future;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::dispatcher::DispatchError;
use crate::retry::is_content_rejection;

/// Requests that isolation may still make, shared by every bisection that draws on it (the
/// relay gives one budget to all the batches of a forwarding cycle).
///
/// ```
/// use tributary::isolate::IsolationBudget;
/// let budget = IsolationBudget::new(2);
/// assert!(budget.take() && budget.take());
/// assert!(!budget.take());
/// assert_eq!(budget.spent(), 2);
/// ```
#[derive(Debug)]
pub struct IsolationBudget {
    left: AtomicUsize,
    spent: AtomicUsize,
}

impl IsolationBudget {
    /// A budget of `requests` isolation requests.
    pub fn new(requests: usize) -> Self {
        IsolationBudget {
            left: AtomicUsize::new(requests),
            spent: AtomicUsize::new(0),
        }
    }

    /// Takes one request from the budget; `false` when none is left.
    pub fn take(&self) -> bool {
        let took = self
            .left
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok();
        if took {
            self.spent.fetch_add(1, Ordering::Relaxed);
        }
        took
    }

    /// Requests taken so far.
    pub fn spent(&self) -> usize {
        self.spent.load(Ordering::Relaxed)
    }

    /// Requests left.
    pub fn left(&self) -> usize {
        self.left.load(Ordering::Relaxed)
    }
}

/// One item refused when sent alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejectedItem {
    /// Its index in the list given to [`bisect`].
    pub index: usize,
    /// The status it was refused with.
    pub status: u16,
    /// What the destination said.
    pub message: String,
}

/// Items that were not delivered for a reason that is not theirs (the destination is down,
/// or refuses everything: 401, 403, 404, ...). Trying them again later may work.
#[derive(Debug, Clone, PartialEq)]
pub struct Undelivered {
    /// The items, as ranges of indexes.
    pub ranges: Vec<Range<usize>>,
    /// The error that stopped delivery.
    pub error: DispatchError,
}

/// What a bisection did with each item: every index is in exactly one of `delivered`,
/// `rejected`, `unresolved` and `undelivered`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BisectOutcome {
    /// Items the destination accepted, as ascending ranges.
    pub delivered: Vec<Range<usize>>,
    /// Items refused alone for their content, ascending by index.
    pub rejected: Vec<RejectedItem>,
    /// Groups that hold refused items not yet isolated when the [`IsolationBudget`] ran
    /// out. Each range was (or descends from) a refused group: send it again later, in
    /// groups no larger than the range. Never reported as rejected.
    pub unresolved: Vec<Range<usize>>,
    /// Items not delivered for another reason; `None` when there are none.
    pub undelivered: Option<Undelivered>,
    /// Requests made.
    pub requests: usize,
}

impl BisectOutcome {
    /// How many items were delivered.
    pub fn delivered_count(&self) -> usize {
        self.delivered.iter().map(ExactSizeIterator::len).sum()
    }

    /// How many items are unresolved or undelivered.
    pub fn pending_count(&self) -> usize {
        let unresolved: usize = self.unresolved.iter().map(ExactSizeIterator::len).sum();
        let undelivered: usize = self
            .undelivered
            .iter()
            .flat_map(|u| u.ranges.iter())
            .map(ExactSizeIterator::len)
            .sum();
        unresolved + undelivered
    }

    /// Whether every item was delivered.
    pub fn is_complete(&self) -> bool {
        self.rejected.is_empty() && self.unresolved.is_empty() && self.undelivered.is_none()
    }

    /// The outcome as a dispatcher result for a batch of `total` items:
    /// - `Ok` when everything was delivered;
    /// - the undelivered error when nothing was delivered nor rejected;
    /// - [`DispatchError::Permanent`] when every item was refused alone;
    /// - [`DispatchError::PartiallyRejected`] when the rest was delivered;
    /// - [`DispatchError::Incomplete`] otherwise (some delivered or rejected, some not
    ///   delivered: the destination failed, or the isolation budget ran out).
    pub fn into_result(self, total: usize) -> Result<(), DispatchError> {
        let delivered = self.delivered_count();
        let pending = self.pending_count();
        let rejected = self.rejected.len();
        if pending > 0 {
            if delivered == 0
                && rejected == 0
                && let Some(u) = self.undelivered
            {
                return Err(u.error);
            }
            let reason = match &self.undelivered {
                Some(u) => u.error.to_string(),
                None => {
                    "the isolation budget ran out before the refused visitors were found".to_owned()
                }
            };
            return Err(DispatchError::Incomplete {
                delivered,
                rejected,
                undelivered: pending,
                total,
                reason,
            });
        }
        let Some(first) = self.rejected.first() else {
            return Ok(());
        };
        if rejected >= total {
            Err(DispatchError::Permanent {
                status: first.status,
                message: first.message.clone(),
            })
        } else {
            Err(DispatchError::PartiallyRejected {
                rejected,
                total,
                status: first.status,
            })
        }
    }
}

/// A range waiting to be sent during a bisection.
struct Pending {
    range: Range<usize>,
    /// The refusal of the group this range was split from.
    group_error: (u16, String),
    /// The sibling sent before this one was delivered whole, so this one holds the bad
    /// items: split it without sending it.
    known_bad: bool,
    /// This is a left half: if delivered whole, its right sibling (next on the stack) is
    /// known bad.
    left_half: bool,
}

/// Delivers `len` items through `send` (which sends the items in a range as one request,
/// with its own retries) and isolates the items the destination refuses for their content.
///
/// The whole range is sent first, outside the budget. When it is refused for its content
/// (see [`is_content_rejection`]), [`isolate`] takes over.
///
/// ```
/// use tributary::DispatchError;
/// use tributary::isolate::{IsolationBudget, bisect};
///
/// // Items 3 and 12 of 16 are bad: the destination refuses any request containing them.
/// let bad = [3usize, 12];
/// let budget = IsolationBudget::new(64);
/// let outcome = block_on(bisect(16, &budget, |r: std::ops::Range<usize>| {
///     let refuse = bad.iter().any(|b| r.contains(b));
///     async move {
///         if refuse { Err(DispatchError::Permanent { status: 400, message: "bad".into() }) }
///         else { Ok(()) }
///     }
/// }));
/// let rejected: Vec<_> = outcome.rejected.iter().map(|r| r.index).collect();
/// assert_eq!(rejected, [3, 12]);
/// assert_eq!(outcome.delivered_count(), 14);
/// # fn block_on<F: std::future::Future>(f: F) -> F::Output {
/// #     tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
/// # }
/// ```
pub async fn bisect<F, Fut>(len: usize, budget: &IsolationBudget, mut send: F) -> BisectOutcome
where
    F: FnMut(Range<usize>) -> Fut,
    Fut: Future<Output = Result<(), DispatchError>>,
{
    let mut out = BisectOutcome {
        requests: 1,
        ..BisectOutcome::default()
    };
    match send(0..len).await {
        Ok(()) => {
            out.delivered.push(0..len);
            out
        }
        Err(DispatchError::Permanent { status, message })
            if is_content_rejection(status) && len > 0 =>
        {
            let more = isolate(len, (status, message), budget, send).await;
            out.requests += more.requests;
            BisectOutcome {
                requests: out.requests,
                ..more
            }
        }
        Err(error) => {
            out.undelivered = Some(Undelivered {
                ranges: std::iter::once(0..len).collect(),
                error,
            });
            out
        }
    }
}

/// Isolates the refused items of `len` items whose whole range was just refused with
/// `refusal` (a status and message), drawing each request from `budget`.
///
/// The range is split in halves, each sent in turn, until refused items are alone. After a
/// 400 or 422, when a left half is delivered its right sibling must hold the bad items and
/// is split without being sent; after a 413 it is sent.
///
/// Cost: with `k` refused items among `n`, at most `2·k·⌈log2 n⌉` requests (fewer when the
/// bad items share halves). When the budget runs out, the groups not yet settled are
/// reported [`BisectOutcome::unresolved`], each at most half the size of the group it came
/// from, so trying them again later resumes the search where it stopped.
pub async fn isolate<F, Fut>(
    len: usize,
    refusal: (u16, String),
    budget: &IsolationBudget,
    mut send: F,
) -> BisectOutcome
where
    F: FnMut(Range<usize>) -> Fut,
    Fut: Future<Output = Result<(), DispatchError>>,
{
    let mut out = BisectOutcome::default();
    let mut stack: Vec<Pending> = Vec::new();
    split(0..len, refusal, &mut stack, &mut out);
    while let Some(task) = stack.pop() {
        // Skipping the send of a half whose sibling passed is sound only when the refusal
        // blames an item (400, 422): a 413 says "too big", and both halves may fit. And an
        // item is never judged without being sent alone.
        let inferable = task.group_error.0 != 413;
        let refusal = if task.known_bad && inferable && task.range.len() > 1 {
            task.group_error
        } else {
            if !budget.take() {
                out.unresolved.push(task.range);
                out.unresolved
                    .extend(stack.drain(..).rev().map(|t| t.range));
                break;
            }
            out.requests += 1;
            match send(task.range.clone()).await {
                Ok(()) => {
                    if task.left_half
                        && let Some(sibling) = stack.last_mut()
                    {
                        sibling.known_bad = true;
                    }
                    out.delivered.push(task.range);
                    continue;
                }
                Err(DispatchError::Permanent { status, message })
                    if is_content_rejection(status) =>
                {
                    (status, message)
                }
                Err(error) => {
                    let mut ranges = vec![task.range];
                    ranges.extend(stack.drain(..).rev().map(|t| t.range));
                    out.undelivered = Some(Undelivered { ranges, error });
                    break;
                }
            }
        };
        split(task.range, refusal, &mut stack, &mut out);
    }
    out.rejected.sort_by_key(|r| r.index);
    out.delivered.sort_by_key(|r| r.start);
    out.unresolved.sort_by_key(|r| r.start);
    // Counted here, where every isolation ends (the HTTP dispatcher's and a forwarder's).
    if !out.rejected.is_empty() {
        metrics::counter!("tributary_http_rejected_visitors_total")
            .increment(out.rejected.len() as u64);
    }
    out
}

/// A refused range: alone, it is rejected; otherwise both halves go on the stack, left on
/// top so it is sent first.
fn split(
    range: Range<usize>,
    refusal: (u16, String),
    stack: &mut Vec<Pending>,
    out: &mut BisectOutcome,
) {
    let Range { start, end } = range;
    if end <= start {
        return;
    }
    if end - start == 1 {
        out.rejected.push(RejectedItem {
            index: start,
            status: refusal.0,
            message: refusal.1,
        });
        return;
    }
    let mid = start + (end - start) / 2;
    stack.push(Pending {
        range: mid..end,
        group_error: refusal.clone(),
        known_bad: false,
        left_half: false,
    });
    stack.push(Pending {
        range: start..mid,
        group_error: refusal,
        known_bad: false,
        left_half: true,
    });
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::cell::RefCell;

    fn refuse(status: u16) -> DispatchError {
        DispatchError::Permanent {
            status,
            message: "no".into(),
        }
    }

    fn block_on<F: Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    /// Runs `bisect` over `n` items against a fake destination that refuses any range
    /// containing a bad item with `status`, recording the ranges sent.
    fn run(n: usize, bad: &[usize], status: u16, cap: usize) -> (BisectOutcome, Vec<Range<usize>>) {
        let sent = RefCell::new(Vec::new());
        let budget = IsolationBudget::new(cap);
        let out = block_on(bisect(n, &budget, |r: Range<usize>| {
            sent.borrow_mut().push(r.clone());
            let refused = bad.iter().any(|b| r.contains(b));
            async move { if refused { Err(refuse(status)) } else { Ok(()) } }
        }));
        (out, sent.into_inner())
    }

    fn covered(out: &BisectOutcome) -> Vec<usize> {
        let mut all: Vec<usize> = out.delivered.iter().cloned().flatten().collect();
        all.extend(out.rejected.iter().map(|r| r.index));
        all.extend(out.unresolved.iter().cloned().flatten());
        if let Some(u) = &out.undelivered {
            all.extend(u.ranges.iter().cloned().flatten());
        }
        all.sort_unstable();
        all
    }

    fn log2_ceil(n: usize) -> usize {
        (usize::BITS - (n.max(2) - 1).leading_zeros()) as usize
    }

    #[test]
    fn isolates_bad_items_and_delivers_each_good_one_once() {
        for n in [1usize, 2, 3, 7, 16, 33, 100] {
            for bad in [vec![], vec![0], vec![n - 1], vec![0, n / 2, n - 1]] {
                let mut bad = bad;
                bad.dedup();
                let (out, sent) = run(n, &bad, 400, 1000);
                let rejected: Vec<_> = out.rejected.iter().map(|r| r.index).collect();
                let mut expect = bad.clone();
                expect.sort_unstable();
                expect.dedup();
                assert_eq!(rejected, expect, "n={n} bad={bad:?}");
                assert_eq!(out.delivered_count(), n - expect.len());
                assert_eq!(covered(&out), (0..n).collect::<Vec<_>>());
                assert_eq!(out.requests, sent.len());
                assert!(
                    out.requests <= 1 + 2 * expect.len() * log2_ceil(n),
                    "n={n} requests={}",
                    out.requests
                );
            }
        }
    }

    #[test]
    fn every_rejected_item_was_sent_alone() {
        let bad = [1usize, 2, 9, 10, 11, 30];
        let (out, sent) = run(32, &bad, 422, 1000);
        for r in &out.rejected {
            assert!(
                sent.contains(&(r.index..r.index + 1)),
                "{} never sent alone",
                r.index
            );
        }
        assert_eq!(out.rejected.len(), bad.len());
    }

    #[test]
    fn a_size_refusal_is_split_until_the_parts_fit_and_rejects_nothing() {
        // The destination takes at most 3 items a request, whichever they are.
        let budget = IsolationBudget::new(64);
        let out = block_on(bisect(16, &budget, |r: Range<usize>| async move {
            if r.len() > 3 {
                Err(refuse(413))
            } else {
                Ok(())
            }
        }));
        assert!(out.rejected.is_empty(), "{:?}", out.rejected);
        assert_eq!(out.delivered_count(), 16);
    }

    #[test]
    fn a_single_bad_item_costs_about_log2_n_requests() {
        let (out, _) = run(16, &[5], 400, 1000);
        assert_eq!(out.rejected.len(), 1);
        // Full, then one half per level; right siblings of delivered halves are never sent.
        assert!(out.requests <= 1 + 2 * 4, "{}", out.requests);
    }

    #[test]
    fn non_content_errors_stop_the_bisection() {
        let (out, sent) = run(8, &[2], 401, 1000);
        assert_eq!(sent.len(), 1);
        assert!(out.rejected.is_empty() && out.delivered.is_empty());
        let u = out.undelivered.unwrap();
        assert_eq!(u.ranges, vec![0..8]);
        assert_eq!(u.error, refuse(401));
    }

    #[test]
    fn a_spent_budget_leaves_the_rest_unresolved_never_rejected() {
        let bad: Vec<usize> = (0..64).step_by(3).collect();
        let (out, sent) = run(64, &bad, 400, 10);
        assert_eq!(sent.len(), 11, "the whole, then the budget of 10");
        for r in &out.rejected {
            assert!(sent.contains(&(r.index..r.index + 1)));
        }
        assert!(!out.unresolved.is_empty());
        assert_eq!(covered(&out), (0..64).collect::<Vec<_>>());
        // Each unresolved group is at most half of the whole.
        assert!(out.unresolved.iter().all(|r| r.len() <= 32));
    }

    #[test]
    fn resuming_unresolved_groups_finishes_the_job() {
        // Keep isolating what is unresolved, a small budget each round, as the relay does
        // across cycles: in the end exactly the bad items are rejected.
        let n = 200;
        let bad: Vec<usize> = (0..n).filter(|i| i % 13 == 5).collect();
        let mut todo: Vec<Range<usize>> = std::iter::once(0..n).collect();
        let mut rejected = Vec::new();
        let mut delivered = 0;
        let mut rounds = 0;
        while let Some(group) = todo.pop() {
            rounds += 1;
            assert!(rounds < 1000);
            let budget = IsolationBudget::new(7);
            let out = block_on(bisect(group.len(), &budget, |r: Range<usize>| {
                let refused = bad
                    .iter()
                    .any(|b| (r.start + group.start..r.end + group.start).contains(b));
                async move { if refused { Err(refuse(400)) } else { Ok(()) } }
            }));
            delivered += out.delivered_count();
            rejected.extend(out.rejected.iter().map(|r| r.index + group.start));
            todo.extend(
                out.unresolved
                    .iter()
                    .map(|r| r.start + group.start..r.end + group.start),
            );
        }
        rejected.sort_unstable();
        assert_eq!(rejected, bad);
        assert_eq!(delivered, n - bad.len());
    }

    #[test]
    fn into_result_maps_outcomes() {
        let (out, _) = run(4, &[1], 400, 100);
        assert_eq!(
            out.into_result(4),
            Err(DispatchError::PartiallyRejected {
                rejected: 1,
                total: 4,
                status: 400
            })
        );
        let (out, _) = run(1, &[0], 400, 100);
        assert_eq!(out.into_result(1), Err(refuse(400)));
        let (out, _) = run(2, &[], 400, 100);
        assert_eq!(out.into_result(2), Ok(()));
        let (out, _) = run(16, &[0, 5, 9, 14], 400, 2);
        assert!(matches!(
            out.into_result(16),
            Err(DispatchError::Incomplete { total: 16, .. })
        ));
    }

    #[test]
    fn futures_are_send() {
        fn assert_send<T: Send>(_: &T) {}
        let budget = IsolationBudget::new(1);
        let fut = bisect(4, &budget, |_r| async { Ok(()) });
        assert_send(&fut);
    }
}
