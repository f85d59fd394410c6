//! `POST /v1/events` and `POST /eu/v1/events`: accept an Event API payload, make it durable,
//! then answer.
//!
//! The order matters and is the relay's promise: authenticate, bound the body, check the
//! shape, split what is over `max_batch_bytes` by visitors, append to the spool, and only
//! when the spool has committed answer `204`. Any failure before the commit answers an error
//! and stores nothing; nothing after the commit can fail the request.

use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio::sync::Notify;
use tributary::raw::ShapeError;
use tributary::{RawBatch, RawBatchError};
use tributary_spool::{Payload, Route, Spool, SpoolError};

/// What the ingest handlers share.
pub struct IngestState {
    /// Where accepted payloads go.
    pub spool: Arc<dyn Spool>,
    /// Request body limit, compressed and decompressed.
    pub max_body_bytes: usize,
    /// Stored payloads are split to at most this many bytes.
    pub max_batch_bytes: usize,
    /// ... and at most this many visitors, so that no upstream request carries more.
    pub max_batch_events: usize,
    /// Accepted bearer tokens; empty means no authentication.
    pub auth_tokens: crate::auth::BearerTokens,
    /// Woken when enough has been appended to fill a batch.
    pub forwarder_wake: Arc<Notify>,
    /// Bytes appended since the forwarder last looked.
    pub appended_bytes: Arc<AtomicUsize>,
    /// Request-body bytes all requests together may hold in memory while they are read
    /// (`--max-buffered-bytes`): one permit per byte.
    pub body_budget: Arc<tokio::sync::Semaphore>,
    /// Requests handled at once (`--max-concurrent-requests`).
    pub requests: Arc<tokio::sync::Semaphore>,
    /// Longest time a request body may take to arrive (`--body-timeout`).
    pub body_timeout: std::time::Duration,
    /// The number of permits `requests` started with.
    pub requests_max: usize,
    /// The shared-relay rules (privacy, duplicates, quota, token rate), applied between
    /// the parse and the append ([`crate::rules`]).
    pub rules: Arc<crate::rules::IngestRules>,
}

/// An ingest error, answered as `{"error": ..., "path": ...}`.
#[derive(Debug)]
pub struct IngestError {
    status: StatusCode,
    message: String,
    path: Option<String>,
    retry_after: Option<u64>,
}

impl IngestError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        IngestError {
            status,
            message: message.into(),
            path: None,
            retry_after: None,
        }
    }

    fn at(mut self, path: impl Into<String>) -> Self {
        self.path = Some(path.into());
        self
    }
}

