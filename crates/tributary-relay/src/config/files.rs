//! The files settings come from: the `--config` TOML file and the bearer-token file, both
//! small regular files.

use std::path::Path;

use super::{ConfigError, RelaySettings};

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
