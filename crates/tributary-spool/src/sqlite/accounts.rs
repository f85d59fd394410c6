//! Pending bytes per account, read from `account_pending` (kept by triggers, see
//! `schema`) through a read-only connection of its own: WAL readers never wait for the
//! writer thread, so the relay can ask on its ingest path.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

use crate::SpoolError;

/// A lazily opened read-only connection to `spool.db`.
#[derive(Debug)]
pub(super) struct AccountReader {
    path: PathBuf,
    conn: Mutex<Option<Connection>>,
}

impl AccountReader {
    pub(super) fn new(path: &Path) -> AccountReader {
        AccountReader {
            path: path.to_owned(),
            conn: Mutex::new(None),
        }
    }

    /// Bytes pending for `account` (0 if it has none).
    pub(super) fn pending_bytes(&self, account: &str) -> Result<u64, SpoolError> {
        let err = |e: rusqlite::Error| SpoolError::Storage(format!("{}: {e}", self.path.display()));
        let mut guard = self
            .conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if guard.is_none() {
            let conn = Connection::open_with_flags(
                &self.path,
                OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )
            .map_err(err)?;
            conn.busy_timeout(std::time::Duration::from_secs(5))
                .map_err(err)?;
            *guard = Some(conn);
        }
        let Some(conn) = guard.as_ref() else {
            return Ok(0);
        };
        let bytes: Option<i64> = conn
            .prepare_cached("SELECT pending_bytes FROM account_pending WHERE account = ?1")
            .and_then(|mut s| s.query_row(params![account], |r| r.get(0)).optional())
            .map_err(err)?;
        Ok(bytes.map_or(0, |b| u64::try_from(b).unwrap_or(0)))
    }
}