impl IntoResponse for IngestError {
    fn into_response(self) -> Response {
        let mut body = serde_json::json!({ "error": self.message });
        if let Some(path) = self.path {
            body["path"] = serde_json::Value::from(path);
        }
        let mut response = (self.status, axum::Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

/// `POST /v1/events`.
pub async fn post_us(
    State(state): State<Arc<IngestState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<StatusCode, IngestError> {
    ingest(&state, Route::US, &headers, body).await
}

/// `POST /eu/v1/events`.
pub async fn post_eu(
    State(state): State<Arc<IngestState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<StatusCode, IngestError> {
    ingest(&state, Route::EU, &headers, body).await
}

async fn ingest(
    state: &IngestState,
    route: Route,
    headers: &HeaderMap,
    body: Body,
) -> Result<StatusCode, IngestError> {
    let result = accept(state, route, headers, body).await;
    let status = match &result {
        Ok(s) => *s,
        Err(e) => e.status,
    };
    metrics::counter!("tributary_ingest_requests_total", "status" => status.as_str().to_owned())
        .increment(1);
    result
}

async fn accept(
    state: &IngestState,
    route: Route,
    headers: &HeaderMap,
    body: Body,
) -> Result<StatusCode, IngestError> {
    let _slot = state.requests.clone().try_acquire_owned().map_err(|_| {
        busy(format!(
            "relay busy: {} requests in progress (--max-concurrent-requests)",
            state.requests_max
        ))
    })?;
    let token = state
        .auth_tokens
        .check(headers)
        .map_err(|e| IngestError::new(StatusCode::UNAUTHORIZED, e.to_string()))?;
    state.rules.check_rate(token).map_err(|wait| IngestError {
        retry_after: Some(wait.as_secs_f64().ceil().max(1.0) as u64),
        ..IngestError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "this token is over its request rate (--token-rate-limit); retry later",
        )
    })?;
    check_content_type(headers)?;
    let (raw, held) = tokio::time::timeout(state.body_timeout, read_body(state, body))
        .await
        .map_err(|_| {
            IngestError::new(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request body did not arrive within {:?} (--body-timeout)",
                    state.body_timeout
                ),
            )
        })??;
    let body = decode_body(headers, raw, state.max_body_bytes)?;
    // What gunzip made counts against the same budget as what arrived: the permits already
    // held for the compressed buffer (freed by now) count toward it, so a body is counted
    // once, at the larger of its two sizes.
    let held_bytes = held.as_ref().map_or(0, |p| p.num_permits());
    let _inflated = match body.len().checked_sub(held_bytes) {
        Some(extra) if extra > 0 => Some(
            state
                .body_budget
                .clone()
                .try_acquire_many_owned(u32::try_from(extra).unwrap_or(u32::MAX))
                .map_err(|_| {
                    busy("relay busy: the memory for request bodies is in use (--max-buffered-bytes)".into())
                })?,
        ),
        _ => None,
    };
    let batch = parse_payload(body)?;
    // The shared-relay stage: privacy, then duplicates, then quota (see `crate::rules`).
    let admitted = state
        .rules
        .admit(&*state.spool, batch, |b| {
            stored_bytes(b, state.max_batch_bytes, state.max_batch_events)
        })
        .await
        .map_err(rule_error)?;
    let (batch, settle) = admitted.into_parts();
    if batch.visitors().is_empty() {
        // Every event was a duplicate: already accepted, so acknowledged again.
        state.rules.settle(settle, true, 0).await;
        return Ok(StatusCode::NO_CONTENT);
    }
    let events = batch.visitors().len();
    let parts = match batch.split_to_fit(state.max_batch_bytes) {
        Ok(parts) => parts,
        Err(e) => {
            state.rules.settle(settle, false, 0).await;
            return Err(
                IngestError::new(StatusCode::PAYLOAD_TOO_LARGE, e.to_string())
                    .at(format!("$.visitors[{}]", e.index)),
            );
        }
    };
    let max_events = state.max_batch_events.max(1);
    let payloads: Vec<Payload> = parts
        .iter()
        .flat_map(|b| {
            let n = b.visitors().len();
            (0..n.max(1))
                .step_by(max_events)
                .map(move |start| b.slice(start..(start + max_events).min(n)))
        })
        .map(|b| Payload::from_batch(route.clone(), &b))
        .collect();
    let bytes: usize = payloads.iter().map(Payload::stored_len).sum();
    // Spawned and awaited: a client that goes away (or a shutdown that stops waiting)
    // drops this future, but not the append, which the spool may commit anyway; the
    // settle after it must run too, or the claimed uuids would be released unrecorded and
    // the SDK's retry accepted again.
    let spool = state.spool.clone();
    let rules = state.rules.clone();
    let appended = tokio::spawn(async move {
        let appended = spool.append(payloads).await;
        rules.settle(settle, appended.is_ok(), bytes as u64).await;
        appended
    })
    .await
    .map_err(|e| spool_error(SpoolError::Storage(format!("append task failed: {e}"))))?;
    appended.map_err(spool_error)?;

    metrics::counter!("tributary_ingest_events_total").increment(events as u64);
    metrics::counter!("tributary_ingest_bytes_total").increment(bytes as u64);
    let pending = state.appended_bytes.fetch_add(bytes, Ordering::Relaxed) + bytes;
    if pending >= state.max_batch_bytes {
        state.forwarder_wake.notify_one();
    }
    Ok(StatusCode::NO_CONTENT)
}

/// What the spool will count for `batch` once split as below (split to fit `max_bytes`,
/// then at most `max_events` visitors a payload): the header once per payload, and the
/// visitors with the commas between them. The split is only measured here; a batch that
/// cannot be split is refused after the quota, so its estimate need not be exact.
fn stored_bytes(batch: &RawBatch, max_bytes: usize, max_events: usize) -> u64 {
    let max_events = max_events.max(1);
    let parts = batch
        .clone()
        .split_to_fit(max_bytes)
        .unwrap_or_else(|_| vec![batch.clone()]);
    let mut total = 0usize;
    for part in &parts {
        let visitors = part.visitors();
        if visitors.is_empty() {
            total += part.header().len();
            continue;
        }
        for chunk in visitors.chunks(max_events) {
            total += part.header().len()
                + chunk.iter().map(Bytes::len).sum::<usize>()
                + (chunk.len() - 1);
        }
    }
    total as u64
}

/// A 503 that asks the client to come back in a second.
fn busy(message: String) -> IngestError {
    IngestError {
        retry_after: Some(1),
        ..IngestError::new(StatusCode::SERVICE_UNAVAILABLE, message)
    }
}

/// Reads the body frame by frame, taking each frame's bytes from the shared budget before
/// keeping them, so that many slow or large uploads together cannot hold more than
/// `--max-buffered-bytes`. Returns the body and the budget it holds (given back on drop).
async fn read_body(
    state: &IngestState,
    mut body: Body,
) -> Result<(Bytes, Option<tokio::sync::OwnedSemaphorePermit>), IngestError> {
    use http_body_util::BodyExt;
    let limit = state.max_body_bytes;
    let mut buf: Vec<u8> = Vec::new();
    let mut held: Option<tokio::sync::OwnedSemaphorePermit> = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            IngestError::new(
                StatusCode::BAD_REQUEST,
                format!("the request body could not be read: {e}"),
            )
        })?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if buf.len() + data.len() > limit {
            return Err(IngestError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("body over {limit} bytes"),
            ));
        }
        // The budget counts what the buffer allocates, not what it holds: growing by
        // doubling can take twice the bytes read, and it is the allocation that costs RSS.
        let needed = buf.len() + data.len();
        if needed > buf.capacity() {
            let grown = needed.max(buf.capacity().saturating_mul(2)).min(limit);
            let more = grown - buf.capacity();
            let n = u32::try_from(more).unwrap_or(u32::MAX);
            let permit = state
                .body_budget
                .clone()
                .try_acquire_many_owned(n)
                .map_err(|_| {
                    busy(
                        "relay busy: the memory for request bodies is in use (--max-buffered-bytes)"
                            .into(),
                    )
                })?;
            match &mut held {
                Some(h) => h.merge(permit),
                None => held = Some(permit),
            }
            buf.reserve_exact(grown - buf.len());
        }
        buf.extend_from_slice(&data);
    }
    Ok((Bytes::from(buf), held))
}

