//! The durable half of the relay's duplicate filter: which event uuids were accepted
//! recently, in a small SQLite file of its own (`dedup.db`) beside the spool's.
//!
//! A file of its own, not a table in `spool.db`, because the spool has one writer thread
//! that group-commits appends: a second connection writing the same file would wait for
//! the write lock behind every group commit, and every group commit behind it. Here the
//! two files commit side by side.
//!
//! Keys are the first 16 bytes of SHA-256 of the account id, a zero byte and the uuid
//! text, not the uuid: an account's uuids never match another account's (one team cannot
//! suppress another's events by sending its uuids), rows have a fixed size whatever a
//! client sends as a uuid, and a collision (about one in 2^64 at a billion keys) costs
//! one dropped event at worst.
//!
//! Rows are kept in insertion order (rowid), which is time order: expiry deletes a prefix
//! of the table, and the bound on rows deletes the oldest first, both without an index on
//! the time.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

use crate::SpoolError;

/// The dedup file inside the spool directory.
pub const DEDUP_FILE: &str = "dedup.db";

/// One remembered uuid: 16 bytes of its SHA-256 (see [`dedup_key`]).
pub type DedupKey = [u8; 16];

/// The key of `account`'s event `uuid` as [`DedupStore`] stores it: SHA-256 of
/// `account ‖ 0x00 ‖ uuid`, so the same uuid under two accounts gives two keys.
///
/// ```
/// use tributary_spool::dedup_key;
/// assert_eq!(dedup_key("1", "a"), dedup_key("1", "a"));
/// assert_ne!(dedup_key("1", "a"), dedup_key("1", "b"));
/// assert_ne!(dedup_key("1", "a"), dedup_key("2", "a"));
/// // The separator keeps the two parts apart.
/// assert_ne!(dedup_key("1", "2a"), dedup_key("12", "a"));
/// ```
pub fn dedup_key(account: &str, uuid: &str) -> DedupKey {
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    hasher.update(account.as_bytes());
    hasher.update([0u8]);
    hasher.update(uuid.as_bytes());
    let digest = hasher.finalize();
    let mut key = [0u8; 16];
    key.copy_from_slice(&digest[..16]);
    key
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS seen (
    id INTEGER PRIMARY KEY,
    seen_at INTEGER NOT NULL,
    key BLOB NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS seen_key ON seen(key);
";

/// Durable set of recently accepted event uuids, with the time each was accepted.
///
/// Every method blocks (one SQLite connection behind a mutex): call it from a blocking
/// thread. Commits use `synchronous = NORMAL` in WAL mode: what was recorded survives
/// `kill -9` of the process; a power loss may forget the last records, which lets a
/// duplicate through, never drops an event that was not seen.
///
/// ```
/// use tributary_spool::{DedupStore, dedup_key};
/// let dir = tempfile::tempdir().unwrap();
/// let store = DedupStore::open(dir.path()).unwrap();
/// let k = dedup_key("1", "5b1e-...");
/// assert_eq!(store.seen_since(&[k], 0).unwrap(), vec![false]);
/// store.record(&[k], 1_000).unwrap();
/// assert_eq!(store.seen_since(&[k], 500).unwrap(), vec![true]);
/// assert_eq!(store.seen_since(&[k], 2_000).unwrap(), vec![false]);
/// assert_eq!(store.expire(2_000, u64::MAX).unwrap(), 1);
/// ```
#[derive(Debug)]
pub struct DedupStore {
    conn: Mutex<Connection>,
    path: PathBuf,
}

fn storage(path: &Path, e: rusqlite::Error) -> SpoolError {
    SpoolError::Storage(format!("{}: {e}", path.display()))
}

impl DedupStore {
    /// Opens (or creates) `dir/dedup.db`.
    pub fn open(dir: &Path) -> Result<DedupStore, SpoolError> {
        std::fs::create_dir_all(dir).map_err(|e| {
            SpoolError::Storage(format!("cannot create directory {}: {e}", dir.display()))
        })?;
        let path = dir.join(DEDUP_FILE);
        let err = |e| storage(&path, e);
        let conn = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(err)?;
        let _: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
            .map_err(err)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(err)?;
        conn.pragma_update(None, "journal_size_limit", 16 * 1024 * 1024)
            .map_err(err)?;
        conn.execute_batch(SCHEMA).map_err(err)?;
        Ok(DedupStore {
            conn: Mutex::new(conn),
            path,
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave the connection half-way: SQLite
        // rolls back an unfinished transaction when the next one begins.
        self.conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// For each key, whether it was recorded at or after `since_ms`.
    pub fn seen_since(&self, keys: &[DedupKey], since_ms: i64) -> Result<Vec<bool>, SpoolError> {
        let conn = self.lock();
        let err = |e| storage(&self.path, e);
        let mut stmt = conn
            .prepare_cached("SELECT seen_at FROM seen WHERE key = ?1")
            .map_err(err)?;
        keys.iter()
            .map(|k| {
                let at: Option<i64> = stmt
                    .query_row(params![&k[..]], |r| r.get(0))
                    .optional()
                    .map_err(err)?;
                Ok(at.is_some_and(|at| at >= since_ms))
            })
            .collect()
    }

    /// Records `keys` as accepted at `now_ms`, in one transaction. A key already there is
    /// moved to the end (a new row), so that row order stays time order.
    pub fn record(&self, keys: &[DedupKey], now_ms: i64) -> Result<(), SpoolError> {
        if keys.is_empty() {
            return Ok(());
        }
        let mut conn = self.lock();
        let err = |e| storage(&self.path, e);
        let tx = conn.transaction().map_err(err)?;
        {
            let mut stmt = tx
                .prepare_cached("INSERT OR REPLACE INTO seen (seen_at, key) VALUES (?1, ?2)")
                .map_err(err)?;
            for k in keys {
                stmt.execute(params![now_ms, &k[..]]).map_err(err)?;
            }
        }
        tx.commit().map_err(err)
    }

    /// Deletes the keys recorded before `before_ms`, and the oldest beyond the newest
    /// `max_rows`; returns how many went. Runs in chunks of 10,000 rows so that a large
    /// expiry never holds the file for long.
    pub fn expire(&self, before_ms: i64, max_rows: u64) -> Result<u64, SpoolError> {
        const CHUNK: i64 = 10_000;
        let err = |e| storage(&self.path, e);
        let mut total = 0u64;
        loop {
            let conn = self.lock();
            // The rows are in time order: everything below the first row still in the
            // window (or below the row-count bound) goes.
            let first_kept: Option<i64> = conn
                .query_row(
                    "SELECT id FROM seen WHERE seen_at >= ?1 ORDER BY id LIMIT 1",
                    params![before_ms],
                    |r| r.get(0),
                )
                .optional()
                .map_err(err)?;
            let (min, max): (Option<i64>, Option<i64>) = conn
                .query_row("SELECT MIN(id), MAX(id) FROM seen", [], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })
                .map_err(err)?;
            let (Some(min), Some(max)) = (min, max) else {
                return Ok(total);
            };
            let by_time = first_kept.unwrap_or(max + 1);
            let by_count = max
                .saturating_sub(i64::try_from(max_rows).unwrap_or(i64::MAX))
                .saturating_add(1);
            let cut = by_time.max(by_count).min(min.saturating_add(CHUNK));
            if cut <= min {
                return Ok(total);
            }
            let n = conn
                .execute("DELETE FROM seen WHERE id < ?1", params![cut])
                .map_err(err)?;
            total += n as u64;
            if n == 0 {
                return Ok(total);
            }
        }
    }

    /// The time of the newest key held (`None` when empty): a filter in front of this set
    /// that knows every key recorded since may skip asking for keys older than that.
    pub fn newest_ms(&self) -> Result<Option<i64>, SpoolError> {
        let conn = self.lock();
        conn.query_row(
            "SELECT seen_at FROM seen ORDER BY id DESC LIMIT 1",
            [],
            |r| r.get(0),
        )
        .optional()
        .map_err(|e| storage(&self.path, e))
    }

    /// Keys held.
    pub fn len(&self) -> Result<u64, SpoolError> {
        let conn = self.lock();
        let n: i64 = conn
            .query_row("SELECT COUNT(*) FROM seen", [], |r| r.get(0))
            .map_err(|e| storage(&self.path, e))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Whether it holds no key.
    pub fn is_empty(&self) -> Result<bool, SpoolError> {
        Ok(self.len()? == 0)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn expiry_keeps_the_window_and_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let store = DedupStore::open(dir.path()).unwrap();
        let keys: Vec<DedupKey> = (0..100).map(|i| dedup_key("1", &i.to_string())).collect();
        for (i, k) in keys.iter().enumerate() {
            store.record(&[*k], i as i64).unwrap();
        }
        assert_eq!(store.expire(50, u64::MAX).unwrap(), 50);
        assert_eq!(store.len().unwrap(), 50);
        assert_eq!(
            store.seen_since(&keys[49..51], 0).unwrap(),
            vec![false, true]
        );
        assert_eq!(store.expire(0, 10).unwrap(), 40);
        assert_eq!(
            store.seen_since(&keys[89..91], 0).unwrap(),
            vec![false, true]
        );
        // A key recorded again moves to the end and survives a cut by count.
        store.record(&[keys[90]], 1000).unwrap();
        assert_eq!(store.expire(0, 1).unwrap(), 9);
        assert_eq!(store.seen_since(&[keys[90]], 0).unwrap(), vec![true]);
    }

    #[test]
    fn survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let k = dedup_key("1", "u");
        DedupStore::open(dir.path())
            .unwrap()
            .record(&[k], 7)
            .unwrap();
        let again = DedupStore::open(dir.path()).unwrap();
        assert_eq!(again.seen_since(&[k], 7).unwrap(), vec![true]);
    }
}
