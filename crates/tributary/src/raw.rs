//! Event API payloads held as bytes: the header fields and each visitor kept apart, so
//! payloads can be merged and split without decoding or re-encoding a single visitor.
//!
//! A body is `{HEADER,"visitors":[V1,V2,...]}` where `HEADER` is every top-level field but
//! `visitors`. Two payloads whose headers are byte-equal may share a body. The relay relies
//! on this to forward what clients sent byte for byte; the library builds its payloads the
//! same way so that splitting at the size limit costs no re-serialisation.

use std::borrow::Cow;
use std::fmt;

use bytes::{BufMut, Bytes, BytesMut};
use serde::Deserialize;
use serde::de::{self, MapAccess, SeqAccess, Visitor as SerdeVisitor};
use serde_json::value::RawValue;

/// The Event API's limit on one request body, in bytes.
pub const MAX_PAYLOAD_BYTES: usize = 3_500_000;

/// `,"visitors":[` plus `{`, `]` and `}`: the bytes a body adds around header and visitors.
const ENVELOPE_BYTES: usize = r#"{,"visitors":[]}"#.len();

/// Why bytes are not an Event API payload this module can hold.
#[derive(Debug, thiserror::Error)]
pub enum RawBatchError {
    /// Not JSON, or not a JSON object at the top level.
    #[error("invalid JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// The object has no `visitors` field.
    #[error("$.visitors: missing")]
    MissingVisitors,
    /// A top-level field appears twice.
    #[error("$.{0}: duplicate field")]
    DuplicateField(String),
}

/// One visitor that alone makes a payload larger than the limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "visitor at index {index} needs a {size}-byte payload on its own, over the {limit}-byte limit"
)]
pub struct OversizedVisitor {
    /// Index of the visitor in the input.
    pub index: usize,
    /// Size of the smallest payload that could carry it.
    pub size: usize,
    /// The limit in force.
    pub limit: usize,
}

/// A payload as a header and a list of opaque visitors.
///
/// ```
/// use bytes::Bytes;
/// use tributary::RawBatch;
/// let body = Bytes::from_static(br#"{"revision":"1","visitors":[{"visitor_id":"a","x":4200}],"account_id":"9"}"#);
/// let batch = RawBatch::parse(body).unwrap();
/// assert_eq!(batch.visitors().len(), 1);
/// assert_eq!(&batch.visitors()[0][..], br#"{"visitor_id":"a","x":4200}"#);
/// assert_eq!(&batch.header()[..], br#""account_id":"9","revision":"1""#);
/// assert_eq!(batch.encoded_len(), batch.encode().len());
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct RawBatch {
    header: Bytes,
    visitors: Vec<Bytes>,
}

impl fmt::Debug for RawBatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Visitors hold personal data: show only their count.
        f.debug_struct("RawBatch")
            .field("header", &String::from_utf8_lossy(&self.header))
            .field("visitors", &self.visitors.len())
            .finish()
    }
}

impl RawBatch {
    /// A batch from a header (top-level fields without braces, comma-separated) and visitor
    /// JSON objects. The caller vouches that both are valid JSON fragments.
    pub fn from_parts(header: Bytes, visitors: Vec<Bytes>) -> Self {
        RawBatch { header, visitors }
    }

