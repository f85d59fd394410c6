//! The files settings come from: the `--config` TOML file and the bearer-token file, both
//! small regular files.

use std::collections::HashSet;
use std::path::Path;

use super::{ConfigError, PrivacyTable, RelaySettings};
use crate::privacy::{AttributeRule, HashKey, PrivacyRule, PrivacyRules};

/// Most bytes a config or token file may have: such files are small, and `/dev/zero` is not
/// one.
const MAX_SETTINGS_FILE_BYTES: u64 = 1 << 20;

impl RelaySettings {
    /// Reads a TOML file of settings (kebab-case keys, as the flags without `--`); an
    /// unknown key is an error that names it.
    pub fn from_file(path: &Path) -> Result<RelaySettings, ConfigError> {
        let text = read_small(path, "config file").map_err(|e| match e {
            Small::Io(source) => ConfigError::Read {
                path: path.to_owned(),
                source,
            },
            Small::Unfit(message) => ConfigError::Unfit {
                path: path.to_owned(),
                message,
            },
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }
}

enum Small {
    Io(std::io::Error),
    Unfit(String),
}

/// Reads a small regular text file, refusing devices, pipes and anything over 1 MiB.
fn read_small(path: &Path, what: &str) -> Result<String, Small> {
    let meta = std::fs::metadata(path).map_err(Small::Io)?;
    if !meta.is_file() {
        return Err(Small::Unfit(format!("a {what} must be a regular file")));
    }
    if meta.len() > MAX_SETTINGS_FILE_BYTES {
        return Err(Small::Unfit(format!(
            "{} bytes; a {what} may have at most {MAX_SETTINGS_FILE_BYTES}",
            meta.len()
        )));
    }
    let mut text = String::new();
    std::io::Read::read_to_string(
        &mut std::io::Read::take(
            std::fs::File::open(path).map_err(Small::Io)?,
            MAX_SETTINGS_FILE_BYTES,
        ),
        &mut text,
    )
    .map_err(Small::Io)?;
    Ok(text)
}

/// The accepted tokens from the flag and the file. Authentication fails closed: a blank
/// token, or a file that holds none, is an error, never "no authentication".
pub(super) fn auth_tokens(
    listed: Option<Vec<String>>,
    file: Option<&Path>,
) -> Result<Vec<String>, ConfigError> {
    let invalid = |name, message: String| ConfigError::Invalid { name, message };
    let mut tokens = Vec::new();
    if let Some(listed) = listed {
        for t in listed {
            let t = t.trim();
            if t.is_empty() {
                return Err(invalid(
                    "auth-tokens",
                    "holds a blank token (a stray comma or space?); every token must be non-empty"
                        .into(),
                ));
            }
            tokens.push(t.to_owned());
        }
    }
    if let Some(path) = file {
        let text = read_small(path, "token file").map_err(|e| {
            let why = match e {
                Small::Io(e) => e.to_string(),
                Small::Unfit(m) => m,
            };
            invalid("auth-tokens-file", format!("{}: {why}", path.display()))
        })?;
        let before = tokens.len();
        tokens.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_owned),
        );
        if tokens.len() == before {
            return Err(invalid(
                "auth-tokens-file",
                format!("{} holds no token", path.display()),
            ));
        }
    }
    if tokens.iter().any(|t| t.chars().any(char::is_whitespace)) {
        return Err(invalid(
            "auth-tokens",
            "a token may not contain spaces (a bearer token is one word)".into(),
        ));
    }
    Ok(tokens)
}

/// Most bytes an HMAC key file may have.
const MAX_KEY_FILE_BYTES: u64 = 4096;