fn rule_error(e: crate::rules::RuleError) -> IngestError {
    use crate::rules::RuleError;
    match e {
        RuleError::Visitor { index, message } => {
            IngestError::new(StatusCode::BAD_REQUEST, message).at(format!("$.visitors[{index}]"))
        }
        RuleError::InFlight(message) => busy(message),
        e @ RuleError::Quota { .. } => IngestError {
            retry_after: Some(crate::rules::QUOTA_RETRY_AFTER_SECS),
            ..IngestError::new(StatusCode::TOO_MANY_REQUESTS, e.to_string())
        },
        RuleError::Storage(e) => spool_error(e),
    }
}

fn spool_error(e: SpoolError) -> IngestError {
    if let SpoolError::TooLarge(m) = &e {
        // A visitor too large for the spool (an SQS message): resending cannot help.
        return IngestError::new(StatusCode::PAYLOAD_TOO_LARGE, m.clone());
    }
    let (retry_after, message) = match &e {
        SpoolError::Full { .. } => (5, e.to_string()),
        _ => {
            tracing::error!(error = %e, "spool append failed; answering 503");
            (1, "spool unavailable".to_owned())
        }
    };
    IngestError {
        retry_after: Some(retry_after),
        ..IngestError::new(StatusCode::SERVICE_UNAVAILABLE, message)
    }
}

fn check_content_type(headers: &HeaderMap) -> Result<(), IngestError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let essence = ct.split(';').next().unwrap_or("").trim();
    if essence.eq_ignore_ascii_case("application/json") {
        Ok(())
    } else {
        Err(IngestError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("Content-Type must be application/json, got {ct:?}"),
        ))
    }
}

