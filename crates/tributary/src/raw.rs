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
use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor as SerdeVisitor};
use serde_json::value::RawValue;

use crate::validate::Problem;

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

/// Why an ingest body was refused by [`RawBatch::parse_shape`]: exactly what
/// [`validate_payload_shape`](crate::validate::validate_payload_shape) followed by
/// [`RawBatch::parse`] would have said.
#[derive(Debug, thiserror::Error)]
pub enum ShapeError {
    /// The shape rules' first problem (`None` only if they failed without naming one).
    #[error("{}", .0.as_ref().map_or_else(|| "invalid payload".to_owned(), ToString::to_string))]
    Shape(Option<Problem>),
    /// The shape is right but the body cannot be held as a [`RawBatch`].
    #[error(transparent)]
    Batch(RawBatchError),
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
        let header = canonical_header(top.fields)?;
        let visitors = visitors_raw
            .iter()
            .map(|v| body.slice_ref(v.get().as_bytes()))
            .collect();
        Ok(RawBatch { header, visitors })
    }

    /// Checks the shape rules of [`validate_payload_shape`](crate::validate::validate_payload_shape)
    /// and reads the body as [`RawBatch::parse`] does, in one pass over the body: each
    /// visitor's fields are checked as they are read, and its bytes found from where its
    /// first key and last value lie. This is the relay's ingest parser: the check and the
    /// parse used to read every byte four times.
    ///
    /// Acceptance and the batch are exactly those of the two calls in sequence. A refused
    /// body is handed to those two calls to name its first problem, so every message and
    /// JSON path is theirs; refusals are rare and their cost is not on the hot path.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use tributary::RawBatch;
    /// use tributary::raw::ShapeError;
    /// let ok = Bytes::from_static(br#"{"visitors":[{"visitor_id":"a","snapshots":[{}]}],"account_id":"9"}"#);
    /// assert_eq!(RawBatch::parse_shape(ok.clone()).unwrap(), RawBatch::parse(ok).unwrap());
    /// let bad = Bytes::from_static(br#"{"account_id":"9","visitors":[{"snapshots":[{}]}]}"#);
    /// match RawBatch::parse_shape(bad) {
    ///     Err(ShapeError::Shape(Some(p))) => assert_eq!(p.path, "$.visitors[0].visitor_id"),
    ///     other => panic!("{other:?}"),
    /// }
    /// ```
    pub fn parse_shape(body: Bytes) -> Result<Self, ShapeError> {
        if let Some(batch) = Self::parse_shape_fast(&body) {
            return Ok(batch);
        }
        // The slow path, only to name the problem the way the two-pass check always has.
        if let Err(problems) = crate::validate::validate_payload_shape(&body) {
            return Err(ShapeError::Shape(problems.into_iter().next()));
        }
        RawBatch::parse(body).map_err(ShapeError::Batch)
    }

    /// The accepting path of [`RawBatch::parse_shape`]; `None` for anything it would refuse
    /// (or is unsure of), which then goes the slow way.
    fn parse_shape_fast(body: &Bytes) -> Option<Self> {
        let mut de = serde_json::Deserializer::from_slice(body);
        let top = TopSeed { body }.deserialize(&mut de).ok()?;
        de.end().ok()?;
        let account_id = top.account_id?.get();
        if account_id.len() <= 2 || !account_id.starts_with('"') {
            return None;
        }
        let visitors = top.visitors?;
        if visitors.is_empty() {
            return None;
        }
        let mut fields = top.fields;
        fields.push((Cow::Borrowed("account_id"), top.account_id?));
        let header = canonical_header(fields).ok()?;
        let visitors = visitors.iter().map(|v| body.slice_ref(v)).collect();
        Some(RawBatch { header, visitors })
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

/// The header in canonical form: fields sorted by name, containers re-encoded compactly.
/// A field that appears twice is an error.
fn canonical_header(mut fields: Vec<(Cow<'_, str>, &RawValue)>) -> Result<Bytes, RawBatchError> {
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
    Ok(Bytes::from(header))
}

/// The top level of a payload for [`RawBatch::parse_shape`]: `account_id` apart from the
/// other header fields, `visitors` as the bytes of each item. Anything the shape rules would
/// refuse (a duplicate `account_id` or `visitors`, `visitors` not an array, an item not an
/// object, a visitor without a usable `visitor_id` or `snapshots`) fails the parse, which
/// sends the body the slow way.
struct ShapeTopLevel<'a> {
    account_id: Option<&'a RawValue>,
    fields: Vec<(Cow<'a, str>, &'a RawValue)>,
    visitors: Option<Vec<&'a [u8]>>,
}

/// Reads a [`ShapeTopLevel`] out of `body`, the bytes being read: the visitors' bytes are
/// found from where their fields lie in it.
struct TopSeed<'a> {
    body: &'a [u8],
}

