//! The Python class `tributary_events.BatchEventProcessor`.
//!
//! `process()` does as little as it can on the caller's thread: a type check and a push of
//! the Python object onto a bounded queue. A converter thread (`tributary-py-convert`) takes
//! the GIL once per run of up to [`CONVERT_RUN`] events, reads them into
//! [`tributary::UserEvent`]s, and feeds Tributary's `BatchEventProcessor` with the GIL
//! released; its threads batch, build the payloads and dispatch.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError, bounded};
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use tributary::{HttpDispatcher, ProcessError, RetryPolicy, UserEvent};

use crate::convert::{Converter, Sdk, type_name};
use crate::dispatch::{DispatchCounters, RelayRoutes, SdkDispatcher, Target};
use crate::options::{self, int_option, seconds_option, str_option};
use crate::pylog;
use crate::spool::{self, InProcessForwarder, SpoolSetting};

/// Most events converted under one hold of the GIL.
pub(crate) const CONVERT_RUN: usize = 512;
/// Converted events queued for Tributary's batcher (besides `queue_capacity`).
const BATCHER_QUEUE: usize = 2 * CONVERT_RUN;
/// Requests in flight at once with a Rust dispatcher (HTTP, spool): Tributary's default.
const RUST_DISPATCH_CONCURRENCY: usize = 32;
/// How long the converter waits for room in the batcher's queue before it gives up on an
/// event (the dispatcher is then stuck past every HTTP timeout and retry budget).
const FEED_TIMEOUT: Duration = Duration::from_secs(600);

enum Msg {
    Event(Py<PyAny>),
    Flush,
    Stop,
}

#[derive(Debug, Default)]
struct Counters {
    accepted: AtomicU64,
    dropped_queue_full: AtomicU64,
    dropped_stopped: AtomicU64,
    /// Accepted, then not taken by the batcher because `stop()` closed it first (the
    /// converter was still behind at the `timeout_interval` deadline).
    dropped_at_stop: AtomicU64,
    invalid: AtomicU64,
    /// Refused because the converter thread failed (a panic: a bug, reported in the log).
    dropped_converter_failed: AtomicU64,
    full_logged: AtomicBool,
    failed_logged: AtomicBool,
    stopped_logged: AtomicBool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Idle,
    Running,
    Stopped,
}

/// Everything one process's processor owns. After `fork()` the child gets a new epoch and
/// the parent's is leaked in the child: its threads do not exist there, and its queued
/// events are the parent's to send.
struct Epoch {
    phase: Phase,
    tx: Sender<Msg>,
    rx: Option<Receiver<Msg>>,
    counters: Arc<Counters>,
    dispatch_counters: Arc<DispatchCounters>,
    running: Option<Running>,
    /// The stopped processor, for `stats()` after `stop()`.
    finished: Option<Arc<tributary::BatchEventProcessor>>,
}

struct Running {
    rust: Arc<tributary::BatchEventProcessor>,
    forwarder: Option<InProcessForwarder>,
    converter: JoinHandle<()>,
    done: Receiver<()>,
}

impl Epoch {
    fn new(capacity: usize) -> Epoch {
        let (tx, rx) = bounded(capacity);
        Epoch {
            phase: Phase::Idle,
            tx,
            rx: Some(rx),
            counters: Arc::default(),
            dispatch_counters: Arc::default(),
            running: None,
            finished: None,
        }
    }
}

/// Settings as given to the constructor, checked.
struct Settings {
    batch_size: usize,
    flush_interval: Duration,
    timeout_interval: Duration,
    queue_capacity: usize,
    endpoint: Option<String>,
    /// A relay's base URL: US requests to `/v1/events`, EU ones to `/eu/v1/events`.
    relay_url: Option<String>,
    gzip: bool,
    auth_token: Option<String>,
    retry_attempts: u32,
    request_timeout: Duration,
    spool: Option<SpoolSetting>,
}