    /// Reads a payload body. The header is put in canonical form (fields sorted by name,
    /// compact values) so equal headers compare equal as bytes; visitors are kept exactly as
    /// they appear in `body`, without copying.
    pub fn parse(body: Bytes) -> Result<Self, RawBatchError> {
        let top: TopLevel<'_> = serde_json::from_slice(&body)?;
        let visitors_raw = top.visitors.ok_or(RawBatchError::MissingVisitors)?;
        let mut fields = top.fields;
        fields.sort_by(|a, b| a.0.cmp(&b.0));
        if let Some(w) = fields.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(RawBatchError::DuplicateField(w[0].0.to_string()));
        }
        let mut header = Vec::with_capacity(256);
        for (i, (key, value)) in fields.iter().enumerate() {
            if i > 0 {
                header.push(b',');
            }
            serde_json::to_writer(&mut header, key.as_ref())?;
            header.push(b':');
            let text = value.get();
            if text.starts_with('{') || text.starts_with('[') {
                // Re-encode containers so insignificant whitespace does not split contexts.
                let v: serde_json::Value = serde_json::from_str(text)?;
                serde_json::to_writer(&mut header, &v)?;
            } else {
                header.extend_from_slice(text.as_bytes());
            }
        }
        let visitors = visitors_raw
            .iter()
            .map(|v| body.slice_ref(v.get().as_bytes()))
            .collect();
        Ok(RawBatch {
            header: Bytes::from(header),
            visitors,
        })
    }

    /// The header: every top-level field but `visitors`, comma-separated, without braces.
    pub fn header(&self) -> &Bytes {
        &self.header
    }

    /// The visitors, each a JSON object exactly as received or built.
    pub fn visitors(&self) -> &[Bytes] {
        &self.visitors
    }

    /// Gives up the visitors.
    pub fn into_visitors(self) -> Vec<Bytes> {
        self.visitors
    }

    /// Size in bytes of [`RawBatch::encode`]'s output, computed without encoding.
    pub fn encoded_len(&self) -> usize {
        encoded_len(
            self.header.len(),
            self.visitors.iter().map(Bytes::len).sum(),
            self.visitors.len(),
        )
    }

    /// The request body: `{HEADER,"visitors":[...]}`, written by [`write_body`].
    pub fn encode(&self) -> Bytes {
        write_body(&self.header, &self.visitors)
    }

    /// A batch with the same header and the visitors `range` of this one.
    pub fn slice(&self, range: std::ops::Range<usize>) -> RawBatch {
        RawBatch {
            header: self.header.clone(),
            visitors: self.visitors[range].to_vec(),
        }
    }

    /// Splits into batches of the same header whose bodies are each at most `max_bytes`,
    /// keeping visitor order. A visitor too large to fit alone is an error naming it, and
    /// no batch is returned, so the caller decides what happens to the rest.
    pub fn split_to_fit(self, max_bytes: usize) -> Result<Vec<RawBatch>, OversizedVisitor> {
        if self.encoded_len() <= max_bytes {
            return Ok(vec![self]);
        }
        let mut out = Vec::new();
        let mut current: Vec<Bytes> = Vec::new();
        let mut current_len = 0usize;
        for (index, v) in self.visitors.into_iter().enumerate() {
            let alone = encoded_len(self.header.len(), v.len(), 1);
            if alone > max_bytes {
                return Err(OversizedVisitor {
                    index,
                    size: alone,
                    limit: max_bytes,
                });
            }
            let with = encoded_len(self.header.len(), current_len + v.len(), current.len() + 1);
            if with > max_bytes && !current.is_empty() {
                out.push(RawBatch {
                    header: self.header.clone(),
                    visitors: std::mem::take(&mut current),
                });
                current_len = 0;
            }
            current_len += v.len();
            current.push(v);
        }
        if !current.is_empty() {
            out.push(RawBatch {
                header: self.header,
                visitors: current,
            });
        }
        Ok(out)
    }
}

/// Size of a body with a header of `header_len` bytes and `count` visitors totalling
/// `visitors_len` bytes.
///
/// ```
/// use tributary::raw::encoded_len;
/// assert_eq!(encoded_len(0, 0, 0), br#"{"visitors":[]}"#.len());
/// assert_eq!(encoded_len(5, 4, 2), br#"{"a":1,"visitors":[{},{}]}"#.len());
/// ```
pub fn encoded_len(header_len: usize, visitors_len: usize, count: usize) -> usize {
    let header_comma = usize::from(header_len > 0);
    ENVELOPE_BYTES - 1 + header_comma + header_len + visitors_len + count.saturating_sub(1)
}

