//! When to try a request again, and how long to wait first.
//!
//! [`RetryPolicy`] is a plain value with pure functions, so the whole retry behaviour can be
//! tested without a network or a clock: capped exponential backoff with full jitter, a
//! maximum number of attempts, a total time budget, and `Retry-After` honoured.
//! [`classify`] says what an HTTP status means for a retry; [`parse_retry_after`] reads the
//! header.
//!
//! ```
//! use std::time::Duration;
//! use tributary::retry::{Jitter, RetryPolicy};
//!
//! let policy = RetryPolicy { jitter: Jitter::None, ..RetryPolicy::default() };
//! let mut rng = rand::rng();
//! // After the first failed attempt, 1 s into the budget: wait the initial backoff.
//! assert_eq!(policy.next_delay(1, Duration::from_secs(1), None, &mut rng),
//!            Some(Duration::from_millis(200)));
//! // The server asked for 5 s: that wins over the shorter backoff.
//! assert_eq!(policy.next_delay(1, Duration::from_secs(1), Some(Duration::from_secs(5)), &mut rng),
//!            Some(Duration::from_secs(5)));
//! // Attempts used up: give up.
//! assert_eq!(policy.next_delay(5, Duration::from_secs(1), None, &mut rng), None);
//! ```

use std::time::{Duration, SystemTime};

use rand::Rng;

/// How the wait before a retry is randomised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Jitter {
    /// Wait a uniformly random time between zero and the backoff ("full jitter"), so many
    /// clients that failed together do not come back together.
    #[default]
    Full,
    /// Wait half the backoff plus a uniformly random part of the other half ("equal
    /// jitter"): spread like full jitter, but never much shorter than the backoff. For
    /// retries of work held durably, where a near-zero wait would only re-send early.
    Equal,
    /// Wait exactly the backoff (for tests and for reasoning about worst cases).
    None,
}

/// What an HTTP status means for delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Classification {
    /// 2xx: delivered.
    Success,
    /// 5xx, 408, 429: may pass; try again later.
    Retryable,
    /// Anything else (other 4xx, 3xx, 1xx): the same request will fail again.
    Permanent,
}

/// Classifies an HTTP status: 2xx succeed; 408, 429 and 5xx are retried; everything else is
/// permanent (redirects are not followed: a POST must not silently turn into a GET).
///
/// ```
/// use tributary::retry::{classify, Classification};
/// assert_eq!(classify(204), Classification::Success);
/// assert_eq!(classify(503), Classification::Retryable);
/// assert_eq!(classify(429), Classification::Retryable);
/// assert_eq!(classify(400), Classification::Permanent);
/// ```
pub fn classify(status: u16) -> Classification {
    match status {
        200..=299 => Classification::Success,
        408 | 429 | 500..=599 => Classification::Retryable,
        _ => Classification::Permanent,
    }
}

/// Whether a permanent `status` may be caused by the content of some items in a batch, so
/// that splitting the batch can isolate them: 400 (bad request), 413 (too large) and 422
/// (unprocessable). Other permanent statuses (401, 403, 404, 405, 415, 3xx, ...) say the
/// endpoint or credentials are wrong: every item would fail the same way, so splitting only
/// multiplies requests.
pub fn is_content_rejection(status: u16) -> bool {
    matches!(status, 400 | 413 | 422)
}

/// Retry policy: capped exponential backoff with jitter, bounded by attempts and by time.
///
/// Attempt `n` (1-based) that fails is followed by a wait of up to
/// `min(max_backoff, initial_backoff * multiplier^(n-1))` (the whole of it without jitter),
/// or the server's `Retry-After` when that is longer. No retry starts once `max_attempts`
/// were made or when the wait would end past `total_budget`, counted from the start of the
/// first attempt (callers also cap each attempt's timeout by the budget left, so the whole
/// delivery takes at most about `total_budget`).
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (default 5). `0` counts as `1`.
    pub max_attempts: u32,
    /// Backoff after the first failure (default 200 ms).
    pub initial_backoff: Duration,
    /// Largest backoff (default 30 s). `Retry-After` may ask for more, within the budget.
    pub max_backoff: Duration,
    /// Growth of the backoff per attempt (default 2.0).
    pub multiplier: f64,
    /// Time from the start of the first attempt after which no retry starts (default 60 s).
    pub total_budget: Duration,
    /// Randomisation of the backoff (default [`Jitter::Full`]).
    pub jitter: Jitter,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(30),
            multiplier: 2.0,
            total_budget: Duration::from_secs(60),
            jitter: Jitter::Full,
        }
    }
}

impl RetryPolicy {
    /// One attempt, no retries.
    pub fn no_retries() -> Self {
        RetryPolicy {
            max_attempts: 1,
            ..RetryPolicy::default()
        }
    }

