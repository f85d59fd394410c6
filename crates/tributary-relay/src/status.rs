//! The operator's status page: `GET /status` (one self-contained HTML page, no external
//! assets), `GET /status.json` (the same data), and `POST /status/dead-letters/retry` and
//! `POST /status/dead-letters/purge` for the dead letters.
//!
//! The page shows whether the relay is accepting, how the upstream has been answering (last
//! success, failures in a row, last error), the backlog (events, bytes, oldest pending age),
//! the ingest and delivery rates, a chart of backlog and rates over the last hour, and the
//! dead letters with their reasons. The history behind the chart is kept in memory only:
//! one sample every [`HISTORY_INTERVAL`], at most [`HISTORY_SAMPLES`] of them (one hour).
//!
//! The POSTs are protected like ingest: with `--auth-tokens` set they need
//! `Authorization: Bearer TOKEN`. They take only `application/json` bodies, so a form on
//! another site cannot post them from an operator's browser. A GET changes nothing: on an
//! SQS spool the dead letters are only counted (listing them would mean receiving from the
//! dead-letter queue, which hides the messages and counts a receive against each; use
//! `tributary spool dead-letters list`), and the backlog's events, bytes and age show as
//! unknown, since SQS does not count them.
//!
//! The GETs are unauthenticated, so what one costs is bounded: the report lists at most
//! [`DEAD_LETTERS_SHOWN`] dead letters as summaries (no bodies; reasons cut to
//! [`DeadLetterSummary::MAX_REASON_CHARS`]), one report is built at a time, and a report
//! is reused for [`REPORT_CACHE`].
//!
//! ```text
//! curl -s -X POST -H 'authorization: Bearer TOKEN' -H 'content-type: application/json' \
//!      -d '{"ids":["42"]}' http://127.0.0.1:8080/status/dead-letters/retry
//! {"retried":1}
//! ```

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::auth::{AuthError, BearerTokens};
use axum::Json;
use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use tokio::sync::{Semaphore, watch};
use tributary_spool::forward::{Forwarder, RouteHealth};
use tributary_spool::{DeadLetterSummary, Selection, Spool, SpoolStats};

/// Time between two samples of the history behind the chart.
pub const HISTORY_INTERVAL: Duration = Duration::from_secs(10);
/// Samples kept: one hour at [`HISTORY_INTERVAL`]. The oldest is dropped first.
pub const HISTORY_SAMPLES: usize = 360;
/// Dead letters listed on the page (oldest first); the count shows how many there are.
pub const DEAD_LETTERS_SHOWN: usize = 100;
/// Largest body the dead-letter POSTs read (a list of ids).
pub const MAX_ACTION_BODY_BYTES: usize = 64 * 1024;
/// How long one report answers the GETs: a burst of polls costs one spool read.
pub const REPORT_CACHE: Duration = Duration::from_secs(1);

const PAGE: &str = include_str!("status.html");

/// What the status routes read: the spool, the forwarder's view of the upstream, and the
/// history.
pub struct StatusState {
    spool: Arc<dyn Spool>,
    forwarder: Arc<Forwarder>,
    forwarding: bool,
    backlog_counted: bool,
    /// `--auth-tokens`, checked as ingest checks them.
    auth_tokens: BearerTokens,
    history: Mutex<VecDeque<Sample>>,
    /// One report built at a time; the last one, reused for [`REPORT_CACHE`].
    building: Semaphore,
    cached: Mutex<Option<(Instant, StatusReport)>>,
}

/// One point of the history.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Sample {
    /// When, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// Events (visitors) pending.
    pub pending_events: u64,
    /// Bytes pending.
    pub pending_bytes: u64,
    /// Dead letters held.
    pub dead_letters: u64,
    /// Events accepted so far (the spool's durable totals; `None` on a spool without them).
    #[serde(skip)]
    accepted_events: Option<u64>,
    /// Events delivered so far, as `accepted_events`.
    #[serde(skip)]
    delivered_events: Option<u64>,
    /// Events accepted per second since the previous sample.
    pub ingest_per_sec: Option<f64>,
    /// Events delivered per second since the previous sample.
    pub delivered_per_sec: Option<f64>,
}

