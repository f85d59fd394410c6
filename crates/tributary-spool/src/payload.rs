//! [`Payload`]: the unit a spool stores: one header and the visitors that share it.

use bytes::{BufMut, Bytes, BytesMut};
use tributary::{RawBatch, RawBatchError};

use crate::Route;

/// One stored payload: which upstream it goes to, its header (every top-level field but
/// `visitors`, canonical form, see [`RawBatch::header`]) and its visitors as one
/// comma-separated run of JSON objects, exactly as received.
///
/// Payloads with equal `route` and `header` can be merged by concatenating their visitor runs.
///
/// ```
/// use bytes::Bytes;
/// use tributary::RawBatch;
/// use tributary_spool::Payload;
/// let batch = RawBatch::parse(Bytes::from_static(br#"{"account_id":"1","visitors":[{"a":1},{"b":2}]}"#)).unwrap();
/// let p = Payload::from_batch("us", &batch);
/// assert_eq!(&p.visitors[..], br#"{"a":1},{"b":2}"#);
/// assert_eq!(p.visitor_count, 2);
/// assert_eq!(p.to_batch().unwrap().encode(), batch.encode());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payload {
    /// The upstream it must go to.
    pub route: Route,
    /// Canonical header.
    pub header: Bytes,
    /// Visitor objects joined by commas, without brackets.
    pub visitors: Bytes,
    /// Number of visitor objects in `visitors`.
    pub visitor_count: u32,
}

impl Payload {
    /// A payload for `route` holding `batch`.
    pub fn from_batch(route: impl Into<Route>, batch: &RawBatch) -> Payload {
        let visitors = batch.visitors();
        let len = visitors.iter().map(Bytes::len).sum::<usize>() + visitors.len();
        let mut run = BytesMut::with_capacity(len);
        for (i, v) in visitors.iter().enumerate() {
            if i > 0 {
                run.put_u8(b',');
            }
            run.put_slice(v);
        }
        Payload {
            route: route.into(),
            header: batch.header().clone(),
            visitors: run.freeze(),
            visitor_count: u32::try_from(visitors.len()).unwrap_or(u32::MAX),
        }
    }

    /// Bytes this payload counts for in a spool (header plus visitors as received): what
    /// limits and byte figures add up. A spool that compresses may keep it in fewer.
    pub fn stored_len(&self) -> usize {
        self.header.len() + self.visitors.len()
    }

    /// Back to a [`RawBatch`], parsing the visitor run. Payloads built by
    /// [`Payload::from_batch`] always parse; a corrupted one is an error.
    pub fn to_batch(&self) -> Result<RawBatch, RawBatchError> {
        let parsed = RawBatch::parse(tributary::raw::write_body(b"", [&self.visitors]))?;
        Ok(RawBatch::from_parts(
            self.header.clone(),
            parsed.into_visitors(),
        ))
    }
}
