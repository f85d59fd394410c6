//! [`RuntimeBridge`]: synchronous code calling async code on a private runtime.
//!
//! An [`EventDispatcher`](crate::EventDispatcher) is called from the processor's own thread
//! and must block until its request is settled, while HTTP clients and spools are async. A
//! bridge owns one thread running a single-threaded tokio runtime; [`RuntimeBridge::call`]
//! hands it a future and blocks the calling thread for the result. So a sync dispatcher
//! never needs, and never blocks, the caller's runtime: it can be built, used and dropped
//! inside an async runtime or outside one.
//!
//! ```
//! use tributary::bridge::RuntimeBridge;
//!
//! let bridge = RuntimeBridge::builder("example-bridge").build()?;
//! let answer = bridge.call(|| async {
//!     tokio::time::sleep(std::time::Duration::from_millis(1)).await;
//!     6 * 7
//! })?;
//! assert_eq!(answer, 42);
//!
//! // Background work on the same runtime; dropping the bridge cancels it.
//! let (tx, rx) = std::sync::mpsc::channel();
//! bridge.handle().spawn(async move { tx.send("ran").ok() });
//! assert_eq!(rx.recv().ok(), Some("ran"));
//! # Ok::<(), tributary::bridge::BridgeError>(())
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::thread::{JoinHandle, ThreadId};
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use tokio::runtime::Handle;
use tokio::sync::Notify;

use crate::dispatcher::DispatchError;

/// Why a [`RuntimeBridge`] could not be started or could not run a call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BridgeError {
    /// The operating system would not start the thread, or the runtime could not be built.
    #[error("cannot start the {thread} thread: {reason}")]
    Start {
        /// The bridge's thread name.
        thread: String,
        /// What failed.
        reason: String,
    },
    /// The bridge's runtime has stopped, or stopped before the call finished.
    #[error("the {thread} thread has stopped")]
    Stopped {
        /// The bridge's thread name.
        thread: String,
    },
    /// The call's future (or the closure making it) panicked; the bridge keeps working.
    #[error("a call on the {thread} thread panicked")]
    Panicked {
        /// The bridge's thread name.
        thread: String,
    },
    /// [`RuntimeBridge::call`] was made from the bridge's own thread (from a task spawned on
    /// its runtime): blocking that thread would wait for itself forever.
    #[error("a call on the {thread} thread was made from that thread")]
    WouldDeadlock {
        /// The bridge's thread name.
        thread: String,
    },
}

impl From<BridgeError> for DispatchError {
    fn from(e: BridgeError) -> Self {
        DispatchError::Unavailable(e.to_string())
    }
}

/// A unit of work for the bridge's thread: makes and runs one call's future there, so the
/// future itself need not be `Send`.
type Job = Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = ()>>> + Send>;

/// A thread running a single-threaded tokio runtime, and a bounded queue of calls into it.
/// See the [module docs](self).
///
/// Calls run concurrently with each other on the bridge's runtime; in-flight calls are
/// bounded by the number of blocked callers, and calls waiting to start by
/// [`RuntimeBridgeBuilder::queue_capacity`] (a caller past it blocks until there is room).
/// Dropping the bridge cancels what still runs on it (calls cannot be in flight then: they
/// borrow it) and joins its thread, waiting at most
/// [`RuntimeBridgeBuilder::shutdown_timeout`] before leaving it to finish alone.
pub struct RuntimeBridge {
    name: String,
    /// `None` once dropping: the worker ends when it sees the queue disconnected.
    jobs: Option<Sender<Job>>,
    /// Wakes the worker when a job is queued (the queue itself is a blocking channel, so
    /// that sending never needs a runtime).
    wake: Arc<Notify>,
    handle: Handle,
    thread_id: ThreadId,
    worker: Option<JoinHandle<()>>,
    /// Disconnected when the worker is about to exit.
    exited: Receiver<()>,
    shutdown_timeout: Duration,
}

impl std::fmt::Debug for RuntimeBridge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuntimeBridge")
            .field("name", &self.name)
            .field("queued", &self.jobs.as_ref().map(Sender::len))
            .finish_non_exhaustive()
    }
}

/// Builds a [`RuntimeBridge`].
#[derive(Debug, Clone)]
pub struct RuntimeBridgeBuilder {
    name: String,
    queue_capacity: usize,
    shutdown_timeout: Duration,
}

impl RuntimeBridgeBuilder {
    /// Calls that may wait for the bridge's thread to pick them up (default 1024, at least
    /// 1). The thread starts each call as soon as it sees it, so this only fills while the
    /// thread is busy.
    pub fn queue_capacity(mut self, n: usize) -> Self {
        self.queue_capacity = n.max(1);
        self
    }