    /// The exponential backoff after failed attempt `attempt` (1-based), before jitter:
    /// `min(max_backoff, initial_backoff * multiplier^(attempt-1))`.
    pub fn backoff_ceiling(&self, attempt: u32) -> Duration {
        let exp = i32::try_from(attempt.saturating_sub(1)).unwrap_or(i32::MAX);
        let secs = self.initial_backoff.as_secs_f64() * self.multiplier.max(1.0).powi(exp);
        Duration::try_from_secs_f64(secs)
            .unwrap_or(self.max_backoff)
            .min(self.max_backoff)
    }

    /// The wait after failed attempt `attempt` (1-based): [`RetryPolicy::backoff_ceiling`]
    /// with jitter applied.
    pub fn backoff<R: Rng + ?Sized>(&self, attempt: u32, rng: &mut R) -> Duration {
        let ceiling = self.backoff_ceiling(attempt);
        match self.jitter {
            Jitter::None => ceiling,
            Jitter::Full => {
                let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
                Duration::from_nanos(rng.random_range(0..=nanos))
            }
            Jitter::Equal => {
                let half = u64::try_from(ceiling.as_nanos() / 2).unwrap_or(u64::MAX / 2);
                Duration::from_nanos(half + rng.random_range(0..=half))
            }
        }
    }

    /// The wait before trying again a request that is held durably (a spooled payload), after
    /// `attempt` failed attempts (1-based): the jittered backoff, or the server's
    /// `Retry-After` when longer, but never more than `max_backoff`: a server asking for a
    /// day does not hold a spool for a day. There is no attempt limit and no budget here:
    /// whoever holds the request decides when to give up (a retention period).
    ///
    /// ```
    /// use std::time::Duration;
    /// use tributary::retry::{Jitter, RetryPolicy};
    /// let policy = RetryPolicy {
    ///     initial_backoff: Duration::from_secs(1),
    ///     max_backoff: Duration::from_secs(300),
    ///     jitter: Jitter::None,
    ///     ..RetryPolicy::default()
    /// };
    /// let mut rng = rand::rng();
    /// assert_eq!(policy.held_delay(4, None, &mut rng), Duration::from_secs(8));
    /// let asked = Some(Duration::from_secs(20));
    /// assert_eq!(policy.held_delay(1, asked, &mut rng), Duration::from_secs(20));
    /// let a_day = Some(Duration::from_secs(86_400));
    /// assert_eq!(policy.held_delay(1, a_day, &mut rng), Duration::from_secs(300));
    /// ```
    pub fn held_delay<R: Rng + ?Sized>(
        &self,
        attempt: u32,
        retry_after: Option<Duration>,
        rng: &mut R,
    ) -> Duration {
        let backoff = self.backoff(attempt, rng);
        retry_after
            .map_or(backoff, |ra| ra.max(backoff))
            .min(self.max_backoff)
    }

    /// How long to wait before the next attempt, or `None` to give up.
    ///
    /// `attempt` is the number of attempts made so far (all failed, retryably), `elapsed` the
    /// time since the first one started, `retry_after` what the server asked for. The wait
    /// is the jittered backoff, or `retry_after` when longer. It gives up when `attempt`
    /// reached `max_attempts`, or when waiting would reach the end of `total_budget`:
    /// in particular when `retry_after` asks for more than the budget has left, in which
    /// case the caller should report `retry_after` so that whoever holds the request
    /// durably can wait that long.
    pub fn next_delay<R: Rng + ?Sized>(
        &self,
        attempt: u32,
        elapsed: Duration,
        retry_after: Option<Duration>,
        rng: &mut R,
    ) -> Option<Duration> {
        if attempt >= self.max_attempts.max(1) {
            return None;
        }
        let remaining = self.total_budget.saturating_sub(elapsed);
        let backoff = self.backoff(attempt, rng);
        let delay = retry_after.map_or(backoff, |ra| ra.max(backoff));
        // Waiting until the budget's end would leave no time for the attempt itself.
        (delay < remaining).then_some(delay)
    }
}

