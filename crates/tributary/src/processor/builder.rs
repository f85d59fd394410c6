//! [`BatchEventProcessorBuilder`]: settings with the seeds' defaults, checked at build time.

use std::sync::Arc;
use std::time::Duration;

use crate::dispatcher::EventDispatcher;
use crate::notification::NotificationCenter;
use crate::raw::MAX_PAYLOAD_BYTES;

use super::batch::BatchEventProcessor;

/// Names of the environment variables [`BatchEventProcessorBuilder::with_env`] reads.
///
/// Each setting has the Java/Android SDK property name (with dots, read through
/// `std::env::var`, which accepts it even though most shells cannot set it) and a
/// shell-friendly name. When both are set, the dotted name wins. Durations are integer
/// **milliseconds**, as in the Java SDK.
pub mod env {
    /// Events per batch (dotted name, as the Java SDK reads it).
    pub const BATCH_SIZE: &str = "event.processor.batch.size";
    /// Events per batch (shell-friendly name).
    pub const BATCH_SIZE_ENV: &str = "EVENT_PROCESSOR_BATCH_SIZE";
    /// Flush interval in milliseconds (dotted name).
    pub const BATCH_INTERVAL: &str = "event.processor.batch.interval";
    /// Flush interval in milliseconds (shell-friendly name).
    pub const BATCH_INTERVAL_ENV: &str = "EVENT_PROCESSOR_BATCH_INTERVAL";
    /// Close timeout in milliseconds (dotted name).
    pub const CLOSE_TIMEOUT: &str = "event.processor.close.timeout";
    /// Close timeout in milliseconds (shell-friendly name).
    pub const CLOSE_TIMEOUT_ENV: &str = "EVENT_PROCESSOR_CLOSE_TIMEOUT";
}

