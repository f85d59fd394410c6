//! From a datafile to delivered events: load a datafile, record the decisions your SDK made
//! (impressions) and what users did (conversions), batch them, send them over HTTP, close.
//!
//! Run against a local upstream (a relay, `tributary bench sink`, or anything answering 2xx):
//!
//! ```sh
//! TRIBUTARY_ENDPOINT=http://127.0.0.1:8080/v1/events \
//!     cargo run -p tributary --example from_datafile -- [DATAFILE]
//! cargo run -p tributary --example from_datafile -- --endpoint URL [DATAFILE]
//! ```
//!
//! With no endpoint it does **not** send anything: it prints what it would send and how to
//! send it. Left to its default, the HTTP dispatcher posts to the production Event API
//! (`https://logx.optimizely.com/v1/events`), and example events in a real project's
//! results are hard to take back; so that takes `--production`, said out loud.
//!
//! `DATAFILE` (or `TRIBUTARY_DATAFILE`) defaults to the Python SDK fixtures' datafile in
//! `../shared`. The crate does not bucket users: the variations below stand for what your
//! SDK's `decide` returned. The exit status is non-zero if any event was not delivered.

use std::error::Error;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tributary::dispatcher::http::HttpDispatcher;
use tributary::user_event_factory::{ImpressionRequest, NO_ATTRIBUTES};
use tributary::{
    BatchEventProcessor, DispatchError, EventDispatcher, LogEvent, ProcessError, ProjectConfig,
    UserEvent, UserEventFactory,
};

/// The fixtures' datafile, beside the repository.
const DEFAULT_DATAFILE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../../shared/fixtures/python-sdk-5.7.0/datafile.json"
);

/// Where the events go.
enum Target {
    /// An explicit endpoint (a relay, a test server).
    Endpoint(String),
    /// The production Event API: asked for with `--production`.
    Production,
    /// Nowhere: print each request instead.
    DryRun,
}

/// Prints one line per request instead of sending it.
struct PrintOnly;

impl EventDispatcher for PrintOnly {
    fn dispatch(&self, log_event: &LogEvent) -> Result<(), DispatchError> {
        println!(
            "would POST {} ({} events, {} bytes)",
            log_event.url,
            log_event.visitor_count(),
            log_event.body().len()
        );
        Ok(())
    }
}

fn main() -> Result<(), Box<dyn Error>> {
    let mut endpoint = std::env::var("TRIBUTARY_ENDPOINT")
        .ok()
        .filter(|s| !s.is_empty());
    let mut production = false;
    let mut datafile = std::env::var("TRIBUTARY_DATAFILE").ok();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--endpoint" => endpoint = Some(args.next().ok_or("--endpoint needs a URL")?),
            "--production" => production = true,
            "-h" | "--help" => {
                println!(
                    "usage: from_datafile [--endpoint URL | --production] [DATAFILE]\n\
                     (TRIBUTARY_ENDPOINT, TRIBUTARY_DATAFILE also work)"
                );
                return Ok(());
            }
            _ => datafile = Some(arg),
        }
    }
    let target = match (endpoint, production) {
        (Some(_), true) => return Err("give --endpoint or --production, not both".into()),
        (Some(url), false) => Target::Endpoint(url),
        (None, true) => Target::Production,
        (None, false) => Target::DryRun,
    };

    // 1. The datafile: one ProjectConfig per revision, shared by every event built from it.
    let path = datafile.unwrap_or_else(|| DEFAULT_DATAFILE.to_owned());
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    let config = Arc::new(ProjectConfig::from_json(&text)?);
    let factory = UserEventFactory::new(config);

    // 2. The processor, with the HTTP dispatcher (or the printing one for a dry run).
    let dispatcher: Box<dyn EventDispatcher> = match &target {
        Target::Endpoint(url) => {
            println!("sending to {url}");
            Box::new(HttpDispatcher::builder().endpoint(url.as_str()).build()?)
        }
        Target::Production => {
            println!("sending to the production Event API");
            // No .endpoint(): each request goes to its own url, logx.optimizely.com.
            Box::new(HttpDispatcher::builder().build()?)
        }
        Target::DryRun => {
            println!(
                "dry run: nothing is sent. Set TRIBUTARY_ENDPOINT or pass --endpoint URL to \
                 send to a relay or test server, --production for logx.optimizely.com"
            );
            Box::new(PrintOnly)
        }
    };
    let processor = BatchEventProcessor::builder()
        .dispatcher(dispatcher)
        .batch_size(10)
        .flush_interval(Duration::from_secs(1))
        .build()?;

    // 3. Events: what the SDK decided (an impression) and what the user did (a conversion).
    let mut queue_full = 0u64;
    let mut record = |event: UserEvent| match processor.process(event) {
        Ok(()) => {}
        // process() never blocks: with the queue full the event is dropped. Count it (the
        // processor counts it too, in the close report); do not end the program with `?`.
        Err(ProcessError::QueueFull) => queue_full += 1,
        Err(e) => eprintln!("event not recorded: {e}"),
    };
    for i in 0..20 {
        let user = format!("user-{i}");
        let attributes = [
            ("country", json!("DE")),
            ("plan", json!(if i % 3 == 0 { "pro" } else { "free" })),
            ("age", json!(20 + i)),
        ];
        let decision = ImpressionRequest {
            user_id: &user,
            flag_key: "checkout_redesign",
            rule_key: "checkout_redesign_ab",
            variation_key: if i % 2 == 0 { "treatment" } else { "control" },
            // `enabled` left out: taken from the variation's featureEnabled, as decide does.
            ..Default::default()
        };
        record(factory.build_impression(&decision, &attributes)?);
        let tags = json!({"revenue": 4200, "value": 3.5, "category": "shoes"});
        record(factory.conversion(&user, &attributes, "purchase", tags.as_object())?);
    }
    // A visitor without attributes: NO_ATTRIBUTES (a bare `[]` cannot be typed).
    record(factory.conversion("anonymous-1", NO_ATTRIBUTES, "add_to_cart", None)?);

    // 4. Close: sends what is batched and waits (up to the close timeout) for delivery.
    let report = processor.close();
    let stats = processor.stats();
    println!(
        "dispatched {}, failed {}, dropped {} (queue full: {queue_full}), pending {}; \
         {} requests, close waited {:?}",
        report.dispatched,
        report.failed,
        report.dropped,
        report.pending_at_timeout,
        stats.batches,
        report.waited
    );
    if report.dispatched != stats.accepted || report.dispatched == 0 {
        return Err(format!(
            "{} of {} accepted events were not delivered",
            stats.accepted - report.dispatched.min(stats.accepted),
            stats.accepted
        )
        .into());
    }
    Ok(())
}