/// Reads a `Retry-After` header value: delay-seconds (`"120"`) or an HTTP date
/// (`"Wed, 21 Oct 2015 07:28:00 GMT"`), relative to `now`. A date in the past means no
/// wait. Anything else is `None`.
///
/// ```
/// use std::time::{Duration, SystemTime};
/// use tributary::retry::parse_retry_after;
/// let now = SystemTime::now();
/// assert_eq!(parse_retry_after(" 3 ", now), Some(Duration::from_secs(3)));
/// assert_eq!(parse_retry_after("soon", now), None);
/// ```
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn exact() -> RetryPolicy {
        RetryPolicy {
            jitter: Jitter::None,
            ..RetryPolicy::default()
        }
    }

    #[test]
    fn backoff_grows_then_caps() {
        let p = RetryPolicy {
            max_backoff: Duration::from_secs(1),
            ..exact()
        };
        let mut rng = StdRng::seed_from_u64(1);
        let waits: Vec<_> = (1..=6)
            .map(|a| p.backoff(a, &mut rng).as_millis())
            .collect();
        assert_eq!(waits, [200, 400, 800, 1000, 1000, 1000]);
        // Huge attempt numbers saturate instead of overflowing.
        assert_eq!(p.backoff(u32::MAX, &mut rng), Duration::from_secs(1));
    }

    #[test]
    fn full_jitter_stays_under_the_ceiling_and_varies() {
        let p = RetryPolicy::default();
        let mut rng = StdRng::seed_from_u64(42);
        let waits: Vec<_> = (0..200).map(|_| p.backoff(3, &mut rng)).collect();
        assert!(waits.iter().all(|w| *w <= Duration::from_millis(800)));
        let distinct: std::collections::HashSet<_> = waits.iter().collect();
        assert!(distinct.len() > 100);
        // Deterministic for a seed.
        let mut again = StdRng::seed_from_u64(42);
        assert_eq!(p.backoff(3, &mut again), waits[0]);
    }

    #[test]
    fn gives_up_after_max_attempts() {
        let p = RetryPolicy {
            max_attempts: 3,
            ..exact()
        };
        let mut rng = StdRng::seed_from_u64(0);
        assert!(p.next_delay(1, Duration::ZERO, None, &mut rng).is_some());
        assert!(p.next_delay(2, Duration::ZERO, None, &mut rng).is_some());
        assert_eq!(p.next_delay(3, Duration::ZERO, None, &mut rng), None);
        assert_eq!(
            RetryPolicy::no_retries().next_delay(1, Duration::ZERO, None, &mut rng),
            None
        );
        let zero = RetryPolicy {
            max_attempts: 0,
            ..exact()
        };
        assert_eq!(zero.next_delay(1, Duration::ZERO, None, &mut rng), None);
    }

    #[test]
    fn budget_bounds_the_wait() {
        let p = RetryPolicy {
            total_budget: Duration::from_secs(10),
            ..exact()
        };
        let mut rng = StdRng::seed_from_u64(0);
        assert_eq!(
            p.next_delay(1, Duration::from_millis(9_700), None, &mut rng),
            Some(Duration::from_millis(200))
        );
        assert_eq!(
            p.next_delay(1, Duration::from_millis(9_800), None, &mut rng),
            None
        );
        assert_eq!(
            p.next_delay(1, Duration::from_secs(11), None, &mut rng),
            None
        );
    }

    #[test]
    fn retry_after_wins_when_longer_and_fits() {
        let p = exact();
        let mut rng = StdRng::seed_from_u64(0);
        let e = Duration::from_secs(1);
        assert_eq!(
            p.next_delay(1, e, Some(Duration::from_secs(3)), &mut rng),
            Some(Duration::from_secs(3))
        );
        // Shorter than the backoff: the backoff stands.
        assert_eq!(
            p.next_delay(3, e, Some(Duration::from_millis(10)), &mut rng),
            Some(Duration::from_millis(800))
        );
        // Beyond the budget left (59 s): give up rather than cut the server's wait short.
        assert_eq!(
            p.next_delay(1, e, Some(Duration::from_secs(59)), &mut rng),
            None
        );
        // Retry-After may exceed max_backoff within the budget.
        assert_eq!(
            p.next_delay(1, e, Some(Duration::from_secs(45)), &mut rng),
            Some(Duration::from_secs(45))
        );
    }

    #[test]
    fn classification() {
        for s in [200, 201, 202, 204, 299] {
            assert_eq!(classify(s), Classification::Success, "{s}");
        }
        for s in [408, 429, 500, 502, 503, 504, 599] {
            assert_eq!(classify(s), Classification::Retryable, "{s}");
        }
        for s in [100, 301, 302, 400, 401, 403, 404, 409, 413, 422] {
            assert_eq!(classify(s), Classification::Permanent, "{s}");
        }
        assert!(is_content_rejection(400) && is_content_rejection(413));
        assert!(!is_content_rejection(401) && !is_content_rejection(404));
    }

    #[test]
    fn retry_after_parsing() {
        let now = httpdate::parse_http_date("Wed, 21 Oct 2015 07:28:00 GMT").unwrap();
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        for bad in ["", "-1", "1.5", "tomorrow"] {
            assert_eq!(parse_retry_after(bad, now), None, "{bad}");
        }
    }
}
