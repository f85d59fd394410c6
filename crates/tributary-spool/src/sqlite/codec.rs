//! How a payload's visitor run is stored: zstd-compressed when that makes it smaller,
//! as received otherwise, with the row's `encoding` column saying which.
//!
//! Why compress at all: durable ingest is bound by the writer thread's work in the kernel,
//! and that work grows with the bytes each row puts through the WAL and then through the
//! checkpoint. Event JSON repeats its keys and ids in every visitor, so a run of ten
//! visitors shrinks several times over, and the same disk holds that many more events
//! while the upstream is down.
//!
//! The byte columns and limits keep counting the payload as received (header plus
//! visitors), so what `--spool-max-bytes` allows does not depend on how well the events
//! compress; only the file is smaller.

use std::cell::RefCell;

use bytes::Bytes;

use crate::{Payload, Route};

/// How the spool stores visitor runs ([`super::SqliteConfig::compression`]).
///
/// ```
/// use tributary_spool::{Compression, SqliteConfig};
/// let plain = SqliteConfig { compression: Compression::None, ..SqliteConfig::default() };
/// assert_eq!(SqliteConfig::default().compression, Compression::Zstd);
/// assert_eq!("none".parse::<Compression>().unwrap(), plain.compression);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Stored as received: rows can be read with the `sqlite3` shell as they are.
    None,
    /// zstd at level 1 (the fastest of its regular levels: the point is to spare the
    /// writer thread, not the last byte), kept only when smaller than the run as received.
    #[default]
    Zstd,
}

/// The zstd level of [`Compression::Zstd`].
const ZSTD_LEVEL: i32 = 1;

impl Compression {
    /// The name of the setting: `zstd` or `none`.
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Zstd => "zstd",
        }
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A [`Compression`] name that is neither `zstd` nor `none`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown spool compression {0:?}: expected zstd or none")]
pub struct ParseCompressionError(pub String);

impl std::str::FromStr for Compression {
    type Err = ParseCompressionError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "zstd" => Ok(Compression::Zstd),
            "none" => Ok(Compression::None),
            _ => Err(ParseCompressionError(s.to_owned())),
        }
    }
}

/// The `encoding` column: the visitor run as received.
pub(super) const RAW: i64 = 0;
/// The `encoding` column: one zstd frame holding the visitor run.
pub(super) const ZSTD: i64 = 1;

/// Runs shorter than this are stored as received: a zstd frame's own header and the
/// call's cost outweigh what a few dozen bytes could save.
const MIN_LEN: usize = 128;

/// Work above this many bytes leaves the async runtime for a blocking thread, so that one
/// large body does not hold up every other task on its worker.
pub(super) const INLINE_BYTES: usize = 256 << 10;

thread_local! {
    // A zstd context costs far more to set up than one payload of events costs to code, so
    // each thread keeps one of each (the runtime's workers, the blocking pool's threads).
    static COMPRESSOR: RefCell<Option<zstd::bulk::Compressor<'static>>> =
        const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { RefCell::new(None) };
}

fn compress(run: &[u8]) -> std::io::Result<Vec<u8>> {
    COMPRESSOR.with_borrow_mut(|slot| {
        let compressor = match slot {
            Some(c) => c,
            None => slot.insert(zstd::bulk::Compressor::new(ZSTD_LEVEL)?),
        };
        compressor.compress(run)
    })
}

fn decompress(frame: &[u8], raw_len: usize) -> std::io::Result<Vec<u8>> {
    DECOMPRESSOR.with_borrow_mut(|slot| {
        let decompressor = match slot {
            Some(d) => d,
            None => slot.insert(zstd::bulk::Decompressor::new()?),
        };
        decompressor.decompress(frame, raw_len)
    })
}

/// A payload as one row stores it.
#[derive(Debug, Clone)]
pub(super) struct StoredPayload {
    pub(super) route: Route,
    pub(super) header: Bytes,
    /// The visitor run as `encoding` stores it.
    pub(super) visitors: Bytes,
    pub(super) encoding: i64,
    pub(super) visitor_count: u32,
    /// Header plus visitors as received: what limits and byte counts are in.
    pub(super) len: usize,
}

