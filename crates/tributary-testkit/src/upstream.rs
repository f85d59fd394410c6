//! [`RecordingUpstream`]: an HTTP server on loopback that records requests and answers from a
//! [`Script`].

use std::io::Read;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::serve::{IncomingStream, Listener};
use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, oneshot};

use crate::script::{Reply, ReplyKind, Script};

/// Largest request body the upstream reads (before decompression). The Event API's limit is
/// 3.5 MB; this leaves room for tests that send more on purpose.
const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;

/// How the upstream answered a recorded request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// An HTTP status (sent after the scripted delay, if any).
    Status(u16),
    /// No answer: the request was left hanging.
    Hung,
    /// The connection was reset without an answer.
    Reset,
}

/// One request as the upstream saw it.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    /// 0-based arrival number.
    pub seq: u64,
    /// When the whole request had been read.
    pub received_at: Instant,
    /// Which TCP connection carried it (0-based, in accept order): equal ids mean the
    /// client reused a kept-alive connection.
    pub connection: u64,
    /// `POST`, `GET`, ...
    pub method: String,
    /// Path and query, e.g. `/v1/events`.
    pub path: String,
    /// Headers in arrival order, names lower-case.
    pub headers: Vec<(String, String)>,
    /// The body, gunzipped when `Content-Encoding: gzip` (and decodable).
    pub body: Bytes,
    /// The body as it came over the wire.
    pub raw_body: Bytes,
    /// How the upstream answered.
    pub answer: Answer,
}

impl RecordedRequest {
    /// The first value of header `name` (case-insensitive), if present and text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body parsed as JSON, if it is JSON.
    pub fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.body).ok()
    }

    /// The event uuids in the body (see [`crate::event_uuids`]).
    pub fn event_uuids(&self) -> Vec<String> {
        crate::event_uuids(&self.body)
    }

    /// Whether the upstream answered 2xx.
    pub fn is_success(&self) -> bool {
        matches!(self.answer, Answer::Status(s) if (200..300).contains(&s))
    }
}