/// A spool's dispatcher and, for SQLite, its forwarder.
type OpenedSpool = (
    Box<dyn tributary::EventDispatcher>,
    Option<InProcessForwarder>,
);

impl Settings {
    /// Opens the `spool=` spool (the caller checked there is one).
    fn open_spool(&self, logger: Py<PyAny>) -> Result<OpenedSpool, spool::SpoolSetupError> {
        let Some(setting) = &self.spool else {
            return Err(spool::SpoolSetupError::Open(
                String::new(),
                "no spool= given".into(),
            ));
        };
        let (us, eu) = self.upstreams();
        spool::open(
            setting,
            us.as_deref(),
            eu.as_deref(),
            Some(logger),
            self.request_timeout,
            self.retry_attempts,
        )
    }

    /// Where US and EU requests go, when not to each event's own Event API URL.
    fn upstreams(&self) -> (Option<String>, Option<String>) {
        match (&self.relay_url, &self.endpoint) {
            (Some(base), _) => (
                Some(format!("{base}/v1/events")),
                Some(format!("{base}/eu/v1/events")),
            ),
            (None, Some(url)) => (Some(url.clone()), None),
            (None, None) => (None, None),
        }
    }

    /// Tributary's HTTP dispatcher, to `endpoint` or each event's URL.
    fn http(&self, endpoint: Option<String>) -> PyResult<HttpDispatcher> {
        let mut b = HttpDispatcher::builder()
            .gzip(self.gzip)
            .request_timeout(self.request_timeout)
            .retry(RetryPolicy {
                max_attempts: self.retry_attempts,
                ..RetryPolicy::default()
            });
        if let Some(url) = endpoint {
            b = b.endpoint(url);
        }
        if let Some(token) = &self.auth_token {
            b = b.header("Authorization", format!("Bearer {token}"));
        }
        b.build()
            .map_err(|e| PyValueError::new_err(format!("HTTP dispatcher: {e}")))
    }
}

/// A drop-in for `optimizely.event.event_processor.BatchEventProcessor`, backed by
/// Tributary's Rust pipeline.
///
/// Same positional parameters and defaults as the SDK's (batch 10, flush 30 s, close timeout
/// 5 s, not started unless `start_on_init=True`), plus keyword-only options: see
/// `docs/python.md` and the type stub.
#[pyclass(
    module = "tributary_events._native",
    name = "_BatchEventProcessor",
    frozen,
    weakref,
    subclass
)]
pub(crate) struct BatchEventProcessor {
    settings: Settings,
    sdk: Arc<Sdk>,
    logger: Py<PyAny>,
    sdk_logger: Py<PyAny>,
    event_dispatcher: Option<Py<PyAny>>,
    notification_center: Option<Py<PyAny>>,
    /// The process that created the processor: a SQLite spool is only usable there.
    created_pid: u32,
    // Locked only while the GIL is held and never across a release of it, so no other
    // thread holds it when `os.fork()` (which holds the GIL) runs.
    epoch: Mutex<Epoch>,
}

