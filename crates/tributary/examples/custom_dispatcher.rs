//! A custom event dispatcher: append each request body as one line of a JSON Lines file.
//!
//! Run: `cargo run -p tributary --example custom_dispatcher [FILE]`
//!
//! A dispatcher is any `Send + Sync` type implementing [`EventDispatcher`]. The processor calls
//! it from its dispatch workers, up to `dispatch_concurrency` requests at once (default 32),
//! so it must be safe to call from several threads; it may block, but it must return
//! rather than hang, and it owns its retries: the processor never retries. Report what
//! happened truthfully: `Ok` means every visitor was delivered; `Transient` and `Permanent`
//! errors count the whole request as failed in the processor's statistics.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tributary::{
    BatchEventProcessor, Conversion, DispatchError, EventContext, EventDispatcher, LogEvent,
    ProcessError, UserEvent, UserEventKind,
};

/// Appends `{"url":...,"body":...}` lines to a file.
struct JsonLinesFile {
    // The dispatcher is shared (&self); a Mutex makes each line's write exclusive.
    file: Mutex<File>,
}

impl EventDispatcher for JsonLinesFile {
    fn dispatch(&self, log_event: &LogEvent) -> Result<(), DispatchError> {
        let mut line = Vec::with_capacity(log_event.body().len() + 64);
        line.extend_from_slice(br#"{"url":"#);
        line.extend_from_slice(
            serde_json::to_string(&log_event.url)
                .map_err(|e| DispatchError::Unavailable(e.to_string()))?
                .as_bytes(),
        );
        line.extend_from_slice(br#","body":"#);
        line.extend_from_slice(log_event.body());
        line.extend_from_slice(b"}\n");
        let mut file = self
            .file
            .lock()
            .map_err(|_| DispatchError::Unavailable("file lock poisoned".into()))?;
        // A full disk may clear up: call it transient, so a retrying wrapper would try again.
        file.write_all(&line).map_err(|e| DispatchError::Transient {
            message: e.to_string(),
            retry_after: None,
        })
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("tributary-events.jsonl"));
    let file = OpenOptions::new().create(true).append(true).open(&path)?;
    let processor = BatchEventProcessor::builder()
        .dispatcher(JsonLinesFile {
            file: Mutex::new(file),
        })
        .batch_size(5)
        .build()?;

    let context = Arc::new(EventContext::new("12133785640", "21537940595", "131"));
    let mut queue_full = 0;
    for i in 0..12 {
        let event = UserEvent::new(
            context.clone(),
            format!("user-{i}"),
            vec![],
            UserEventKind::Conversion(Conversion {
                event_id: "21549340108".into(),
                event_key: "purchase".into(),
                revenue: Some(100 * i),
                value: None,
                tags: None,
            }),
        );
        // process() never blocks: a full queue drops the event. Count it; `?` here would end
        // the program at the first burst.
        match processor.process(event) {
            Ok(()) => {}
            Err(ProcessError::QueueFull) => queue_full += 1,
            Err(e) => eprintln!("event not recorded: {e}"),
        }
    }
    let report = processor.close();
    println!(
        "{} events in {} requests appended to {}",
        report.dispatched,
        processor.stats().batches,
        path.display()
    );
    println!(
        "dispatched {}, failed {}, dropped {} (queue full: {queue_full}), pending {}",
        report.dispatched, report.failed, report.dropped, report.pending_at_timeout
    );
    Ok(())
}
