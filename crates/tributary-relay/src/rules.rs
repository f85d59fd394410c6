//! The rules of a relay many teams share, as one ingest stage between the parse and the
//! append, in this order:
//!
//! 1. **privacy** ([`crate::privacy`]): attributes dropped or allow-listed, visitor ids
//!    hashed, before anything reaches the disk;
//! 2. **duplicates** ([`crate::dedup`]): events whose uuid was accepted within the window
//!    dropped, visitors left without events dropped;
//! 3. **quota** ([`crate::quota`]): what is left counted against the account's pending
//!    bytes; over it, 429.
//!
//! The per-token rate limit comes earlier, at authentication, before the body is read.
//! Metrics are labelled by `account_id` (or by the token's position in the list), never by
//! anything of a visitor; the account values are bounded by [`AccountLabels`].

use std::borrow::Cow;
use std::time::Duration;

use serde::Deserialize;
use tributary::RawBatch;
use tributary_spool::{DedupStore, Spool, SpoolError};

use crate::account_labels::AccountLabels;
use crate::config::RelayConfig;
use crate::dedup::{Claim, Dedup, DedupConfig, DedupError};
use crate::privacy::{PrivacyCounts, PrivacyRules};
use crate::quota::{AccountQuota, QuotaDecision, TokenRateLimit};
use crate::spool_addr::SpoolAddr;

/// The `Retry-After` of a 429 for an account over its quota: its backlog drains at the
/// upstream's pace, which a second or two does not change.
pub const QUOTA_RETRY_AFTER_SECS: u64 = 10;

/// The shared-relay rules, built once at start.
#[derive(Debug, Default)]
pub struct IngestRules {
    privacy: PrivacyRules,
    dedup: Option<Dedup>,
    quota: Option<AccountQuota>,
    rate: Option<TokenRateLimit>,
    labels: AccountLabels,
}

/// Why the stage refused a request.
#[derive(Debug, thiserror::Error)]
pub enum RuleError {
    /// A visitor the privacy rules could not read (400), with its index.
    #[error("{message}")]
    Visitor {
        /// Index in `visitors`.
        index: usize,
        /// What is wrong (names a field, never a value).
        message: String,
    },
    /// Another request carrying the same uuids is being accepted (503, retry).
    #[error("{0}")]
    InFlight(String),
    /// The account is over its quota (429).
    #[error(
        "account {account} has {pending} bytes pending with this request, over its \
         {limit}-byte share (--max-pending-bytes-per-account); retry later"
    )]
    Quota {
        /// The account.
        account: String,
        /// Its pending bytes with this request.
        pending: u64,
        /// The quota.
        limit: u64,
    },
    /// The spool or the duplicate store failed (503).
    #[error(transparent)]
    Storage(#[from] SpoolError),
}

/// A request that passed the stage: what to append, and what to settle after.
#[derive(Debug)]
pub struct Admitted {
    /// The payload to store (no visitor left: nothing to store, answer 2xx).
    pub batch: RawBatch,
    account: Option<String>,
    claim: Option<Claim>,
}

#[derive(Deserialize)]
struct AccountId<'a> {
    #[serde(borrow)]
    account_id: Cow<'a, str>,
}

/// The `account_id` of a canonical header (`"account_id":"1",...`, no braces).
fn account_of(header: &[u8]) -> String {
    let mut object = Vec::with_capacity(header.len() + 2);
    object.push(b'{');
    object.extend_from_slice(header);
    object.push(b'}');
    serde_json::from_slice::<AccountId<'_>>(&object)
        .map(|a| a.account_id.into_owned())
        .unwrap_or_default()
}

impl IngestRules {
    /// The rules `config` asks for; opens the durable duplicate set on a SQLite spool.
    pub fn from_config(config: &RelayConfig) -> Result<IngestRules, SpoolError> {
        let dedup = if config.dedup_window.is_zero() {
            None
        } else {
            let store = match SpoolAddr::parse(&config.spool) {
                SpoolAddr::Sqlite(dir) => Some(DedupStore::open(&dir)?),
                // Several nodes share an SQS queue: each filters what it saw, in memory.
                SpoolAddr::Sqs(_) => None,
            };
            Some(Dedup::new(
                DedupConfig {
                    window: config.dedup_window,
                    cache_uuids: config.dedup_cache_uuids,
                    max_uuids: config.dedup_max_uuids,
                },
                store,
            ))
        };
        let rate = config.token_rate_limit.map(|rate| {
            let burst = config
                .token_burst
                .unwrap_or_else(|| u32::try_from(rate.ceil() as u64).unwrap_or(u32::MAX).max(1));
            TokenRateLimit::new(rate, burst, config.auth_tokens.len())
        });
        Ok(IngestRules {
            privacy: config.privacy_rules.clone(),
            dedup,
            quota: config.max_pending_bytes_per_account.map(AccountQuota::new),
            rate,
            labels: AccountLabels::new(
                config.privacy_rules.accounts.keys().cloned(),
                config.max_account_labels,
            ),
        })
    }

    /// Only a duplicate filter (for tests of the ingest path).
    #[cfg(test)]
    pub(crate) fn with_dedup(dedup: Dedup) -> IngestRules {
        IngestRules {
            dedup: Some(dedup),
            ..IngestRules::default()
        }
    }