/// Undoes `Content-Encoding: gzip`, refusing to inflate past `limit` bytes.
fn decode_body(headers: &HeaderMap, raw: Bytes, limit: usize) -> Result<Bytes, IngestError> {
    let encoding = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("identity")
        .trim();
    if encoding.eq_ignore_ascii_case("identity") || encoding.is_empty() {
        return Ok(raw);
    }
    if !encoding.eq_ignore_ascii_case("gzip") {
        return Err(IngestError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("Content-Encoding {encoding:?} not supported; use gzip or none"),
        ));
    }
    // Several gzip members one after another are one valid gzip stream (RFC 1952 §2.2);
    // anything after the last member that is not a member is refused, not dropped.
    let mut out = Vec::with_capacity(raw.len().saturating_mul(4).min(limit));
    let mut decoder = flate2::read::MultiGzDecoder::new(&raw[..]).take(limit as u64 + 1);
    decoder.read_to_end(&mut out).map_err(|e| {
        IngestError::new(
            StatusCode::BAD_REQUEST,
            format!("invalid gzip body (or bytes after the gzip stream): {e}"),
        )
    })?;
    if out.len() > limit {
        return Err(IngestError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("decompressed body over {limit} bytes"),
        ));
    }
    Ok(Bytes::from(out))
}

