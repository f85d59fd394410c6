//! `tributary_events._native`: Tributary's [`BatchEventProcessor`](tributary::BatchEventProcessor)
//! as a drop-in for the Optimizely Python SDK's `BatchEventProcessor`.
//!
//! Built into the `tributary-events` wheel by maturin (`pip install ./crates/tributary-python`);
//! the pure-Python half is `python/tributary_events/`. See `docs/python.md`.
//!
//! ```text
//! process(user_event) -> bounded queue of Python objects (caller's thread: a type check and a push)
//!   -> converter thread (takes the GIL per run of events): SDK objects -> tributary::UserEvent
//!   -> tributary::BatchEventProcessor -> SdkDispatcher (LOG_EVENT, then the Python
//!      dispatcher, Tributary's HTTP dispatcher, or a spool)
//! ```

mod convert;
mod dispatch;
mod dispatchers;
mod options;
mod processor;
mod pylog;
mod spool;

use pyo3::prelude::*;

/// The Python module `tributary_events._native`.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(pylog::_interpreter_exiting, m)?)?;
    m.add_class::<processor::BatchEventProcessor>()?;
    m.add_class::<dispatchers::RelayEventDispatcher>()?;
    m.add_class::<dispatchers::SpoolEventDispatcher>()?;
    m.add_class::<dispatchers::SqsEventDispatcher>()?;
    Ok(())
}
