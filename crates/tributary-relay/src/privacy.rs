//! Privacy rules, applied to each visitor before anything reaches the spool: drop named
//! attributes, or keep only named ones (and the SDKs' reserved `$opt_*`), and replace each
//! `visitor_id` by its HMAC-SHA256 under a key the operator holds.
//!
//! A visitor no rule changes is forwarded exactly as received (the same bytes). A visitor
//! a rule changes is written again field by field (`json_fields`): the fields the
//! rule did not touch keep their bytes, their order and any field unknown to this code.
//! Nothing here logs a value it removes or replaces.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::json_fields::{Fields, array_items, write_array, write_object};

/// The prefix of the attribute keys the SDKs reserve (`$opt_bot_filtering`,
/// `$opt_user_agent`, ...): kept by an allow-list whatever it names.
pub const RESERVED_PREFIX: &str = "$opt_";

/// Which attributes a visitor keeps.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum AttributeRule {
    /// All of them.
    #[default]
    KeepAll,
    /// All but these keys.
    Drop(HashSet<String>),
    /// Only these keys, and those starting with [`RESERVED_PREFIX`].
    Allow(HashSet<String>),
}

impl AttributeRule {
    fn keeps(&self, key: Option<&str>) -> bool {
        match (self, key) {
            (AttributeRule::KeepAll, _) => true,
            (AttributeRule::Drop(keys), Some(k)) => !keys.contains(k),
            (AttributeRule::Drop(_), None) => true,
            (AttributeRule::Allow(keys), Some(k)) => {
                k.starts_with(RESERVED_PREFIX) || keys.contains(k)
            }
            // An allow-list keeps only what it names, and an attribute without a key
            // names nothing.
            (AttributeRule::Allow(_), None) => false,
        }
    }
}

/// An HMAC-SHA256 key for visitor ids. Its bytes are never printed.
#[derive(Clone)]
pub struct HashKey(Arc<[u8]>);

impl std::fmt::Debug for HashKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HashKey({} bytes)", self.0.len())
    }
}

impl HashKey {
    /// A key from a key file's bytes: one trailing newline (`\n` or `\r\n`), which editors
    /// add, is not part of the key.
    ///
    /// ```
    /// use tributary_relay::privacy::HashKey;
    /// let k = HashKey::from_file_bytes(b"secret\n");
    /// assert_eq!(k.hash("user-1"), HashKey::from_file_bytes(b"secret").hash("user-1"));
    /// assert_eq!(k.hash("user-1").len(), 64);
    /// ```
    pub fn from_file_bytes(bytes: &[u8]) -> HashKey {
        let bytes = bytes
            .strip_suffix(b"\r\n")
            .or_else(|| bytes.strip_suffix(b"\n"))
            .unwrap_or(bytes);
        HashKey(Arc::from(bytes))
    }

    /// Whether the key has no bytes.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Lowercase hex HMAC-SHA256 of `visitor_id` under the key.
    pub fn hash(&self, visitor_id: &str) -> String {
        // HMAC takes a key of any length, so this cannot fail.
        let mut mac = match <Hmac<Sha256> as KeyInit>::new_from_slice(&self.0) {
            Ok(m) => m,
            Err(_) => return String::new(),
        };
        mac.update(visitor_id.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }
}

/// The rules for one account (or for every account without rules of its own).
#[derive(Debug, Clone, Default)]
pub struct PrivacyRule {
    /// Which attributes are kept.
    pub attributes: AttributeRule,
    /// Replace `visitor_id` by its HMAC under this key.
    pub hash_visitor_ids: Option<HashKey>,
}

impl PrivacyRule {
    /// Whether the rule changes nothing.
    pub fn is_noop(&self) -> bool {
        self.attributes == AttributeRule::KeepAll && self.hash_visitor_ids.is_none()
    }
}

/// Every rule: the default one and those of single accounts.
#[derive(Debug, Clone, Default)]
pub struct PrivacyRules {
    /// For accounts without rules of their own.
    pub default: PrivacyRule,
    /// By `account_id`.
    pub accounts: BTreeMap<String, PrivacyRule>,
}

impl PrivacyRules {
    /// Whether no account has any rule (the ingest path then skips this stage).
    pub fn is_noop(&self) -> bool {
        self.default.is_noop() && self.accounts.values().all(PrivacyRule::is_noop)
    }

    /// The rule for `account`.
    pub fn for_account(&self, account: &str) -> &PrivacyRule {
        self.accounts.get(account).unwrap_or(&self.default)
    }
}

/// What the rules did to one request, for the metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PrivacyCounts {
    /// Attributes removed.
    pub attributes_dropped: u64,
    /// Visitor ids replaced by their HMAC.
    pub visitor_ids_hashed: u64,
    /// Visitors written again (any rule changed them).
    pub visitors_rewritten: u64,
}

