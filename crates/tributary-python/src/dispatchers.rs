//! `dispatch_event(log_event)` objects for users who keep the SDK's own processor:
//! [`RelayEventDispatcher`], [`SpoolEventDispatcher`], [`SqsEventDispatcher`]. Each sends
//! the SDK's LogEvent through a Rust dispatcher with the GIL released.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use tributary::{EventDispatcher, HttpDispatcher, LogEvent, RawBatch, RetryPolicy};

use crate::options::{self, int_option, seconds_option, str_option};
use crate::spool::{self, InProcessForwarder, SpoolSetting};

/// Parses the SDK LogEvent's `params` into Tributary's LogEvent (JSON-encoded as the SDK's
/// default dispatcher does).
fn log_event(py: Python<'_>, log_event: &Bound<'_, PyAny>) -> PyResult<LogEvent> {
    let url: String = log_event.getattr("url")?.extract()?;
    let params = log_event.getattr("params")?;
    let body: String = py
        .import("json")?
        .call_method1("dumps", (params,))?
        .extract()?;
    let batch = RawBatch::parse(Bytes::from(body)).map_err(|e| {
        PyValueError::new_err(format!("log_event.params is not an Event API batch: {e}"))
    })?;
    Ok(LogEvent::new(url, batch))
}

/// A value made in one process. After `fork()` its threads (a runtime bridge, a SQLite
/// worker) do not exist in the child, and sending through it would wait for them forever:
/// the child gets `None` and makes its own, and the parent's is never dropped there
/// (dropping could join threads that are not there, or close the parent's SQLite state).
struct PerProcess<T> {
    // Locked with the GIL held and never across a release of it, so no thread holds it at
    // a fork.
    inner: Mutex<(u32, Option<Arc<T>>)>,
}

impl<T> PerProcess<T> {
    fn new(value: T) -> Self {
        PerProcess {
            inner: Mutex::new((std::process::id(), Some(Arc::new(value)))),
        }
    }

    fn lock(&self) -> MutexGuard<'_, (u32, Option<Arc<T>>)> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The value, if it was made in this process.
    fn get(&self) -> Option<Arc<T>> {
        let g = self.lock();
        (g.0 == std::process::id()).then(|| g.1.clone()).flatten()
    }

    /// This process's value: `fresh` unless another thread installed one first.
    fn install(&self, fresh: T) -> Arc<T> {
        let mut g = self.lock();
        let pid = std::process::id();
        if g.0 != pid || g.1.is_none() {
            std::mem::forget(g.1.take());
            g.0 = pid;
        }
        g.1.get_or_insert_with(|| Arc::new(fresh)).clone()
    }
}

impl<T> Drop for PerProcess<T> {
    fn drop(&mut self) {
        let g = self.inner.get_mut().unwrap_or_else(PoisonError::into_inner);
        if g.0 != std::process::id() {
            std::mem::forget(g.1.take());
        }
    }
}

fn send(py: Python<'_>, d: &dyn EventDispatcher, event: LogEvent) -> PyResult<()> {
    py.detach(|| d.dispatch(&event))
        .map_err(|e| PyRuntimeError::new_err(format!("dispatch_event failed: {e}")))
}

fn http(
    url: &str,
    auth_token: Option<&str>,
    gzip: bool,
    attempts: u32,
    timeout: Duration,
) -> PyResult<HttpDispatcher> {
    let mut b = HttpDispatcher::builder()
        .endpoint(url)
        .gzip(gzip)
        .request_timeout(timeout)
        .retry(RetryPolicy {
            max_attempts: attempts,
            ..RetryPolicy::default()
        });
    if let Some(t) = auth_token {
        b = b.header("Authorization", format!("Bearer {t}"));
    }
    b.build()
        .map_err(|e| PyValueError::new_err(format!("relay_url: {e}")))
}

/// Posts each LogEvent to a Tributary relay (`/v1/events`, or `/eu/v1/events` for EU
/// payloads), keep-alive, with retries and `Retry-After`. Raises `RuntimeError` when the
/// relay did not take it (the SDK's processor catches and logs that).
#[pyclass(module = "tributary_events._native", frozen)]
pub(crate) struct RelayEventDispatcher {
    config: RelayConfig,
    current: PerProcess<RelayTargets>,
}

struct RelayConfig {
    base: String,
    token: Option<String>,
    gzip: bool,
    attempts: u32,
    timeout: Duration,
}