/// A real HTTP/1.1 server on `127.0.0.1:<free port>` that records every request and answers
/// from a [`Script`].
///
/// It runs on a private thread with its own tokio runtime, so it works the same from plain
/// `#[test]`s and from async tests (including ones whose client blocks a runtime thread).
/// Dropping it (or [`RecordingUpstream::shutdown`]) stops the server, closes its connections
/// and joins its thread.
///
/// ```
/// use std::time::Duration;
/// use tributary_testkit::{RecordingUpstream, Reply, Script};
///
/// let upstream = RecordingUpstream::start();
/// upstream.set_script(Script::new().default_reply(Reply::status(200)));
/// assert!(upstream.url().starts_with("http://127.0.0.1:"));
/// assert!(upstream.requests().is_empty());
/// ```
pub struct RecordingUpstream {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for RecordingUpstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordingUpstream")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

struct Shared {
    requests: Mutex<Vec<RecordedRequest>>,
    changed: Condvar,
    changed_async: Notify,
    script: Mutex<Script>,
    next_seq: AtomicU64,
    connections: AtomicUsize,
}

impl Shared {
    fn requests(&self) -> MutexGuard<'_, Vec<RecordedRequest>> {
        // A panicking test thread must not hide what was recorded from the others.
        self.requests.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn script(&self) -> MutexGuard<'_, Script> {
        self.script.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl RecordingUpstream {
    /// Starts a server answering `204` to everything.
    ///
    /// # Panics
    /// If no loopback port can be bound or no thread started (test support only).
    pub fn start() -> Self {
        Self::start_with(Script::new())
    }

    /// Starts a server answering from `script`.
    ///
    /// # Panics
    /// If no loopback port can be bound or no thread started (test support only).
    pub fn start_with(script: Script) -> Self {
        match Self::try_start(script) {
            Ok(u) => u,
            Err(e) => panic!("recording upstream failed to start: {e}"),
        }
    }

    /// Starts a server answering from `script`, reporting failures.
    pub fn try_start(script: Script) -> std::io::Result<Self> {
        // Bind here so the address is known when this returns; serve on the thread.
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let shared = Arc::new(Shared {
            requests: Mutex::new(Vec::new()),
            changed: Condvar::new(),
            changed_async: Notify::new(),
            script: Mutex::new(script),
            next_seq: AtomicU64::new(0),
            connections: AtomicUsize::new(0),
        });
        let (tx, rx) = oneshot::channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let state = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name(format!("recording-upstream-{}", addr.port()))
            .spawn(move || {
                // Built and dropped on this thread, never inside a caller's runtime; the drop
                // cancels hung handlers.
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => {
                        let _ = ready_tx.send(Ok(()));
                        runtime.block_on(serve(std_listener, state, rx));
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })?;
        ready_rx
            .recv()
            .map_err(|_| std::io::Error::other("recording upstream thread exited early"))??;
        Ok(RecordingUpstream {
            addr,
            shared,
            shutdown: Some(tx),
            thread: Some(thread),
        })
    }

    /// The Event API URL on this server: `http://127.0.0.1:PORT/v1/events`.
    pub fn url(&self) -> String {
        format!("http://{}/v1/events", self.addr)
    }

    /// `http://127.0.0.1:PORT`, for other paths.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A copy of every request recorded so far, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.requests().clone()
    }

    /// How many requests were recorded.
    pub fn request_count(&self) -> usize {
        self.shared.requests().len()
    }

    /// Forgets the recorded requests (the request and connection numbering continues).
    pub fn clear_requests(&self) {
        self.shared.requests().clear();
    }

    /// How many TCP connections were accepted: with keep-alive, fewer than requests.
    pub fn connections_accepted(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Replaces the script; queued replies of the old one are dropped.
    pub fn set_script(&self, script: Script) {
        *self.shared.script() = script;
    }

    /// Blocks until `cond` holds for the recorded requests or `timeout` passes; returns
    /// whether it held. Wakes on every new request, so it never polls.
    pub fn wait_for(
        &self,
        mut cond: impl FnMut(&[RecordedRequest]) -> bool,
        timeout: Duration,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        let mut reqs = self.shared.requests();
        loop {
            if cond(&reqs) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            reqs = match self.shared.changed.wait_timeout(reqs, deadline - now) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
    }

    /// [`RecordingUpstream::wait_for`] for async tests: awaits instead of blocking.
    pub async fn wait_for_async(
        &self,
        mut cond: impl FnMut(&[RecordedRequest]) -> bool,
        timeout: Duration,
    ) -> bool {
        let check = async {
            loop {
                // Register interest before checking, so a request landing in between wakes us.
                let notified = self.shared.changed_async.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if cond(&self.shared.requests()) {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(timeout, check).await.is_ok()
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

impl Drop for RecordingUpstream {
    fn drop(&mut self) {
        self.shutdown();
    }
}

async fn serve(
    std_listener: std::net::TcpListener,
    shared: Arc<Shared>,
    stop: oneshot::Receiver<()>,
) {
    let listener = match TcpListener::from_std(std_listener) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("recording upstream: {e}");
            return;
        }
    };
    let listener = TrackedListener {
        inner: listener,
        shared: Arc::clone(&shared),
    };
    let app = Router::new().fallback(handle).with_state(shared);
    let server = axum::serve(
        listener,
        app.into_make_service_with_connect_info::<ConnHandle>(),
    );
    tokio::select! {
        r = std::future::IntoFuture::into_future(server) => {
            if let Err(e) = r {
                eprintln!("recording upstream: {e}");
            }
        }
        _ = stop => {}
    }
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(conn): ConnectInfo<ConnHandle>,
    request: Request,
) -> Response {
    let (parts, body) = request.into_parts();
    let raw_body = match axum::body::to_bytes(body, MAX_BODY_BYTES).await {
        Ok(b) => b,
        Err(e) => return (StatusCode::PAYLOAD_TOO_LARGE, e.to_string()).into_response(),
    };
    let headers: Vec<(String, String)> = parts
        .headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let gzipped = parts
        .headers
        .get("content-encoding")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("gzip"));
    let body = if gzipped {
        gunzip(&raw_body).unwrap_or_else(|| raw_body.clone())
    } else {
        raw_body.clone()
    };

    let seq = shared.next_seq.fetch_add(1, Ordering::SeqCst);
    let reply: Reply = shared.script().next_reply(seq, &body);
    let answer = match &reply.kind {
        ReplyKind::Respond { status, .. } => Answer::Status(*status),
        ReplyKind::Hang => Answer::Hung,
        ReplyKind::Reset => Answer::Reset,
    };
    shared.requests().push(RecordedRequest {
        seq,
        received_at: Instant::now(),
        connection: conn.id,
        method: parts.method.to_string(),
        path: parts
            .uri
            .path_and_query()
            .map_or_else(|| parts.uri.path().to_owned(), |p| p.as_str().to_owned()),
        headers,
        body,
        raw_body,
        answer,
    });
    shared.changed.notify_all();
    shared.changed_async.notify_waiters();

    match reply.kind {
        ReplyKind::Respond {
            status,
            headers,
            body,
            delay,
        } => {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let mut response = Response::new(Body::from(body));
            *response.status_mut() =
                StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            for (k, v) in headers {
                if let (Ok(k), Ok(v)) = (HeaderName::try_from(k), HeaderValue::try_from(v)) {
                    response.headers_mut().append(k, v);
                }
            }
            response
        }
        ReplyKind::Hang => std::future::pending().await,
        ReplyKind::Reset => {
            // Make the connection fail on the next write (the response), which drops it;
            // zero linger turns the close into a reset.
            conn.kill.store(true, Ordering::SeqCst);
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

fn gunzip(data: &[u8]) -> Option<Bytes> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(data)
        .take(MAX_BODY_BYTES as u64 * 4)
        .read_to_end(&mut out)
        .ok()?;
    Some(Bytes::from(out))
}

/// Per-connection information handed to the handler: the connection number and a switch
/// that makes the connection fail.
#[derive(Debug, Clone)]
struct ConnHandle {
    id: u64,
    kill: Arc<AtomicBool>,
}

impl Connected<IncomingStream<'_, TrackedListener>> for ConnHandle {
    fn connect_info(stream: IncomingStream<'_, TrackedListener>) -> Self {
        stream.remote_addr().clone()
    }
}

/// A TCP listener that counts connections and wraps each in a killable stream.
struct TrackedListener {
    inner: TcpListener,
    shared: Arc<Shared>,
}

impl Listener for TrackedListener {
    type Io = KillableStream;
    type Addr = ConnHandle;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.inner.accept().await {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    let id = self.shared.connections.fetch_add(1, Ordering::SeqCst) as u64;
                    let kill = Arc::new(AtomicBool::new(false));
                    let io = KillableStream {
                        inner: stream,
                        kill: Arc::clone(&kill),
                    };
                    return (io, ConnHandle { id, kill });
                }
                // Out of file descriptors and the like: back off briefly and keep serving.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(ConnHandle {
            id: u64::MAX,
            kill: Arc::new(AtomicBool::new(false)),
        })
    }
}

/// A TCP stream that fails every operation once its kill switch is set, resetting the
/// connection when dropped.
struct KillableStream {
    inner: TcpStream,
    kill: Arc<AtomicBool>,
}

impl KillableStream {
    fn killed(&self) -> Option<std::io::Error> {
        if self.kill.load(Ordering::SeqCst) {
            let _ = self.inner.set_zero_linger();
            Some(std::io::Error::from(std::io::ErrorKind::ConnectionReset))
        } else {
            None
        }
    }
}

impl AsyncRead for KillableStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if let Some(e) = this.killed() {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for KillableStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if let Some(e) = this.killed() {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if let Some(e) = this.killed() {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if let Some(e) = this.killed() {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}