fn lock(m: &Mutex<Epoch>) -> MutexGuard<'_, Epoch> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[pymethods]
impl BatchEventProcessor {
    #[new]
    #[pyo3(signature = (
        event_dispatcher=None, logger=None, start_on_init=false, event_queue=None,
        batch_size=None, flush_interval=None, timeout_interval=None, notification_center=None,
        *, queue_capacity=None, endpoint=None, relay_url=None, gzip=false, auth_token=None,
        retry_attempts=None, request_timeout=None, spool=None,
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        event_dispatcher: Option<Bound<'_, PyAny>>,
        logger: Option<Bound<'_, PyAny>>,
        start_on_init: bool,
        event_queue: Option<Bound<'_, PyAny>>,
        batch_size: Option<Bound<'_, PyAny>>,
        flush_interval: Option<Bound<'_, PyAny>>,
        timeout_interval: Option<Bound<'_, PyAny>>,
        notification_center: Option<Bound<'_, PyAny>>,
        queue_capacity: Option<Bound<'_, PyAny>>,
        endpoint: Option<Bound<'_, PyAny>>,
        relay_url: Option<Bound<'_, PyAny>>,
        gzip: bool,
        auth_token: Option<Bound<'_, PyAny>>,
        retry_attempts: Option<Bound<'_, PyAny>>,
        request_timeout: Option<Bound<'_, PyAny>>,
        spool: Option<Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        if event_queue.as_ref().is_some_and(|q| !q.is_none()) {
            return Err(PyValueError::new_err(
                "event_queue is not supported: Tributary keeps its own bounded queue; \
                 pass queue_capacity=N (the number of events it holds) instead",
            ));
        }
        let event_dispatcher = event_dispatcher.filter(|d| !d.is_none());
        if let Some(d) = &event_dispatcher
            && !d.hasattr("dispatch_event")?
        {
            return Err(PyTypeError::new_err(format!(
                "event_dispatcher must have a dispatch_event(log_event) method; {} has none",
                type_name(d)
            )));
        }
        let endpoint = str_option("endpoint", endpoint.as_ref())?;
        if let Some(url) = &endpoint {
            tributary::dispatcher::transport::check_endpoint(url)
                .map_err(|e| PyValueError::new_err(format!("endpoint: {e}")))?;
        }
        let relay_url = str_option("relay_url", relay_url.as_ref())?
            .map(|u| u.trim_end_matches('/').to_owned());
        if let Some(base) = &relay_url {
            if endpoint.is_some() {
                return Err(PyValueError::new_err(
                    "endpoint and relay_url exclude each other: endpoint takes every request, \
                     relay_url sends EU requests to its /eu/v1/events route",
                ));
            }
            tributary::dispatcher::transport::check_endpoint(&format!("{base}/v1/events"))
                .map_err(|e| PyValueError::new_err(format!("relay_url: {e}")))?;
        }
        let spool = match str_option("spool", spool.as_ref())? {
            None => None,
            Some(s) => Some(
                SpoolSetting::parse(&s)
                    .map_err(|e| PyValueError::new_err(format!("spool={s:?}: {e}")))?,
            ),
        };
        if spool.is_some() && (gzip || auth_token.as_ref().is_some_and(|t| !t.is_none())) {
            // The in-process forwarder (and `tributary drain` for SQS) sends with its own
            // settings: an accepted token or gzip flag would be silently ignored.
            return Err(PyValueError::new_err(
                "auth_token and gzip apply to the HTTP mode only: with spool=, requests are \
                 forwarded without them (a relay with --auth-tokens would refuse them)",
            ));
        }
        if spool.is_some() && event_dispatcher.is_some() {
            return Err(PyValueError::new_err(
                "spool and event_dispatcher exclude each other: with a spool, Tributary writes each batch to it",
            ));
        }
        let settings = Settings {
            batch_size: int_option(
                "batch_size",
                batch_size.as_ref(),
                options::DEFAULT_BATCH_SIZE,
                1,
                options::MAX_BATCH_SIZE,
            )?,
            flush_interval: seconds_option(
                "flush_interval",
                flush_interval.as_ref(),
                options::DEFAULT_FLUSH_INTERVAL,
                true,
            )?,
            timeout_interval: seconds_option(
                "timeout_interval",
                timeout_interval.as_ref(),
                options::DEFAULT_TIMEOUT_INTERVAL,
                // 0 would give conversion and delivery no time: everything queued lost.
                true,
            )?,
            queue_capacity: int_option(
                "queue_capacity",
                queue_capacity.as_ref(),
                options::DEFAULT_QUEUE_CAPACITY,
                1,
                options::MAX_QUEUE_CAPACITY,
            )?,
            endpoint,
            relay_url,
            gzip,
            auth_token: str_option("auth_token", auth_token.as_ref())?,
            retry_attempts: int_option(
                "retry_attempts",
                retry_attempts.as_ref(),
                5,
                1,
                options::MAX_RETRY_ATTEMPTS as usize,
            )? as u32,
            request_timeout: seconds_option(
                "request_timeout",
                request_timeout.as_ref(),
                Duration::from_secs(10),
                true,
            )?,
            spool,
        };
        let sdk = Arc::new(Sdk::load(py)?);
        let helpers = py.import("tributary_events._sdk")?;
        let given = logger.filter(|l| !l.is_none());
        // The SDK's own helpers (tag parsing) log to the user's logger, or nowhere, as in
        // the SDK; this processor's warnings go to `tributary_events` when none is given.
        // The SDK's SimpleLogger/NoOpLogger have no-op methods of their own: the SDK
        // adapts them to a `logging.Logger` first, so does this.
        let given = match given {
            Some(l) => Some(helpers.call_method1("adapt_logger", (l,))?),
            None => None,
        };
        let sdk_logger = match &given {
            Some(l) => l.clone().unbind(),
            None => helpers.call_method0("no_op_logger")?.unbind(),
        };
        let logger = match given {
            Some(l) => l.unbind(),
            None => helpers.call_method0("default_logger")?.unbind(),
        };
        let processor = BatchEventProcessor {
            epoch: Mutex::new(Epoch::new(settings.queue_capacity)),
            settings,
            sdk,
            logger,
            sdk_logger,
            event_dispatcher: event_dispatcher.map(Bound::unbind),
            notification_center: notification_center
                .filter(|n| !n.is_none())
                .map(Bound::unbind),
            created_pid: std::process::id(),
        };
        if start_on_init {
            processor.start_locked(py, &mut lock(&processor.epoch), None)?;
        }
        Ok(processor)
    }

    /// Queues `user_event` (the SDK's `ImpressionEvent` or `ConversionEvent`). Never blocks;
    /// a full queue drops the event, counted in `stats()["dropped_queue_full"]` and logged
    /// once. Anything else raises `TypeError`.
    fn process(&self, py: Python<'_>, user_event: &Bound<'_, PyAny>) -> PyResult<()> {
        let t = user_event.get_type();
        // Exact type first (a pointer comparison); subclasses through isinstance.
        if !(t.is(&self.sdk.impression)
            || t.is(&self.sdk.conversion)
            || user_event.is_instance(self.sdk.impression.bind(py))?
            || user_event.is_instance(self.sdk.conversion.bind(py))?)
        {
            return Err(PyTypeError::new_err(format!(
                "process() takes an optimizely ImpressionEvent or ConversionEvent, not {}",
                type_name(user_event)
            )));
        }
        self.check_process()?;
        let epoch = lock(&self.epoch);
        let counters = &epoch.counters;
        if epoch.phase == Phase::Stopped {
            counters.dropped_stopped.fetch_add(1, Ordering::Relaxed);
            let first = !counters.stopped_logged.swap(true, Ordering::Relaxed);
            drop(epoch);
            if first {
                self.log(py, "warning", "BatchEventProcessor is stopped: events passed to process() are dropped (counted in stats()[\"dropped_stopped\"])");
            }
            return Ok(());
        }
        match epoch.tx.try_send(Msg::Event(user_event.clone().unbind())) {
            Ok(()) => {
                counters.accepted.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Disconnected(_)) => {
                // Only when the converter thread is gone: it failed (logged when it did).
                counters
                    .dropped_converter_failed
                    .fetch_add(1, Ordering::Relaxed);
                let first = !counters.failed_logged.swap(true, Ordering::Relaxed);
                drop(epoch);
                if first {
                    self.log(py, "error", "BatchEventProcessor converter thread has failed: events passed to process() are dropped (counted in stats()[\"dropped_converter_failed\"]); stop() and start() it again");
                }
            }
            Err(TrySendError::Full(_)) => {
                counters.dropped_queue_full.fetch_add(1, Ordering::Relaxed);
                let first = !counters.full_logged.swap(true, Ordering::Relaxed);
                drop(epoch);
                if first {
                    let msg = format!(
                        "BatchEventProcessor queue is full ({} events): dropping events until there is room (counted in stats()[\"dropped_queue_full\"]; raise queue_capacity)",
                        self.settings.queue_capacity
                    );
                    self.log(py, "warning", &msg);
                }
            }
        }
        Ok(())
    }

    /// Starts the threads (a no-op with a warning when already running).
    fn start(&self, py: Python<'_>) -> PyResult<()> {
        self.check_process()?;
        // Opening an SQS spool calls AWS: done before the lock, with the GIL released (a
        // processor already running drops it unused).
        let prepared = match &self.settings.spool {
            Some(SpoolSetting::Sqs(_)) if lock(&self.epoch).phase != Phase::Running => {
                let (s, logger) = (&self.settings, self.logger.clone_ref(py));
                Some(
                    py.detach(|| s.open_spool(logger))
                        .map_err(|e| PyValueError::new_err(e.to_string()))?,
                )
            }
            _ => None,
        };
        let started = self.start_locked(py, &mut lock(&self.epoch), prepared)?;
        // Logged without the lock: Python code may switch threads, and one waiting for
        // the lock holds the GIL.
        if !started {
            self.log(py, "warning", "BatchEventProcessor already started.");
        }
        Ok(())
    }

    /// Sends what is batched so far, without waiting.
    fn flush(&self, py: Python<'_>) {
        let tx = lock(&self.epoch).tx.clone();
        // Ordered after every event queued before it; waits (GIL released) if the queue is full.
        let timeout = self.settings.timeout_interval.max(Duration::from_secs(1));
        py.detach(|| {
            let _ = tx.send_timeout(Msg::Flush, timeout);
        });
    }

    /// Stops intake, delivers every accepted event, and waits up to `timeout_interval` for
    /// the dispatcher. The GIL is released while it waits.
    fn stop(&self, py: Python<'_>) {
        let (tx, running) = {
            let mut epoch = lock(&self.epoch);
            let was = epoch.phase;
            epoch.phase = Phase::Stopped;
            if was != Phase::Running {
                let queued = epoch.tx.len();
                drop(epoch);
                if was == Phase::Idle && queued > 0 {
                    // As the SDK's: a processor never started sends nothing; but not silently.
                    self.log(py, "warning", &format!("BatchEventProcessor stopped before start(): {queued} queued events not sent"));
                }
                return;
            }
            // The converter's only sender goes with this call: once `Stop` is taken or the
            // queue is drained, it ends, even when `Stop` could not be queued in time.
            let (closed, _) = bounded(0);
            (
                std::mem::replace(&mut epoch.tx, closed),
                epoch.running.take(),
            )
        };
        let Some(running) = running else { return };
        let timeout = self.settings.timeout_interval;
        let rust = running.rust.clone();
        let report = py.detach(move || {
            let deadline = Instant::now() + timeout;
            // Every event queued before this is converted and handed to the batcher first.
            let _ = tx.send_deadline(Msg::Stop, deadline);
            let behind = tx.len();
            drop(tx);
            let converted = running.done.recv_deadline(deadline).is_ok();
            // Within the caller's `timeout_interval`, not a fresh one after conversion.
            let report = running.rust.close_within(deadline);
            if converted {
                let _ = running.converter.join();
            }
            if let Some(f) = running.forwarder {
                // What is spooled and not forwarded by the deadline stays in the spool.
                f.stop(deadline);
            }
            (report, converted, behind)
        });
        let (report, converted, behind) = report;
        {
            let mut epoch = lock(&self.epoch);
            if epoch.phase == Phase::Stopped {
                epoch.finished = Some(rust);
            }
        }
        if !converted {
            self.log(py, "warning", &format!("BatchEventProcessor stop(): events were still being converted at the {timeout:?} timeout ({behind} still queued): those the converter reaches now are dropped, counted in stats()[\"dropped_at_stop\"]"));
        }
        if !report.is_complete() {
            self.log(
                py,
                "warning",
                &format!("BatchEventProcessor stop(): {report}"),
            );
        } else {
            self.log(
                py,
                "debug",
                &format!("BatchEventProcessor stop(): {report}"),
            );
        }
    }

    /// Events queued and not yet taken by the converter thread (like `queue.Queue.qsize()`).
    fn qsize(&self) -> usize {
        lock(&self.epoch).tx.len()
    }

    /// Whether the processor's threads are running.
    #[getter]
    fn is_running(&self) -> bool {
        let epoch = lock(&self.epoch);
        epoch.phase == Phase::Running
            && epoch
                .running
                .as_ref()
                .is_some_and(|r| !r.converter.is_finished())
    }

    /// The processor's counters, as a dict of ints (see docs/python.md).
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        // Values copied out under the lock; the dict is built without it (building can run
        // Python code, which can switch to a thread that waits for the lock with the GIL).
        let values = {
            let epoch = lock(&self.epoch);
            let c = &epoch.counters;
            let rust = epoch
                .running
                .as_ref()
                .map(|r| &r.rust)
                .or(epoch.finished.as_ref())
                .map(|r| r.stats())
                .unwrap_or_default();
            let dc = &epoch.dispatch_counters;
            [
                ("accepted", c.accepted.load(Ordering::Relaxed)),
                (
                    "dropped_queue_full",
                    c.dropped_queue_full.load(Ordering::Relaxed),
                ),
                ("dropped_stopped", c.dropped_stopped.load(Ordering::Relaxed)),
                ("dropped_at_stop", c.dropped_at_stop.load(Ordering::Relaxed)),
                ("invalid", c.invalid.load(Ordering::Relaxed)),
                (
                    "dropped_converter_failed",
                    c.dropped_converter_failed.load(Ordering::Relaxed),
                ),
                ("queued", epoch.tx.len() as u64),
                ("dispatched", rust.events_dispatched),
                ("failed", rust.events_failed),
                ("requests", rust.requests()),
                ("pending", rust.pending()),
                (
                    "dispatcher_errors",
                    dc.dispatcher_errors.load(Ordering::Relaxed),
                ),
                (
                    "notification_errors",
                    dc.notification_errors.load(Ordering::Relaxed),
                ),
            ]
        };
        let d = PyDict::new(py);
        for (k, v) in values {
            d.set_item(k, v)?;
        }
        Ok(d)
    }

    fn _at_exit(&self, py: Python<'_>) {
        self.stop(py);
    }

    /// `os.register_at_fork(after_in_child=...)`: a fresh processor in the child.
    fn _after_fork_in_child(&self, py: Python<'_>) -> PyResult<()> {
        let mut epoch = lock(&self.epoch);
        let fresh = Epoch::new(self.settings.queue_capacity);
        let old = std::mem::replace(&mut *epoch, fresh);
        let was_running = old.phase == Phase::Running;
        // Its threads are the parent's; touching its channel or joining them could hang.
        std::mem::forget(old);
        if was_running && !self.sqlite_spool() {
            // The child's only thread: nothing waits for the GIL or the lock here.
            self.start_locked(py, &mut epoch, None)?;
        }
        Ok(())
    }

    fn __repr__(&self) -> String {
        let epoch = lock(&self.epoch);
        format!(
            "<tributary_events.BatchEventProcessor {:?} batch_size={} queue_capacity={} queued={}>",
            epoch.phase,
            self.settings.batch_size,
            self.settings.queue_capacity,
            epoch.tx.len()
        )
    }
}

