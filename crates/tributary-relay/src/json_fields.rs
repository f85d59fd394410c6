//! A JSON object as its fields in order, each key and value kept as the bytes it was
//! written with, for the targeted edits of the privacy rules and the duplicate filter: a
//! field that is not edited is written back exactly as it came (numbers, escapes in keys
//! and values, unknown fields, key order); only the whitespace between tokens goes.

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;
use serde::de::{MapAccess, Visitor};
use serde_json::value::RawValue;

/// An object's fields in order (keys decoded, values borrowed from the input), and each
/// key as written (see [`Fields::raw_key`]).
#[derive(Debug)]
pub(crate) struct Fields<'a>(pub(crate) Vec<(String, &'a RawValue)>, Vec<Cow<'a, [u8]>>);

impl<'de: 'a, 'a> Deserialize<'de> for Fields<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Fields<'a>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Fields<'a>, M::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, &'de RawValue>()? {
                    out.push((k, v));
                }
                Ok(Fields(out, Vec::new()))
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

impl<'a> Fields<'a> {
    /// Reads an object.
    pub(crate) fn parse(bytes: &'a [u8]) -> Result<Fields<'a>, serde_json::Error> {
        let mut fields: Fields<'a> = serde_json::from_slice(bytes)?;
        fields.1 = raw_keys(bytes, &fields.0);
        Ok(fields)
    }

    /// Field `i`'s key as written in the input, quotes included (`"\u0061"` stays so).
    pub(crate) fn raw_key(&self, i: usize) -> &[u8] {
        self.1.get(i).map_or(b"\"\"", |k| k.as_ref())
    }

    /// The fields in order as (key as written, value as written), for [`write_object`].
    pub(crate) fn raw(&self) -> impl Iterator<Item = (&[u8], &'a [u8])> + '_ {
        self.0
            .iter()
            .enumerate()
            .map(|(i, (_, v))| (self.raw_key(i), v.get().as_bytes()))
    }

    /// The raw value of `key`, if present.
    pub(crate) fn get(&self, key: &str) -> Option<&'a RawValue> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| *v)
    }

    /// The raw value of `key` when it occurs exactly once: an object that repeats a key
    /// is left as it is by the edits, since rewriting one occurrence of several would
    /// change what a reader that keeps another occurrence sees.
    pub(crate) fn get_unique(&self, key: &str) -> Option<&'a RawValue> {
        let mut found = self.0.iter().filter(|(k, _)| k == key);
        match (found.next(), found.next()) {
            (Some((_, v)), None) => Some(*v),
            _ => None,
        }
    }
}

/// Each key of `fields` as written in `bytes`: the string that starts after the previous
/// value (or the `{`). The values are slices of `bytes`, so their offsets say where to
/// look; should the scan not find a key where it must be, the decoded key is written
/// again instead (same meaning, maybe other escapes).
fn raw_keys<'a>(bytes: &'a [u8], fields: &[(String, &'a RawValue)]) -> Vec<Cow<'a, [u8]>> {
    let base = bytes.as_ptr() as usize;
    let mut pos = bytes.iter().position(|b| *b == b'{').map_or(0, |p| p + 1);
    let mut out = Vec::with_capacity(fields.len());
    for (key, value) in fields {
        let found = scan_key(bytes, pos);
        let v = value.get().as_bytes();
        let start = (v.as_ptr() as usize).wrapping_sub(base);
        match found {
            Some((from, to)) if start <= bytes.len() && to < start => {
                out.push(Cow::Borrowed(&bytes[from..=to]));
            }
            _ => {
                let mut k = Vec::with_capacity(key.len() + 2);
                // A key is a string: writing it cannot fail.
                let _ = serde_json::to_writer(&mut k, key);
                out.push(Cow::Owned(k));
            }
        }
        pos = start.saturating_add(v.len()).min(bytes.len());
    }
    out
}

/// The first string at or after `pos` past whitespace and a comma: its first and last
/// byte (the quotes).
fn scan_key(bytes: &[u8], mut pos: usize) -> Option<(usize, usize)> {
    while let Some(b) = bytes.get(pos) {
        match b {
            b' ' | b'\t' | b'\n' | b'\r' | b',' => pos += 1,
            b'"' => break,
            _ => return None,
        }
    }
    let from = pos;
    pos += 1;
    while let Some(b) = bytes.get(pos) {
        match b {
            b'\\' => pos += 2,
            b'"' => return Some((from, pos)),
            _ => pos += 1,
        }
    }
    None
}

/// Writes an object from fields in order, each key (a JSON string, quotes included) and
/// value as given.
pub(crate) fn write_object<'v>(fields: impl IntoIterator<Item = (&'v [u8], &'v [u8])>) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.push(b'{');
    for (i, (k, v)) in fields.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(k);
        out.push(b':');
        out.extend_from_slice(v);
    }
    out.push(b'}');
    out
}

/// Writes an array of raw items.
pub(crate) fn write_array<'v>(items: impl IntoIterator<Item = &'v [u8]>) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.push(b'[');
    for (i, item) in items.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(item);
    }
    out.push(b']');
    out
}

/// The items of a JSON array, each as written; `None` if `raw` is not an array.
pub(crate) fn array_items(raw: &RawValue) -> Option<Vec<&RawValue>> {
    serde_json::from_str::<Vec<&RawValue>>(raw.get()).ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn fields_round_trip_byte_for_byte_without_whitespace() {
        let text = br#" { "z" : 4200,"a":3.50,"u":"\u00e9x" ,"\u0061\"":1,"n":{"k":[1, 2]}}"#;
        let f = Fields::parse(text).unwrap();
        assert_eq!(f.0[3].0, "a\"", "keys are decoded for lookups");
        let out = write_object(f.raw());
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"z":4200,"a":3.50,"u":"\u00e9x","\u0061\"":1,"n":{"k":[1, 2]}}"#
        );
    }
}