/// Writes a request body: `{`, `header`, a comma if the header is not empty,
/// `"visitors":[`, the non-empty `visitor_runs` joined by commas, `]}`.
///
/// This is the one place the Event API envelope is written. A visitor run is one visitor
/// object or several joined by commas, without brackets (as a spool stores them); empty
/// runs are skipped, so they add no stray comma. `header` is every top-level field but
/// `visitors`, comma-separated, without braces ([`RawBatch::header`]). Nothing is checked or
/// re-encoded: the caller vouches that both are valid JSON fragments. The output is exactly
/// [`body_len`] bytes, allocated once.
///
/// ```
/// use tributary::raw::{body_len, write_body};
/// let runs = [&br#"{"visitor_id":"a"}"#[..], b"", br#"{"visitor_id":"b"},{"visitor_id":"c"}"#];
/// let body = write_body(br#""account_id":"1""#, runs);
/// assert_eq!(
///     &body[..],
///     br#"{"account_id":"1","visitors":[{"visitor_id":"a"},{"visitor_id":"b"},{"visitor_id":"c"}]}"#
/// );
/// assert_eq!(body.len(), body_len(br#""account_id":"1""#.len(), runs));
/// assert_eq!(&write_body(b"", [b""])[..], br#"{"visitors":[]}"#);
/// ```
pub fn write_body<I>(header: &[u8], visitor_runs: I) -> Bytes
where
    I: IntoIterator,
    I::Item: AsRef<[u8]>,
    I::IntoIter: Clone,
{
    let runs = visitor_runs.into_iter();
    let mut out = BytesMut::with_capacity(body_len(header.len(), runs.clone()));
    out.put_u8(b'{');
    out.put_slice(header);
    if !header.is_empty() {
        out.put_u8(b',');
    }
    out.put_slice(br#""visitors":["#);
    let mut first = true;
    for run in runs {
        let run = run.as_ref();
        if run.is_empty() {
            continue;
        }
        if !first {
            out.put_u8(b',');
        }
        first = false;
        out.put_slice(run);
    }
    out.put_slice(b"]}");
    out.freeze()
}

/// The exact size of [`write_body`]'s output for a header of `header_len` bytes and these
/// visitor runs, without writing it: [`encoded_len`] over the runs' total length and the
/// number of non-empty runs.
pub fn body_len<I>(header_len: usize, visitor_runs: I) -> usize
where
    I: IntoIterator,
    I::Item: AsRef<[u8]>,
{
    let (bytes, count) = visitor_runs
        .into_iter()
        .map(|r| r.as_ref().len())
        .filter(|&n| n > 0)
        .fold((0, 0), |(bytes, count), n| (bytes + n, count + 1));
    encoded_len(header_len, bytes, count)
}

/// The top level of a payload, borrowed from the input.
struct TopLevel<'a> {
    fields: Vec<(Cow<'a, str>, &'a RawValue)>,
    visitors: Option<Vec<&'a RawValue>>,
}

impl<'de> Deserialize<'de> for TopLevel<'de> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> SerdeVisitor<'de> for V {
            type Value = TopLevel<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an Event API payload object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut fields = Vec::with_capacity(8);
                let mut visitors = None;
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    if key == "visitors" {
                        if visitors.is_some() {
                            return Err(de::Error::custom("$.visitors: duplicate field"));
                        }
                        visitors = Some(map.next_value::<VisitorList<'de>>()?.0);
                    } else {
                        fields.push((key, map.next_value::<&'de RawValue>()?));
                    }
                }
                Ok(TopLevel { fields, visitors })
            }
        }
        d.deserialize_map(V)
    }
}

/// `visitors`: an array whose items must each be a JSON object.
struct VisitorList<'a>(Vec<&'a RawValue>);