impl<'de> DeserializeSeed<'de> for TopSeed<'de> {
    type Value = ShapeTopLevel<'de>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> SerdeVisitor<'de> for TopSeed<'de> {
    type Value = ShapeTopLevel<'de>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an Event API payload object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut top = ShapeTopLevel {
            account_id: None,
            fields: Vec::with_capacity(8),
            visitors: None,
        };
        while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
            match key.as_ref() {
                "visitors" => {
                    if top.visitors.is_some() {
                        return Err(de::Error::duplicate_field("visitors"));
                    }
                    top.visitors = Some(map.next_value_seed(VisitorListSeed { body: self.body })?);
                }
                "account_id" => {
                    if top.account_id.is_some() {
                        return Err(de::Error::duplicate_field("account_id"));
                    }
                    top.account_id = Some(map.next_value::<&'de RawValue>()?);
                }
                _ => top.fields.push((key, map.next_value::<&'de RawValue>()?)),
            }
        }
        Ok(top)
    }
}

/// `visitors` for [`RawBatch::parse_shape`]: an array of visitor objects, each read once.
struct VisitorListSeed<'a> {
    body: &'a [u8],
}

impl<'de> DeserializeSeed<'de> for VisitorListSeed<'de> {
    type Value = Vec<&'de [u8]>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> SerdeVisitor<'de> for VisitorListSeed<'de> {
    type Value = Vec<&'de [u8]>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of visitor objects")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(1));
        while let Some(span) = seq.next_element_seed(VisitorSpanSeed { body: self.body })? {
            out.push(span);
        }
        Ok(out)
    }
}

/// One visitor for [`RawBatch::parse_shape`]: its `visitor_id` (a non-empty string) and
/// `snapshots` (a non-empty array) checked as its fields go by, each at most once; its
/// value is its bytes in the body.
struct VisitorSpanSeed<'a> {
    body: &'a [u8],
}

impl<'de> DeserializeSeed<'de> for VisitorSpanSeed<'de> {
    type Value = &'de [u8];
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> SerdeVisitor<'de> for VisitorSpanSeed<'de> {
    type Value = &'de [u8];
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a visitor object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let (mut first_key, mut last_value) = (None, None);
        let (mut visitor_id, mut snapshots) = (None, None);
        while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
            if first_key.is_none() {
                // The first key places the object in the body; one with an escape is not
                // borrowed from the body, so its place is unknown: the slow way reads it.
                let Cow::Borrowed(borrowed) = key else {
                    return Err(de::Error::custom("first key escaped"));
                };
                first_key = Some(borrowed);
            }
            let value = map.next_value::<&'de RawValue>()?;
            let duplicate = match key.as_ref() {
                "visitor_id" => visitor_id.replace(value).is_some(),
                "snapshots" => snapshots.replace(value).is_some(),
                _ => false,
            };
            if duplicate {
                return Err(de::Error::custom("duplicate field"));
            }
            last_value = Some(value);
        }
        let id = visitor_id.map_or("", |v| v.get());
        if id.len() <= 2 || !id.starts_with('"') {
            return Err(de::Error::custom("no usable visitor_id"));
        }
        let snapshots = snapshots.map_or("", |v| v.get());
        match snapshots.strip_prefix('[') {
            Some(rest) if !rest.trim_start().starts_with(']') => {}
            _ => return Err(de::Error::custom("no usable snapshots")),
        }
        let (Some(first_key), Some(last_value)) = (first_key, last_value) else {
            return Err(de::Error::custom("an empty visitor"));
        };
        visitor_span(self.body, first_key, last_value.get())
            .ok_or_else(|| de::Error::custom("visitor not located in the body"))
    }
}