/// `GET /status.json`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StatusReport {
    /// When this report was made, in milliseconds since the Unix epoch.
    pub now_ms: u64,
    /// Whether the spool takes appends now.
    pub accepting: bool,
    /// Why not, when it does not.
    pub not_accepting_reason: Option<String>,
    /// Whether this relay forwards (false for `serve --no-forward`).
    pub forwarding: bool,
    /// How each region's upstream has been answering (`us`, `eu`).
    pub upstream: RouteHealth,
    /// What the spool holds.
    pub spool: SpoolStats,
    /// Whether the spool counts its backlog's events, bytes and age (false on SQS, whose
    /// `pending_events`, `pending_bytes` and `oldest_age_ms` are then 0 and mean unknown).
    pub backlog_counted: bool,
    /// The latest rates (from the last two samples), events per second.
    pub ingest_per_sec: Option<f64>,
    /// As `ingest_per_sec`, for deliveries.
    pub delivered_per_sec: Option<f64>,
    /// Oldest first, at most [`HISTORY_SAMPLES`].
    pub history: Vec<Sample>,
    /// The oldest [`DEAD_LETTERS_SHOWN`] dead letters (without their bodies); `None` when
    /// the spool cannot list them without changing them (SQS: `spool.dead_letters` has the
    /// count) or listing failed.
    pub dead_letters: Option<Vec<DeadLetterView>>,
    /// Why the dead letters could not be listed, when they could not (the rest of the
    /// report stands).
    pub dead_letters_error: Option<String>,
}

/// A dead letter as the page lists it: no body, so no visitor data.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeadLetterView {
    /// Id for retry or purge.
    pub id: String,
    /// Why it was set aside, at most [`DeadLetterSummary::MAX_REASON_CHARS`] characters.
    pub reason: String,
    /// Visitors in it.
    pub events: u32,
    /// Its stored size.
    pub bytes: usize,
    /// Its route (`us`, `eu`).
    pub route: String,
    /// When it was appended, in milliseconds since the Unix epoch.
    pub appended_at_ms: u64,
    /// When it was set aside, in milliseconds since the Unix epoch.
    pub dead_at_ms: u64,
}

/// Body of the dead-letter POSTs: `{"ids": [...]}` or `{"all": true}`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeadLetterAction {
    /// The dead letters to act on.
    #[serde(default)]
    pub ids: Vec<String>,
    /// All of them (then `ids` must be empty).
    #[serde(default)]
    pub all: bool,
}

impl StatusState {
    /// State for the status routes of a relay. `backlog_counted` is false for a spool whose
    /// stats do not count pending events, bytes and age (SQS).
    pub fn new(
        spool: Arc<dyn Spool>,
        forwarder: Arc<Forwarder>,
        forwarding: bool,
        backlog_counted: bool,
        auth_tokens: Vec<String>,
    ) -> Arc<StatusState> {
        Arc::new(StatusState {
            spool,
            forwarder,
            forwarding,
            backlog_counted,
            auth_tokens: BearerTokens::new(&auth_tokens),
            history: Mutex::new(VecDeque::with_capacity(HISTORY_SAMPLES)),
            building: Semaphore::new(1),
            cached: Mutex::new(None),
        })
    }