impl BatchEventProcessor {
    fn log(&self, py: Python<'_>, level: &str, message: &str) {
        let _ = self.logger.bind(py).call_method1(level, (message,));
    }

    fn sqlite_spool(&self) -> bool {
        matches!(self.settings.spool, Some(SpoolSetting::Sqlite(_)))
    }

    /// A SQLite spool opened in a forked child would share the parent's in-process SQLite
    /// state (locks, WAL index): refused, with what to do instead.
    fn check_process(&self) -> PyResult<()> {
        if self.sqlite_spool() && std::process::id() != self.created_pid {
            return Err(PyRuntimeError::new_err(format!(
                "this BatchEventProcessor(spool=PATH) was created in process {} before fork(): \
                 a SQLite spool cannot be used across fork; create the processor after the fork \
                 (gunicorn post_fork or no --preload, uWSGI --lazy-apps or @postfork)",
                self.created_pid
            )));
        }
        Ok(())
    }

    /// Starts the threads; `Ok(false)` when already running (nothing done).
    fn start_locked(
        &self,
        py: Python<'_>,
        epoch: &mut Epoch,
        prepared: Option<OpenedSpool>,
    ) -> PyResult<bool> {
        match epoch.phase {
            Phase::Running => return Ok(false),
            Phase::Stopped => *epoch = Epoch::new(self.settings.queue_capacity),
            Phase::Idle => {}
        }
        let Some(rx) = epoch.rx.take() else {
            return Err(PyRuntimeError::new_err(
                "BatchEventProcessor: internal queue already taken",
            ));
        };
        let s = &self.settings;
        let mut forwarder = None;
        let target = match (&self.event_dispatcher, &s.spool) {
            (Some(d), _) => Target::Python(d.clone_ref(py)),
            (None, Some(_)) => {
                // Else with the GIL held: the epoch lock is held here, and a thread waiting
                // for it with the GIL would deadlock a release. (SQLite: a local open.)
                let (d, f) = match prepared {
                    Some(opened) => opened,
                    None => s
                        .open_spool(self.logger.clone_ref(py))
                        .map_err(|e| PyValueError::new_err(e.to_string()))?,
                };
                forwarder = f;
                Target::Rust(d)
            }
            (None, None) => {
                let (us, eu) = s.upstreams();
                match (us, eu) {
                    (Some(us), Some(eu)) => Target::Rust(Box::new(RelayRoutes {
                        us: Box::new(s.http(Some(us))?),
                        eu: Box::new(s.http(Some(eu))?),
                    })),
                    (us, _) => Target::Rust(Box::new(s.http(us)?)),
                }
            }
        };
        // The SDK calls a Python dispatcher from one thread; so does this.
        let concurrency = if matches!(target, Target::Python(_)) {
            1
        } else {
            RUST_DISPATCH_CONCURRENCY
        };
        let dispatcher = SdkDispatcher {
            target,
            notification_center: self.notification_center.as_ref().map(|n| n.clone_ref(py)),
            sdk: self.sdk.clone(),
            logger: self.logger.clone_ref(py),
            counters: epoch.dispatch_counters.clone(),
        };
        let rust = tributary::BatchEventProcessor::builder()
            .dispatcher(dispatcher)
            .batch_size(s.batch_size)
            .flush_interval(s.flush_interval)
            .close_timeout(s.timeout_interval)
            .queue_capacity(BATCHER_QUEUE)
            .dispatch_concurrency(concurrency)
            .build()
            .map_err(|e| PyRuntimeError::new_err(format!("BatchEventProcessor: {e}")))?;
        let rust = Arc::new(rust);
        let (done_tx, done) = bounded(1);
        let mut converter = Converter::new(self.sdk.clone(), self.sdk_logger.clone_ref(py));
        let feed = rust.clone();
        let counters = epoch.counters.clone();
        let logger = self.logger.clone_ref(py);
        let thread = std::thread::Builder::new()
            .name("tributary-py-convert".into())
            .spawn(move || {
                // No panic across threads: a bug in conversion ends this thread with a log
                // line, and process() then says so instead of "queue is full".
                let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    convert_loop(&rx, &mut converter, &feed, &counters, &logger)
                }));
                drop(rx);
                if let Err(panic) = ran {
                    let why = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    pylog::log(&logger, "error", &format!("BatchEventProcessor converter thread failed (a bug in tributary-events, please report it): {why}"));
                }
                let _ = done_tx.send(());
            })
            .map_err(|e| {
                PyRuntimeError::new_err(format!("could not start the converter thread: {e}"))
            })?;
        epoch.running = Some(Running {
            rust,
            forwarder,
            converter: thread,
            done,
        });
        epoch.phase = Phase::Running;
        Ok(true)
    }
}