/// Reads the payload and checks the shape the relay relies on (see
/// [`tributary::validate::validate_payload_shape`]): a top-level object with a non-empty
/// string `account_id` and a non-empty `visitors` array whose items each have a non-empty
/// string `visitor_id` and a non-empty `snapshots` array. Everything else is the upstream's
/// to judge. The first problem is answered, with its JSON path.
pub fn parse_payload(body: Bytes) -> Result<RawBatch, IngestError> {
    let bad = |m: String| IngestError::new(StatusCode::BAD_REQUEST, m);
    // One pass over the body; a refused one is named exactly as the shape check names it.
    RawBatch::parse_shape(body).map_err(|e| match e {
        ShapeError::Shape(Some(p)) if p.path == "$" => bad(p.message),
        ShapeError::Shape(Some(p)) => bad(p.message).at(p.path),
        ShapeError::Shape(None) => bad("invalid payload".into()),
        ShapeError::Batch(RawBatchError::MissingVisitors) => bad("missing".into()).at("$.visitors"),
        ShapeError::Batch(RawBatchError::DuplicateField(f)) => {
            bad("duplicate field".into()).at(format!("$.{f}"))
        }
        ShapeError::Batch(RawBatchError::Json(e)) => bad(format!("invalid JSON: {e}")),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn parse(s: &str) -> Result<RawBatch, IngestError> {
        parse_payload(Bytes::from(s.to_owned()))
    }

    #[test]
    fn shape_errors_name_the_path() {
        let cases = [
            (r#"[1]"#, None),
            (
                r#"{"visitors":[{"visitor_id":"a","snapshots":[{}]}]}"#,
                Some("$.account_id"),
            ),
            (r#"{"account_id":"1"}"#, Some("$.visitors")),
            (r#"{"account_id":"1","visitors":[]}"#, Some("$.visitors")),
            (r#"{"account_id":1,"visitors":[]}"#, Some("$.account_id")),
            (
                r#"{"account_id":"1","visitors":[{"visitor_id":"a","snapshots":[{}]},{"snapshots":[{}]}]}"#,
                Some("$.visitors[1].visitor_id"),
            ),
            (
                r#"{"account_id":"1","visitors":[{"visitor_id":"a","snapshots":{}}]}"#,
                Some("$.visitors[0].snapshots"),
            ),
            (
                r#"{"account_id":"1","account_id":"2","visitors":[{"visitor_id":"a","snapshots":[{}]}]}"#,
                None,
            ),
        ];
        for (body, path) in cases {
            let err = parse(body).unwrap_err();
            assert_eq!(err.status, StatusCode::BAD_REQUEST, "{body}");
            assert_eq!(err.path.as_deref(), path, "{body}: {}", err.message);
        }
    }

    #[test]
    fn unknown_fields_and_numbers_survive() {
        let body = r#"{"account_id":"1","region":"EU","visitors":[{"visitor_id":"a","session_id":"s","snapshots":[{}],"n":4200,"f":3.5}]}"#;
        let batch = parse(body).unwrap();
        assert_eq!(
            &batch.visitors()[0][..],
            br#"{"visitor_id":"a","session_id":"s","snapshots":[{}],"n":4200,"f":3.5}"#
        );
        assert!(
            std::str::from_utf8(batch.header())
                .unwrap()
                .contains(r#""region":"EU""#)
        );
    }

    #[test]
    fn gzip_bomb_is_refused() {
        use std::io::Write;
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        enc.write_all(&vec![b' '; 1 << 20]).unwrap();
        let gz = enc.finish().unwrap();
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        let err = decode_body(&h, Bytes::from(gz), 4096).unwrap_err();
        assert_eq!(err.status, StatusCode::PAYLOAD_TOO_LARGE);
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(64))]

            /// The ingest parser never panics, whatever the bytes.
            #[test]
            fn ingest_parser_never_panics(body in proptest::collection::vec(any::<u8>(), 0..512)) {
                let _ = crate::ingest::parse_payload(Bytes::from(body));
            }

            /// Nor on JSON-looking input, where the interesting paths are.
            #[test]
            fn ingest_parser_never_panics_on_json_like_input(
                body in r#"[{}\[\]",:0-9a-z_ ]{0,200}"#,
                prefix in prop_oneof![
                    Just(""),
                    Just(r#"{"account_id":"1","visitors":"#),
                    Just(r#"{"account_id":"1","visitors":[{"visitor_id":"#),
                ],
            ) {
                let _ = crate::ingest::parse_payload(Bytes::from(format!("{prefix}{body}")));
            }
        }
    }

    /// A real SQLite spool whose append commits at once (as the writer thread does, even
    /// when nobody waits for it) but answers only when the test opens the gate.
    struct GatedSpool {
        inner: Arc<tributary_spool::SqliteSpool>,
        gate: Arc<tokio::sync::Semaphore>,
        committed: Arc<Notify>,
    }

    #[async_trait::async_trait]
    impl Spool for GatedSpool {
        async fn append(&self, payloads: Vec<Payload>) -> Result<(), SpoolError> {
            let inner = self.inner.clone();
            let committed = self.committed.clone();
            let write = tokio::spawn(async move {
                let r = inner.append(payloads).await;
                committed.notify_one();
                r
            });
            let _open = self.gate.acquire().await;
            write
                .await
                .map_err(|e| SpoolError::Storage(e.to_string()))?
        }
        async fn lease(
            &self,
            n: usize,
            b: usize,
            d: std::time::Duration,
        ) -> Result<Vec<tributary_spool::Leased>, SpoolError> {
            self.inner.lease(n, b, d).await
        }
        async fn ack(&self, r: &[tributary_spool::Receipt]) -> Result<(), SpoolError> {
            self.inner.ack(r).await
        }
        async fn release(
            &self,
            r: &[tributary_spool::Receipt],
            d: std::time::Duration,
        ) -> Result<(), SpoolError> {
            self.inner.release(r, d).await
        }
        async fn dead_letter(
            &self,
            r: &[tributary_spool::Receipt],
            reason: &str,
        ) -> Result<(), SpoolError> {
            self.inner.dead_letter(r, reason).await
        }
        async fn settle_parts(
            &self,
            p: Vec<tributary_spool::PartialSettlement>,
        ) -> Result<(), SpoolError> {
            self.inner.settle_parts(p).await
        }
        async fn stats(&self) -> Result<tributary_spool::SpoolStats, SpoolError> {
            self.inner.stats().await
        }
        async fn dead_letters(
            &self,
            limit: usize,
        ) -> Result<Vec<tributary_spool::DeadLetter>, SpoolError> {
            self.inner.dead_letters(limit).await
        }
        async fn retry_dead_letters(
            &self,
            w: tributary_spool::Selection,
        ) -> Result<u64, SpoolError> {
            self.inner.retry_dead_letters(w).await
        }
        async fn purge_dead_letters(
            &self,
            w: tributary_spool::Selection,
        ) -> Result<u64, SpoolError> {
            self.inner.purge_dead_letters(w).await
        }
    }

    #[tokio::test]
    async fn a_request_cut_off_during_the_append_still_records_its_uuids() {
        let dir = tempfile::tempdir().unwrap();
        let inner =
            Arc::new(tributary_spool::SqliteSpool::open(dir.path(), Default::default()).unwrap());
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let committed = Arc::new(Notify::new());
        let spool = GatedSpool {
            inner: inner.clone(),
            gate: gate.clone(),
            committed: committed.clone(),
        };
        let dedup = crate::dedup::Dedup::new(
            crate::dedup::DedupConfig {
                window: std::time::Duration::from_secs(600),
                cache_uuids: 100,
                max_uuids: 1000,
            },
            None,
        );
        let state = Arc::new(IngestState {
            spool: Arc::new(spool),
            max_body_bytes: 1 << 20,
            max_batch_bytes: 1 << 20,
            max_batch_events: 100,
            auth_tokens: crate::auth::BearerTokens::default(),
            forwarder_wake: Arc::new(Notify::new()),
            appended_bytes: Arc::new(AtomicUsize::new(0)),
            body_budget: Arc::new(tokio::sync::Semaphore::new(1 << 22)),
            requests: Arc::new(tokio::sync::Semaphore::new(8)),
            body_timeout: std::time::Duration::from_secs(10),
            requests_max: 8,
            rules: Arc::new(crate::rules::IngestRules::with_dedup(dedup)),
        });
        let body = r#"{"account_id":"1","anonymize_ip":true,"client_name":"python-sdk","client_version":"5.7.0","enrich_decisions":true,"project_id":"2","revision":"3","visitors":[{"attributes":[],"snapshots":[{"decisions":[],"events":[{"entity_id":"4","key":"k","timestamp":1,"uuid":"u-1"}]}],"visitor_id":"v"}]}"#;
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        let request = tokio::spawn({
            let state = state.clone();
            let headers = headers.clone();
            async move { post_us(State(state), headers, Body::from(body)).await }
        });
        // The write is committed; the client goes away before the answer.
        committed.notified().await;
        request.abort();
        assert!(request.await.unwrap_err().is_cancelled());
        gate.add_permits(1);
        // The SDK retries: its event was stored, so the retry is acknowledged and dropped
        // (waiting, if need be, for the cut-off request's settle).
        let status = post_us(State(state.clone()), headers, Body::from(body))
            .await
            .unwrap();
        assert_eq!(status, StatusCode::NO_CONTENT);
        assert_eq!(
            inner.stats().await.unwrap().pending,
            1,
            "the retry was stored again: the cut-off request's uuids were not recorded"
        );
    }

    #[test]
    fn the_quota_estimate_is_what_the_split_payloads_store() {
        let visitor = |i: usize| {
            format!(
                r#"{{"attributes":[],"snapshots":[{{"decisions":[],"events":[{{"entity_id":"4","key":"k","timestamp":1,"uuid":"u-{i}"}}]}}],"visitor_id":"v{i}"}}"#
            )
        };
        let visitors: Vec<String> = (0..25).map(visitor).collect();
        let body = format!(
            r#"{{"account_id":"1","anonymize_ip":true,"client_name":"python-sdk","client_version":"5.7.0","enrich_decisions":true,"project_id":"2","revision":"3","visitors":[{}]}}"#,
            visitors.join(",")
        );
        let batch = parse(&body).unwrap();
        for (max_bytes, max_events) in [(1 << 20, 100), (1 << 20, 4), (700, 100), (700, 2)] {
            let parts = batch.clone().split_to_fit(max_bytes).unwrap();
            let stored: usize = parts
                .iter()
                .flat_map(|b| {
                    let n = b.visitors().len();
                    (0..n.max(1))
                        .step_by(max_events)
                        .map(move |start| b.slice(start..(start + max_events).min(n)))
                })
                .map(|b| Payload::from_batch(Route::US, &b).stored_len())
                .sum();
            assert_eq!(
                stored_bytes(&batch, max_bytes, max_events),
                stored as u64,
                "{max_bytes} bytes, {max_events} events"
            );
        }
    }
}