    fn history(&self) -> std::sync::MutexGuard<'_, VecDeque<Sample>> {
        self.history
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes one sample now (the history drops its oldest past [`HISTORY_SAMPLES`]).
    pub async fn sample(&self) {
        let stats = match self.spool.stats().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "status: spool stats unavailable");
                return;
            }
        };
        let totals = self.spool.totals().await.ok().flatten();
        let at_ms = now_ms();
        let mut history = self.history();
        let previous = history.back().copied();
        let accepted_events = totals.as_ref().map(|t| t.events.accepted);
        let delivered_events = totals.as_ref().map(|t| t.events.delivered);
        let rate = |now: Option<u64>, before: Option<u64>, before_ms: u64| {
            let (now, before) = (now?, before?);
            let secs = at_ms.saturating_sub(before_ms) as f64 / 1000.0;
            (secs > 0.0).then(|| now.saturating_sub(before) as f64 / secs)
        };
        let (ingest_per_sec, delivered_per_sec) = match previous {
            Some(p) => (
                rate(accepted_events, p.accepted_events, p.at_ms),
                rate(delivered_events, p.delivered_events, p.at_ms),
            ),
            None => (None, None),
        };
        if history.len() == HISTORY_SAMPLES {
            history.pop_front();
        }
        history.push_back(Sample {
            at_ms,
            pending_events: stats.pending_events,
            pending_bytes: stats.pending_bytes,
            dead_letters: stats.dead_letters,
            accepted_events,
            delivered_events,
            ingest_per_sec,
            delivered_per_sec,
        });
    }

    /// The report `GET /status.json` answers: one built within [`REPORT_CACHE`] if there is
    /// one, else a new one (one at a time). Only the spool's stats are needed; the dead
    /// letters are best-effort.
    pub async fn report(&self) -> Result<StatusReport, tributary_spool::SpoolError> {
        let fresh = |cached: &Mutex<Option<(Instant, StatusReport)>>| {
            lock(cached)
                .as_ref()
                .filter(|(at, _)| at.elapsed() < REPORT_CACHE)
                .map(|(_, r)| r.clone())
        };
        if let Some(r) = fresh(&self.cached) {
            return Ok(r);
        }
        let _permit = self
            .building
            .acquire()
            .await
            .map_err(|_| tributary_spool::SpoolError::Closed)?;
        // Someone else may have built one while this request waited.
        if let Some(r) = fresh(&self.cached) {
            return Ok(r);
        }
        let report = self.build_report().await?;
        *lock(&self.cached) = Some((Instant::now(), report.clone()));
        Ok(report)
    }

    /// Drops the cached report, so the next GET reads the spool (after a retry or purge).
    fn invalidate(&self) {
        *lock(&self.cached) = None;
    }

    async fn build_report(&self) -> Result<StatusReport, tributary_spool::SpoolError> {
        let spool = self.spool.stats().await?;
        let (accepting, not_accepting_reason) = match self.spool.check_ready().await {
            Ok(()) => (true, None),
            Err(e) => (false, Some(e.to_string())),
        };
        let (dead_letters, dead_letters_error) =
            match self.spool.dead_letter_summaries(DEAD_LETTERS_SHOWN).await {
                Ok(list) => (
                    list.map(|l| l.into_iter().map(DeadLetterView::from).collect()),
                    None,
                ),
                Err(e) => {
                    tracing::warn!(error = %e, "status: dead letters could not be listed");
                    (None, Some(e.to_string()))
                }
            };
        let history: Vec<Sample> = self.history().iter().copied().collect();
        let last = history.last();
        Ok(StatusReport {
            now_ms: now_ms(),
            accepting,
            not_accepting_reason,
            forwarding: self.forwarding,
            upstream: self.forwarder.upstream_health(),
            spool,
            backlog_counted: self.backlog_counted,
            ingest_per_sec: last.and_then(|s| s.ingest_per_sec),
            delivered_per_sec: last.and_then(|s| s.delivered_per_sec),
            history,
            dead_letters,
            dead_letters_error,
        })
    }

    fn authorize(&self, headers: &HeaderMap) -> Result<(), StatusError> {
        self.auth_tokens
            .check(headers)
            .map(|_| ())
            .map_err(StatusError::Unauthorized)
    }
}