struct RelayTargets {
    us: HttpDispatcher,
    eu: HttpDispatcher,
}

impl RelayConfig {
    fn build(&self) -> PyResult<RelayTargets> {
        let c = self;
        Ok(RelayTargets {
            us: http(
                &format!("{}/v1/events", c.base),
                c.token.as_deref(),
                c.gzip,
                c.attempts,
                c.timeout,
            )?,
            eu: http(
                &format!("{}/eu/v1/events", c.base),
                c.token.as_deref(),
                c.gzip,
                c.attempts,
                c.timeout,
            )?,
        })
    }
}

#[pymethods]
impl RelayEventDispatcher {
    #[new]
    #[pyo3(signature = (relay_url, *, auth_token=None, gzip=false, retry_attempts=None, request_timeout=None))]
    fn new(
        relay_url: &str,
        auth_token: Option<Bound<'_, PyAny>>,
        gzip: bool,
        retry_attempts: Option<Bound<'_, PyAny>>,
        request_timeout: Option<Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let token = str_option("auth_token", auth_token.as_ref())?;
        let attempts = int_option(
            "retry_attempts",
            retry_attempts.as_ref(),
            3,
            1,
            options::MAX_RETRY_ATTEMPTS as usize,
        )? as u32;
        let timeout = seconds_option(
            "request_timeout",
            request_timeout.as_ref(),
            Duration::from_secs(5),
            true,
        )?;
        let config = RelayConfig {
            base: relay_url.trim_end_matches('/').to_owned(),
            token,
            gzip,
            attempts,
            timeout,
        };
        let current = PerProcess::new(config.build()?);
        Ok(RelayEventDispatcher { config, current })
    }

    /// Sends `log_event` (the SDK's LogEvent); returns once the relay stored it.
    fn dispatch_event(&self, py: Python<'_>, log_event: &Bound<'_, PyAny>) -> PyResult<()> {
        let event = self::log_event(py, log_event)?;
        let targets = match self.current.get() {
            Some(t) => t,
            // A forked child: clients of its own.
            None => self.current.install(self.config.build()?),
        };
        let d = if crate::dispatch::RelayRoutes::is_eu(&event.url) {
            &targets.eu
        } else {
            &targets.us
        };
        send(py, d, event)
    }
}

/// Appends each LogEvent to a spool, durable before `dispatch_event` returns.
struct SpoolTarget {
    dispatcher: Box<dyn EventDispatcher>,
    forwarder: Mutex<Option<InProcessForwarder>>,
}

impl SpoolTarget {
    fn open(
        setting: &SpoolSetting,
        endpoint: Option<&str>,
        logger: Option<Py<PyAny>>,
        attempts: u32,
    ) -> Result<Self, spool::SpoolSetupError> {
        let (dispatcher, forwarder) = spool::open(
            setting,
            endpoint,
            None,
            logger,
            Duration::from_secs(10),
            attempts,
        )?;
        Ok(SpoolTarget {
            dispatcher,
            forwarder: Mutex::new(forwarder),
        })
    }

    fn close(&self, py: Python<'_>, timeout: Duration) {
        let f = self
            .forwarder
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(f) = f {
            py.detach(|| f.stop(Instant::now() + timeout));
        }
    }
}

/// Appends each LogEvent to the SQLite spool in `path` and forwards it from there on a
/// thread of its own (merging, retries, isolation, dead letters), to `endpoint` or the
/// Event API. `close()` forwards what it can within `timeout` seconds; the rest stays in
/// the spool for the next start (or `tributary drain PATH`).
#[pyclass(module = "tributary_events._native", frozen)]
pub(crate) struct SpoolEventDispatcher {
    target: PerProcess<SpoolTarget>,
    created_pid: u32,
}

#[pymethods]
impl SpoolEventDispatcher {
    #[new]
    #[pyo3(signature = (path, *, endpoint=None, retry_attempts=None))]
    fn new(
        py: Python<'_>,
        path: &str,
        endpoint: Option<Bound<'_, PyAny>>,
        retry_attempts: Option<Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let endpoint = str_option("endpoint", endpoint.as_ref())?;
        let attempts = int_option(
            "retry_attempts",
            retry_attempts.as_ref(),
            5,
            1,
            options::MAX_RETRY_ATTEMPTS as usize,
        )? as u32;
        let setting = match SpoolSetting::parse(path) {
            Ok(s @ SpoolSetting::Sqlite(_)) => s,
            _ => {
                return Err(PyValueError::new_err(format!(
                    "path={path:?}: expected a directory path"
                )));
            }
        };
        Ok(SpoolEventDispatcher {
            target: PerProcess::new(
                SpoolTarget::open(
                    &setting,
                    endpoint.as_deref(),
                    // The forwarder's warnings: to `tributary_events`, as the processor's.
                    Some(
                        py.import("tributary_events._sdk")?
                            .call_method0("default_logger")?
                            .unbind(),
                    ),
                    attempts,
                )
                .map_err(|e| PyValueError::new_err(e.to_string()))?,
            ),
            created_pid: std::process::id(),
        })
    }

