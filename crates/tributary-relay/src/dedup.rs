//! The duplicate filter (`--dedup-window`): an event whose `uuid` the relay accepted within
//! the window is dropped at ingest, so an SDK that retries after a lost acknowledgement
//! reaches the upstream once.
//!
//! Two layers: a bounded map in memory of the uuids accepted recently (`--dedup-cache-uuids`
//! entries, oldest out first), and on the SQLite spool a durable set in `dedup.db` beside the
//! spool ([`tributary_spool::DedupStore`], at most `--dedup-max-uuids` rows, expired past
//! the window), so the filter holds across restarts and `kill -9`. The disk is asked only
//! while the map may not know every uuid of the window (after a restart, until the window
//! has passed; or once the map has evicted a uuid still in the window); otherwise a uuid the
//! map does not hold is new, and only its record is written.
//!
//! The order makes it lose nothing: a request's uuids are *claimed* (in memory) while it is
//! appended, and *recorded* only after the spool committed. A crash between the two forgets
//! the uuids, and the client's retry is accepted again (a duplicate, never a loss). A second
//! request carrying a claimed uuid waits for the first to settle (up to [`IN_FLIGHT_WAIT`])
//! and is then filtered again; still claimed after that, it is answered 503 +
//! `Retry-After` rather than dropped, since the first may yet fail.
//!
//! Uuids are keyed per account ([`dedup_key`]): one account's uuids never drop another's
//! events, and an empty uuid counts as none (never dropped).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

use bytes::Bytes;
use serde::Deserialize;
use tributary_spool::{DedupKey, DedupStore, SpoolError, dedup_key};

use crate::json_fields::{Fields, array_items, write_array, write_object};

/// The default window: off. See docs/relay.md for the measured cost that a window adds.
pub const DEFAULT_WINDOW: Duration = Duration::ZERO;

/// Default uuids held in memory: about 9 to 11 MiB of resident memory per 100,000 (measured,
/// BENCHMARKS.md), so 200,000 (about 17 to 21 MiB) keep the relay inside its memory budget.
pub const DEFAULT_CACHE_UUIDS: usize = 200_000;

/// Default uuids held on disk: about 60 bytes each (measured, BENCHMARKS.md), so 2,000,000
/// take some 120 MiB beside the spool.
pub const DEFAULT_MAX_UUIDS: u64 = 2_000_000;

/// How often the durable set is expired.
const EXPIRY_EVERY: Duration = Duration::from_secs(60);

/// The filter's settings.
#[derive(Debug, Clone, Copy)]
pub struct DedupConfig {
    /// How long an accepted uuid is remembered.
    pub window: Duration,
    /// Entries held in memory.
    pub cache_uuids: usize,
    /// Rows held on disk.
    pub max_uuids: u64,
}

/// In-memory recent uuids, oldest first.
#[derive(Default)]
struct Cache {
    at: HashMap<DedupKey, i64>,
    order: VecDeque<(DedupKey, i64)>,
    /// Uuids being appended, each with a receiver that closes when its claim ends.
    claimed: HashMap<DedupKey, watch::Receiver<()>>,
    /// The newest time of a uuid this map does not hold although it may be in the durable
    /// set: the newest there when the relay started, or the newest entry evicted since.
    /// While it is older than the window, the map knows every uuid of the window, and a
    /// uuid it does not hold needs no lookup on disk.
    unknown_newest: i64,
}

impl Cache {
    fn insert(&mut self, key: DedupKey, now: i64, cap: usize) {
        self.at.insert(key, now);
        self.order.push_back((key, now));
        while self.order.len() > cap {
            if let Some((old, at)) = self.order.pop_front() {
                // Only the newest entry of a key removes it from the map.
                if self.at.get(&old) == Some(&at) {
                    self.at.remove(&old);
                    self.unknown_newest = self.unknown_newest.max(at);
                }
            }
        }
    }

