//! A JSON object as its fields in order, each value kept as the bytes it was written
//! with, for the targeted edits of the privacy rules and the duplicate filter: a field
//! that is not edited is written back exactly as it came (numbers, escapes, unknown
//! fields, key order); only the whitespace between tokens goes.

use std::fmt;

use serde::Deserialize;
use serde::de::{MapAccess, Visitor};
use serde_json::value::RawValue;

/// An object's fields in order, values borrowed from the input.
#[derive(Debug)]
pub(crate) struct Fields<'a>(pub(crate) Vec<(String, &'a RawValue)>);

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
                Ok(Fields(out))
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

impl<'a> Fields<'a> {
    /// Reads an object.
    pub(crate) fn parse(bytes: &'a [u8]) -> Result<Fields<'a>, serde_json::Error> {
        serde_json::from_slice(bytes)
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

/// Writes an object from fields in order, each value as given.
pub(crate) fn write_object<'v>(fields: impl IntoIterator<Item = (&'v str, &'v [u8])>) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.push(b'{');
    for (i, (k, v)) in fields.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        // A key is a string: writing it cannot fail.
        let _ = serde_json::to_writer(&mut out, k);
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
        let text = br#"{"z":4200,"a":3.50,"u":"\u00e9x","n":{"k":[1, 2]}}"#;
        let f = Fields::parse(text).unwrap();
        let out = write_object(f.0.iter().map(|(k, v)| (k.as_str(), v.get().as_bytes())));
        assert_eq!(
            out,
            br#"{"z":4200,"a":3.50,"u":"\u00e9x","n":{"k":[1, 2]}}"#
        );
    }
}