    /// Appends `log_event` to the spool; returns once it is durable. In a process forked
    /// after the dispatcher was made, raises `RuntimeError` (see docs/python.md).
    fn dispatch_event(&self, py: Python<'_>, log_event: &Bound<'_, PyAny>) -> PyResult<()> {
        let Some(target) = self.target.get() else {
            // Reopening the SQLite spool in the child would share the parent's in-process
            // SQLite state (locks, WAL index): refused.
            return Err(PyRuntimeError::new_err(format!(
                "this SpoolEventDispatcher was created in process {} before fork(): a SQLite \
                 spool cannot be used across fork; create it after the fork (gunicorn post_fork \
                 or no --preload, uWSGI --lazy-apps or @postfork)",
                self.created_pid
            )));
        };
        let event = self::log_event(py, log_event)?;
        send(py, &*target.dispatcher, event)
    }

    /// Stops the forwarder after forwarding what it can within `timeout` seconds (0 to
    /// 86400). A no-op in a forked child: the forwarder is the parent's.
    #[pyo3(signature = (timeout=5.0))]
    fn close(&self, py: Python<'_>, timeout: f64) -> PyResult<()> {
        if !(0.0..=options::MAX_INTERVAL_S).contains(&timeout) {
            return Err(PyValueError::new_err(format!(
                "timeout must be a number of seconds from 0 to 86400, got {timeout}"
            )));
        }
        if let Some(target) = self.target.get() {
            target.close(py, Duration::from_secs_f64(timeout));
        }
        Ok(())
    }
}

/// The SQS bulk dispatcher: writes each LogEvent to the SQS queue `queue` (a name or URL)
/// with one persistent client, `SendMessageBatch` and retries, for `tributary drain`
/// elsewhere. AWS settings come from the environment (`AWS_REGION`, credentials chain,
/// `AWS_ENDPOINT_URL`).
#[pyclass(module = "tributary_events._native", frozen)]
pub(crate) struct SqsEventDispatcher {
    queue: String,
    attempts: u32,
    target: PerProcess<SpoolTarget>,
}

impl SqsEventDispatcher {
    fn open(py: Python<'_>, queue: &str, attempts: u32) -> PyResult<SpoolTarget> {
        let setting = SpoolSetting::Sqs(queue.to_owned());
        // Opening the client may call AWS: without the GIL.
        py.detach(|| SpoolTarget::open(&setting, None, None, attempts).map_err(|e| e.to_string()))
            .map_err(PyValueError::new_err)
    }
}

#[pymethods]
impl SqsEventDispatcher {
    #[new]
    #[pyo3(signature = (queue, *, retry_attempts=None))]
    fn new(
        py: Python<'_>,
        queue: &str,
        retry_attempts: Option<Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let attempts = int_option(
            "retry_attempts",
            retry_attempts.as_ref(),
            5,
            1,
            options::MAX_RETRY_ATTEMPTS as usize,
        )? as u32;
        let queue = queue.strip_prefix("sqs://").unwrap_or(queue);
        if queue.is_empty() {
            return Err(PyValueError::new_err(
                "queue must name an SQS queue (a name or a URL)",
            ));
        }
        Ok(SqsEventDispatcher {
            queue: queue.to_owned(),
            attempts,
            target: PerProcess::new(Self::open(py, queue, attempts)?),
        })
    }

    /// Writes `log_event` to the queue; returns once SQS has it.
    fn dispatch_event(&self, py: Python<'_>, log_event: &Bound<'_, PyAny>) -> PyResult<()> {
        let target = match self.target.get() {
            Some(t) => t,
            // A forked child: a client of its own.
            None => self
                .target
                .install(Self::open(py, &self.queue, self.attempts)?),
        };
        let event = self::log_event(py, log_event)?;
        send(py, &*target.dispatcher, event)
    }
}
