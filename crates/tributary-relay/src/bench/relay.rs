//! `tributary bench relay`: a load generator that posts realistic Event API payloads to a
//! relay and reports throughput and latency; and `tributary bench sink`: a bare axum server
//! answering 204, the peer the relay is measured against and a local upstream for
//! forwarding benchmarks.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;

use crate::config::HumanDuration;

/// `tributary bench relay` flags.
#[derive(Debug, clap::Args)]
pub struct RelayLoadArgs {
    /// Relay ingest URL.
    #[arg(long, default_value = "http://127.0.0.1:8080/v1/events")]
    pub url: String,
    /// Events (visitors) per payload.
    #[arg(long, default_value_t = 1)]
    pub events_per_payload: usize,
    /// Concurrent connections.
    #[arg(long, default_value_t = 32)]
    pub connections: usize,
    /// How long to send.
    #[arg(long, default_value = "10s")]
    pub duration: HumanDuration,
    /// Requests per second in total; 0 sends as fast as the relay answers. With a rate,
    /// latency is measured from when each request was due, so a stalled server is not hidden.
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Give every request events with uuids no earlier request had (built as it is sent),
    /// instead of cycling through 256 prepared bodies: what a duplicate filter sees from
    /// real traffic.
    #[arg(long)]
    pub fresh_uuids: bool,
    /// Also report p50/p99/max and errors for each window this long (by when each request
    /// was due or sent), so a slow stretch shows where it happened; 0: the whole run only.
    #[arg(long, default_value = "0s")]
    pub window: HumanDuration,
}

/// `tributary bench sink` flags.
#[derive(Debug, clap::Args)]
pub struct SinkArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9090")]
    pub listen: SocketAddr,
    /// Exit once this many events (visitors) were received, printing the rate.
    #[arg(long)]
    pub expect_events: Option<u64>,
    /// Refuse with 400, as the Event API does, every request holding an event whose number
    /// (the last 12 hex digits of the uuids `bench relay` sends) is a multiple of N: one
    /// event in N is bad. 0: refuse nothing.
    #[arg(long, default_value_t = 0)]
    pub refuse_one_in: u64,
    /// Wait this long before answering each request, like an upstream that far away (each
    /// request waits on its own; requests do not queue behind each other).
    #[arg(long, default_value = "0s")]
    pub latency: HumanDuration,
    /// Take the sink away on a schedule: every this long (counted from the start), stop
    /// listening for `--outage-for`, so connections are refused, then listen on the same
    /// address again. Needs `--outage-for`.
    #[arg(long, requires = "outage_for")]
    pub outage_every: Option<HumanDuration>,
    /// How long each outage lasts; shorter than `--outage-every`.
    #[arg(long, requires = "outage_every")]
    pub outage_for: Option<HumanDuration>,
}

/// When the sink is gone: `gone_for` at the end of every `every`, the first outage
/// starting `every - gone_for` after start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OutageSchedule {
    every: Duration,
    gone_for: Duration,
}

impl OutageSchedule {
    /// The schedule the flags ask for, or an error naming the flag that is wrong.
    pub(crate) fn from_args(args: &SinkArgs) -> anyhow::Result<Option<OutageSchedule>> {
        let (every, gone_for) = match (args.outage_every, args.outage_for) {
            (None, None) => return Ok(None),
            (Some(e), Some(f)) => (e.0, f.0),
            (Some(_), None) => anyhow::bail!("--outage-every needs --outage-for"),
            (None, Some(_)) => anyhow::bail!("--outage-for needs --outage-every"),
        };
        anyhow::ensure!(!every.is_zero(), "--outage-every must be more than 0");
        anyhow::ensure!(!gone_for.is_zero(), "--outage-for must be more than 0");
        anyhow::ensure!(
            gone_for < every,
            "--outage-for ({}) must be shorter than --outage-every ({})",
            humantime::format_duration(gone_for),
            humantime::format_duration(every)
        );
        Ok(Some(OutageSchedule { every, gone_for }))
    }

    /// How long the sink is up before each outage.
    fn up_for(&self) -> Duration {
        self.every - self.gone_for
    }
}

