//! [`LambdaRuntimeApi`]: the AWS Lambda Runtime API (the interface a custom runtime's
//! `bootstrap` polls), served on `127.0.0.1` for tests, as documented at
//! <https://docs.aws.amazon.com/lambda/latest/dg/runtimes-api.html>:
//!
//! | request | what it does here |
//! |---|---|
//! | `GET /2018-06-01/runtime/invocation/next` | waits for the next [`LambdaRuntimeApi::invoke`], answers its event with `Lambda-Runtime-Aws-Request-Id`, `Lambda-Runtime-Deadline-Ms`, `Lambda-Runtime-Invoked-Function-Arn`, `Lambda-Runtime-Trace-Id` |
//! | `POST /2018-06-01/runtime/invocation/{id}/response` | records the function's result |
//! | `POST /2018-06-01/runtime/invocation/{id}/error` | records the function's error |
//! | `POST /2018-06-01/runtime/init/error` | records an initialisation error |
//!
//! Point the runtime at it with `AWS_LAMBDA_RUNTIME_API=<api.address()>` (plus the
//! `AWS_LAMBDA_FUNCTION_*` variables Lambda sets, from [`LambdaRuntimeApi::function_env`]).
//! Like [`crate::RecordingUpstream`] it runs on its own thread and runtime and stops on drop.
//!
//! ```
//! use std::time::Duration;
//! use tributary_testkit::LambdaRuntimeApi;
//! let api = LambdaRuntimeApi::start();
//! assert!(api.address().starts_with("127.0.0.1:"));
//! // No runtime is polling: the invocation times out unanswered.
//! let outcome = api.invoke(serde_json::json!({}), Duration::from_millis(50), Duration::from_millis(50));
//! assert!(outcome.is_none());
//! ```

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tokio::sync::{Notify, oneshot};

/// Function ARN sent with every invocation.
pub const FUNCTION_ARN: &str = "arn:aws:lambda:us-east-1:123456789012:function:tributary";

/// How one invocation ended.
#[derive(Debug, Clone)]
pub struct Invocation {
    /// The `Lambda-Runtime-Aws-Request-Id` it was sent with.
    pub request_id: String,
    /// The `Lambda-Runtime-Deadline-Ms` it was sent with (Unix milliseconds).
    pub deadline_ms: u64,
    /// When the runtime answered (Unix milliseconds).
    pub answered_at_ms: u64,
    /// The body posted to `/response`, when it succeeded.
    pub response: Option<serde_json::Value>,
    /// The body posted to `/error`, when it failed.
    pub error: Option<serde_json::Value>,
}

struct Pending {
    request_id: String,
    deadline_ms: u64,
    event: Bytes,
}

#[derive(Default)]
struct Shared {
    queue: Mutex<VecDeque<Pending>>,
    queued: Notify,
    deadlines: Mutex<HashMap<String, u64>>,
    done: Mutex<HashMap<String, Invocation>>,
    done_changed: Condvar,
    init_errors: Mutex<Vec<String>>,
    polls: std::sync::atomic::AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The Runtime API on a loopback port. See the [module docs](self).
pub struct LambdaRuntimeApi {
    addr: SocketAddr,
    shared: Arc<Shared>,
    next_id: std::sync::atomic::AtomicU64,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for LambdaRuntimeApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LambdaRuntimeApi")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl LambdaRuntimeApi {
    /// Starts the server.
    ///
    /// # Panics
    /// If no loopback port can be bound or no thread started (test support only).
    pub fn start() -> Self {
        match Self::try_start() {
            Ok(api) => api,
            Err(e) => panic!("Lambda Runtime API failed to start: {e}"),
        }
    }

    /// Starts the server, reporting failures.
    pub fn try_start() -> std::io::Result<Self> {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let shared = Arc::new(Shared::default());
        let (tx, rx) = oneshot::channel::<()>();
        let state = shared.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(format!("lambda-runtime-api-{}", addr.port()))
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => {
                        let _ = ready_tx.send(Ok(()));
                        runtime.block_on(async move {
                            let Ok(listener) = tokio::net::TcpListener::from_std(std_listener)
                            else {
                                return;
                            };
                            let app = Router::new()
                                .route("/2018-06-01/runtime/invocation/next", get(next))
                                .route(
                                    "/2018-06-01/runtime/invocation/{id}/response",
                                    post(response),
                                )
                                .route("/2018-06-01/runtime/invocation/{id}/error", post(error))
                                .route("/2018-06-01/runtime/init/error", post(init_error))
                                .with_state(state);
                            // Not a graceful shutdown: a runtime's long poll on /next never
                            // ends by itself; dropping the runtime cancels it.
                            tokio::select! {
                                _ = axum::serve(listener, app) => {}
                                _ = rx => {}
                            }
                        });
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })?;
        ready_rx
            .recv()
            .map_err(|_| std::io::Error::other("Lambda Runtime API thread exited early"))??;
        Ok(LambdaRuntimeApi {
            addr,
            shared,
            next_id: std::sync::atomic::AtomicU64::new(1),
            shutdown: Some(tx),
            thread: Some(thread),
        })
    }