/// The bytes of an object in `body`, from its first key and its last value (both slices of
/// `body`): back from the key over its opening quote and any whitespace to `{`, on from the
/// value over any whitespace to `}`. serde_json has read the object, so those bytes are
/// there; `None` if either slice is not in `body` or the bytes are not as expected.
fn visitor_span<'a>(body: &'a [u8], first_key: &str, last_value: &str) -> Option<&'a [u8]> {
    let offset = |s: &str| (s.as_ptr() as usize).checked_sub(body.as_ptr() as usize);
    let is_space = |b: &u8| matches!(b, b' ' | b'\t' | b'\n' | b'\r');
    let quote = offset(first_key)?.checked_sub(1)?;
    if body.get(quote) != Some(&b'"') {
        return None;
    }
    let open = body[..quote].iter().rposition(|b| !is_space(b))?;
    let value_end = offset(last_value)?.checked_add(last_value.len())?;
    let close = value_end + body.get(value_end..)?.iter().position(|b| !is_space(b))?;
    if body[open] != b'{' || body[close] != b'}' {
        return None;
    }
    body.get(open..=close)
}

/// A key, borrowed from the body when it has no escapes (`Cow<str>`'s own `Deserialize`
/// always copies).
struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> SerdeVisitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_str(V)
    }
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
                while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
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

    /// The two-pass ingest check `parse_shape` replaces: the shape rules, then `parse`.
    fn two_pass(body: Bytes) -> Result<RawBatch, String> {
        if let Err(problems) = crate::validate::validate_payload_shape(&body) {
            return Err(format!("{:?}", problems.into_iter().next()));
        }
        RawBatch::parse(body).map_err(|e| e.to_string())
    }

    fn one_pass(body: Bytes) -> Result<RawBatch, String> {
        RawBatch::parse_shape(body).map_err(|e| match e {
            ShapeError::Shape(p) => format!("{p:?}"),
            ShapeError::Batch(e) => e.to_string(),
        })
    }

    #[test]
    fn parse_shape_agrees_with_the_two_pass_check_on_known_cases() {
        for body in [
            r#"{"account_id":"1","visitors":[{"visitor_id":"a","snapshots":[{}]}]}"#,
            r#" {"visitors":[{"snapshots":[{}],"visitor_id":"a"}],"b":{"y": 1, "x":[1, 2]},"account_id":"1"} "#,
            r#"[1]"#,
            r#"{"account_id":"1"}"#,
            r#"{"account_id":"","visitors":[]}"#,
            r#"{"account_id":null,"visitors":[{"visitor_id":null,"snapshots":null}]}"#,
            r#"{"account_id":"1","account_id":"1","visitors":[{"visitor_id":"a","snapshots":[{}]}]}"#,
            r#"{"account_id":"1","r":1,"r":2,"visitors":[{"visitor_id":"a","snapshots":[{}]}]}"#,
            r#"{"account_id":"1","visitors":[{"visitor_id":"a","visitor_id":"b","snapshots":[{}]}]}"#,
            r#"{"account_id":"1","visitors":[{"visitor_id":"a","snapshots":[ ]}]}"#,
            r#"{"account_id":"1","visitors":[{"visitor_id":"a","snapshots":[{}]},2]}"#,
            r#"{"account_id":"1","visitors":{"visitor_id":"a"}}"#,
            r#"{"account_id":"1","visitors":[{"visitor_id":"a","snapshots":[{}]}],"visitors":[]}"#,
            r#"{"account_id":"1","visitors":[{"visitor_id":"a","snapshots":[{}]}"#,
            "",
            // Whitespace everywhere a visitor's bytes are found from its fields.
            "{\"account_id\":\"1\",\"visitors\":[ \n{ \t\"visitor_id\" : \"a\" ,\r\n \"snapshots\" : [ {} ] \n} , {\"snapshots\":[1],\"visitor_id\":\"b\"}\t]}",
            // Escaped keys: a visitor's first or a later one, and a header field's.
            r#"{"account_id":"1","visitors":[{"visitor\u005fid":"a","snapshots":[{}]}]}"#,
            r#"{"account_id":"1","visitors":[{"visitor_id":"a","snap\u0073hots":[{}]}]}"#,
            r#"{"account_id":"1","visitors":[{"visitor_id":"a","snapshots":[{}],"\u0078":1}]}"#,
            r#"{"account_id":"1","re\u0067ion":"EU","visitors":[{"visitor_id":"a","snapshots":[{}]}]}"#,
            // A visitor whose last field holds strings that look like the object's end.
            r#"{"account_id":"1","visitors":[{"visitor_id":"a}","snapshots":[{}],"s":" } "}]}"#,
        ] {
            let body = Bytes::from(body.as_bytes().to_vec());
            assert_eq!(one_pass(body.clone()), two_pass(body.clone()), "{body:?}");
        }
    }

    #[test]
    fn the_one_pass_path_takes_padded_visitors_and_keeps_their_exact_bytes() {
        let body = Bytes::from_static(
            b"{\"account_id\":\"1\",\"visitors\":[ \n{ \"visitor_id\" : \"a\" , \"snapshots\":[{}] \n} ,{\"visitor_id\":\"b\",\"snapshots\":[1],\"k\":\"}\"}]}",
        );
        let fast = RawBatch::parse_shape_fast(&body).expect("the one-pass path takes it");
        assert_eq!(
            &fast.visitors()[0][..],
            b"{ \"visitor_id\" : \"a\" , \"snapshots\":[{}] \n}"
        );
        assert_eq!(
            &fast.visitors()[1][..],
            br#"{"visitor_id":"b","snapshots":[1],"k":"}"}"#
        );
        assert_eq!(fast, RawBatch::parse(body).expect("a payload"));

        // A visitor whose first key has an escape has no place in the body: the slow way
        // reads it. An escape in a later key does not matter.
        let first = Bytes::from_static(
            br#"{"account_id":"1","visitors":[{"\u0078":1,"visitor_id":"a","snapshots":[{}]}]}"#,
        );
        assert!(RawBatch::parse_shape_fast(&first).is_none());
        let later = Bytes::from_static(
            br#"{"account_id":"1","visitors":[{"visitor_id":"a","snapshots":[{}],"\u0078":1}]}"#,
        );
        assert!(RawBatch::parse_shape_fast(&later).is_some());
        for body in [first, later] {
            assert_eq!(
                RawBatch::parse_shape(body.clone())
                    .expect("accepted")
                    .visitors()[0],
                body.slice(30..body.len() - 2)
            );
        }
    }

    #[test]
    fn visitor_span_wants_slices_of_the_body_around_an_object() {
        let body = br#"[{"k":1}]"#.to_vec();
        let body = &body[..];
        let text = std::str::from_utf8(body).expect("ascii");
        assert_eq!(
            visitor_span(body, &text[3..4], &text[6..7]),
            Some(&body[1..8])
        );
        // Not at a key (no quote before it), not inside braces, not in the body at all.
        assert_eq!(visitor_span(body, &text[4..5], &text[6..7]), None);
        assert_eq!(visitor_span(&body[..7], &text[3..4], &text[6..7]), None);
        assert_eq!(visitor_span(body, "k", "1"), None);
        // A key after the value: no object between them.
        let two = br#"{"a":1} {"k":2}"#.to_vec();
        let text = std::str::from_utf8(&two).expect("ascii");
        assert_eq!(visitor_span(&two, &text[10..11], &text[5..6]), None);
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        fn value() -> impl Strategy<Value = &'static str> {
            prop::sample::select(vec![
                r#""a""#,
                r#""""#,
                "1",
                "null",
                "[]",
                "[{}]",
                "[ {} ]",
                "{}",
                r#"{"k": [1, 2]}"#,
                "true",
            ])
        }

        /// An optional field: mostly a good value, sometimes any of [`value`].
        fn field(name: &'static str, good: &'static str) -> impl Strategy<Value = Option<String>> {
            prop_oneof![
                3 => Just(Some(format!(r#""{name}":{good}"#))),
                1 => value().prop_map(move |v| Some(format!(r#""{name}":{v}"#))),
                1 => Just(None),
            ]
        }

        /// Fields in a shuffled order, one of them now and then written twice.
        fn object(fields: Vec<Option<String>>, dup: usize, rotate: usize) -> String {
            let mut fields: Vec<String> = fields.into_iter().flatten().collect();
            if let Some(f) = fields.get(dup).cloned() {
                fields.push(f);
            }
            if !fields.is_empty() {
                let n = rotate % fields.len();
                fields.rotate_left(n);
            }
            format!("{{{}}}", fields.join(", "))
        }

        fn visitor() -> impl Strategy<Value = String> {
            let good = (
                field("visitor_id", r#""u""#),
                field("snapshots", r#"[{"events":[]}]"#),
                field("session_id", r#""s""#),
                0usize..12,
                0usize..3,
            )
                .prop_map(|(a, b, c, dup, rot)| object(vec![a, b, c], dup, rot));
            prop_oneof![8 => good, 1 => value().prop_map(str::to_owned)]
        }

        fn body() -> impl Strategy<Value = String> {
            let visitors = prop_oneof![
                4 => prop::collection::vec(visitor(), 0..4)
                    .prop_map(|v| Some(format!(r#""visitors":[{}]"#, v.join(", ")))),
                1 => field("visitors", "[]"),
            ];
            (
                field("account_id", r#""9""#),
                field("region", r#""EU""#),
                visitors,
                0usize..12,
                0usize..3,
                0usize..10,
            )
                .prop_map(|(a, r, v, dup, rot, shape)| {
                    let mut s = object(vec![a, r, v], dup, rot);
                    match shape {
                        // A top-level array, then a truncated body (a syntax error at the end).
                        0 => s = format!("[{s}]"),
                        1 => {
                            s.pop();
                        }
                        _ => {}
                    }
                    s
                })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]
            /// Same acceptance, same batch, same first problem as the two-pass check.
            #[test]
            fn parse_shape_agrees_with_the_two_pass_check(body in body()) {
                let bytes = Bytes::from(body.into_bytes());
                prop_assert_eq!(one_pass(bytes.clone()), two_pass(bytes));
            }

            /// The same with whitespace beside every brace, bracket, comma and colon (no
            /// generated string holds one), and every body the two-pass check accepts taken by
            /// the one-pass path, which finds each visitor's bytes by stepping over that
            /// whitespace.
            #[test]
            fn parse_shape_agrees_with_the_two_pass_check_in_any_whitespace(
                body in body(),
                pads in prop::collection::vec(0usize..4, 1..32),
            ) {
                const PADS: [&str; 4] = ["", " ", "\n\t", " \r\n "];
                let mut spaced = String::with_capacity(body.len() * 2);
                for (i, c) in body.chars().enumerate() {
                    let pad = PADS[pads[i % pads.len()]];
                    match c {
                        '{' | '[' | ',' | ':' => {
                            spaced.push(c);
                            spaced.push_str(pad);
                        }
                        '}' | ']' => {
                            spaced.push_str(pad);
                            spaced.push(c);
                        }
                        _ => spaced.push(c),
                    }
                }
                let bytes = Bytes::from(spaced.into_bytes());
                prop_assert_eq!(one_pass(bytes.clone()), two_pass(bytes.clone()));
                // No generated key has an escape, so nothing accepted goes the slow way.
                if two_pass(bytes.clone()).is_ok() {
                    prop_assert!(RawBatch::parse_shape_fast(&bytes).is_some());
                }
            }
        }
    }
}