impl StoredPayload {
    /// The row for `payload` under `compression`.
    pub(super) fn pack(payload: &Payload, compression: Compression) -> StoredPayload {
        let len = payload.stored_len();
        let (encoding, visitors) = match compression {
            Compression::Zstd if payload.visitors.len() >= MIN_LEN => {
                match compress(&payload.visitors) {
                    Ok(packed) if packed.len() < payload.visitors.len() => {
                        (ZSTD, Bytes::from(packed))
                    }
                    // No smaller (or the encoder failed, which it does only out of
                    // memory): stored as received loses nothing.
                    _ => (RAW, payload.visitors.clone()),
                }
            }
            _ => (RAW, payload.visitors.clone()),
        };
        StoredPayload {
            route: payload.route.clone(),
            header: payload.header.clone(),
            visitors,
            encoding,
            visitor_count: payload.visitor_count,
            len,
        }
    }
}

/// The visitor run of a row: `stored` as its `encoding` column says, `raw_len` bytes long
/// once decoded. The error says what is wrong with the row.
pub(super) fn unpack(encoding: i64, stored: Vec<u8>, raw_len: usize) -> Result<Bytes, String> {
    match encoding {
        RAW => Ok(Bytes::from(stored)),
        ZSTD => {
            let raw = decompress(&stored, raw_len)
                .map_err(|e| format!("its stored visitors do not decompress (zstd: {e})"))?;
            if raw.len() != raw_len {
                return Err(format!(
                    "its stored visitors decompress to {} bytes, the row says {raw_len}",
                    raw.len()
                ));
            }
            Ok(Bytes::from(raw))
        }
        other => Err(format!(
            "its visitors are stored in an encoding this build does not know ({other})"
        )),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn payload(visitors: &[u8]) -> Payload {
        Payload {
            route: "us".into(),
            header: Bytes::from_static(br#""account_id":"1""#),
            visitors: Bytes::copy_from_slice(visitors),
            visitor_count: 1,
        }
    }

    #[test]
    fn a_repetitive_run_is_compressed_and_comes_back_whole() {
        let run = br#"{"visitor_id":"v","attributes":[{"key":"plan","value":"free"}]},"#.repeat(10);
        let stored = StoredPayload::pack(&payload(&run), Compression::default());
        assert_eq!(stored.encoding, ZSTD);
        assert!(
            stored.visitors.len() < run.len() / 3,
            "{}",
            stored.visitors.len()
        );
        assert_eq!(stored.len, 16 + run.len());
        let back = unpack(stored.encoding, stored.visitors.to_vec(), run.len()).unwrap();
        assert_eq!(&back[..], &run[..]);
    }

    #[test]
    fn short_or_incompressible_runs_and_none_are_stored_as_received() {
        let short = payload(br#"{"visitor_id":"v"}"#);
        assert_eq!(
            StoredPayload::pack(&short, Compression::default()).encoding,
            RAW
        );
        // Bytes from a generator with no repeats: zstd cannot make them smaller.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let stored = StoredPayload::pack(&payload(&noise), Compression::default());
        assert_eq!(stored.encoding, RAW);
        assert_eq!(&stored.visitors[..], &noise[..]);
        let run = b"{},".repeat(100);
        assert_eq!(
            StoredPayload::pack(&payload(&run), Compression::None).encoding,
            RAW
        );
    }

    #[test]
    fn a_damaged_or_unknown_row_is_an_error_that_says_so() {
        let run = b"{\"a\":1},".repeat(40);
        let stored = StoredPayload::pack(&payload(&run), Compression::default());
        let mut cut = stored.visitors.to_vec();
        cut.truncate(cut.len() / 2);
        let e = unpack(ZSTD, cut, run.len()).unwrap_err();
        assert!(e.contains("do not decompress"), "{e}");
        let e = unpack(ZSTD, stored.visitors.to_vec(), run.len() + 1).unwrap_err();
        assert!(e.contains("the row says"), "{e}");
        let e = unpack(7, Vec::new(), 0).unwrap_err();
        assert!(e.contains("does not know (7)"), "{e}");
    }
}