    /// How long dropping the bridge waits for its thread to stop (default 5 s). Work still
    /// running is cancelled at its next `.await`; blocking work (`spawn_blocking`) that
    /// outlasts this is left to finish on its own and the thread is not joined.
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = timeout;
        self
    }

    /// Starts the thread and its runtime.
    pub fn build(self) -> Result<RuntimeBridge, BridgeError> {
        let name = self.name;
        let start_error = |reason: String| BridgeError::Start {
            thread: name.clone(),
            reason,
        };
        let (jobs, queue) = crossbeam_channel::bounded::<Job>(self.queue_capacity);
        let (ready_tx, ready_rx) = crossbeam_channel::bounded::<Result<Handle, String>>(1);
        let (exited_tx, exited) = crossbeam_channel::bounded::<()>(0);
        let wake = Arc::new(Notify::new());
        let worker_wake = wake.clone();
        let grace = self.shutdown_timeout;
        let worker = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                // Dropped last, even when unwinding: tells `Drop` the thread is done.
                let _exited = exited_tx;
                // Built and dropped on this thread, never inside the caller's runtime.
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                if ready_tx.send(Ok(runtime.handle().clone())).is_err() {
                    return;
                }
                let local = tokio::task::LocalSet::new();
                local.block_on(&runtime, serve(queue, worker_wake));
                {
                    // Cancels the calls' tasks, inside the runtime their drops may need.
                    let _enter = runtime.enter();
                    drop(local);
                }
                runtime.shutdown_timeout(grace);
            })
            .map_err(|e| start_error(e.to_string()))?;
        let handle = match ready_rx.recv() {
            Ok(Ok(handle)) => handle,
            Ok(Err(reason)) => {
                let _ = worker.join();
                return Err(start_error(reason));
            }
            Err(_) => {
                let _ = worker.join();
                return Err(start_error("the thread exited early".into()));
            }
        };
        Ok(RuntimeBridge {
            thread_id: worker.thread().id(),
            name,
            jobs: Some(jobs),
            wake,
            handle,
            worker: Some(worker),
            exited,
            shutdown_timeout: grace,
        })
    }
}

/// The worker loop: starts each queued job as a task of its own, so concurrent callers do
/// not wait for each other, until the queue is disconnected.
async fn serve(queue: Receiver<Job>, wake: Arc<Notify>) {
    loop {
        match queue.try_recv() {
            Ok(job) => {
                tokio::task::spawn_local(job());
            }
            // `Notify` keeps one wake-up for a send that lands between the empty queue and
            // this await, so none is lost.
            Err(TryRecvError::Empty) => wake.notified().await,
            Err(TryRecvError::Disconnected) => break,
        }
    }
}

impl RuntimeBridge {
    /// A builder for a bridge whose thread is called `name` (shown in thread listings,
    /// panics and errors).
    pub fn builder(name: impl Into<String>) -> RuntimeBridgeBuilder {
        RuntimeBridgeBuilder {
            name: name.into(),
            queue_capacity: 1024,
            shutdown_timeout: Duration::from_secs(5),
        }
    }

    /// The bridge's thread name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs the future `make` returns on the bridge's runtime and blocks until it is done.
    ///
    /// `make` is sent to the bridge's thread and called there, so the future it returns
    /// need not be `Send` (it may hold a client that must stay on one runtime). A panic in
    /// `make` or the future is [`BridgeError::Panicked`] and does not stop the bridge.
    /// Safe to call from inside another async runtime (it blocks that thread, like any
    /// blocking call), but not from the bridge's own thread ([`BridgeError::WouldDeadlock`]).
    pub fn call<F, Fut, T>(&self, make: F) -> Result<T, BridgeError>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T> + 'static,
        T: Send + 'static,
    {
        if std::thread::current().id() == self.thread_id {
            return Err(BridgeError::WouldDeadlock {
                thread: self.name.clone(),
            });
        }
        let stopped = || BridgeError::Stopped {
            thread: self.name.clone(),
        };
        let jobs = self.jobs.as_ref().ok_or_else(stopped)?;
        let (reply, settled) = crossbeam_channel::bounded::<Result<T, Fault>>(1);
        let job: Job = Box::new(move || {
            Box::pin(async move {
                // A task of its own, so a panic is caught by the runtime and reported here.
                let result = match tokio::task::spawn_local(async move { make().await }).await {
                    Ok(value) => Ok(value),
                    Err(e) if e.is_panic() => Err(Fault::Panicked),
                    Err(_) => Err(Fault::Stopped),
                };
                // The caller waits for this; if it is gone there is no one to tell.
                let _ = reply.send(result);
            })
        });
        jobs.send(job).map_err(|_| stopped())?;
        self.wake.notify_one();
        match settled.recv() {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(Fault::Panicked)) => Err(BridgeError::Panicked {
                thread: self.name.clone(),
            }),
            // The runtime dropped the call: it is shutting down.
            Ok(Err(Fault::Stopped)) | Err(_) => Err(stopped()),
        }
    }

    /// The bridge's runtime, for background tasks (`handle().spawn(...)`). They run while
    /// the bridge lives and are cancelled when it is dropped.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }
}

