//! The spool's on-disk format: the schema, its migration from older formats, and the
//! read-only check that a file is a spool this build can use, made before anything writes
//! to it.
//!
//! Apart from the operations because it changes only with the format: these are the only
//! statements that create or alter tables.

use std::path::Path;

use rusqlite::{Connection, OpenFlags, Transaction};

use super::SqliteConfig;

/// The on-disk format this code reads and writes (`PRAGMA user_version`). Version 2 added
/// the conservation totals and the spool's clock to `totals`; version 3 the pending bytes
/// of each account (`account_pending`, kept by triggers); version 4 the `encoding` of each
/// row's visitors (see `codec`).
pub(super) const SCHEMA_VERSION: i64 = 4;

/// Small columns come first in both tables: SQLite reads a row's columns in order, and the
/// scans that only need ids, sizes and times (retention, stats) then never touch the blob
/// overflow pages.
///
/// `AUTOINCREMENT` because receipts and dead-letter ids name rows by id: a plain rowid may
/// be reused after the highest row is deleted, and a stale receipt would then hit a newer
/// payload.
///
/// `leases` counts how many times a row was leased; it is also the generation a receipt
/// carries, so a receipt whose lease expired and was handed to someone else is detected.
/// `leased` is 1 from a lease until a release, so that the partial index holds only leased
/// rows and counting them stays cheap whatever the backlog.
///
/// `totals` holds running sums updated in the same transaction as every change, so opening
/// and the full check never scan the payloads.
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS payloads (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    visitor_count INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    appended_at INTEGER NOT NULL,
    visible_at INTEGER NOT NULL,
    leases INTEGER NOT NULL DEFAULT 0,
    leased INTEGER NOT NULL DEFAULT 0,
    route TEXT NOT NULL,
    header BLOB NOT NULL,
    visitors BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS payloads_visible ON payloads(visible_at);
CREATE INDEX IF NOT EXISTS payloads_leased ON payloads(visible_at) WHERE leased = 1;
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY,
    visitor_count INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    appended_at INTEGER NOT NULL,
    dead_at INTEGER NOT NULL,
    reason TEXT NOT NULL,
    route TEXT NOT NULL,
    header BLOB NOT NULL,
    visitors BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS totals (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    pending INTEGER NOT NULL,
    pending_bytes INTEGER NOT NULL,
    pending_events INTEGER NOT NULL,
    dead INTEGER NOT NULL,
    dead_bytes INTEGER NOT NULL
);
INSERT OR IGNORE INTO totals (id, pending, pending_bytes, pending_events, dead, dead_bytes)
    VALUES (0, 0, 0, 0, 0, 0);
";

/// Version 1 to 2. What a version-1 spool had accepted before is not known: it is taken to
/// be what it holds, so the totals balance from the upgrade on.
const MIGRATE_TO_2: &str = "
ALTER TABLE totals ADD COLUMN dead_events INTEGER NOT NULL DEFAULT 0;
ALTER TABLE totals ADD COLUMN accepted INTEGER NOT NULL DEFAULT 0;
ALTER TABLE totals ADD COLUMN accepted_events INTEGER NOT NULL DEFAULT 0;
ALTER TABLE totals ADD COLUMN delivered INTEGER NOT NULL DEFAULT 0;
ALTER TABLE totals ADD COLUMN delivered_events INTEGER NOT NULL DEFAULT 0;
ALTER TABLE totals ADD COLUMN purged INTEGER NOT NULL DEFAULT 0;
ALTER TABLE totals ADD COLUMN purged_events INTEGER NOT NULL DEFAULT 0;
ALTER TABLE totals ADD COLUMN split INTEGER NOT NULL DEFAULT 0;
ALTER TABLE totals ADD COLUMN clock_ms INTEGER NOT NULL DEFAULT 0;
UPDATE totals SET
    dead_events = (SELECT COALESCE(SUM(visitor_count), 0) FROM dead_letters),
    accepted = pending + dead,
    accepted_events = pending_events + (SELECT COALESCE(SUM(visitor_count), 0) FROM dead_letters)
    WHERE id = 0;
";

/// Version 2 to 3: pending bytes per `account_id`, for the relay's fair share
/// (`--max-pending-bytes-per-account`). Triggers keep it, so every statement that adds,
/// removes or rewrites a payload row (append, ack, settle, dead-letter, retry, retention)
/// moves it in its own transaction without code of its own, and reading one account's
/// figure is one primary-key lookup instead of a scan. The account is the header's
/// `account_id` (headers are JSON fragments: `"account_id":"1",...`); a header that is not
/// valid JSON counts under `''` rather than failing the write. An account's row goes when
/// its last pending payload does, so the table holds the accounts with something pending,
/// not every account ever seen.
const MIGRATE_TO_3: &str = "
CREATE TABLE IF NOT EXISTS account_pending (
    account TEXT PRIMARY KEY,
    pending INTEGER NOT NULL,
    pending_bytes INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS account_pending_insert AFTER INSERT ON payloads BEGIN
    INSERT INTO account_pending (account, pending, pending_bytes)
        VALUES ((CASE WHEN json_valid('{' || CAST(NEW.header AS TEXT) || '}') THEN COALESCE(CAST(json_extract('{' || CAST(NEW.header AS TEXT) || '}', '$.account_id') AS TEXT), '') ELSE '' END), 1, NEW.bytes)
        ON CONFLICT (account) DO UPDATE SET pending = pending + 1,
            pending_bytes = pending_bytes + excluded.pending_bytes;
END;
CREATE TRIGGER IF NOT EXISTS account_pending_delete AFTER DELETE ON payloads BEGIN
    UPDATE account_pending SET pending = pending - 1, pending_bytes = pending_bytes - OLD.bytes
        WHERE account = (CASE WHEN json_valid('{' || CAST(OLD.header AS TEXT) || '}') THEN COALESCE(CAST(json_extract('{' || CAST(OLD.header AS TEXT) || '}', '$.account_id') AS TEXT), '') ELSE '' END);
    DELETE FROM account_pending WHERE pending <= 0 AND account = (CASE WHEN json_valid('{' || CAST(OLD.header AS TEXT) || '}') THEN COALESCE(CAST(json_extract('{' || CAST(OLD.header AS TEXT) || '}', '$.account_id') AS TEXT), '') ELSE '' END);
END;
CREATE TRIGGER IF NOT EXISTS account_pending_update AFTER UPDATE OF bytes, header ON payloads BEGIN
    UPDATE account_pending SET pending = pending - 1, pending_bytes = pending_bytes - OLD.bytes
        WHERE account = (CASE WHEN json_valid('{' || CAST(OLD.header AS TEXT) || '}') THEN COALESCE(CAST(json_extract('{' || CAST(OLD.header AS TEXT) || '}', '$.account_id') AS TEXT), '') ELSE '' END);
    DELETE FROM account_pending WHERE pending <= 0 AND account = (CASE WHEN json_valid('{' || CAST(OLD.header AS TEXT) || '}') THEN COALESCE(CAST(json_extract('{' || CAST(OLD.header AS TEXT) || '}', '$.account_id') AS TEXT), '') ELSE '' END);
    INSERT INTO account_pending (account, pending, pending_bytes)
        VALUES ((CASE WHEN json_valid('{' || CAST(NEW.header AS TEXT) || '}') THEN COALESCE(CAST(json_extract('{' || CAST(NEW.header AS TEXT) || '}', '$.account_id') AS TEXT), '') ELSE '' END), 1, NEW.bytes)
        ON CONFLICT (account) DO UPDATE SET pending = pending + 1,
            pending_bytes = pending_bytes + excluded.pending_bytes;
END;
INSERT INTO account_pending (account, pending, pending_bytes)
    SELECT (CASE WHEN json_valid('{' || CAST(header AS TEXT) || '}') THEN COALESCE(CAST(json_extract('{' || CAST(header AS TEXT) || '}', '$.account_id') AS TEXT), '') ELSE '' END), COUNT(*), SUM(bytes) FROM payloads GROUP BY 1 HAVING 1
    ON CONFLICT (account) DO UPDATE SET pending = excluded.pending,
        pending_bytes = excluded.pending_bytes;
";

/// Version 3 to 4: how each row's visitors are stored (`codec::RAW` or `codec::ZSTD`).
/// The rows already there were stored as received, which is the default. The column goes
/// last, after the blobs: only the reads that take the visitors need it, and those read
/// the row through anyway.
const MIGRATE_TO_4: &str = "
ALTER TABLE payloads ADD COLUMN encoding INTEGER NOT NULL DEFAULT 0;
ALTER TABLE dead_letters ADD COLUMN encoding INTEGER NOT NULL DEFAULT 0;
";

/// Brings a database of format `version` (older than [`SCHEMA_VERSION`]; 0 is a new file)
/// to the current format, inside the caller's transaction.
pub(super) fn migrate(tx: &Transaction<'_>, version: i64) -> rusqlite::Result<()> {
    if version < 1 {
        tx.execute_batch(SCHEMA)?;
    }
    if version < 2 {
        tx.execute_batch(MIGRATE_TO_2)?;
    }
    if version < 3 {
        tx.execute_batch(MIGRATE_TO_3)?;
    }
    if version < 4 {
        tx.execute_batch(MIGRATE_TO_4)?;
    }
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)
}

/// What to do about a spool file that cannot be used, for every such error.
pub(super) const WHAT_TO_DO: &str = "the relay will not use it and has not changed it. Stop every \
     process using this spool, move the file aside with its -wal and -shm files (mv spool.db \
     spool.db.damaged), start again to begin an empty spool, and salvage what the old file \
     holds with `sqlite3 spool.db.damaged .recover`";

/// Proves through a read-only connection that `path` is a spool this build can use: a
/// SQLite database, of no other program, of a format not newer than this build's, and (with
/// [`SqliteConfig::check_on_open`]) whole. The error says what is wrong and what to do.
pub(super) fn precheck(path: &Path, config: &SqliteConfig) -> Result<(), String> {
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags)
        .map_err(|e| format!("cannot be opened ({e}); {WHAT_TO_DO}"))?;
    let _ = conn.busy_timeout(config.busy_timeout);
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(|e| format!("not a readable SQLite database ({e}); {WHAT_TO_DO}"))?;
    if version > SCHEMA_VERSION {
        return Err(format!(
            "written by a newer version of Tributary (spool format {version}, this build \
             reads up to {SCHEMA_VERSION}); run the newer version, or move the file aside \
             to start an empty spool. It has not been changed"
        ));
    }
    if version == 0 {
        let tables: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'",
                [],
                |r| r.get(0),
            )
            .map_err(|e| format!("cannot read its schema ({e}); {WHAT_TO_DO}"))?;
        if tables > 0 {
            return Err(format!(
                "a SQLite database of another program ({tables} tables, no spool format), \
                 not a Tributary spool; point --spool at another directory. It has not \
                 been changed"
            ));
        }
    }
    if config.check_on_open {
        quick_check(&conn).map_err(|detail| format!("{detail}; {WHAT_TO_DO}"))?;
    }
    Ok(())
}

/// `PRAGMA quick_check` (every page of the database and of the WAL, not the index contents
/// against the rows): a file cut short, or overwritten, fails it.
fn quick_check(conn: &Connection) -> Result<(), String> {
    let rows: rusqlite::Result<Vec<String>> = conn
        .prepare("PRAGMA quick_check(5)")
        .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect());
    match rows {
        Ok(rows) if rows.len() == 1 && rows[0] == "ok" => Ok(()),
        Ok(rows) => Err(format!("damaged: its check found {}", rows.join("; "))),
        Err(e) => Err(format!("damaged: it cannot be read through ({e})")),
    }
}