enum Item {
    Event(Box<UserEvent>),
    Flush,
    Stop,
}

/// Until `Stop` (or every sender gone): runs of queued objects converted under one hold of
/// the GIL, then fed to the batcher without it.
fn convert_loop(
    rx: &Receiver<Msg>,
    converter: &mut Converter,
    rust: &tributary::BatchEventProcessor,
    counters: &Counters,
    logger: &Py<PyAny>,
) {
    let mut run: Vec<Msg> = Vec::with_capacity(CONVERT_RUN);
    let mut items: Vec<Item> = Vec::with_capacity(CONVERT_RUN);
    while let Ok(first) = rx.recv() {
        if pylog::interpreter_exiting() {
            // What is left would need the GIL to convert; the interpreter is going.
            let left = 1 + rx.try_iter().count() as u64;
            counters.dropped_at_stop.fetch_add(left, Ordering::Relaxed);
            return;
        }
        run.push(first);
        while run.len() < CONVERT_RUN {
            match rx.try_recv() {
                Ok(m) => run.push(m),
                Err(_) => break,
            }
        }
        Python::attach(|py| {
            for m in run.drain(..) {
                match m {
                    Msg::Event(obj) => match converter.convert(obj.bind(py)) {
                        Ok(e) => items.push(Item::Event(Box::new(e))),
                        Err(e) => {
                            counters.invalid.fetch_add(1, Ordering::Relaxed);
                            let _ = logger.bind(py).call_method1(
                                "error",
                                (format!("Invalid user event, not sent: {e}"),),
                            );
                        }
                    },
                    Msg::Flush => items.push(Item::Flush),
                    Msg::Stop => items.push(Item::Stop),
                }
            }
        });
        let (mut stuck, mut closed) = (0u64, 0u64);
        let mut stop = false;
        for item in items.drain(..) {
            match item {
                Item::Event(e) => match rust.process_timeout(*e, FEED_TIMEOUT) {
                    Ok(()) => {}
                    Err(ProcessError::QueueFull) => stuck += 1,
                    // Closed by a `stop()` that timed out before conversion got here.
                    Err(_) => closed += 1,
                },
                Item::Flush => rust.flush(),
                Item::Stop => {
                    stop = true;
                    break;
                }
            }
        }
        if stuck + closed > 0 {
            counters
                .dropped_queue_full
                .fetch_add(stuck, Ordering::Relaxed);
            counters
                .dropped_at_stop
                .fetch_add(closed, Ordering::Relaxed);
            // tracing has no subscriber in a Python process: the user's logger it is.
            let message = if closed > 0 {
                format!(
                    "BatchEventProcessor: {closed} events dropped: stop() closed the batcher before they were converted (counted in stats()[\"dropped_at_stop\"])"
                )
            } else {
                format!(
                    "BatchEventProcessor: {stuck} events dropped: the batcher took none for {FEED_TIMEOUT:?} (counted in stats()[\"dropped_queue_full\"])"
                )
            };
            pylog::log(logger, "error", &message);
        }
        if stop {
            return;
        }
    }
}