    /// `127.0.0.1:PORT`, the value of `AWS_LAMBDA_RUNTIME_API`.
    pub fn address(&self) -> String {
        self.addr.to_string()
    }

    /// The environment Lambda gives a function: `AWS_LAMBDA_RUNTIME_API` and the
    /// `AWS_LAMBDA_FUNCTION_*` / log variables.
    pub fn function_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_LAMBDA_RUNTIME_API", self.address()),
            ("AWS_LAMBDA_FUNCTION_NAME", "tributary".to_owned()),
            ("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "256".to_owned()),
            ("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST".to_owned()),
            (
                "AWS_LAMBDA_LOG_GROUP_NAME",
                "/aws/lambda/tributary".to_owned(),
            ),
            ("AWS_LAMBDA_LOG_STREAM_NAME", "test".to_owned()),
        ]
    }

    /// How many times a runtime has asked for the next invocation.
    pub fn polls(&self) -> u64 {
        self.shared.polls.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Init errors the runtime reported.
    pub fn init_errors(&self) -> Vec<String> {
        lock(&self.shared.init_errors).clone()
    }

    /// Queues `event` with a deadline `timeout` from now and waits up to `timeout + slack`
    /// for the runtime's answer; `None` when none came.
    pub fn invoke(
        &self,
        event: serde_json::Value,
        timeout: Duration,
        slack: Duration,
    ) -> Option<Invocation> {
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let request_id = format!("00000000-0000-4000-8000-{id:012}");
        let deadline_ms = now_ms() + u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        lock(&self.shared.deadlines).insert(request_id.clone(), deadline_ms);
        lock(&self.shared.queue).push_back(Pending {
            request_id: request_id.clone(),
            deadline_ms,
            event: Bytes::from(event.to_string()),
        });
        self.shared.queued.notify_one();
        let wait_until = std::time::Instant::now() + timeout + slack;
        let mut done = lock(&self.shared.done);
        loop {
            if let Some(inv) = done.remove(&request_id) {
                return Some(inv);
            }
            let left = wait_until.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                // Not answered: take it back so a late runtime does not get it.
                lock(&self.shared.queue).retain(|p| p.request_id != request_id);
                return None;
            }
            done = self
                .shared
                .done_changed
                .wait_timeout(done, left)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }

    /// Stops the server and joins its thread. Idempotent; also done on drop.
    pub fn shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for LambdaRuntimeApi {
    fn drop(&mut self) {
        self.shutdown();
    }
}

async fn next(State(shared): State<Arc<Shared>>) -> Response {
    shared
        .polls
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    loop {
        let notified = shared.queued.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if let Some(p) = lock(&shared.queue).pop_front() {
            let mut headers = HeaderMap::new();
            let pairs = [
                ("lambda-runtime-aws-request-id", p.request_id.clone()),
                ("lambda-runtime-deadline-ms", p.deadline_ms.to_string()),
                (
                    "lambda-runtime-invoked-function-arn",
                    FUNCTION_ARN.to_owned(),
                ),
                (
                    "lambda-runtime-trace-id",
                    "Root=1-00000000-000000000000000000000000;Sampled=0".to_owned(),
                ),
                ("content-type", "application/json".to_owned()),
            ];
            for (name, value) in pairs {
                if let Ok(v) = value.parse() {
                    headers.insert(name, v);
                }
            }
            return (StatusCode::OK, headers, p.event).into_response();
        }
        notified.await;
    }
}

fn finish(shared: &Shared, id: &str, body: &Bytes, ok: bool) -> StatusCode {
    let Some(deadline_ms) = lock(&shared.deadlines).remove(id) else {
        return StatusCode::BAD_REQUEST;
    };
    let value = serde_json::from_slice(body)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(body).into()));
    let inv = Invocation {
        request_id: id.to_owned(),
        deadline_ms,
        answered_at_ms: now_ms(),
        response: ok.then(|| value.clone()),
        error: (!ok).then_some(value),
    };
    lock(&shared.done).insert(id.to_owned(), inv);
    shared.done_changed.notify_all();
    StatusCode::ACCEPTED
}

async fn response(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    body: Bytes,
) -> StatusCode {
    finish(&shared, &id, &body, true)
}

async fn error(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    body: Bytes,
) -> StatusCode {
    finish(&shared, &id, &body, false)
}

async fn init_error(State(shared): State<Arc<Shared>>, body: Bytes) -> StatusCode {
    lock(&shared.init_errors).push(String::from_utf8_lossy(&body).into_owned());
    StatusCode::ACCEPTED
}