    /// The claim end to wait for when one of `keys` is claimed by another request.
    fn claimed_by_other(&self, keys: &[DedupKey]) -> Option<watch::Receiver<()>> {
        keys.iter().find_map(|k| self.claimed.get(k).cloned())
    }
}

/// The filter: shared by every ingest request.
pub struct Dedup {
    config: DedupConfig,
    cache: Arc<Mutex<Cache>>,
    store: Option<Arc<DedupStore>>,
    expiring: Arc<AtomicBool>,
    last_expiry: Mutex<i64>,
}

impl std::fmt::Debug for Dedup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dedup")
            .field("config", &self.config)
            .field("durable", &self.store.is_some())
            .finish()
    }
}

/// A request's uuids held while it is appended; give it back with [`Dedup::settle`].
/// Dropped unsettled (the request was cut off: its client went away, shutdown), the uuids
/// are released as not accepted.
#[derive(Default)]
pub struct Claim {
    keys: Vec<DedupKey>,
    cache: Option<Arc<Mutex<Cache>>>,
    /// Dropped (after the keys left the map, since `Drop::drop` runs before the fields
    /// drop), it wakes the requests waiting on these uuids.
    _ended: Option<watch::Sender<()>>,
}

impl std::fmt::Debug for Claim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Claim")
            .field("uuids", &self.keys.len())
            .finish()
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if let (Some(cache), false) = (&self.cache, self.keys.is_empty()) {
            let mut cache = cache
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for k in &self.keys {
                cache.claimed.remove(k);
            }
        }
    }
}

/// How long a request waits for another request's claim on one of its uuids to end
/// before it is answered 503 (the other append is normally done in milliseconds; one
/// that takes longer is stuck on the disk, and the client is better told to retry).
pub const IN_FLIGHT_WAIT: Duration = Duration::from_secs(2);