    /// Whether any rule applies to payloads (else the stage is skipped).
    pub fn is_noop(&self) -> bool {
        self.privacy.is_noop() && self.dedup.is_none() && self.quota.is_none()
    }

    /// Takes one request from bearer token `index`'s bucket; `Err(wait)` over the rate.
    pub fn check_rate(&self, index: Option<usize>) -> Result<(), Duration> {
        match (&self.rate, index) {
            (Some(rate), Some(i)) => rate.take(i).inspect_err(|_| {
                metrics::counter!("tributary_token_rate_limited_total", "token" => i.to_string())
                    .increment(1);
            }),
            _ => Ok(()),
        }
    }

    /// Privacy, then duplicates, then quota. `stored_bytes` says what the batch will take
    /// in the spool.
    pub async fn admit(
        &self,
        spool: &dyn Spool,
        batch: RawBatch,
        stored_bytes: impl Fn(&RawBatch) -> u64,
    ) -> Result<Admitted, RuleError> {
        if self.is_noop() {
            return Ok(Admitted {
                batch,
                account: None,
                claim: None,
            });
        }
        let header = batch.header().clone();
        let account = account_of(&header);
        let rule = self.privacy.for_account(&account);
        let mut visitors = batch.into_visitors();
        if !rule.is_noop() {
            let mut counts = PrivacyCounts::default();
            for (index, v) in visitors.iter_mut().enumerate() {
                match rule.apply(v, &mut counts) {
                    Ok(Some(new)) => *v = new,
                    Ok(None) => {}
                    Err(e) => {
                        return Err(RuleError::Visitor {
                            index,
                            message: e.0,
                        });
                    }
                }
            }
            let label = self.labels.label(&account);
            metrics::counter!("tributary_privacy_attributes_dropped_total", "account" => label.clone())
                .increment(counts.attributes_dropped);
            metrics::counter!("tributary_privacy_visitor_ids_hashed_total", "account" => label.clone())
                .increment(counts.visitor_ids_hashed);
            metrics::counter!("tributary_privacy_visitors_rewritten_total", "account" => label)
                .increment(counts.visitors_rewritten);
        }
        let mut claim = None;
        if let Some(dedup) = &self.dedup {
            let filtered = dedup
                .filter(&account, visitors)
                .await
                .map_err(|e| match e {
                    DedupError::InFlight => RuleError::InFlight(e.to_string()),
                    DedupError::Store(s) => RuleError::Storage(s),
                })?;
            if filtered.duplicate_events > 0 {
                let label = self.labels.label(&account);
                metrics::counter!("tributary_ingest_duplicate_events_total", "account" => label.clone())
                    .increment(filtered.duplicate_events);
                metrics::counter!("tributary_ingest_duplicate_visitors_dropped_total", "account" => label)
                    .increment(filtered.dropped_visitors);
            }
            visitors = filtered.visitors;
            claim = Some(filtered.claim);
        }
        let batch = RawBatch::from_parts(header, visitors);
        if let (Some(quota), false) = (&self.quota, batch.visitors().is_empty()) {
            let bytes = stored_bytes(&batch);
            let decision = quota.check(spool, &account, bytes).await;
            let refused = match decision {
                Ok(QuotaDecision::Accept) => None,
                Ok(QuotaDecision::Refuse { pending, limit }) => Some(RuleError::Quota {
                    account: account.clone(),
                    pending,
                    limit,
                }),
                Err(e) => Some(RuleError::Storage(e)),
            };
            if let Some(err) = refused {
                if matches!(err, RuleError::Quota { .. }) {
                    metrics::counter!("tributary_quota_refused_requests_total", "account" => self.labels.label(&account))
                        .increment(1);
                }
                if let (Some(dedup), Some(c)) = (&self.dedup, claim) {
                    dedup.settle(c, false).await;
                }
                return Err(err);
            }
        }
        Ok(Admitted {
            batch,
            account: Some(account),
            claim,
        })
    }

    /// After the append: `accepted` records the uuids and counts the bytes for the quota;
    /// otherwise the claim is released.
    pub async fn settle(&self, pending: PendingSettlement, accepted: bool, bytes: u64) {
        let PendingSettlement { account, claim } = pending;
        if let (Some(dedup), Some(claim)) = (&self.dedup, claim) {
            dedup.settle(claim, accepted).await;
        }
        if let (Some(quota), Some(account), true) = (&self.quota, account, accepted) {
            quota.appended(&account, bytes);
        }
    }
}

/// What [`IngestRules::settle`] needs once the append is done: the account (for the
/// quota's figure) and the claimed uuids. Dropped unsettled, the uuids are released.
#[derive(Debug)]
pub struct PendingSettlement {
    account: Option<String>,
    claim: Option<Claim>,
}

impl Admitted {
    /// Splits into the batch to store and what [`IngestRules::settle`] needs.
    pub fn into_parts(self) -> (RawBatch, PendingSettlement) {
        (
            self.batch,
            PendingSettlement {
                account: self.account,
                claim: self.claim,
            },
        )
    }
}