/// A realistic payload: the shape the Python SDK sends for a conversion, `n` visitors.
pub fn sample_payload(n: usize, seq: u64) -> Vec<u8> {
    let visitors: Vec<serde_json::Value> = (0..n)
        .map(|i| {
            serde_json::json!({
                "snapshots": [{"events": [{
                    "entity_id": "21549340108",
                    "uuid": format!("00000000-0000-4000-8000-{:012x}", seq * n as u64 + i as u64),
                    "key": "purchase",
                    "timestamp": 1_795_443_245_068u64,
                    "revenue": 4200,
                    "value": 3.5,
                    "tags": {"revenue": 4200, "value": 3.5, "category": "shoes"}
                }]}],
                "attributes": [
                    {"entity_id": "21554750045", "key": "country", "type": "custom", "value": "DE"},
                    {"entity_id": "21556420039", "key": "plan", "type": "custom", "value": "free"},
                    {"entity_id": "21563280023", "key": "age", "type": "custom", "value": 34},
                    {"entity_id": "$opt_bot_filtering", "key": "$opt_bot_filtering", "type": "custom", "value": true}
                ],
                "visitor_id": format!("user-{}", seq * n as u64 + i as u64)
            })
        })
        .collect();
    let body = serde_json::json!({
        "account_id": "12133785640", "project_id": "21537940595", "revision": "131",
        "client_name": "python-sdk", "client_version": "5.7.0",
        "anonymize_ip": true, "enrich_decisions": true, "visitors": visitors
    });
    serde_json::to_vec(&body).unwrap_or_default()
}

