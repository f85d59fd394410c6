//! The relay's HTTP server: axum's router on hyper, with the bounds a server facing many
//! clients needs and `axum::serve` does not set.
//!
//! - **Connections**: at most `max_connections` at once, kept below the process's file limit
//!   (raised to its hard limit at start where allowed) so that the spool and the upstream
//!   always have descriptors; a connection over the limit is closed at once.
//! - **Header timeout**: a connection that has not sent a complete request head within
//!   `header_timeout` is closed. Hyper's timer runs from the moment it waits for a head, so
//!   this also closes idle keep-alive connections and slowloris clients.
//! - **Header size**: at most `max_header_bytes` buffered per HTTP/1 connection.
//! - **HTTP/2**: at most `h2_max_streams` concurrent streams per connection. (Hyper has no
//!   header or idle timeout for HTTP/2: an h2 connection that goes quiet after its preface
//!   holds its slot until the client closes it.)
//!
//! Request bodies are bounded where they are read (see `ingest`): a shared byte budget, a
//! concurrency limit and a body timeout.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Bounds of the HTTP server. See the module docs.
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    /// Connections open at once.
    pub max_connections: usize,
    /// Longest wait for a complete request head (idle keep-alive included).
    pub header_timeout: Duration,
    /// Most header bytes buffered per HTTP/1 connection.
    pub max_header_bytes: usize,
    /// Concurrent streams per HTTP/2 connection.
    pub h2_max_streams: u32,
}

/// Descriptors kept for everything that is not a client connection: the spool's files, the
/// upstream connections, the runtime.
const RESERVED_FDS: u64 = 128;

/// Raises the soft limit on open files to the hard limit (where the system allows), and
/// returns the most client connections that leave `RESERVED_FDS` (128) free.
pub fn connection_ceiling() -> usize {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let mut soft = limit.current.unwrap_or(u64::MAX);
    if let Some(hard) = limit.maximum.or(Some(u64::MAX))
        && hard > soft
    {
        let raised = Rlimit {
            current: Some(hard),
            maximum: limit.maximum,
        };
        if setrlimit(Resource::Nofile, raised).is_ok() {
            soft = hard;
        }
    }
    let ceiling = soft.saturating_sub(RESERVED_FDS).max(16);
    usize::try_from(ceiling).unwrap_or(usize::MAX)
}

/// Serves `app` on `listener` until `shutdown` resolves, then stops accepting and waits for
/// the connections in progress to finish (the caller bounds that wait).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ServerLimits,
    shutdown: impl Future<Output = ()>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.h2_max_streams)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut shutdown = std::pin::pin!(shutdown);
    // Connection tasks live in a JoinSet so that dropping this future (the shutdown
    // deadline) aborts every one of them: unfinished requests are dropped, not left running.
    let mut connections = tokio::task::JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Out of descriptors and the like: back off, keep serving.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    metrics::counter!("tributary_connections_refused_total").increment(1);
                    drop(stream);
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let service = TowerToHyperService::new(app.clone());
                let builder = builder.clone();
                let watcher = graceful.watcher();
                let header_timeout = limits.header_timeout;
                connections.spawn(async move {
                    // Hyper picks HTTP/1 or HTTP/2 from the first bytes, and waits for them
                    // with no timer of its own: a client that connects and sends nothing
                    // would hold its slot forever.
                    let mut first = [0u8; 1];
                    match tokio::time::timeout(header_timeout, stream.peek(&mut first)).await {
                        Ok(Ok(n)) if n > 0 => {}
                        _ => return,
                    }
                    let conn = builder
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .into_owned();
                    // Errors here are the client's (reset, timeout, bad framing): not ours to
                    // log above debug.
                    if let Err(e) = watcher.watch(conn).await {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                    drop(slot);
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    graceful.shutdown().await;
    // What is left never sent a request (waiting for its first byte): nothing to finish.
    connections.shutdown().await;
}
