//! Bearer tokens (`--auth-tokens`), checked the same way by ingest and by the status
//! page's dead-letter actions.
//!
//! Tokens are kept as SHA-256 digests and compared digest to digest in constant time:
//! equal-length inputs, every token compared, so neither a token's length nor which token
//! matched shows in the timing.

use axum::http::{HeaderMap, header};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The accepted bearer tokens; empty means no authentication.
///
/// ```
/// use axum::http::{HeaderMap, HeaderValue, header};
/// use tributary_relay::auth::{AuthError, BearerTokens};
///
/// let tokens = BearerTokens::new(&["s3cret".to_owned()]);
/// let mut headers = HeaderMap::new();
/// headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer s3cret"));
/// assert_eq!(tokens.check(&headers), Ok(Some(0)));
/// assert_eq!(tokens.check(&HeaderMap::new()), Err(AuthError::Missing));
/// ```
#[derive(Clone, Default)]
pub struct BearerTokens {
    digests: Vec<[u8; 32]>,
}

/// Why a request was not authenticated (answered 401).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `Authorization: Bearer ...` header, or an empty token.
    #[error("missing Authorization: Bearer token")]
    Missing,
    /// A token that is not one of `--auth-tokens`.
    #[error("invalid token")]
    Invalid,
}

impl std::fmt::Debug for BearerTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the digests: they identify the tokens.
        f.debug_struct("BearerTokens")
            .field("tokens", &self.digests.len())
            .finish()
    }
}

impl BearerTokens {
    /// The tokens to accept.
    pub fn new(tokens: &[String]) -> BearerTokens {
        BearerTokens {
            digests: tokens.iter().map(|t| digest(t)).collect(),
        }
    }

    /// Whether authentication is off (no tokens configured).
    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    /// Checks the request's bearer token. `Ok(None)` when no token is required, else the
    /// position of the matching token in `--auth-tokens` (what the per-token rate limit
    /// and its metric label use, never the token).
    pub fn check(&self, headers: &HeaderMap) -> Result<Option<usize>, AuthError> {
        if self.digests.is_empty() {
            return Ok(None);
        }
        // The scheme is case-insensitive (RFC 9110 §11.1): `bearer`, `BEARER` and `Bearer`.
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim_start().split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
            .filter(|token| !token.is_empty())
            .ok_or(AuthError::Missing)?;
        let given = digest(given);
        let mut matched = None;
        for (i, t) in self.digests.iter().enumerate() {
            if bool::from(t.ct_eq(&given)) {
                matched = Some(i);
            }
        }
        matched.map(Some).ok_or(AuthError::Invalid)
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn with(value: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_static(value));
        h
    }

    #[test]
    fn tokens_are_matched_by_position_and_mismatches_named() {
        let tokens = BearerTokens::new(&["a".to_owned(), "bb".to_owned()]);
        assert_eq!(tokens.check(&with("Bearer bb")), Ok(Some(1)));
        assert_eq!(tokens.check(&with("bearer  a ")), Ok(Some(0)));
        assert_eq!(tokens.check(&with("Bearer bbb")), Err(AuthError::Invalid));
        assert_eq!(tokens.check(&with("Basic a")), Err(AuthError::Missing));
        assert_eq!(tokens.check(&with("Bearer ")), Err(AuthError::Missing));
        assert_eq!(BearerTokens::default().check(&HeaderMap::new()), Ok(None));
    }

    #[test]
    fn debug_shows_no_token() {
        let tokens = BearerTokens::new(&["s3cret".to_owned()]);
        assert_eq!(format!("{tokens:?}"), "BearerTokens { tokens: 1 }");
    }
}
