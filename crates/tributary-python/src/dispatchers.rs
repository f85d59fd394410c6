//! `dispatch_event(log_event)` objects for users who keep the SDK's own processor:
//! [`RelayEventDispatcher`], [`SpoolEventDispatcher`], [`SqsEventDispatcher`]. Each sends
//! the SDK's LogEvent through a Rust dispatcher with the GIL released.

use std::sync::Mutex;
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
    us: HttpDispatcher,
    eu: HttpDispatcher,
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
        let base = relay_url.trim_end_matches('/');
        Ok(RelayEventDispatcher {
            us: http(
                &format!("{base}/v1/events"),
                token.as_deref(),
                gzip,
                attempts,
                timeout,
            )?,
            eu: http(
                &format!("{base}/eu/v1/events"),
                token.as_deref(),
                gzip,
                attempts,
                timeout,
            )?,
        })
    }

    /// Sends `log_event` (the SDK's LogEvent); returns once the relay stored it.
    fn dispatch_event(&self, py: Python<'_>, log_event: &Bound<'_, PyAny>) -> PyResult<()> {
        let event = self::log_event(py, log_event)?;
        let d = if event.url.contains("://eu.") {
            &self.eu
        } else {
            &self.us
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
    fn open(setting: &SpoolSetting, endpoint: Option<&str>, attempts: u32) -> PyResult<Self> {
        let (dispatcher, forwarder) =
            spool::open(setting, endpoint, Duration::from_secs(10), attempts)
                .map_err(|e| PyValueError::new_err(e.to_string()))?;
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
    target: SpoolTarget,
}

#[pymethods]
impl SpoolEventDispatcher {
    #[new]
    #[pyo3(signature = (path, *, endpoint=None, retry_attempts=None))]
    fn new(
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
            target: SpoolTarget::open(&setting, endpoint.as_deref(), attempts)?,
        })
    }

    /// Appends `log_event` to the spool; returns once it is durable.
    fn dispatch_event(&self, py: Python<'_>, log_event: &Bound<'_, PyAny>) -> PyResult<()> {
        let event = self::log_event(py, log_event)?;
        send(py, &*self.target.dispatcher, event)
    }

    /// Stops the forwarder after forwarding what it can within `timeout` seconds.
    #[pyo3(signature = (timeout=5.0))]
    fn close(&self, py: Python<'_>, timeout: f64) {
        self.target
            .close(py, Duration::from_secs_f64(timeout.max(0.0)));
    }
}

/// The SQS bulk dispatcher: writes each LogEvent to the SQS queue `queue` (a name or URL)
/// with one persistent client, `SendMessageBatch` and retries, for `tributary drain`
/// elsewhere. AWS settings come from the environment (`AWS_REGION`, credentials chain,
/// `AWS_ENDPOINT_URL`).
#[pyclass(module = "tributary_events._native", frozen)]
pub(crate) struct SqsEventDispatcher {
    target: SpoolTarget,
}

#[pymethods]
impl SqsEventDispatcher {
    #[new]
    #[pyo3(signature = (queue, *, retry_attempts=None))]
    fn new(queue: &str, retry_attempts: Option<Bound<'_, PyAny>>) -> PyResult<Self> {
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
            target: SpoolTarget::open(&SpoolSetting::Sqs(queue.to_owned()), None, attempts)?,
        })
    }

    /// Writes `log_event` to the queue; returns once SQS has it.
    fn dispatch_event(&self, py: Python<'_>, log_event: &Bound<'_, PyAny>) -> PyResult<()> {
        let event = self::log_event(py, log_event)?;
        send(py, &*self.target.dispatcher, event)
    }
}
