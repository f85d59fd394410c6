//! A dispatcher that bridges to async code on the service's own tokio runtime, and the
//! async close that lets it finish.
//!
//! The processor calls `EventDispatcher::dispatch` on its own worker threads, which are not
//! runtime threads, so a dispatcher may spawn a task on the service's runtime and block
//! its worker thread until the task answers. On a current-thread runtime (as here) that
//! task can only run while the runtime's one thread is free: a sync `close()` on that
//! thread would starve it, stall for the whole close timeout and report everything
//! pending. `close_async().await` waits on a thread of its own instead.
//!
//! ```text
//! cargo run -p tributary --example async_dispatcher
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tributary::{
    BatchEventProcessor, Conversion, DispatchError, EventContext, EventDispatcher, LogEvent,
    ProcessError, UserEvent, UserEventKind,
};

/// Hands each request to a task on the service's runtime and waits for its answer.
struct OnServiceRuntime {
    handle: tokio::runtime::Handle,
    visitors_sent: Arc<AtomicUsize>,
}

/// Stands in for an async client (an HTTP client, a queue producer) owned by the service.
async fn send_somewhere(body: bytes::Bytes) -> Result<usize, String> {
    tokio::time::sleep(Duration::from_millis(20)).await;
    Ok(body.len())
}

impl EventDispatcher for OnServiceRuntime {
    fn dispatch(&self, log_event: &LogEvent) -> Result<(), DispatchError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let body = log_event.body().clone();
        self.handle.spawn(async move {
            let _ = tx.send(send_somewhere(body).await);
        });
        // A processor worker thread, not a runtime thread: blocking here is allowed.
        match rx.blocking_recv() {
            Ok(Ok(_bytes)) => {
                self.visitors_sent
                    .fetch_add(log_event.visitor_count(), Ordering::Relaxed);
                Ok(())
            }
            Ok(Err(message)) => Err(DispatchError::Transient {
                message,
                retry_after: None,
            }),
            Err(_) => Err(DispatchError::Unavailable(
                "the service runtime has shut down".into(),
            )),
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let visitors_sent = Arc::new(AtomicUsize::new(0));
    let processor = BatchEventProcessor::builder()
        .dispatcher(OnServiceRuntime {
            handle: tokio::runtime::Handle::current(),
            visitors_sent: visitors_sent.clone(),
        })
        .build()?;

    let ctx = Arc::new(EventContext::new("1001", "2002", "42"));
    let mut refused = 0;
    for i in 0..500 {
        let event = UserEvent::new(
            ctx.clone(),
            format!("user-{i}"),
            vec![],
            UserEventKind::Conversion(Conversion {
                event_id: "7".into(),
                event_key: "purchase".into(),
                revenue: None,
                value: None,
                tags: None,
            }),
        );
        // process() never blocks: a full queue is a refusal to count, not an error to end on.
        match processor.process(event) {
            Ok(()) => {}
            Err(ProcessError::QueueFull) => refused += 1,
            Err(e) => return Err(e.into()),
        }
    }

    // Not processor.close(): that would block this runtime's only thread.
    let report = processor.close_async().await;
    println!("{report}");
    println!(
        "visitors sent: {}, refused: {refused}",
        visitors_sent.load(Ordering::Relaxed)
    );
    if !report.is_complete() {
        return Err(format!("not everything was delivered: {report}").into());
    }
    Ok(())
}