/// A visitor the rules could not read: not an object, a `visitor_id` that is not a
/// string, or (with an attribute rule) `attributes` that is neither an array nor null. The message names the field, never its value.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PrivacyError(pub String);

/// The attribute the SDKs send when a bucketing id is set: it often holds the user id
/// itself, so it is hashed with the visitor id.
pub const BUCKETING_ID_KEY: &str = "$opt_bucketing_id";

/// `item` with its string `value` replaced by the HMAC, when it is the
/// [`BUCKETING_ID_KEY`] attribute; `None` otherwise (left as it is).
fn hash_bucketing_id(key: &HashKey, item: &serde_json::value::RawValue) -> Option<Vec<u8>> {
    let fields = Fields::parse(item.get().as_bytes()).ok()?;
    let is_bucketing = fields.0.iter().any(|(k, v)| {
        k == "key" && serde_json::from_str::<String>(v.get()).is_ok_and(|s| s == BUCKETING_ID_KEY)
    });
    if !is_bucketing {
        return None;
    }
    let mut hashed: Vec<Vec<u8>> = Vec::new();
    for (k, v) in &fields.0 {
        if k == "value" {
            // A value that is not a string is not an id the SDK wrote; hashed as text
            // anyway, so that nothing of it passes.
            let id = serde_json::from_str::<String>(v.get()).unwrap_or_else(|_| v.get().to_owned());
            let mut out = Vec::with_capacity(66);
            let _ = serde_json::to_writer(&mut out, &key.hash(&id));
            hashed.push(out);
        }
    }
    let mut next = hashed.iter();
    Some(write_object(fields.raw().enumerate().map(|(i, (k, v))| {
        if fields.0[i].0 == "value" {
            (k, next.next().map_or(v, Vec::as_slice))
        } else {
            (k, v)
        }
    })))
}

/// Whether `rule` keeps one attribute item, judged by every occurrence of `key` in it (a
/// reader downstream may take any one of them): an item that is not an object, or whose
/// `key` is not a string, cannot be judged and is dropped, so a rule never lets through
/// what it could not read.
fn keeps_item(rule: &AttributeRule, item: &serde_json::value::RawValue) -> bool {
    let Ok(fields) = Fields::parse(item.get().as_bytes()) else {
        return false;
    };
    let mut keys = fields.0.iter().filter(|(k, _)| k == "key").peekable();
    if keys.peek().is_none() {
        return rule.keeps(None);
    }
    keys.all(|(_, raw)| match serde_json::from_str::<String>(raw.get()) {
        Ok(key) => rule.keeps(Some(&key)),
        Err(_) => false,
    })
}

