//! The disk reserve: free space on the spool's file system less the WAL, the refusal of
//! appends that would eat into the space kept for delivery, WAL checkpoints and giving free
//! pages back to the file system when space runs low, and readiness.
//!
//! Apart from the operations because it is about the file system, not the rows: they only
//! pass through it (`with_room` and `with_room_chunked` around the forwarder's writes,
//! `refusal` before an append, `write_budget` to size a lease).

use std::path::Path;

use super::store::{DISK_FULL, Store, storage, to_u64};
use super::totals::Delta;
use crate::SpoolError;

/// Readiness asks for room for a request of this size (64 KiB) beyond the reserve, so that a
/// relay that just refused a request for lack of space does not call itself ready.
const READY_MARGIN: u64 = 64 << 10;

/// Pages of WAL one row's write is counted as when sizing the forwarder's writes on a nearly
/// full disk: the row's leaf page, an index page, and one more for a split or the freelist.
/// (Leasing rows of 3.5 KB grew the WAL by about two pages a row; an update that leaves a
/// row's size alone rewrites only its first page, however many overflow pages it has.)
const WAL_PAGES_PER_ROW: u64 = 3;

fn is_disk_full(e: &SpoolError) -> bool {
    matches!(e, SpoolError::Full { reason } if reason == DISK_FULL)
}

impl Store {
    /// Runs `op`; if the file system is full, checkpoints the WAL (which gives back its
    /// space once the pages are in the database) and tries once more. The forwarder's
    /// writes (lease, ack, release, settle) go through here, so a full disk cannot stop
    /// the deliveries that free it.
    pub(super) fn with_room<T>(
        &mut self,
        op: impl Fn(&mut Store) -> Result<T, SpoolError>,
    ) -> Result<T, SpoolError> {
        if self.room() < self.reserve_bytes.saturating_mul(2) {
            // Low on space: start from an empty WAL.
            self.checkpoint();
        }
        let result = match op(self) {
            Err(e) if is_disk_full(&e) => {
                tracing::warn!("spool file system full; checkpointing the WAL and trying again");
                self.checkpoint();
                op(self)
            }
            other => other,
        };
        if result.is_ok() && self.room() < self.reserve_bytes.saturating_mul(2) {
            // Low on space: keep the WAL small and give the pages of what was delivered back
            // to the file system, so that ingest can resume by itself.
            self.checkpoint();
            self.give_back();
        }
        result.map_err(|e| self.classify(e))
    }

    /// Runs `op` over `items` in chunks of at most [`Self::rows_per_write`], each chunk its own
    /// transaction through [`Self::with_room`], and sums what the chunks return. On a nearly
    /// full disk one write of many rows (the release of a large leased window after the
    /// upstream failed) can need more WAL than the disk has left: it then failed whole, again
    /// after the checkpoint, and its payloads stayed leased until the lease expired (a minute
    /// without deliveries, by default). In chunks, each with a checkpoint after it, every
    /// write fits. With room to spare it is one chunk, as before.
    ///
    /// A chunk that fails ends the call with its error; the chunks before it are committed.
    /// Every caller's rows are independent (ack, release, dead-letter, settle by receipt),
    /// so that is the same as the forwarder having sent fewer receipts.
    pub(super) fn with_room_chunked<I>(
        &mut self,
        items: &[I],
        op: impl Fn(&mut Store, &[I]) -> Result<u64, SpoolError>,
    ) -> Result<u64, SpoolError> {
        if items.is_empty() {
            return self.with_room(|s| op(s, items));
        }
        let mut total = 0u64;
        let mut rest = items;
        while !rest.is_empty() {
            let (chunk, tail) = rest.split_at(self.rows_per_write().min(rest.len()));
            total = total.saturating_add(self.with_room(|s| op(s, chunk))?);
            rest = tail;
        }
        Ok(total)
    }

    /// Rows one forwarder write may change now: any number with room to spare, else as many
    /// as [`Self::write_budget`] carries (at least one).
    pub(super) fn rows_per_write(&self) -> usize {
        self.write_budget()
            .map_or(usize::MAX, |budget| self.rows_within(budget))
    }

    /// Bytes of WAL one forwarder write may add now: no limit (`None`) with four reserves
    /// of room or more; under that, a quarter of the room left.
    pub(super) fn write_budget(&self) -> Option<u64> {
        let room = self.room();
        (room < self.reserve_bytes.saturating_mul(4)).then_some(room / 4)
    }

