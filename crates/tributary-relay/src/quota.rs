//! Fair share: an account whose pending payloads reach `--max-pending-bytes-per-account`
//! is refused with 429 while every other account is still accepted; and a request rate per
//! bearer token (`--token-rate-limit`, a token bucket) so one service cannot take the relay's
//! whole ingest.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tributary_spool::{Spool, SpoolError};

/// How long a figure read from the spool is used before it is read again; appends made
/// here in between are added to it, so a flood cannot run past the quota between reads.
const REFRESH: Duration = Duration::from_millis(250);

/// Most accounts whose figure is remembered between reads (the least recently read go).
const MAX_ACCOUNTS_CACHED: usize = 10_000;

/// The per-account quota on pending bytes.
#[derive(Debug)]
pub struct AccountQuota {
    max_pending_bytes: u64,
    cache: Mutex<HashMap<String, (Instant, u64)>>,
}

/// What the quota says about a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaDecision {
    /// Under the quota.
    Accept,
    /// Over it: the account's pending bytes and the limit.
    Refuse {
        /// Bytes pending for the account (with this request's).
        pending: u64,
        /// The limit.
        limit: u64,
    },
}

impl AccountQuota {
    /// A quota of `max_pending_bytes` per account.
    pub fn new(max_pending_bytes: u64) -> AccountQuota {
        AccountQuota {
            max_pending_bytes,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The limit.
    pub fn limit(&self) -> u64 {
        self.max_pending_bytes
    }

    /// Whether `account` may add `bytes` now.
    pub async fn check(
        &self,
        spool: &dyn Spool,
        account: &str,
        bytes: u64,
    ) -> Result<QuotaDecision, SpoolError> {
        let cached = {
            let cache = self
                .cache
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            cache
                .get(account)
                .filter(|(at, _)| at.elapsed() < REFRESH)
                .map(|(_, b)| *b)
        };
        let pending = match cached {
            Some(b) => b,
            None => {
                let b = spool.account_pending_bytes(account).await?.ok_or_else(|| {
                    SpoolError::Unsupported("per-account pending bytes".to_owned())
                })?;
                let mut cache = self
                    .cache
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if cache.len() >= MAX_ACCOUNTS_CACHED {
                    cache.retain(|_, (at, _)| at.elapsed() < REFRESH);
                }
                cache.insert(account.to_owned(), (Instant::now(), b));
                b
            }
        };
        let after = pending.saturating_add(bytes);
        Ok(if after > self.max_pending_bytes {
            QuotaDecision::Refuse {
                pending: after,
                limit: self.max_pending_bytes,
            }
        } else {
            QuotaDecision::Accept
        })
    }

    /// Counts `bytes` appended for `account` until its figure is next read.
    pub fn appended(&self, account: &str, bytes: u64) {
        let mut cache = self
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((_, b)) = cache.get_mut(account) {
            *b = b.saturating_add(bytes);
        }
    }
}

/// One token bucket: `rate` tokens a second, at most `burst` held.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// A token bucket per bearer token (by its position in the configured list, so the map is
/// bounded by the list and holds no secret).
#[derive(Debug)]
pub struct TokenRateLimit {
    rate: f64,
    burst: f64,
    buckets: Mutex<Vec<Bucket>>,
}

impl TokenRateLimit {
    /// `rate` requests a second per token, bursts of up to `burst`, for `tokens` tokens.
    ///
    /// ```
    /// use tributary_relay::quota::TokenRateLimit;
    /// let limit = TokenRateLimit::new(1.0, 2, 1);
    /// assert!(limit.take(0).is_ok());
    /// assert!(limit.take(0).is_ok());
    /// assert!(limit.take(0).is_err()); // the burst is spent; a token comes in 1 s
    /// ```
    pub fn new(rate: f64, burst: u32, tokens: usize) -> TokenRateLimit {
        let now = Instant::now();
        TokenRateLimit {
            rate,
            burst: f64::from(burst.max(1)),
            buckets: Mutex::new(vec![
                Bucket {
                    tokens: f64::from(burst.max(1)),
                    at: now,
                };
                tokens
            ]),
        }
    }

    /// Takes one request from token `index`'s bucket; `Err(wait)` when it is empty, with
    /// how long until the next request is allowed.
    pub fn take(&self, index: usize) -> Result<(), Duration> {
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(b) = buckets.get_mut(index) else {
            return Ok(());
        };
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * self.rate).min(self.burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            // A rate too small (or not a number) makes no Duration: the longest wait told.
            Err(Duration::try_from_secs_f64((1.0 - b.tokens) / self.rate)
                .map_or(MAX_RATE_WAIT, |w| w.min(MAX_RATE_WAIT)))
        }
    }
}

/// The longest wait [`TokenRateLimit::take`] reports (`Retry-After`), whatever the rate.
pub const MAX_RATE_WAIT: Duration = Duration::from_secs(3600);

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_tiny_rate_reports_the_longest_wait_instead_of_panicking() {
        for rate in [1e-300, 0.0, f64::MIN_POSITIVE] {
            let limit = TokenRateLimit::new(rate, 1, 1);
            assert!(limit.take(0).is_ok());
            assert_eq!(limit.take(0), Err(MAX_RATE_WAIT), "rate {rate}");
        }
    }
}