impl From<DeadLetterSummary> for DeadLetterView {
    fn from(d: DeadLetterSummary) -> DeadLetterView {
        DeadLetterView {
            id: d.id,
            reason: d.reason,
            events: d.visitor_count,
            bytes: d.stored_len,
            route: d.route.as_str().to_owned(),
            appended_at_ms: d.appended_at_ms,
            dead_at_ms: d.dead_at_ms,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Samples the history every [`HISTORY_INTERVAL`] until `stop`.
pub async fn keep_history(state: Arc<StatusState>, mut stop: watch::Receiver<bool>) {
    loop {
        state.sample().await;
        tokio::select! {
            _ = tokio::time::sleep(HISTORY_INTERVAL) => {}
            _ = stop.changed() => return,
        }
    }
}

/// The status routes, ready to merge into the relay's router.
pub fn router(state: Arc<StatusState>) -> Router {
    Router::new()
        .route("/status", get(page))
        .route("/status.json", get(json))
        .route("/status/dead-letters/retry", post(retry))
        .route("/status/dead-letters/purge", post(purge))
        .layer(DefaultBodyLimit::max(MAX_ACTION_BODY_BYTES))
        .with_state(state)
}

/// Why a status request failed.
#[derive(Debug, thiserror::Error)]
enum StatusError {
    #[error("{0}")]
    Unauthorized(AuthError),
    #[error("{0}")]
    BadRequest(String),
    #[error("spool: {0}")]
    Spool(#[from] tributary_spool::SpoolError),
    #[error("cannot render the page: {0}")]
    Render(String),
}

impl IntoResponse for StatusError {
    fn into_response(self) -> Response {
        let status = match &self {
            StatusError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            StatusError::BadRequest(_) => StatusCode::BAD_REQUEST,
            StatusError::Spool(tributary_spool::SpoolError::Unknown(_)) => StatusCode::NOT_FOUND,
            StatusError::Spool(_) => StatusCode::SERVICE_UNAVAILABLE,
            StatusError::Render(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let mut response = (
            status,
            Json(serde_json::json!({ "error": self.to_string() })),
        )
            .into_response();
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

async fn page(State(state): State<Arc<StatusState>>) -> Result<Response, StatusError> {
    let report = state.report().await?;
    // The first render needs no request of its own; `<` escaped so the JSON cannot end the
    // script element.
    let initial = serde_json::to_string(&report)
        .map_err(|e| StatusError::Render(e.to_string()))?
        .replace('<', "\\u003c");
    let html = PAGE.replacen("__INITIAL_STATUS__", &initial, 1);
    Ok((
        [
            (header::CACHE_CONTROL, "no-store"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                 connect-src 'self'; img-src data:; form-action 'none'; frame-ancestors 'none'",
            ),
        ],
        Html(html),
    )
        .into_response())
}

async fn json(State(state): State<Arc<StatusState>>) -> Result<Response, StatusError> {
    let report = state.report().await?;
    Ok(([(header::CACHE_CONTROL, "no-store")], Json(report)).into_response())
}

fn selection(action: DeadLetterAction) -> Result<Selection, StatusError> {
    match (action.all, action.ids.is_empty()) {
        (true, true) => Ok(Selection::All),
        (false, false) => Ok(Selection::Ids(action.ids)),
        (true, false) => Err(StatusError::BadRequest(
            "give either \"ids\" or \"all\": true, not both".to_owned(),
        )),
        (false, true) => Err(StatusError::BadRequest(
            "no dead letters selected: give \"ids\": [...] or \"all\": true".to_owned(),
        )),
    }
}

type ActionBody = Result<Json<DeadLetterAction>, axum::extract::rejection::JsonRejection>;

/// What a dead-letter action may touch: the token first, then the body, as ingest checks.
fn authorized_selection(
    state: &StatusState,
    headers: &HeaderMap,
    body: ActionBody,
) -> Result<Selection, StatusError> {
    state.authorize(headers)?;
    let Json(action) = body.map_err(|e| StatusError::BadRequest(e.body_text()))?;
    selection(action)
}

async fn retry(
    State(state): State<Arc<StatusState>>,
    headers: HeaderMap,
    body: ActionBody,
) -> Result<Json<serde_json::Value>, StatusError> {
    let which = authorized_selection(&state, &headers, body)?;
    let n = state.spool.retry_dead_letters(which).await?;
    state.invalidate();
    tracing::info!(
        dead_letters = n,
        "dead letters queued again from the status page"
    );
    Ok(Json(serde_json::json!({ "retried": n })))
}

async fn purge(
    State(state): State<Arc<StatusState>>,
    headers: HeaderMap,
    body: ActionBody,
) -> Result<Json<serde_json::Value>, StatusError> {
    let which = authorized_selection(&state, &headers, body)?;
    let n = state.spool.purge_dead_letters(which).await?;
    state.invalidate();
    tracing::warn!(dead_letters = n, "dead letters purged from the status page");
    Ok(Json(serde_json::json!({ "purged": n })))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