/// Why the filter could not decide.
#[derive(Debug, thiserror::Error)]
pub enum DedupError {
    /// Another request carrying one of these uuids was still being appended after
    /// [`IN_FLIGHT_WAIT`].
    #[error("another request with the same event uuids is being accepted; retry")]
    InFlight,
    /// The durable set failed.
    #[error(transparent)]
    Store(#[from] SpoolError),
}

/// What the filter did to one request.
#[derive(Debug, Default)]
pub struct Filtered {
    /// The visitors that remain (each as received, or written again without its duplicate
    /// events).
    pub visitors: Vec<Bytes>,
    /// Events dropped as duplicates.
    pub duplicate_events: u64,
    /// Visitors dropped because no event was left.
    pub dropped_visitors: u64,
    /// The uuids claimed; settle them.
    pub claim: Claim,
}

#[derive(Deserialize)]
struct EventUuid<'a> {
    #[serde(borrow)]
    uuid: Option<std::borrow::Cow<'a, str>>,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The key of each event of `account`'s visitor, by snapshot: `None` for an event
/// without a uuid or with an empty one (kept: it cannot be a known duplicate). A visitor
/// or snapshot that repeats `snapshots` or `events` is not looked into (kept whole), since
/// [`without_events`] could not rewrite it faithfully.
fn visitor_uuids(account: &str, visitor: &[u8]) -> Option<Vec<Vec<Option<DedupKey>>>> {
    let fields = Fields::parse(visitor).ok()?;
    let snapshots = array_items(fields.get_unique("snapshots")?)?;
    Some(
        snapshots
            .iter()
            .map(|s| {
                Fields::parse(s.get().as_bytes())
                    .ok()
                    .and_then(|f| f.get_unique("events").and_then(array_items))
                    .map(|events| {
                        events
                            .iter()
                            .map(|e| {
                                serde_json::from_str::<EventUuid<'_>>(e.get())
                                    .ok()
                                    .and_then(|e| e.uuid)
                                    .filter(|u| !u.is_empty())
                                    .map(|u| dedup_key(account, &u))
                            })
                            .collect()
                    })
                    .unwrap_or_default()
            })
            .collect(),
    )
}

/// `visitor` without the events `keep` says no to; snapshots left without events go, and
/// `None` when no snapshot is left.
fn without_events(visitor: &[u8], keep: &[Vec<bool>]) -> Option<Bytes> {
    let fields = Fields::parse(visitor).ok()?;
    let snapshots = array_items(fields.get("snapshots")?)?;
    let mut kept_snapshots: Vec<Vec<u8>> = Vec::new();
    for (s, keep_events) in snapshots.iter().zip(keep) {
        if keep_events.iter().all(|k| *k) {
            kept_snapshots.push(s.get().as_bytes().to_vec());
            continue;
        }
        if !keep_events.iter().any(|k| *k) {
            continue;
        }
        let sf = Fields::parse(s.get().as_bytes()).ok()?;
        let events = sf.get("events").and_then(array_items)?;
        let events = write_array(
            events
                .iter()
                .zip(keep_events)
                .filter(|(_, k)| **k)
                .map(|(e, _)| e.get().as_bytes()),
        );
        kept_snapshots.push(write_object(sf.0.iter().enumerate().map(|(i, (k, v))| {
            let value = if k == "events" {
                &events[..]
            } else {
                v.get().as_bytes()
            };
            (sf.raw_key(i), value)
        })));
    }
    if kept_snapshots.is_empty() {
        return None;
    }
    let snapshots = write_array(kept_snapshots.iter().map(Vec::as_slice));
    Some(Bytes::from(write_object(fields.0.iter().enumerate().map(
        |(i, (k, v))| {
            let value = if k == "snapshots" {
                &snapshots[..]
            } else {
                v.get().as_bytes()
            };
            (fields.raw_key(i), value)
        },
    ))))
}

impl Dedup {
    /// A filter; `store` makes it durable.
    pub fn new(config: DedupConfig, store: Option<DedupStore>) -> Dedup {
        // What the durable set holds from before is unknown to the map; if it cannot be
        // read, assume it holds everything (ask it every time).
        let unknown_newest = store.as_ref().map_or(i64::MIN, |s| {
            s.newest_ms().map_or(i64::MAX, |n| n.unwrap_or(i64::MIN))
        });
        Dedup {
            config,
            cache: Arc::new(Mutex::new(Cache {
                unknown_newest,
                ..Cache::default()
            })),
            store: store.map(Arc::new),
            expiring: Arc::new(AtomicBool::new(false)),
            last_expiry: Mutex::new(0),
        }
    }