/// Runs the load generator.
pub fn run_load(args: RelayLoadArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(args.connections > 0, "--connections must be at least 1");
    anyhow::ensure!(
        args.events_per_payload > 0,
        "--events-per-payload must be at least 1"
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = runtime.block_on(load(&args))?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "{:>10} {:>10} {:>12} {:>12} {:>9} {:>9} {:>9} {:>9}",
            "requests", "errors", "req/s", "events/s", "p50 ms", "p90 ms", "p99 ms", "max ms"
        );
        println!(
            "{:>10} {:>10} {:>12.0} {:>12.0} {:>9.3} {:>9.3} {:>9.3} {:>9.3}",
            report.requests,
            report.errors,
            report.requests_per_sec,
            report.events_per_sec,
            report.p50_ms,
            report.p90_ms,
            report.p99_ms,
            report.max_ms
        );
        if !report.windows.is_empty() {
            println!(
                "{:>8} {:>10} {:>10} {:>9} {:>9} {:>9}",
                "at s", "requests", "errors", "p50 ms", "p99 ms", "max ms"
            );
            for w in &report.windows {
                println!(
                    "{:>8.1} {:>10} {:>10} {:>9.3} {:>9.3} {:>9.3}",
                    w.at_s, w.requests, w.errors, w.p50_ms, w.p99_ms, w.max_ms
                );
            }
        }
    }
    Ok(if report.errors == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// What a load run measured.
#[derive(Debug, serde::Serialize)]
pub struct LoadReport {
    /// Requests answered 2xx.
    pub requests: u64,
    /// Requests that failed or were answered otherwise.
    pub errors: u64,
    /// 2xx requests per second.
    pub requests_per_sec: f64,
    /// Events per second in 2xx requests.
    pub events_per_sec: f64,
    /// Latency percentiles in milliseconds.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Slowest.
    pub max_ms: f64,
    /// Per `--window`, in order (absent without `--window`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub windows: Vec<WindowReport>,
}

/// One `--window` of a load run.
#[derive(Debug, serde::Serialize)]
pub struct WindowReport {
    /// Start of the window, seconds from the start of the run.
    pub at_s: f64,
    /// Requests answered 2xx that were due in this window.
    pub requests: u64,
    /// Requests due in this window that failed or were answered otherwise.
    pub errors: u64,
    /// Latency percentiles of the 2xx requests, milliseconds.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Slowest.
    pub max_ms: f64,
}

/// The `p` percentile of sorted nanoseconds, in milliseconds (0 when empty).
fn percentile_ms(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[idx] as f64 / 1e6
}

/// Groups (offset from start, latency or `None` for an error) into windows of `window`.
fn windows(samples: &[(u64, Option<u64>)], window: Duration) -> Vec<WindowReport> {
    let width = window.as_nanos().max(1) as u64;
    let Some(last) = samples.iter().map(|&(at, _)| at / width).max() else {
        return Vec::new();
    };
    let mut latencies: Vec<Vec<u64>> = (0..=last).map(|_| Vec::new()).collect();
    let mut errors = vec![0u64; latencies.len()];
    for &(at, latency) in samples {
        let w = (at / width) as usize;
        match latency {
            Some(l) => latencies[w].push(l),
            None => errors[w] += 1,
        }
    }
    latencies
        .into_iter()
        .zip(errors)
        .enumerate()
        .map(|(i, (mut l, errors))| {
            l.sort_unstable();
            WindowReport {
                at_s: (i as u64 * width) as f64 / 1e9,
                requests: l.len() as u64,
                errors,
                p50_ms: percentile_ms(&l, 0.50),
                p99_ms: percentile_ms(&l, 0.99),
                max_ms: l.last().map_or(0.0, |&n| n as f64 / 1e6),
            }
        })
        .collect()
}

async fn load(args: &RelayLoadArgs) -> anyhow::Result<LoadReport> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.connections)
        .timeout(Duration::from_secs(30))
        .build()?;
    // Distinct bodies so the relay stores distinct events; built before the clock starts.
    let bodies: Arc<Vec<Bytes>> = Arc::new(
        (0..256u64)
            .map(|s| Bytes::from(sample_payload(args.events_per_payload, s)))
            .collect(),
    );
    let errors = Arc::new(AtomicU64::new(0));
    // Fresh bodies are numbered past the prepared ones, so no uuid repeats.
    let next_fresh = Arc::new(AtomicU64::new(256));
    let fresh = args.fresh_uuids;
    let windowed = !args.window.0.is_zero();
    let events_per_payload = args.events_per_payload;
    let started = Instant::now();
    let until = started + args.duration.0;
    let per_conn_interval = (args.rate > 0)
        .then(|| Duration::from_secs_f64(args.connections as f64 / args.rate as f64));
    let mut tasks = tokio::task::JoinSet::new();
    for conn in 0..args.connections {
        let client = client.clone();
        let bodies = bodies.clone();
        let errors = errors.clone();
        let url = args.url.clone();
        let next_fresh = next_fresh.clone();
        tasks.spawn(async move {
            let mut latencies = Vec::with_capacity(1 << 16);
            // (due or sent, from the start; latency or None): only kept with --window.
            let mut samples: Vec<(u64, Option<u64>)> = Vec::new();
            let mut due = Instant::now();
            let mut i = conn;
            while Instant::now() < until {
                if per_conn_interval.is_some() {
                    tokio::time::sleep_until(due.into()).await;
                }
                let body = if fresh {
                    let seq = next_fresh.fetch_add(1, Ordering::Relaxed);
                    Bytes::from(sample_payload(events_per_payload, seq))
                } else {
                    bodies[i % bodies.len()].clone()
                };
                i += 1;
                let sent = per_conn_interval.map_or_else(Instant::now, |_| due);
                let ok = match client
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                {
                    Ok(r) => r.status().is_success(),
                    Err(_) => false,
                };
                let latency = sent.elapsed().as_nanos() as u64;
                if ok {
                    latencies.push(latency);
                } else {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                if windowed {
                    let at = sent.saturating_duration_since(started).as_nanos() as u64;
                    samples.push((at, ok.then_some(latency)));
                }
                if let Some(step) = per_conn_interval {
                    due += step;
                }
            }
            (latencies, samples)
        });
    }
    let mut all = Vec::new();
    let mut samples = Vec::new();
    while let Some(r) = tasks.join_next().await {
        let (latencies, s) = r?;
        all.extend(latencies);
        samples.extend(s);
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort_unstable();
    let pct = |p: f64| percentile_ms(&all, p);
    let requests = all.len() as u64;
    Ok(LoadReport {
        requests,
        errors: errors.load(Ordering::Relaxed),
        requests_per_sec: requests as f64 / elapsed,
        events_per_sec: (requests * args.events_per_payload as u64) as f64 / elapsed,
        p50_ms: pct(0.50),
        p90_ms: pct(0.90),
        p99_ms: pct(0.99),
        p999_ms: pct(0.999),
        max_ms: all.last().map_or(0.0, |&n| n as f64 / 1e6),
        windows: if windowed {
            windows(&samples, args.window.0)
        } else {
            Vec::new()
        },
    })
}

#[derive(Default)]
struct SinkState {
    requests: AtomicU64,
    events: AtomicU64,
    bytes: AtomicU64,
    refused: AtomicU64,
    refuse_one_in: u64,
    latency: Duration,
    first_at: std::sync::OnceLock<Instant>,
    outages: AtomicU64,
}

impl SinkState {
    fn router(state: Arc<SinkState>) -> axum::Router {
        axum::Router::new()
            .route("/v1/events", post(sink))
            .route("/eu/v1/events", post(sink))
            .route("/counts", axum::routing::get(counts))
            // axum's default 2 MB limit is below the Event API's 3.5 MB.
            .layer(axum::extract::DefaultBodyLimit::max(64 << 20))
            .with_state(state)
    }
}

/// The sink in-process: on `127.0.0.1:<free port>`, on its own tokio runtime (two worker
/// threads), answering 204 after `latency`. Dropping it stops the server.
pub(crate) struct LoopbackSink {
    addr: SocketAddr,
    state: Arc<SinkState>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl LoopbackSink {
    /// Binds and starts serving.
    pub(crate) fn start(latency: Duration) -> anyhow::Result<LoopbackSink> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("bench-upstream")
            .enable_all()
            .build()?;
        let state = Arc::new(SinkState {
            latency,
            ..SinkState::default()
        });
        let app = SinkState::router(state.clone());
        let listener = runtime.block_on(tokio::net::TcpListener::bind(("127.0.0.1", 0)))?;
        let addr = listener.local_addr()?;
        runtime.spawn(async move { axum::serve(listener, app).await });
        Ok(LoopbackSink {
            addr,
            state,
            runtime: Some(runtime),
        })
    }

    /// `http://127.0.0.1:<port>/v1/events`.
    pub(crate) fn url(&self) -> String {
        format!("http://{}/v1/events", self.addr)
    }

    /// Events (visitors) answered with 204 so far.
    pub(crate) fn events(&self) -> u64 {
        self.state.events.load(Ordering::Relaxed)
    }

    /// Request body bytes received so far, as sent.
    pub(crate) fn bytes(&self) -> u64 {
        self.state.bytes.load(Ordering::Relaxed)
    }
}

impl Drop for LoopbackSink {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

/// Runs the bare sink until `--expect-events` arrive, or forever; with an outage schedule,
/// it stops listening and comes back on that schedule.
pub fn run_sink(args: SinkArgs) -> anyhow::Result<ExitCode> {
    let schedule = OutageSchedule::from_args(&args)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let state = Arc::new(SinkState {
            refuse_one_in: args.refuse_one_in,
            latency: args.latency.0,
            ..SinkState::default()
        });
        let listener = tokio::net::TcpListener::bind(args.listen).await?;
        let addr = listener.local_addr()?;
        eprintln!("sink listening on {addr}");
        let mut server = tokio::spawn(serve_sink(listener, addr, state.clone(), schedule));
        let result = match args.expect_events {
            Some(n) => {
                // The server task is watched too: if it ends (a re-bind after an outage
                // failed), the events can never arrive and waiting would hang.
                while state.events.load(Ordering::Relaxed) < n {
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_millis(5)) => {}
                        done = &mut server => {
                            return match done {
                                Ok(Err(e)) => Err(e),
                                Ok(Ok(())) => Err(anyhow::anyhow!(
                                    "the sink stopped serving before {n} events arrived"
                                )),
                                Err(e) => Err(anyhow::anyhow!("the sink's server task: {e}")),
                            };
                        }
                    }
                }
                let secs = state
                    .first_at
                    .get()
                    .map_or(0.0, |t| t.elapsed().as_secs_f64());
                let events = state.events.load(Ordering::Relaxed);
                println!(
                    "{}",
                    serde_json::json!({
                        "events": events,
                        "requests": state.requests.load(Ordering::Relaxed),
                        "refused_requests": state.refused.load(Ordering::Relaxed),
                        "outages": state.outages.load(Ordering::Relaxed),
                        "seconds": secs,
                        "events_per_sec": events as f64 / secs.max(1e-9),
                    })
                );
                Ok(ExitCode::SUCCESS)
            }
            None => {
                tokio::select! {
                    () = crate::signal::shutdown_signal() => Ok(ExitCode::SUCCESS),
                    done = &mut server => match done {
                        Ok(Err(e)) => Err(e),
                        _ => Ok(ExitCode::SUCCESS),
                    },
                }
            }
        };
        server.abort();
        result
    })
}