impl PrivacyRule {
    /// Applies the rule to one visitor object. `None`: nothing changed, forward `visitor`
    /// as it is.
    pub fn apply(
        &self,
        visitor: &[u8],
        counts: &mut PrivacyCounts,
    ) -> Result<Option<Bytes>, PrivacyError> {
        if self.is_noop() {
            return Ok(None);
        }
        let fields =
            Fields::parse(visitor).map_err(|e| PrivacyError(format!("not a JSON object ({e})")))?;
        let mut replaced: Vec<Option<Vec<u8>>> = vec![None; fields.0.len()];
        let mut changed = false;
        for (i, (key, raw)) in fields.0.iter().enumerate() {
            match key.as_str() {
                "visitor_id" => {
                    let Some(hash_key) = &self.hash_visitor_ids else {
                        continue;
                    };
                    let id: String = serde_json::from_str(raw.get()).map_err(|_| {
                        PrivacyError("visitor_id: must be a string to be hashed".into())
                    })?;
                    let mut out = Vec::with_capacity(66);
                    let _ = serde_json::to_writer(&mut out, &hash_key.hash(&id));
                    replaced[i] = Some(out);
                    counts.visitor_ids_hashed += 1;
                    changed = true;
                }
                "attributes"
                    if self.attributes != AttributeRule::KeepAll
                        || self.hash_visitor_ids.is_some() =>
                {
                    // Anything but an array (or null) could hide an attribute the rule
                    // must remove: refused, rather than stored and forwarded as it is.
                    let Some(items) = array_items(raw) else {
                        if raw.get() == "null" {
                            continue;
                        }
                        return Err(PrivacyError(
                            "attributes: must be an array (or null) where attribute rules or \
                             visitor id hashing apply"
                                .into(),
                        ));
                    };
                    let mut hashed_any = false;
                    let kept: Vec<Cow<'_, [u8]>> = items
                        .iter()
                        .filter(|item| {
                            self.attributes == AttributeRule::KeepAll
                                || keeps_item(&self.attributes, item)
                        })
                        .map(|item| {
                            let hashed = self
                                .hash_visitor_ids
                                .as_ref()
                                .and_then(|key| hash_bucketing_id(key, item));
                            match hashed {
                                Some(new) => {
                                    hashed_any = true;
                                    Cow::Owned(new)
                                }
                                None => Cow::Borrowed(item.get().as_bytes()),
                            }
                        })
                        .collect();
                    let dropped = items.len() - kept.len();
                    if dropped > 0 || hashed_any {
                        counts.attributes_dropped += dropped as u64;
                        replaced[i] = Some(write_array(kept.iter().map(AsRef::as_ref)));
                        changed = true;
                    }
                }
                _ => {}
            }
        }
        if !changed {
            return Ok(None);
        }
        counts.visitors_rewritten += 1;
        let out = write_object(
            fields
                .raw()
                .zip(&replaced)
                .map(|((k, raw), new)| (k, new.as_deref().unwrap_or(raw))),
        );
        Ok(Some(Bytes::from(out)))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const VISITOR: &[u8] = br#"{"snapshots":[{"events":[{"uuid":"u1","revenue":4200,"value":3.50}]}],"attributes":[{"entity_id":"1","key":"email","type":"custom","value":"a@b.c"},{"entity_id":"2","key":"country","type":"custom","value":"DE"},{"entity_id":"$opt_bot_filtering","key":"$opt_bot_filtering","type":"custom","value":true}],"visitor_id":"user-1","session_id":"s"}"#;

    fn set(keys: &[&str]) -> HashSet<String> {
        keys.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn drop_removes_only_the_named_keys_and_keeps_the_rest_as_written() {
        let rule = PrivacyRule {
            attributes: AttributeRule::Drop(set(&["email"])),
            hash_visitor_ids: None,
        };
        let mut counts = PrivacyCounts::default();
        let out = rule.apply(VISITOR, &mut counts).unwrap().unwrap();
        let text = std::str::from_utf8(&out).unwrap();
        assert!(!text.contains("email") && !text.contains("a@b.c"), "{text}");
        assert_eq!(
            text,
            r#"{"snapshots":[{"events":[{"uuid":"u1","revenue":4200,"value":3.50}]}],"attributes":[{"entity_id":"2","key":"country","type":"custom","value":"DE"},{"entity_id":"$opt_bot_filtering","key":"$opt_bot_filtering","type":"custom","value":true}],"visitor_id":"user-1","session_id":"s"}"#
        );
        assert_eq!(counts.attributes_dropped, 1);
    }

    #[test]
    fn allow_keeps_the_named_and_the_reserved_keys() {
        let rule = PrivacyRule {
            attributes: AttributeRule::Allow(set(&["country"])),
            hash_visitor_ids: None,
        };
        let mut counts = PrivacyCounts::default();
        let out = rule.apply(VISITOR, &mut counts).unwrap().unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        let keys: Vec<&str> = v["attributes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["key"].as_str().unwrap())
            .collect();
        assert_eq!(keys, ["country", "$opt_bot_filtering"]);
    }

    #[test]
    fn hashing_replaces_the_id_with_the_hmac() {
        let key = HashKey::from_file_bytes(b"k");
        let rule = PrivacyRule {
            attributes: AttributeRule::KeepAll,
            hash_visitor_ids: Some(key.clone()),
        };
        let mut counts = PrivacyCounts::default();
        let out = rule.apply(VISITOR, &mut counts).unwrap().unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        // RFC 4231-style check against an independent computation.
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(b"k").unwrap();
        mac.update(b"user-1");
        assert_eq!(v["visitor_id"], hex::encode(mac.finalize().into_bytes()));
        assert_eq!(counts.visitor_ids_hashed, 1);
    }

    #[test]
    fn a_visitor_no_rule_touches_is_left_alone() {
        let rule = PrivacyRule {
            attributes: AttributeRule::Drop(set(&["age"])),
            hash_visitor_ids: None,
        };
        let mut counts = PrivacyCounts::default();
        assert!(rule.apply(VISITOR, &mut counts).unwrap().is_none());
        assert_eq!(counts, PrivacyCounts::default());
    }

    #[test]
    fn a_known_hmac_vector() {
        // RFC 4231 test case 2.
        let key = HashKey::from_file_bytes(b"Jefe");
        assert_eq!(
            key.hash("what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn attributes_that_are_not_an_array_are_refused_and_null_passes() {
        let rule = PrivacyRule {
            attributes: AttributeRule::Drop(set(&["email"])),
            hash_visitor_ids: None,
        };
        let mut counts = PrivacyCounts::default();
        for attributes in [
            r#"{"key":"email","value":"a@b.c"}"#,
            r#""email=a@b.c""#,
            "3",
        ] {
            let visitor = format!(r#"{{"visitor_id":"v","attributes":{attributes}}}"#);
            let err = rule.apply(visitor.as_bytes(), &mut counts).unwrap_err();
            assert!(err.0.starts_with("attributes:"), "{}", err.0);
            assert!(!err.0.contains("a@b.c"), "{}", err.0);
        }
        let visitor = br#"{"visitor_id":"v","attributes":null}"#;
        assert!(rule.apply(visitor, &mut counts).unwrap().is_none());
    }

    #[test]
    fn an_item_whose_key_cannot_be_read_is_dropped_and_every_key_counts() {
        let rule = PrivacyRule {
            attributes: AttributeRule::Drop(set(&["email"])),
            hash_visitor_ids: None,
        };
        let visitor = br#"{"visitor_id":"v","attributes":[{"key":"country","key":"email","value":"a@b.c"},{"key":7,"value":"a@b.c"},"a@b.c",[1],{"key":"country","value":"DE"}]}"#;
        let mut counts = PrivacyCounts::default();
        let out = rule.apply(visitor, &mut counts).unwrap().unwrap();
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"visitor_id":"v","attributes":[{"key":"country","value":"DE"}]}"#
        );
        assert_eq!(counts.attributes_dropped, 4);
        // The allow-list judges a repeated key the same way.
        let allow = PrivacyRule {
            attributes: AttributeRule::Allow(set(&["country"])),
            hash_visitor_ids: None,
        };
        let out = allow.apply(visitor, &mut counts).unwrap().unwrap();
        assert!(!std::str::from_utf8(&out).unwrap().contains("a@b.c"));
    }

    #[test]
    fn a_touched_visitor_keeps_odd_numbers_and_escapes_as_written() {
        let rule = PrivacyRule {
            attributes: AttributeRule::Drop(set(&["email"])),
            hash_visitor_ids: Some(HashKey::from_file_bytes(b"k")),
        };
        let visitor = br#"{"snapshots":[{"events":[{"uuid":"a\/b","revenue":123456789012345678901234567890,"value":1e400,"tags":{"p":"x\/y","n":-0.0}}]}],"attributes":[{"key":"email","value":"a@b.c"},{"key":"n","value":1E+2}],"visitor_id":"u"}"#;
        let mut counts = PrivacyCounts::default();
        let out = rule.apply(visitor, &mut counts).unwrap().unwrap();
        let text = std::str::from_utf8(&out).unwrap();
        for kept in [
            r#""uuid":"a\/b""#,
            r#""revenue":123456789012345678901234567890"#,
            r#""value":1e400"#,
            r#""p":"x\/y""#,
            r#""n":-0.0"#,
            r#"{"key":"n","value":1E+2}"#,
        ] {
            assert!(text.contains(kept), "{kept} was rewritten: {text}");
        }
        assert!(!text.contains("a@b.c"), "{text}");
    }

    #[test]
    fn the_bucketing_id_is_hashed_with_the_visitor_id() {
        let key = HashKey::from_file_bytes(b"k");
        let rule = PrivacyRule {
            attributes: AttributeRule::KeepAll,
            hash_visitor_ids: Some(key.clone()),
        };
        let visitor = br#"{"attributes":[{"entity_id":"$opt_bucketing_id","key":"$opt_bucketing_id","type":"custom","value":"user-1"},{"key":"country","value":"DE"}],"visitor_id":"user-1"}"#;
        let mut counts = PrivacyCounts::default();
        let out = rule.apply(visitor, &mut counts).unwrap().unwrap();
        let text = std::str::from_utf8(&out).unwrap();
        assert!(!text.contains("user-1"), "{text}");
        let hashed = key.hash("user-1");
        assert_eq!(
            text,
            format!(
                r#"{{"attributes":[{{"entity_id":"$opt_bucketing_id","key":"$opt_bucketing_id","type":"custom","value":"{hashed}"}},{{"key":"country","value":"DE"}}],"visitor_id":"{hashed}"}}"#
            )
        );
        // Without hashing it is an attribute like any other (kept by an allow-list).
        let allow = PrivacyRule {
            attributes: AttributeRule::Allow(set(&[])),
            hash_visitor_ids: None,
        };
        let out = allow.apply(visitor, &mut counts).unwrap().unwrap();
        assert!(
            std::str::from_utf8(&out)
                .unwrap()
                .contains(r#""value":"user-1""#)
        );
    }
}
