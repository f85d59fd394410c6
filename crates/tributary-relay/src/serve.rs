//! `tributary serve`: ingest, spool and forward in one process.
//!
//! [`main`] binds the listener and calls [`run`], which opens the spool, starts the
//! forwarder and serves. SIGTERM or SIGINT begins shutdown: stop
//! accepting, let in-flight requests finish (each either committed and answered 2xx, or not
//! answered), forward for up to `shutdown_grace`, exit 0. Whatever is left stays spooled.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use tokio::sync::{Notify, watch};
use tributary::dispatcher::transport::redact_url;
use tributary_spool::Spool;

use crate::config::{RelayConfig, RelaySettings};
use crate::ingest::{self, IngestState};
use crate::spool_addr;

/// `tributary serve` flags.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// TOML file with any of the settings (kebab-case keys as the flags); flags and
    /// environment variables win over it.
    #[arg(long, env = "TRIBUTARY_CONFIG", value_name = "FILE")]
    pub config: Option<std::path::PathBuf>,

    /// Accept and spool only; do not forward (an ingest node in front of a shared spool).
    #[arg(long, env = "TRIBUTARY_NO_FORWARD")]
    pub no_forward: bool,

    /// Print the settings the relay would run with, as a TOML config file (tokens not
    /// shown, passwords in URLs as ***), and exit without starting.
    #[arg(long)]
    pub print_config: bool,

    // Flattened: clap shows the inner flags' own help.
    #[allow(missing_docs)]
    #[command(flatten)]
    pub settings: RelaySettings,
}

impl ServeArgs {
    /// Flags over file over defaults.
    pub fn resolve(self) -> anyhow::Result<(RelayConfig, bool)> {
        let file = match &self.config {
            Some(path) => RelaySettings::from_file(path)?,
            None => RelaySettings::default(),
        };
        Ok((self.settings.resolve(file)?, self.no_forward))
    }
}