    /// The settings.
    pub fn config(&self) -> DedupConfig {
        self.config
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Drops the events of `account`'s `visitors` already accepted within the window (and
    /// repeats within the request), and claims the uuids of the rest. A uuid another
    /// request is appending is waited for (up to [`IN_FLIGHT_WAIT`]), then looked at again.
    pub async fn filter(
        &self,
        account: &str,
        visitors: Vec<Bytes>,
    ) -> Result<Filtered, DedupError> {
        let per_visitor: Vec<Option<Vec<Vec<Option<DedupKey>>>>> =
            visitors.iter().map(|v| visitor_uuids(account, v)).collect();
        let mut unique: Vec<DedupKey> = Vec::new();
        let mut in_request: HashSet<DedupKey> = HashSet::new();
        for k in per_visitor.iter().flatten().flatten().flatten().flatten() {
            if in_request.insert(*k) {
                unique.push(*k);
            }
        }
        let deadline = tokio::time::Instant::now() + IN_FLIGHT_WAIT;
        let (known, claim) = loop {
            match self.try_claim(&unique).await? {
                Ok(done) => break done,
                Err(mut other) => {
                    // `changed` ends with an error once the other claim's sender is gone,
                    // at once if it already is.
                    if tokio::time::timeout_at(deadline, other.changed())
                        .await
                        .is_err()
                    {
                        return Err(DedupError::InFlight);
                    }
                }
            }
        };
        let mut out = Filtered {
            claim,
            ..Filtered::default()
        };
        let mut first_seen: HashSet<DedupKey> = HashSet::new();
        for (visitor, uuids) in visitors.into_iter().zip(per_visitor) {
            let Some(uuids) = uuids else {
                out.visitors.push(visitor);
                continue;
            };
            let keep: Vec<Vec<bool>> = uuids
                .iter()
                .map(|events| {
                    events
                        .iter()
                        .map(|k| match k {
                            None => true,
                            Some(k) => !known.contains(k) && first_seen.insert(*k),
                        })
                        .collect()
                })
                .collect();
            let dropped = keep.iter().flatten().filter(|k| !**k).count() as u64;
            if dropped == 0 {
                out.visitors.push(visitor);
                continue;
            }
            out.duplicate_events += dropped;
            match without_events(&visitor, &keep) {
                Some(v) => out.visitors.push(v),
                None => out.dropped_visitors += 1,
            }
        }
        Ok(out)
    }

    /// One look at `unique`: the keys accepted within the window and a claim on the rest,
    /// or (inner `Err`) the end of another request's claim to wait for.
    async fn try_claim(
        &self,
        unique: &[DedupKey],
    ) -> Result<Result<(HashSet<DedupKey>, Claim), watch::Receiver<()>>, DedupError> {
        let now = now_ms();
        let since =
            now.saturating_sub(i64::try_from(self.config.window.as_millis()).unwrap_or(i64::MAX));
        // Memory first; what it does not know, the durable set.
        let mut known: HashSet<DedupKey> = HashSet::new();
        let mut ask: Vec<DedupKey> = Vec::new();
        let complete;
        {
            let cache = self.cache();
            if let Some(other) = cache.claimed_by_other(unique) {
                return Ok(Err(other));
            }
            complete = cache.unknown_newest < since;
            for k in unique {
                match cache.at.get(k) {
                    Some(at) if *at >= since => {
                        known.insert(*k);
                    }
                    _ => ask.push(*k),
                }
            }
        }
        if let (Some(store), false, false) = (&self.store, ask.is_empty(), complete) {
            let store = store.clone();
            let keys = ask.clone();
            let seen = tokio::task::spawn_blocking(move || store.seen_since(&keys, since))
                .await
                .map_err(|e| SpoolError::Storage(format!("dedup lookup failed: {e}")))??;
            known.extend(ask.iter().zip(seen).filter(|(_, s)| *s).map(|(k, _)| *k));
        }
        let (ended, ended_rx) = watch::channel(());
        let mut cache = self.cache();
        // Between the two looks another request may have claimed, or settled, one of
        // these uuids: claimed, wait for it; accepted meanwhile, it is known now.
        if let Some(other) = cache.claimed_by_other(unique) {
            return Ok(Err(other));
        }
        let mut keys = Vec::new();
        for k in unique {
            if known.contains(k) {
                continue;
            }
            if matches!(cache.at.get(k), Some(at) if *at >= since) {
                known.insert(*k);
                continue;
            }
            cache.claimed.insert(*k, ended_rx.clone());
            keys.push(*k);
        }
        drop(cache);
        Ok(Ok((
            known,
            Claim {
                keys,
                cache: Some(self.cache.clone()),
                _ended: Some(ended),
            },
        )))
    }

    /// Ends a claim: `accepted` records its uuids as accepted now (in memory, then durably),
    /// otherwise they are forgotten.
    pub async fn settle(&self, mut claim: Claim, accepted: bool) {
        let now = now_ms();
        let keys = std::mem::take(&mut claim.keys);
        {
            let mut cache = self.cache();
            for k in &keys {
                cache.claimed.remove(k);
                if accepted {
                    cache.insert(*k, now, self.config.cache_uuids);
                }
            }
        }
        // Wakes the requests waiting on these uuids, which now find them accepted (or free).
        drop(claim);
        if !accepted || keys.is_empty() {
            return;
        }
        if let Some(store) = &self.store {
            let store = store.clone();
            let result = tokio::task::spawn_blocking(move || store.record(&keys, now)).await;
            match result {
                Ok(Ok(())) => {}
                // Accepted already: the memory keeps the uuids; a restart forgets them.
                Ok(Err(e)) => tracing::error!(error = %e, "could not record accepted event uuids"),
                Err(e) => tracing::error!(error = %e, "could not record accepted event uuids"),
            }
            self.maybe_expire(now);
        }
    }

    /// Expires the durable set once a minute, off the request path.
    fn maybe_expire(&self, now: i64) {
        {
            let mut last = self
                .last_expiry
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if now - *last < i64::try_from(EXPIRY_EVERY.as_millis()).unwrap_or(i64::MAX) {
                return;
            }
            *last = now;
        }
        let Some(store) = self.store.clone() else {
            return;
        };
        if self.expiring.swap(true, Ordering::AcqRel) {
            return;
        }
        let since =
            now.saturating_sub(i64::try_from(self.config.window.as_millis()).unwrap_or(i64::MAX));
        let max = self.config.max_uuids;
        let expiring = self.expiring.clone();
        tokio::task::spawn_blocking(move || {
            match store.expire(since, max) {
                Ok(0) => {}
                Ok(n) => tracing::debug!(uuids = n, "expired remembered event uuids"),
                Err(e) => tracing::warn!(error = %e, "could not expire remembered event uuids"),
            }
            expiring.store(false, Ordering::Release);
        });
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn config() -> DedupConfig {
        DedupConfig {
            window: Duration::from_secs(600),
            cache_uuids: 100,
            max_uuids: 1000,
        }
    }

    fn v(id: &str, uuids: &[&str]) -> Bytes {
        let events: Vec<String> = uuids
            .iter()
            .map(|u| format!(r#"{{"uuid":"{u}","revenue":4200}}"#))
            .collect();
        Bytes::from(format!(
            r#"{{"visitor_id":"{id}","snapshots":[{{"decisions":[],"events":[{}]}}],"x":3.50}}"#,
            events.join(",")
        ))
    }

    #[tokio::test]
    async fn accepted_uuids_are_dropped_later_and_repeats_within_a_request_once() {
        let dedup = Dedup::new(config(), None);
        let first = dedup
            .filter("1", vec![v("a", &["1", "2"]), v("b", &["2"])])
            .await
            .unwrap();
        assert_eq!(first.duplicate_events, 1);
        assert_eq!(first.dropped_visitors, 1);
        assert_eq!(first.visitors, vec![v("a", &["1", "2"])]);
        dedup.settle(first.claim, true).await;
        let again = dedup
            .filter("1", vec![v("a", &["1", "3"]), v("c", &["2"])])
            .await
            .unwrap();
        assert_eq!(again.duplicate_events, 2);
        // The rest of the visitor is as it was: only the event went.
        assert_eq!(again.visitors, vec![v("a", &["3"])]);
    }

    #[tokio::test]
    async fn a_claimed_uuid_waits_for_its_claim_and_is_filtered_again() {
        let dedup = Arc::new(Dedup::new(config(), None));
        let held = dedup.filter("1", vec![v("a", &["1"])]).await.unwrap();
        // A second request with the claimed uuid and a new one waits, not 503.
        let waiter = tokio::spawn({
            let dedup = dedup.clone();
            async move { dedup.filter("1", vec![v("a", &["1", "2"])]).await }
        });
        // It is parked on the claim: nothing but the settle below can let it finish.
        tokio::task::yield_now().await;
        assert!(
            !waiter.is_finished(),
            "the waiter did not wait for the claim"
        );
        dedup.settle(held.claim, true).await;
        let second = waiter.await.unwrap().unwrap();
        assert_eq!(
            second.duplicate_events, 1,
            "the settled uuid is a duplicate now"
        );
        assert_eq!(
            second.visitors,
            vec![v("a", &["2"])],
            "the new event is kept"
        );
    }

    #[tokio::test]
    async fn a_dropped_claim_frees_its_uuids_for_the_waiter() {
        let dedup = Arc::new(Dedup::new(config(), None));
        let held = dedup.filter("1", vec![v("a", &["1"])]).await.unwrap();
        let waiter = tokio::spawn({
            let dedup = dedup.clone();
            async move { dedup.filter("1", vec![v("a", &["1"])]).await }
        });
        tokio::task::yield_now().await;
        drop(held);
        let retried = waiter.await.unwrap().unwrap();
        assert_eq!(
            retried.duplicate_events, 0,
            "a dropped claim was not accepted"
        );
        dedup.settle(retried.claim, false).await;
        assert_eq!(
            dedup
                .filter("1", vec![v("a", &["1"])])
                .await
                .unwrap()
                .duplicate_events,
            0
        );
    }

    #[tokio::test]
    async fn a_claim_held_past_the_bound_is_in_flight() {
        let dedup = Dedup::new(config(), None);
        let _held = dedup.filter("1", vec![v("a", &["1"])]).await.unwrap();
        let started = tokio::time::Instant::now();
        assert!(matches!(
            dedup.filter("1", vec![v("a", &["1"])]).await,
            Err(DedupError::InFlight)
        ));
        assert!(started.elapsed() >= IN_FLIGHT_WAIT);
    }

    #[tokio::test]
    async fn accounts_do_not_share_uuids_and_empty_uuids_are_never_dropped() {
        let dedup = Dedup::new(config(), None);
        let first = dedup
            .filter("1", vec![v("a", &["u1", ""]), v("b", &[""])])
            .await
            .unwrap();
        assert_eq!(first.duplicate_events, 0, "empty uuids are not repeats");
        dedup.settle(first.claim, true).await;
        let other = dedup.filter("2", vec![v("a", &["u1", ""])]).await.unwrap();
        assert_eq!(
            other.duplicate_events, 0,
            "account 2 lost an event to account 1's uuid"
        );
        let same = dedup.filter("1", vec![v("a", &["u1", ""])]).await.unwrap();
        assert_eq!(same.duplicate_events, 1);
        assert_eq!(same.visitors, vec![v("a", &[""])]);
    }

    #[tokio::test]
    async fn a_snapshot_with_two_events_fields_is_left_whole() {
        let dedup = Dedup::new(config(), None);
        let f = dedup.filter("1", vec![v("a", &["1"])]).await.unwrap();
        dedup.settle(f.claim, true).await;
        let twice = Bytes::from_static(
            br#"{"visitor_id":"a","snapshots":[{"events":[{"uuid":"1"}],"events":[{"uuid":"2"}]}]}"#,
        );
        let f = dedup.filter("1", vec![twice.clone()]).await.unwrap();
        assert_eq!(f.duplicate_events, 0);
        assert_eq!(f.visitors, vec![twice], "the second events array was lost");
    }

    #[tokio::test]
    async fn the_durable_set_answers_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let dedup = Dedup::new(config(), Some(DedupStore::open(dir.path()).unwrap()));
        let f = dedup.filter("1", vec![v("a", &["1"])]).await.unwrap();
        dedup.settle(f.claim, true).await;
        drop(dedup);
        let restarted = Dedup::new(config(), Some(DedupStore::open(dir.path()).unwrap()));
        let f = restarted.filter("1", vec![v("a", &["1"])]).await.unwrap();
        assert_eq!((f.duplicate_events, f.dropped_visitors), (1, 1));
    }

    #[tokio::test]
    async fn an_evicted_uuid_is_still_found_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let small = DedupConfig {
            cache_uuids: 1,
            ..config()
        };
        let dedup = Dedup::new(small, Some(DedupStore::open(dir.path()).unwrap()));
        for u in ["1", "2"] {
            let f = dedup.filter("1", vec![v("a", &[u])]).await.unwrap();
            dedup.settle(f.claim, true).await;
        }
        // "1" left the map for "2": the map is no longer complete, and the disk answers.
        let f = dedup.filter("1", vec![v("a", &["1"])]).await.unwrap();
        assert_eq!(f.duplicate_events, 1);
    }
}