/// The attribute rule of `drop` or `allow` (at most one of them), keys checked.
fn attribute_rule(
    scope: &str,
    drop: Option<&[String]>,
    allow: Option<&[String]>,
) -> Result<Option<AttributeRule>, ConfigError> {
    let keys = |name: &'static str, list: &[String]| -> Result<HashSet<String>, ConfigError> {
        let mut set = HashSet::new();
        for k in list {
            let k = k.trim();
            if k.is_empty() {
                return Err(ConfigError::Invalid {
                    name,
                    message: format!(
                        "{scope}: holds a blank key (a stray comma?); every key must be non-empty"
                    ),
                });
            }
            set.insert(k.to_owned());
        }
        if set.is_empty() {
            return Err(ConfigError::Invalid {
                name,
                message: format!("{scope}: names no key"),
            });
        }
        Ok(set)
    };
    match (drop, allow) {
        (Some(_), Some(_)) => Err(ConfigError::Invalid {
            name: "allow-attributes",
            message: format!(
                "{scope}: drop-attributes and allow-attributes together; choose one (an \
                 allow-list already drops every other key)"
            ),
        }),
        (Some(d), None) => Ok(Some(AttributeRule::Drop(keys("drop-attributes", d)?))),
        (None, Some(a)) => Ok(Some(AttributeRule::Allow(keys("allow-attributes", a)?))),
        (None, None) => Ok(None),
    }
}

/// The privacy rules the settings make: the relay-wide rule and each account's, the key
/// file read. Every mistake is refused here, at start, naming the setting (and never
/// showing the key).
pub(super) fn privacy_rules(
    drop: Option<&[String]>,
    allow: Option<&[String]>,
    hash: bool,
    key_file: Option<&Path>,
    accounts: Option<&PrivacyTable>,
) -> Result<PrivacyRules, ConfigError> {
    let invalid = |name, message: String| ConfigError::Invalid { name, message };
    let any_hash = hash
        || accounts.is_some_and(|t| t.account.iter().any(|a| a.hash_visitor_ids == Some(true)));
    let key = match key_file {
        Some(path) => {
            let meta = std::fs::metadata(path)
                .map_err(|e| invalid("hash-key-file", format!("{}: {e}", path.display())))?;
            if !meta.is_file() || meta.len() > MAX_KEY_FILE_BYTES {
                return Err(invalid(
                    "hash-key-file",
                    format!(
                        "{}: must be a regular file of at most {MAX_KEY_FILE_BYTES} bytes",
                        path.display()
                    ),
                ));
            }
            let bytes = std::fs::read(path)
                .map_err(|e| invalid("hash-key-file", format!("{}: {e}", path.display())))?;
            let key = HashKey::from_file_bytes(&bytes);
            if key.is_empty() {
                return Err(invalid(
                    "hash-key-file",
                    format!(
                        "{} is empty; the key must have at least one byte",
                        path.display()
                    ),
                ));
            }
            Some(key)
        }
        None if any_hash => {
            return Err(invalid(
                "hash-key-file",
                "hash-visitor-ids needs hash-key-file: the HMAC key, the same on every relay"
                    .into(),
            ));
        }
        None => None,
    };
    let default = PrivacyRule {
        attributes: attribute_rule("relay-wide", drop, allow)?.unwrap_or_default(),
        hash_visitor_ids: if hash { key.clone() } else { None },
    };
    let mut rules = PrivacyRules {
        default: default.clone(),
        accounts: Default::default(),
    };
    for a in accounts.map(|t| t.account.as_slice()).unwrap_or_default() {
        let id = a.account_id.trim();
        if id.is_empty() {
            return Err(invalid(
                "privacy.account",
                "an [[privacy.account]] table has a blank account-id".into(),
            ));
        }
        let scope = format!("[[privacy.account]] {id}");
        let attributes = attribute_rule(
            &scope,
            a.drop_attributes.as_deref(),
            a.allow_attributes.as_deref(),
        )?
        .unwrap_or_else(|| default.attributes.clone());
        let hash_visitor_ids = match a.hash_visitor_ids {
            Some(true) => key.clone(),
            Some(false) => None,
            None => default.hash_visitor_ids.clone(),
        };
        let rule = PrivacyRule {
            attributes,
            hash_visitor_ids,
        };
        if rules.accounts.insert(id.to_owned(), rule).is_some() {
            return Err(invalid(
                "privacy.account",
                format!("account-id {id} has two [[privacy.account]] tables"),
            ));
        }
    }
    Ok(rules)
}