/// Why [`BatchEventProcessorBuilder::build`] refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// No dispatcher was given and the default HTTP dispatcher could not be made.
    #[error("no event dispatcher given, and the default HTTP dispatcher failed: {0}")]
    MissingDispatcher(String),
    /// A setting is out of range.
    #[error("invalid {setting}: {reason}")]
    Invalid {
        /// The builder method's name.
        setting: &'static str,
        /// What is allowed.
        reason: &'static str,
    },
    /// An environment variable does not hold a positive integer.
    #[error("environment variable {name}={value:?}: expected a positive integer{unit}")]
    InvalidEnv {
        /// The variable read.
        name: &'static str,
        /// What it held.
        value: String,
        /// `" (milliseconds)"` for durations.
        unit: &'static str,
    },
    /// The operating system would not start a worker thread.
    #[error("could not start the {thread} thread: {source}")]
    Spawn {
        /// Which thread.
        thread: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Settings for a [`BatchEventProcessor`]. Defaults follow the Optimizely SDKs, except the
/// two that concern latency (`queue_capacity`, `dispatch_concurrency`; see below).
///
/// | setting | default | meaning |
/// |---|---|---|
/// | [`batch_size`](Self::batch_size) | 10 | events per request at most; reaching it flushes |
/// | [`flush_interval`](Self::flush_interval) | 30 s | the oldest batched event waits at most this long |
/// | [`queue_capacity`](Self::queue_capacity) | 10,000 | events queued between `process()` and the batcher (the SDKs: 1,000) |
/// | [`dispatch_concurrency`](Self::dispatch_concurrency) | 32 | requests in flight at once, 1..=64 (the SDKs: 1) |
/// | [`close_timeout`](Self::close_timeout) | 5 s | bound on `close()` |
/// | [`max_batch_bytes`](Self::max_batch_bytes) | 3,500,000 | request body limit; larger batches are split |
/// | [`max_pending_batches`](Self::max_pending_batches) | 8 | batches waiting for a dispatch worker to serialise and send them |
/// | [`start_on_init`](Self::start_on_init) | true | start the threads in `build()` |
///
/// **Why these two differ from the SDKs.** With one request in flight, throughput is
/// `batch_size / round-trip`: 200 events/s against an upstream 50 ms away, so a burst of
/// 2,000 events overflowed a 1,000-event queue. With 32 requests in flight the processor
/// sends about `32 × 10 / 50 ms` = 6,400 events/s at 50 ms (plan on 3,000/s sustained), so
/// a burst of 10,000 events is delivered in about 2 s, within the 5 s close timeout; and a
/// 10,000-event queue takes such a burst whole, since a burst arrives faster than any
/// upstream drains it. The larger queue costs memory only while it is full (about 1 KB per
/// typical event, so about 10 MB at most).
///
/// Memory is bounded by `queue_capacity` events, plus `1 + max_pending_batches` batches of
/// at most `batch_size` events (the one being filled and those waiting for a worker), plus
/// `dispatch_concurrency` requests of at most `max_batch_bytes` each (one per worker
/// sending). When the dispatcher falls behind, the pending batches fill, then the queue, and
/// `process()` returns [`ProcessError::QueueFull`](super::ProcessError::QueueFull).
///
/// ```
/// use std::time::Duration;
/// use tributary::{BatchEventProcessor, BuildError, DispatchError, EventDispatcher, LogEvent};
///
/// struct Discard;
/// impl EventDispatcher for Discard {
///     fn dispatch(&self, _: &LogEvent) -> Result<(), DispatchError> { Ok(()) }
/// }
///
/// let processor = BatchEventProcessor::builder()
///     .dispatcher(Discard)
///     .batch_size(15)
///     .flush_interval(Duration::from_secs(50))
///     .build()?;
/// # Ok::<(), BuildError>(())
/// ```
pub struct BatchEventProcessorBuilder {
    pub(crate) dispatcher: Option<Box<dyn EventDispatcher>>,
    pub(crate) batch_size: usize,
    pub(crate) flush_interval: Duration,
    pub(crate) queue_capacity: usize,
    pub(crate) close_timeout: Duration,
    pub(crate) max_batch_bytes: usize,
    pub(crate) max_pending_batches: usize,
    pub(crate) dispatch_concurrency: usize,
    pub(crate) notification_center: Option<Arc<NotificationCenter>>,
    pub(crate) start_on_init: bool,
}

impl std::fmt::Debug for BatchEventProcessorBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchEventProcessorBuilder")
            .field("dispatcher", &self.dispatcher.is_some())
            .field("batch_size", &self.batch_size)
            .field("flush_interval", &self.flush_interval)
            .field("queue_capacity", &self.queue_capacity)
            .field("close_timeout", &self.close_timeout)
            .field("max_batch_bytes", &self.max_batch_bytes)
            .field("max_pending_batches", &self.max_pending_batches)
            .field("dispatch_concurrency", &self.dispatch_concurrency)
            .field("start_on_init", &self.start_on_init)
            .finish_non_exhaustive()
    }
}

impl Default for BatchEventProcessorBuilder {
    fn default() -> Self {
        BatchEventProcessorBuilder {
            dispatcher: None,
            batch_size: 10,
            flush_interval: Duration::from_secs(30),
            queue_capacity: DEFAULT_QUEUE_CAPACITY,
            close_timeout: Duration::from_secs(5),
            max_batch_bytes: MAX_PAYLOAD_BYTES,
            max_pending_batches: 8,
            dispatch_concurrency: DEFAULT_DISPATCH_CONCURRENCY,
            notification_center: None,
            start_on_init: true,
        }
    }
}

/// Default [`BatchEventProcessorBuilder::queue_capacity`]: a 10,000-event burst fits.
pub const DEFAULT_QUEUE_CAPACITY: usize = 10_000;
/// Default [`BatchEventProcessorBuilder::dispatch_concurrency`].
pub const DEFAULT_DISPATCH_CONCURRENCY: usize = 32;
/// Largest [`BatchEventProcessorBuilder::dispatch_concurrency`] accepted.
pub const MAX_DISPATCH_CONCURRENCY: usize = 64;

/// Smallest `max_batch_bytes` accepted: room for a header and one small visitor.
const MIN_BATCH_BYTES: usize = 1024;