/// `tributary serve`: binds `--listen` and runs the relay until SIGTERM or SIGINT.
pub fn main(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let print_config = args.print_config;
    let (config, no_forward) = args.resolve()?;
    if print_config {
        print!("{}", config.to_toml()?);
        return Ok(ExitCode::SUCCESS);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("tributary-relay")
        .build()?;
    runtime.block_on(async {
        // The spool first: a bad path or a damaged file fails before the port is bound, and
        // no health check passes while the spool is still being checked.
        let listen = config.listen;
        let relay = Relay::open(config, !no_forward).await?;
        let listener = match tokio::net::TcpListener::bind(listen).await {
            Ok(l) => l,
            Err(e) => {
                relay.close().await;
                return Err(anyhow::anyhow!("cannot listen on {listen}: {e}"));
            }
        };
        relay
            .serve(listener, crate::signal::shutdown_signal())
            .await
    })?;
    Ok(ExitCode::SUCCESS)
}

struct OpsState {
    spool: Arc<dyn Spool>,
    ready: AtomicBool,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
}

/// [`Relay::open`] then [`Relay::serve`]: serves on `listener` until `shutdown` resolves.
/// `config.listen` is not used: the caller binds (port 0 in tests).
///
/// Errors: the spool cannot be opened, or the upstream client cannot be built.
pub async fn run(
    listener: tokio::net::TcpListener,
    config: RelayConfig,
    forward: bool,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    Relay::open(config, forward)
        .await?
        .serve(listener, shutdown)
        .await
}

/// A relay whose spool is open and whose forwarder is built, not yet serving.
pub struct Relay {
    config: RelayConfig,
    forward: bool,
    spool: Arc<dyn Spool>,
    forwarder: Arc<tributary_spool::forward::Forwarder>,
    wake: Arc<Notify>,
    appended: Arc<AtomicUsize>,
    rules: Arc<crate::rules::IngestRules>,
}

impl Relay {
    /// Opens (or creates) the spool, checking it, and builds the forwarder (which runs
    /// only when `forward` is set).
    pub async fn open(config: RelayConfig, forward: bool) -> anyhow::Result<Relay> {
        let spool = spool_addr::open(&config.spool, &config, spool_addr::OpenMode::Create).await?;
        let rules = match crate::rules::IngestRules::from_config(&config) {
            Ok(r) => Arc::new(r),
            Err(e) => {
                close_spool(&*spool).await;
                return Err(e.into());
            }
        };
        let wake = Arc::new(Notify::new());
        let appended = Arc::new(AtomicUsize::new(0));
        let forwarder = match crate::forwarding::forwarder(
            &config,
            spool.clone(),
            wake.clone(),
            appended.clone(),
            crate::forwarding::Beside::Ingest,
        ) {
            Ok(f) => Arc::new(f),
            Err(e) => {
                close_spool(&*spool).await;
                return Err(e);
            }
        };
        Ok(Relay {
            config,
            forward,
            spool,
            forwarder,
            wake,
            appended,
            rules,
        })
    }

    /// Closes the spool of a relay that will not serve.
    pub async fn close(self) {
        close_spool(&*self.spool).await;
    }

    /// Serves ingest (`POST /v1/events`, `/eu/v1/events`), `/healthz`, `/readyz`,
    /// `/metrics` and the status page ([`crate::status`]) on `listener`, with the forwarder beside it, until `shutdown` resolves;
    /// then stops accepting, lets in-flight requests finish and forwards for up to
    /// `shutdown_grace`, closes the spool and returns.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let Relay {
            config,
            forward,
            spool,
            forwarder,
            wake,
            appended,
            rules,
        } = self;
        let no_forward = !forward;
        let metrics = crate::telemetry::install_metrics();
        crate::telemetry::record_limits(&config);

        let ingest_state = Arc::new(IngestState {
            spool: spool.clone(),
            max_body_bytes: config.max_body_bytes,
            max_batch_bytes: config.max_batch_bytes,
            max_batch_events: config.max_batch_events,
            auth_tokens: crate::auth::BearerTokens::new(&config.auth_tokens),
            forwarder_wake: wake.clone(),
            appended_bytes: appended.clone(),
            body_budget: Arc::new(tokio::sync::Semaphore::new(config.max_buffered_bytes)),
            requests: Arc::new(tokio::sync::Semaphore::new(config.max_concurrent_requests)),
            body_timeout: config.body_timeout,
            requests_max: config.max_concurrent_requests,
            rules,
        });
        let ops = Arc::new(OpsState {
            spool: spool.clone(),
            ready: AtomicBool::new(true),
            metrics,
        });

        let app = Router::new()
            .route("/v1/events", post(ingest::post_us))
            .route("/eu/v1/events", post(ingest::post_eu))
            .with_state(ingest_state)
            .merge(
                Router::new()
                    .route("/healthz", get(healthz))
                    .route("/readyz", get(readyz))
                    .route("/metrics", get(metrics_page))
                    .with_state(ops.clone()),
            );
        let status = crate::status::StatusState::new(
            spool.clone(),
            forwarder.clone(),
            forward,
            !config.spool.starts_with("sqs://"),
            config.auth_tokens.clone(),
        );
        let app = app.merge(crate::status::router(status.clone()));

        let local = match listener.local_addr() {
            Ok(a) => a,
            Err(e) => {
                close_spool(&*spool).await;
                return Err(e.into());
            }
        };
        tracing::info!(
            listen = %local,
            spool = %config.spool,
            upstream = %redact_url(&config.upstream),
            eu_upstream = %redact_url(&config.eu_upstream),
            forwarding = !no_forward,
            "tributary relay ready"
        );

        let (stop_tx, stop_rx) = watch::channel(false);
        let forward_task = if no_forward {
            None
        } else {
            let f = forwarder.clone();
            Some(tokio::spawn(async move { f.run(stop_rx).await }))
        };
        let maintenance = tokio::spawn(maintain(spool.clone(), stop_tx.subscribe()));
        let gauges = tokio::spawn(crate::telemetry::spool_gauges(
            spool.clone(),
            stop_tx.subscribe(),
        ));
        let history = tokio::spawn(crate::status::keep_history(status, stop_tx.subscribe()));

        // `--shutdown-grace` is a hard deadline from the signal, whatever clients do: requests
        // still unfinished when it passes (a slow upload, a client that never ends its body) are
        // dropped unanswered, and the forwarder gets what is left of it.
        let ops_for_signal = ops.clone();
        let signalled = Arc::new(std::sync::OnceLock::<Instant>::new());
        let signalled_at = signalled.clone();
        let wake_deadline = Arc::new(Notify::new());
        let wake = wake_deadline.clone();
        let ceiling = crate::http_server::connection_ceiling();
        let max_connections = match config.max_connections {
            Some(n) if n > ceiling => {
                tracing::warn!(
                    requested = n,
                    allowed = ceiling,
                    "--max-connections is above what the open-file limit leaves; using the lower figure"
                );
                ceiling
            }
            Some(n) => n,
            None => ceiling.min(crate::config::DEFAULT_MAX_CONNECTIONS),
        };
        let limits = crate::http_server::ServerLimits {
            max_connections,
            header_timeout: config.header_timeout,
            max_header_bytes: config.max_header_bytes,
            h2_max_streams: config.h2_max_streams,
        };
        tracing::debug!(?limits, "server limits");
        let server = crate::http_server::serve(listener, app, limits, async move {
            shutdown.await;
            ops_for_signal.ready.store(false, Ordering::Relaxed);
            tracing::info!("shutting down: no new requests; finishing in-flight ones");
            let _ = signalled_at.set(Instant::now());
            wake.notify_one();
        });
        let grace = config.shutdown_grace;
        tokio::select! {
            () = server => {}
            () = async {
                wake_deadline.notified().await;
                if let Some(at) = signalled.get() {
                    tokio::time::sleep_until((*at + grace).into()).await;
                }
            } => {
                tracing::warn!("shutdown grace over with requests still unfinished; dropping them unanswered");
            }
        }
        let deadline = signalled.get().map_or_else(Instant::now, |at| *at) + grace;

        let _ = stop_tx.send(true);
        if let Some(task) = forward_task {
            let _ = task.await;
        }
        let _ = maintenance.await;
        let _ = gauges.await;
        let _ = history.await;
        if !no_forward {
            let bound = deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(2);
            match tokio::time::timeout(bound, forwarder.drain(deadline)).await {
                Ok(Ok(s)) => tracing::info!(
                    events = s.events_delivered,
                    payloads = s.payloads_delivered,
                    "forwarded during shutdown"
                ),
                Ok(Err(e)) => tracing::error!(error = %e, "spool error during shutdown drain"),
                Err(_) => tracing::warn!("shutdown grace over; the rest stays spooled"),
            }
        }
        match spool.stats().await {
            Ok(s) => tracing::info!(
                pending = s.pending,
                "relay stopped; payloads left in the spool"
            ),
            Err(e) => tracing::warn!(error = %e, "relay stopped; spool stats unavailable"),
        }
        close_spool(&*spool).await;
        Ok(())
    }
}

/// Closes `spool`; a failure is logged, not returned: the relay is stopping either way, and
/// the spool recovers on its next open.
async fn close_spool(spool: &dyn Spool) {
    if let Err(e) = spool.close().await {
        tracing::warn!(error = %e, "could not close the spool cleanly; it recovers on the next start");
    }
}

/// Retention upkeep once a minute.
async fn maintain(spool: Arc<dyn Spool>, mut stop: watch::Receiver<bool>) {
    loop {
        match spool.maintain().await {
            Ok(0) => {}
            Ok(n) => tracing::warn!(
                payloads = n,
                "payloads past retention moved to dead letters"
            ),
            Err(e) => tracing::error!(error = %e, "spool maintenance failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(60)) => {}
            _ = stop.changed() => return,
        }
    }
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(ops): State<Arc<OpsState>>) -> impl IntoResponse {
    if !ops.ready.load(Ordering::Relaxed) {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down".to_owned());
    }
    match ops.spool.check_ready().await {
        Ok(()) => (StatusCode::OK, "ready".to_owned()),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not accepting: spool: {e}"),
        ),
    }
}

async fn metrics_page(State(ops): State<Arc<OpsState>>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        ops.metrics.render(),
    )
}