/// Serves on `listener`; with a schedule, drops the listener at each outage (new
/// connections are refused; open ones finish their request and close, so a client's pool
/// cannot keep using them) and binds `addr` again when it ends. Closing the listener is
/// what an upstream that is gone looks like to the relay; answering 503 would not test
/// connection errors. Re-binding the same port works on Linux because tokio sets
/// `SO_REUSEADDR`, and nothing else is expected to take a port a benchmark chose; if the
/// bind fails it is retried every 10 ms for a second, then the sink gives up with an error.
async fn serve_sink(
    listener: tokio::net::TcpListener,
    addr: SocketAddr,
    state: Arc<SinkState>,
    schedule: Option<OutageSchedule>,
) -> anyhow::Result<()> {
    let app = SinkState::router(state.clone());
    let Some(schedule) = schedule else {
        axum::serve(listener, app).await?;
        return Ok(());
    };
    let started = tokio::time::Instant::now();
    let mut listener = Some(listener);
    for n in 1u32.. {
        let listener = match listener.take() {
            Some(l) => l,
            None => rebind(addr).await?,
        };
        let outage_at = started + schedule.every * (n - 1) + schedule.up_for();
        let (down_tx, down_rx) = tokio::sync::oneshot::channel::<()>();
        let serving = tokio::spawn(
            axum::serve(listener, app.clone())
                .with_graceful_shutdown(async {
                    let _ = down_rx.await;
                })
                .into_future(),
        );
        tokio::time::sleep_until(outage_at).await;
        let _ = down_tx.send(());
        state.outages.fetch_add(1, Ordering::Relaxed);
        eprintln!("sink gone (outage {n})");
        tokio::time::sleep_until(outage_at + schedule.gone_for).await;
        // A connection still finishing a slow request keeps its task until it is done;
        // that is the server's business, not the schedule's.
        drop(serving);
        eprintln!("sink back on {addr}");
    }
    Ok(())
}