impl BatchEventProcessorBuilder {
    /// Where requests go (default: an `HttpDispatcher` with its defaults, posting each
    /// request to the Event API endpoint of its region; without the `http` feature there is
    /// no default and `build` fails naming `dispatcher`). The dispatcher is called from the
    /// processor's dispatch workers, up to [`dispatch_concurrency`](Self::dispatch_concurrency)
    /// requests at once, and dropped on the last worker to exit (`close()` waits for that).
    pub fn dispatcher(mut self, dispatcher: impl EventDispatcher) -> Self {
        self.dispatcher = Some(Box::new(dispatcher));
        self
    }

    /// Events per request at most (default 10, at least 1).
    pub fn batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size;
        self
    }

    /// How long the oldest event of a batch may wait before the batch is sent (default 30 s,
    /// more than zero).
    pub fn flush_interval(mut self, interval: Duration) -> Self {
        self.flush_interval = interval;
        self
    }

    /// Events the queue between `process()` and the batcher holds (default 10,000, at least
    /// 1; the Optimizely SDKs use 1,000). Size it for the largest burst to take without
    /// refusals: bursts arrive faster than any upstream drains them.
    pub fn queue_capacity(mut self, capacity: usize) -> Self {
        self.queue_capacity = capacity;
        self
    }

    /// How long `close()` waits for everything to be dispatched (default 5 s). Zero means
    /// close does not wait: it reports what is still pending. A dispatcher that honours
    /// [`EventDispatcher::dispatch_with_deadline`] (the HTTP dispatcher does) cuts its
    /// retries to end a little before it (10 % of it, at most 250 ms), so what it could
    /// not deliver is reported failed with the reason instead of pending.
    pub fn close_timeout(mut self, timeout: Duration) -> Self {
        self.close_timeout = timeout;
        self
    }

    /// Request body limit in bytes (default 3,500,000, at least 1024). Batches that would be
    /// larger are split; one event larger on its own is counted as failed.
    pub fn max_batch_bytes(mut self, bytes: usize) -> Self {
        self.max_batch_bytes = bytes;
        self
    }

    /// Batches that may wait for a dispatch worker, which serialises and sends them
    /// (default 8, at least 1). This bounds the memory a slow dispatcher can hold; past it
    /// the batcher waits and the queue fills.
    pub fn max_pending_batches(mut self, n: usize) -> Self {
        self.max_pending_batches = n;
        self
    }

    /// Requests in flight at once (default 32, 1..=64): the number of dispatch worker
    /// threads, each calling the dispatcher and waiting for it. Throughput is about
    /// `dispatch_concurrency × batch_size / round-trip`; raise it for a distant upstream,
    /// lower it (to 1 for strictly one request at a time) for a dispatcher that must not be
    /// called concurrently.
    ///
    /// ```
    /// use tributary::{BatchEventProcessor, DispatchError, EventDispatcher, LogEvent};
    /// # struct Discard;
    /// # impl EventDispatcher for Discard {
    /// #     fn dispatch(&self, _: &LogEvent) -> Result<(), DispatchError> { Ok(()) }
    /// # }
    /// let processor = BatchEventProcessor::builder()
    ///     .dispatcher(Discard)
    ///     .dispatch_concurrency(4)
    ///     .build()?;
    /// # Ok::<(), tributary::BuildError>(())
    /// ```
    pub fn dispatch_concurrency(mut self, n: usize) -> Self {
        self.dispatch_concurrency = n;
        self
    }

    /// Listeners to tell about each request (`LOG_EVENT`) before it is dispatched: once per
    /// request, on the worker thread sending it (so possibly several at once).
    pub fn notification_center(mut self, center: Arc<NotificationCenter>) -> Self {
        self.notification_center = Some(center);
        self
    }

    /// Whether `build()` starts the worker threads (default true). When false, call
    /// [`BatchEventProcessor::start`]; until then `process()` queues events (up to
    /// `queue_capacity`) and nothing is sent.
    pub fn start_on_init(mut self, start: bool) -> Self {
        self.start_on_init = start;
        self
    }

    /// Reads batch size, flush interval and close timeout from the process environment
    /// (see [`env`](mod@env) for the names and units), overriding what was set before.
    pub fn with_env(self) -> Result<Self, BuildError> {
        self.with_env_lookup(|name| std::env::var(name).ok())
    }

    /// [`with_env`](Self::with_env) with another source of variables (a config map, a test).
    ///
    /// ```
    /// use std::time::Duration;
    /// use tributary::BatchEventProcessorBuilder;
    /// let b = BatchEventProcessorBuilder::default()
    ///     .with_env_lookup(|name| match name {
    ///         "EVENT_PROCESSOR_BATCH_SIZE" => Some("25".to_owned()),
    ///         "event.processor.batch.interval" => Some("1500".to_owned()),
    ///         _ => None,
    ///     })
    ///     .unwrap();
    /// # let _ = b;
    /// ```
    pub fn with_env_lookup(
        mut self,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, BuildError> {
        let read = |dotted: &'static str, plain: &'static str, unit: &'static str| {
            let (name, value) = match lookup(dotted) {
                Some(v) => (dotted, v),
                None => match lookup(plain) {
                    Some(v) => (plain, v),
                    None => return Ok(None),
                },
            };
            match value.trim().parse::<u64>() {
                Ok(n) if n > 0 => Ok(Some(n)),
                _ => Err(BuildError::InvalidEnv { name, value, unit }),
            }
        };
        if let Some(n) = read(env::BATCH_SIZE, env::BATCH_SIZE_ENV, "")? {
            self.batch_size = usize::try_from(n).unwrap_or(usize::MAX);
        }
        if let Some(ms) = read(
            env::BATCH_INTERVAL,
            env::BATCH_INTERVAL_ENV,
            " (milliseconds)",
        )? {
            self.flush_interval = Duration::from_millis(ms);
        }
        if let Some(ms) = read(
            env::CLOSE_TIMEOUT,
            env::CLOSE_TIMEOUT_ENV,
            " (milliseconds)",
        )? {
            self.close_timeout = Duration::from_millis(ms);
        }
        Ok(self)
    }

    pub(crate) fn validate(&self) -> Result<(), BuildError> {
        let invalid = |setting, reason| Err(BuildError::Invalid { setting, reason });
        if self.batch_size == 0 {
            return invalid("batch_size", "must be at least 1");
        }
        if self.flush_interval.is_zero() {
            return invalid("flush_interval", "must be more than zero");
        }
        if self.queue_capacity == 0 {
            return invalid("queue_capacity", "must be at least 1");
        }
        if self.max_batch_bytes < MIN_BATCH_BYTES {
            return invalid("max_batch_bytes", "must be at least 1024");
        }
        if self.max_pending_batches == 0 {
            return invalid("max_pending_batches", "must be at least 1");
        }
        if !(1..=MAX_DISPATCH_CONCURRENCY).contains(&self.dispatch_concurrency) {
            return invalid("dispatch_concurrency", "must be 1 to 64");
        }
        Ok(())
    }

    /// Checks the settings and makes the processor, started unless
    /// [`start_on_init(false)`](Self::start_on_init).
    pub fn build(mut self) -> Result<BatchEventProcessor, BuildError> {
        self.validate()?;
        if self.dispatcher.is_none() {
            self.dispatcher = Some(default_dispatcher()?);
        }
        BatchEventProcessor::from_builder(self)
    }
}

/// The SDKs' default: POST each request to its LogEvent URL.
#[cfg(feature = "http")]
fn default_dispatcher() -> Result<Box<dyn EventDispatcher>, BuildError> {
    let http = crate::dispatcher::http::HttpDispatcher::builder()
        .build()
        .map_err(|e| BuildError::MissingDispatcher(e.to_string()))?;
    Ok(Box::new(http))
}

/// Without the `http` feature there is no dispatcher to default to.
#[cfg(not(feature = "http"))]
fn default_dispatcher() -> Result<Box<dyn EventDispatcher>, BuildError> {
    Err(BuildError::Invalid {
        setting: "dispatcher",
        reason: "required: tributary was built without its `http` feature, so there is no default HTTP dispatcher",
    })
}

#[cfg(all(test, not(feature = "http")))]
mod tests {
    use super::*;

    #[test]
    fn without_http_a_dispatcher_is_required() {
        let Err(e) = BatchEventProcessorBuilder::default().build() else {
            panic!("built without a dispatcher");
        };
        assert!(
            matches!(
                e,
                BuildError::Invalid {
                    setting: "dispatcher",
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("dispatcher"), "{e}");
    }
}