    /// Rows whose writes fit `budget` bytes of WAL at [`WAL_PAGES_PER_ROW`] pages a row, and
    /// at least one.
    pub(super) fn rows_within(&self, budget: u64) -> usize {
        let per_row = self.page_size.max(1).saturating_mul(WAL_PAGES_PER_ROW);
        usize::try_from(budget / per_row)
            .unwrap_or(usize::MAX)
            .max(1)
    }

    /// Moves the WAL into the database and truncates it.
    fn checkpoint(&mut self) {
        match self
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                r.get::<_, i64>(0)
            }) {
            Ok(0) => {}
            Ok(_) => tracing::debug!("WAL checkpoint could not finish (a reader holds it)"),
            Err(e) => tracing::warn!(error = %e, "WAL checkpoint failed"),
        }
    }

    /// Returns free pages of the database to the file system (`incremental_vacuum`), as many
    /// as a quarter of the free space can carry through the WAL, then resets the WAL.
    fn give_back(&mut self) {
        if !self.incremental_vacuum {
            return;
        }
        let free_pages: i64 = self
            .conn
            .pragma_query_value(None, "freelist_count", |r| r.get(0))
            .unwrap_or(0);
        let budget = (self.fs_free() / 4) / self.page_size.max(1);
        let pages = to_u64(free_pages).min(budget);
        if pages == 0 {
            return;
        }
        let vacuum = format!("PRAGMA incremental_vacuum({pages})");
        // The pragma returns a row per page; run it to the end.
        let done = self.conn.prepare(&vacuum).and_then(|mut s| {
            let mut rows = s.query([])?;
            while rows.next()?.is_some() {}
            Ok(())
        });
        if let Err(e) = done {
            tracing::warn!(error = %e, "could not give free pages back to the file system");
        }
        self.checkpoint();
    }

    /// Free bytes of the spool's file system, less the WAL (every WAL write needs real disk
    /// space, whatever the database has free inside).
    fn fs_free(&self) -> u64 {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let free = match rustix::fs::statvfs(dir) {
            Ok(st) => st.f_bavail.saturating_mul(st.f_frsize),
            Err(_) => return u64::MAX,
        };
        let mut wal = self.path.clone().into_os_string();
        wal.push("-wal");
        free.saturating_sub(std::fs::metadata(&wal).map_or(0, |m| m.len()))
    }

    /// Bytes the spool can still grow into: free space on its file system, less the WAL (a
    /// checkpoint may copy every page of it into the database, and must never be the write
    /// that fills the disk, or the WAL could not be reset and nothing could be freed). A
    /// spool that cannot give free pages back (created before format 2) also counts them,
    /// since it reuses them before it grows.
    pub(super) fn room(&self) -> u64 {
        // Unknown free space (statvfs failed) is u64::MAX: do not refuse on a guess;
        // SQLITE_FULL still stops appends.
        let fs_free = self.fs_free();
        if self.incremental_vacuum {
            return fs_free;
        }
        let free_pages: i64 = self
            .conn
            .pragma_query_value(None, "freelist_count", |r| r.get(0))
            .unwrap_or(0);
        fs_free.saturating_add(to_u64(free_pages).saturating_mul(self.page_size))
    }

    /// Why appends are refused now, if they are: a damaged file, or less room than the
    /// reserve plus `incoming` bytes (twice: the WAL holds a copy until it is checkpointed).
    pub(super) fn refusal(&self, incoming: u64) -> Option<SpoolError> {
        if let Some(detail) = &self.damaged {
            return Some(SpoolError::Damaged {
                path: self.path.display().to_string(),
                detail: detail.clone(),
            });
        }
        let room = self.room();
        let need = self
            .reserve_bytes
            .saturating_add(incoming.saturating_mul(2));
        (room < need).then(|| SpoolError::Full {
            reason: format!(
                "{DISK_FULL}: {room} bytes left for the spool, under the {} kept free for \
                 delivery (--spool-reserve-bytes) plus this request",
                self.reserve_bytes
            ),
        })
    }

    /// Whether appends of a usual size would be taken now: the file is sound, the disk has
    /// room, and a write commits (a one-row write of the spool's clock, so that a file made
    /// read-only or immutable under the relay shows here, not only in failed appends).
    pub(super) fn check_ready(&mut self) -> Result<(), SpoolError> {
        if let Some(e) = self.refusal(READY_MARGIN) {
            return Err(e);
        }
        let now = self.clock.now_ms();
        let probe = (|| {
            let tx = self.begin()?;
            Delta::default().write(&tx, now)?;
            tx.commit()
        })()
        .map_err(storage);
        probe.map_err(|e| match self.classify(e) {
            SpoolError::Storage(m) => SpoolError::Storage(format!("cannot write: {m}")),
            other => other,
        })
    }
}
