//! `spool=`: durable and scaled-out modes. A path: each request is appended to a local
//! SQLite spool ([`SqliteSpool`]) and an in-process [`Forwarder`] (the relay's: merging,
//! retries, isolation of refused visitors, dead letters) sends from there. `sqs://QUEUE`:
//! each request is written to SQS ([`SqsSpool`]) for `tributary drain` elsewhere.

use std::path::PathBuf;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pyo3::prelude::*;
use tokio::sync::{Notify, watch};
use tributary::EventDispatcher;
use tributary_spool::forward::{Forwarder, ForwarderConfig, UpstreamConfig, Upstreams};
use tributary_spool::{SpoolDispatcherBuilder, SqliteConfig, SqliteSpool, SqsConfig, SqsSpool};

/// Why a spool could not be opened.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SpoolSetupError {
    #[error("spool={0:?}: {1}")]
    Open(String, String),
}

/// What `spool=` names.
#[derive(Debug, Clone)]
pub(crate) enum SpoolSetting {
    Sqlite(PathBuf),
    Sqs(String),
}

impl SpoolSetting {
    pub(crate) fn parse(s: &str) -> Result<SpoolSetting, String> {
        if let Some(queue) = s.strip_prefix("sqs://") {
            if queue.is_empty() {
                return Err("sqs:// needs a queue name or URL: sqs://QUEUE".into());
            }
            return Ok(SpoolSetting::Sqs(queue.to_owned()));
        }
        if s.is_empty() || s.contains("://") {
            return Err("expected a directory path or sqs://QUEUE".into());
        }
        Ok(SpoolSetting::Sqlite(PathBuf::from(s)))
    }
}

/// The in-process forwarder of a SQLite spool, on a thread of its own.
pub(crate) struct InProcessForwarder {
    stop: watch::Sender<bool>,
    drain_until: Arc<Mutex<Option<Instant>>>,
    thread: Option<JoinHandle<()>>,
    done: std::sync::mpsc::Receiver<()>,
}

impl InProcessForwarder {
    /// Signals the forwarder to stop after draining what it can until `deadline`, and waits
    /// for it until then (the caller holds no GIL). A cycle still sending at the deadline is
    /// left to finish on its thread: what it leased is settled, or its leases run out and
    /// the payloads stay in the spool.
    pub(crate) fn stop(mut self, deadline: Instant) {
        *self
            .drain_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(deadline);
        let _ = self.stop.send(true);
        let wait = deadline.saturating_duration_since(Instant::now()) + Duration::from_millis(100);
        if self.done.recv_timeout(wait).is_ok()
            && let Some(t) = self.thread.take()
        {
            let _ = t.join();
        }
    }
}

impl Drop for InProcessForwarder {
    /// Dropped without [`stop`](Self::stop) (a dispatcher garbage-collected unclosed): the
    /// thread ends after its current cycle; what is spooled stays for the next start.
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// The dispatcher for `setting`, and the forwarder to run beside it (SQLite only).
pub(crate) fn open(
    setting: &SpoolSetting,
    endpoint: Option<&str>,
    eu_endpoint: Option<&str>,
    logger: Option<Py<PyAny>>,
    request_timeout: Duration,
    attempts: u32,
) -> Result<(Box<dyn EventDispatcher>, Option<InProcessForwarder>), SpoolSetupError> {
    let builder = SpoolDispatcherBuilder::new().attempts(attempts);
    match setting {
        SpoolSetting::Sqs(queue) => {
            let queue = queue.clone();
            let name = format!("sqs://{queue}");
            let d = builder
                .build_with(move || SqsSpool::from_env(SqsConfig::new(queue)))
                .map_err(|e| SpoolSetupError::Open(name, e.to_string()))?;
            Ok((Box::new(d), None))
        }
        SpoolSetting::Sqlite(dir) => {
            let name = dir.display().to_string();
            let err = |e: String| SpoolSetupError::Open(name.clone(), e);
            std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
            let spool =
                SqliteSpool::open(dir, SqliteConfig::default()).map_err(|e| err(e.to_string()))?;
            let d = builder.build(spool).map_err(|e| err(e.to_string()))?;
            let mut upstream = UpstreamConfig {
                request_timeout,
                ..UpstreamConfig::default()
            };
            if let Some(url) = endpoint {
                upstream.us = url.to_owned();
                upstream.eu = eu_endpoint.unwrap_or(url).to_owned();
            }
            let upstreams = Arc::new(Upstreams::new(&upstream).map_err(|e| err(e.to_string()))?);
            let forwarder = Forwarder::new(
                d.spool().clone(),
                upstreams,
                ForwarderConfig::default(),
                Arc::new(Notify::new()),
                Arc::new(AtomicUsize::new(0)),
            );
            let (stop, stop_rx) = watch::channel(false);
            let drain_until = Arc::new(Mutex::new(None::<Instant>));
            let until = drain_until.clone();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| err(e.to_string()))?;
            let (done_tx, done) = std::sync::mpsc::channel();
            let thread = std::thread::Builder::new()
                .name("tributary-py-forward".into())
                .spawn(move || {
                    runtime.block_on(async move {
                        forward_until_stopped(&forwarder, stop_rx, logger.as_ref()).await;
                        let deadline = *until.lock().unwrap_or_else(PoisonError::into_inner);
                        if let Some(deadline) = deadline
                            && let Err(e) = forwarder.drain(deadline).await
                        {
                            warn(logger.as_ref(), &format!("spool drain at stop: {e}"));
                        }
                    });
                    let _ = done_tx.send(());
                })
                .map_err(|e| err(e.to_string()))?;
            Ok((
                Box::new(d),
                Some(InProcessForwarder {
                    stop,
                    drain_until,
                    thread: Some(thread),
                    done,
                }),
            ))
        }
    }
}

/// To the Python logger when there is one (tracing has no subscriber in Python).
fn warn(logger: Option<&Py<PyAny>>, message: &str) {
    match logger {
        Some(l) => crate::pylog::log(l, "warning", message),
        None => tracing::warn!("{message}"),
    }
}

/// Forwarding cycles until `stop` turns true. Unlike `Forwarder::run`, a cycle is never cut
/// short by the stop (which would release payloads whose requests were already sent, and
/// send them again in the drain that follows): the stop is looked at between cycles.
async fn forward_until_stopped(
    forwarder: &Forwarder,
    mut stop: watch::Receiver<bool>,
    logger: Option<&Py<PyAny>>,
) {
    let idle = ForwarderConfig::default().flush_interval;
    while !*stop.borrow() {
        let more = match forwarder.cycle().await {
            Ok((_, more)) => more,
            Err(e) => {
                warn(logger, &format!("spool forwarding cycle failed: {e}"));
                false
            }
        };
        if !more {
            tokio::select! {
                _ = tokio::time::sleep(idle) => {}
                changed = stop.changed() => {
                    // The sender is gone (its owner dropped without stop()): stop too, or
                    // `changed()` returns at once forever and this spins.
                    if changed.is_err() {
                        return;
                    }
                }
            }
        }
    }
}