impl<'de> Deserialize<'de> for VisitorList<'de> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> SerdeVisitor<'de> for V {
            type Value = VisitorList<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("$.visitors: an array of objects")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(1));
                while let Some(v) = seq.next_element::<&'de RawValue>()? {
                    if !v.get().starts_with('{') {
                        return Err(de::Error::custom(format!(
                            "$.visitors[{}]: expected an object",
                            out.len()
                        )));
                    }
                    out.push(v);
                }
                Ok(VisitorList(out))
            }
        }
        d.deserialize_seq(V)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parse_keeps_visitors_byte_for_byte() {
        let body = Bytes::from_static(
            "{\"account_id\": \"1\",\n \"visitors\": [ {\"visitor_id\":\"\\u00e9\u{e9}\", \"n\": 4200, \"f\": 3.50, \"session_id\":\"s\"} ], \"x\": {\"b\": 1,  \"a\": [1, 2]}}"
                .as_bytes(),
        );
        let batch = RawBatch::parse(body).unwrap();
        assert_eq!(
            &batch.visitors()[0][..],
            "{\"visitor_id\":\"\\u00e9\u{e9}\", \"n\": 4200, \"f\": 3.50, \"session_id\":\"s\"}"
                .as_bytes()
        );
        assert_eq!(
            std::str::from_utf8(batch.header()).unwrap(),
            r#""account_id":"1","x":{"a":[1,2],"b":1}"#
        );
        let encoded = batch.encode();
        let reparsed: serde_json::Value = serde_json::from_slice(&encoded).unwrap();
        assert_eq!(reparsed["visitors"][0]["n"], 4200);
        assert_eq!(encoded.len(), batch.encoded_len());
    }

    #[test]
    fn parse_rejects_what_is_not_a_payload() {
        for bad in [
            &b"[]"[..],
            b"{}",
            b"{\"visitors\":{}}",
            b"{\"visitors\":[1]}",
            b"{\"a\":1,\"a\":2,\"visitors\":[]}",
            b"{\"visitors\":[],\"visitors\":[]}",
            b"{\"visitors\":[{}]",
        ] {
            assert!(
                RawBatch::parse(Bytes::from_static(bad)).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn empty_header_encodes_without_comma() {
        let b = RawBatch::from_parts(Bytes::new(), vec![Bytes::from_static(b"{}")]);
        assert_eq!(&b.encode()[..], br#"{"visitors":[{}]}"#);
        assert_eq!(b.encoded_len(), b.encode().len());
    }

    #[test]
    fn write_body_joins_runs_as_one_batch_encodes() {
        let header = Bytes::from_static(br#""a":1,"b":"x""#);
        let visitors: Vec<Bytes> = ["{\"v\":1}", "{\"v\":2}", "{\"v\":3}"]
            .into_iter()
            .map(|v| Bytes::from(v.as_bytes().to_vec()))
            .collect();
        let whole = RawBatch::from_parts(header.clone(), visitors.clone()).encode();
        // The same visitors as runs of one and two, with empty runs between: same bytes.
        let runs = [
            Bytes::new(),
            visitors[0].clone(),
            Bytes::new(),
            Bytes::from([&visitors[1][..], b",", &visitors[2][..]].concat()),
            Bytes::new(),
        ];
        let joined = write_body(&header, &runs);
        assert_eq!(joined, whole);
        assert_eq!(body_len(header.len(), &runs), joined.len());
        let empty: [&[u8]; 0] = [];
        assert_eq!(&write_body(b"", empty)[..], br#"{"visitors":[]}"#);
        assert_eq!(body_len(0, empty), br#"{"visitors":[]}"#.len());
    }

    #[test]
    fn split_to_fit_names_the_oversized_visitor() {
        let big = Bytes::from(format!("{{\"v\":\"{}\"}}", "x".repeat(100)));
        let b = RawBatch::from_parts(
            Bytes::from_static(b"\"a\":1"),
            vec![Bytes::from_static(b"{}"), big],
        );
        let err = b.split_to_fit(50).unwrap_err();
        assert_eq!(err.index, 1);
        assert!(err.size > 50);
    }
}