async fn rebind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    let mut tries = 0;
    loop {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => return Ok(l),
            Err(e) if tries < 100 => {
                tries += 1;
                tracing::debug!(error = %e, "sink cannot listen again yet");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => {
                return Err(
                    anyhow::anyhow!(e).context(format!("sink cannot listen on {addr} again"))
                );
            }
        }
    }
}

/// `GET /counts`: what the sink received so far, as JSON.
async fn counts(State(state): State<Arc<SinkState>>) -> axum::Json<serde_json::Value> {
    axum::Json(serde_json::json!({
        "events": state.events.load(Ordering::Relaxed),
        "requests": state.requests.load(Ordering::Relaxed),
        "refused_requests": state.refused.load(Ordering::Relaxed),
        "outages": state.outages.load(Ordering::Relaxed),
    }))
}

/// Answers 204 (or 400 for a request holding a bad event, with `--refuse-one-in`), after
/// `--latency`; counts the visitors it accepted by parsing only the top level.
async fn sink(State(state): State<Arc<SinkState>>, body: Bytes) -> StatusCode {
    let _ = state.first_at.set(Instant::now());
    state.requests.fetch_add(1, Ordering::Relaxed);
    state.bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
    if !state.latency.is_zero() {
        tokio::time::sleep(state.latency).await;
    }
    if state.refuse_one_in > 0 && holds_bad_event(&body, state.refuse_one_in) {
        state.refused.fetch_add(1, Ordering::Relaxed);
        return StatusCode::BAD_REQUEST;
    }
    let n = tributary::RawBatch::parse(body).map_or(0, |b| b.visitors().len() as u64);
    state.events.fetch_add(n, Ordering::Relaxed);
    StatusCode::NO_CONTENT
}

/// Whether `body` holds a `"uuid"` whose last 12 hex digits are a multiple of `n`.
fn holds_bad_event(body: &[u8], n: u64) -> bool {
    const KEY: &[u8] = b"\"uuid\":\"";
    let mut rest = body;
    while let Some(at) = rest.windows(KEY.len()).position(|w| w == KEY) {
        rest = &rest[at + KEY.len()..];
        let Some(end) = rest.iter().position(|&b| b == b'"') else {
            break;
        };
        let uuid = &rest[..end];
        let tail = &uuid[uuid.len().saturating_sub(12)..];
        if let Some(number) = std::str::from_utf8(tail)
            .ok()
            .and_then(|t| u64::from_str_radix(t, 16).ok())
            && number % n == 0
        {
            return true;
        }
    }
    false
}
