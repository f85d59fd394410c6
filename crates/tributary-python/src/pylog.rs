//! Logging to the user's Python logger from Tributary's own threads (tracing has no
//! subscriber in a Python process), and the flag that stops those threads taking the GIL
//! once the interpreter exits: a thread that attaches during finalization is killed inside
//! CPython, which aborts the process.

use std::sync::atomic::{AtomicBool, Ordering};

use pyo3::prelude::*;

static EXITING: AtomicBool = AtomicBool::new(false);

/// Whether the interpreter is exiting (set by the package's `atexit` hook, after every
/// processor was stopped).
pub(crate) fn interpreter_exiting() -> bool {
    EXITING.load(Ordering::Acquire)
}

/// Called by `tributary_events._sdk` at exit: from now on no Tributary thread takes the GIL.
#[pyfunction]
pub(crate) fn _interpreter_exiting() {
    EXITING.store(true, Ordering::Release);
}

/// `logger.<level>(message)` from a thread that does not hold the GIL. At exit it goes to
/// tracing instead. A logger that raises is ignored: logging must not end the thread.
pub(crate) fn log(logger: &Py<PyAny>, level: &str, message: &str) {
    if interpreter_exiting() {
        tracing::warn!("{message}");
        return;
    }
    Python::attach(|py| {
        let _ = logger.bind(py).call_method1(level, (message,));
    });
}
