//! [`SdkDispatcher`]: what the processor's dispatch workers call for each request. It sends
//! LOG_EVENT through the SDK's `NotificationCenter` (as the SDK's processor does, before
//! dispatching), then hands the request to the user's `event_dispatcher` or to a Rust
//! dispatcher (HTTP or spool) with the GIL released.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use pyo3::prelude::*;
use pyo3::types::PyBytes;
use tributary::dispatcher::DispatchDeadline;
use tributary::{DispatchError, EventDispatcher, LogEvent};

use crate::convert::Sdk;

/// Counters of what happened on the Python side of dispatch.
#[derive(Debug, Default)]
pub(crate) struct DispatchCounters {
    /// Exceptions raised by the user's `dispatch_event`.
    pub(crate) dispatcher_errors: AtomicU64,
    /// Exceptions raised by LOG_EVENT listeners (logged; the request is still sent).
    pub(crate) notification_errors: AtomicU64,
}

/// Where requests go.
pub(crate) enum Target {
    /// The user's object with `dispatch_event(log_event)`.
    Python(Py<PyAny>),
    /// Tributary's own dispatcher (HTTP, or a spool).
    Rust(Box<dyn EventDispatcher>),
}

/// Sends each request to a relay's route for its region, as the Event API URL the SDK
/// would use says (`/v1/events`, or `/eu/v1/events` for `https://eu.logx...`).
pub(crate) struct RelayRoutes {
    pub(crate) us: Box<dyn EventDispatcher>,
    pub(crate) eu: Box<dyn EventDispatcher>,
}

impl RelayRoutes {
    pub(crate) fn is_eu(event_url: &str) -> bool {
        event_url.contains("://eu.")
    }

    fn route(&self, log_event: &LogEvent) -> &dyn EventDispatcher {
        if Self::is_eu(&log_event.url) {
            &*self.eu
        } else {
            &*self.us
        }
    }
}

impl EventDispatcher for RelayRoutes {
    fn dispatch(&self, log_event: &LogEvent) -> Result<(), DispatchError> {
        self.route(log_event).dispatch(log_event)
    }

    fn dispatch_with_deadline(
        &self,
        log_event: &LogEvent,
        deadline: &DispatchDeadline,
    ) -> Result<(), DispatchError> {
        self.route(log_event)
            .dispatch_with_deadline(log_event, deadline)
    }
}

pub(crate) struct SdkDispatcher {
    pub(crate) target: Target,
    pub(crate) notification_center: Option<Py<PyAny>>,
    pub(crate) sdk: Arc<Sdk>,
    pub(crate) logger: Py<PyAny>,
    pub(crate) counters: Arc<DispatchCounters>,
}

impl SdkDispatcher {
    /// LOG_EVENT, then the Python dispatcher if that is the target. `Ok(true)`: done;
    /// `Ok(false)`: the Rust target still has to send.
    fn python_side(&self, py: Python<'_>, log_event: &LogEvent) -> Result<bool, DispatchError> {
        let make = || {
            self.sdk
                .make_log_event
                .bind(py)
                .call1((log_event.url.as_str(), PyBytes::new(py, log_event.body())))
        };
        let py_event = match make() {
            Ok(e) => e,
            Err(e) => {
                return Err(DispatchError::Unavailable(format!(
                    "could not build the SDK's LogEvent: {e}"
                )));
            }
        };
        if let Some(center) = &self.notification_center {
            let sent = center.bind(py).call_method1(
                "send_notifications",
                (self.sdk.log_event_type.bind(py), &py_event),
            );
            if let Err(e) = sent {
                self.counters
                    .notification_errors
                    .fetch_add(1, Ordering::Relaxed);
                self.log(py, "error", &format!("LOG_EVENT listener raised: {e}"));
            }
        }
        match &self.target {
            Target::Python(d) => match d.bind(py).call_method1("dispatch_event", (&py_event,)) {
                Ok(_) => Ok(true),
                Err(e) => {
                    self.counters
                        .dispatcher_errors
                        .fetch_add(1, Ordering::Relaxed);
                    // The SDK's own wording, so existing log alerts keep matching.
                    self.log(
                        py,
                        "error",
                        &format!(
                            "Error dispatching event: {log_event_url} {e}",
                            log_event_url = log_event.url
                        ),
                    );
                    // Not retried: the SDK does not retry a dispatcher that raised either.
                    Err(DispatchError::Permanent {
                        status: 0,
                        message: format!("event_dispatcher raised: {e}"),
                    })
                }
            },
            Target::Rust(_) => Ok(false),
        }
    }

    fn log(&self, py: Python<'_>, level: &str, message: &str) {
        // A logger that raises must not take the dispatch worker with it.
        let _ = self.logger.bind(py).call_method1(level, (message,));
    }
}

impl EventDispatcher for SdkDispatcher {
    fn dispatch(&self, log_event: &LogEvent) -> Result<(), DispatchError> {
        self.dispatch_with_deadline(log_event, &DispatchDeadline::none())
    }

    fn dispatch_with_deadline(
        &self,
        log_event: &LogEvent,
        deadline: &DispatchDeadline,
    ) -> Result<(), DispatchError> {
        let python_needed =
            self.notification_center.is_some() || matches!(self.target, Target::Python(_));
        if python_needed && crate::pylog::interpreter_exiting() {
            return Err(DispatchError::Unavailable(
                "the Python interpreter is exiting".into(),
            ));
        }
        if python_needed && Python::attach(|py| self.python_side(py, log_event))? {
            return Ok(());
        }
        match &self.target {
            // The GIL is not held here: Rust sends while Python runs.
            Target::Rust(inner) => {
                let sent = inner.dispatch_with_deadline(log_event, deadline);
                if let Err(e) = &sent {
                    // After the dispatcher's own retries: final. tracing has no subscriber
                    // in a Python process, so the user's logger says it.
                    crate::pylog::log(
                        &self.logger,
                        "error",
                        &format!("Error dispatching event: {} {e}", log_event.url),
                    );
                }
                sent
            }
            Target::Python(_) => Ok(()),
        }
    }
}