/// Why a call ended without a value, as seen on the bridge's thread.
enum Fault {
    Panicked,
    Stopped,
}

impl Drop for RuntimeBridge {
    fn drop(&mut self) {
        // Disconnecting the queue ends the worker loop; no call can be in flight here (it
        // borrows self).
        self.jobs.take();
        self.wake.notify_one();
        let Some(worker) = self.worker.take() else {
            return;
        };
        if worker.thread().id() == std::thread::current().id() {
            // Dropped by a task on its own runtime: joining would wait for itself.
            return;
        }
        // A little over the runtime's own grace, so a clean shutdown is always joined.
        let wait = self.shutdown_timeout + Duration::from_millis(500);
        match self.exited.recv_timeout(wait) {
            Err(RecvTimeoutError::Timeout) => {
                tracing::warn!(thread = %self.name, "bridge thread still busy at shutdown; not joined");
            }
            Ok(()) | Err(RecvTimeoutError::Disconnected) => {
                if worker.join().is_err() {
                    tracing::error!(thread = %self.name, "bridge thread panicked");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Instant;

    use super::*;

    fn bridge() -> RuntimeBridge {
        RuntimeBridge::builder("tributary-test-bridge")
            .build()
            .unwrap()
    }

    #[test]
    fn calls_return_their_value() {
        let b = bridge();
        assert_eq!(b.call(|| async { 1 + 1 }).unwrap(), 2);
        // A future that is not Send runs fine: it never leaves the bridge's thread.
        let v = b
            .call(|| async {
                let rc = std::rc::Rc::new(7);
                tokio::task::yield_now().await;
                *rc
            })
            .unwrap();
        assert_eq!(v, 7);
    }

    #[test]
    fn concurrent_calls_overlap() {
        let b = Arc::new(bridge());
        let start = Instant::now();
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let b = b.clone();
                std::thread::spawn(move || {
                    b.call(|| tokio::time::sleep(Duration::from_millis(200)))
                        .unwrap()
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(
            start.elapsed() < Duration::from_millis(1200),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn a_panicking_call_is_an_error_and_the_bridge_goes_on() {
        let b = bridge();
        let result: Result<(), _> = b.call(|| async { panic!("boom") });
        let e = result.unwrap_err();
        assert!(matches!(e, BridgeError::Panicked { .. }), "{e}");
        let e = b
            .call(|| -> std::future::Ready<()> { panic!("in make") })
            .unwrap_err();
        assert!(matches!(e, BridgeError::Panicked { .. }), "{e}");
        assert_eq!(b.call(|| async { 3 }).unwrap(), 3);
    }

    #[test]
    fn a_call_from_the_bridge_thread_is_refused() {
        let b = Arc::new(bridge());
        let inner = b.clone();
        let (tx, rx) = crossbeam_channel::bounded(1);
        b.handle().spawn(async move {
            let _ = tx.send(inner.call(|| async { 1 }));
            // `inner` may be the last reference: its drop must not join its own thread.
            drop(inner);
        });
        let e = rx.recv().unwrap().unwrap_err();
        assert!(matches!(e, BridgeError::WouldDeadlock { .. }), "{e}");
    }

    #[test]
    fn drop_cancels_background_work_and_joins() {
        let b = bridge();
        let finished = Arc::new(AtomicUsize::new(0));
        let f = finished.clone();
        b.handle().spawn(async move {
            tokio::time::sleep(Duration::from_secs(60)).await;
            f.fetch_add(1, Ordering::SeqCst);
        });
        let start = Instant::now();
        drop(b);
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
        assert_eq!(finished.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn drop_waits_a_bounded_time_for_blocking_work() {
        let b = RuntimeBridge::builder("tributary-test-bridge")
            .shutdown_timeout(Duration::from_millis(100))
            .build()
            .unwrap();
        b.handle()
            .spawn_blocking(|| std::thread::sleep(Duration::from_secs(3)));
        let start = Instant::now();
        drop(b);
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn a_full_queue_makes_callers_wait_not_fail() {
        let b = Arc::new(
            RuntimeBridge::builder("tributary-test-bridge")
                .queue_capacity(1)
                .build()
                .unwrap(),
        );
        let threads: Vec<_> = (0..16)
            .map(|i| {
                let b = b.clone();
                std::thread::spawn(move || b.call(move || async move { i }).unwrap())
            })
            .collect();
        let sum: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(sum, (0..16usize).sum::<usize>());
    }

    #[test]
    fn errors_become_unavailable_dispatch_errors() {
        let e = DispatchError::from(BridgeError::Stopped { thread: "x".into() });
        assert!(matches!(e, DispatchError::Unavailable(_)));
        assert!(!e.is_retryable());
    }
}
