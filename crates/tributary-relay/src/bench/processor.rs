//! `tributary bench processor`: the library's [`BatchEventProcessor`] in-process, with a
//! dispatcher that discards what it is given, or (`--upstream-latency`) with the real
//! [`HttpDispatcher`] posting to a loopback server that answers 204 after that latency.
//!
//! What is measured:
//! - **process() latency**: `Instant::now()` around every call, stored in a preallocated
//!   vector per producer thread; percentiles over all calls. The timer's own cost is measured
//!   and printed, and is *included* in the figures (they are conservative).
//! - **events/s**: accepted events divided by the time from the moment producers are released
//!   to `close()` returning, i.e. until every event was batched, serialised into an Event API
//!   body and handed to the dispatcher. The `CloseReport` must account for every event,
//!   otherwise the command fails.
//!
//! Events are the Python SDK 5.7.0 fixtures' impression and conversion, alternating, distinct
//! users, built before the clock starts (about 1.5 KB each: `--events` bounds the memory).
//! A producer that finds the queue full waits (outside the timed call) rather than losing
//! events, so the figure is the sustained rate of the pipeline. The peer is
//! `scripts/bench_python_processor.py` (with `--endpoint`, the SDK's own dispatcher against
//! `tributary bench sink --latency`). For the one-core figure, run under `taskset -c 0`.
//!
//! With `--upstream-latency D` the upstream is [`LoopbackSink`] on `127.0.0.1:<free port>`,
//! each request waiting `D` before its 204 (requests wait side by side, not in a line), so the
//! figure shows how much of the upstream's latency the processor hides. The processor keeps
//! its defaults but for `--batch-size` and `--queue-capacity`; events are counted as
//! delivered by the server, not the dispatcher.

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;
use tributary::{
    AttributeValue, BatchEventProcessor, Conversion, DispatchError, EventContext, EventDispatcher,
    EventFactory, HttpDispatcher, Impression, LogEvent, UserEvent, UserEventKind, VisitorAttribute,
};

use super::relay::LoopbackSink;
use crate::config::HumanDuration;

/// Run the batch event processor in-process with a no-op dispatcher.
#[derive(Debug, clap::Args)]
pub struct ProcessorArgs {
    /// Events to process in total (split evenly between producer threads).
    #[arg(long, default_value_t = 200_000)]
    pub events: usize,
    /// The processor's batch_size.
    #[arg(long, default_value_t = 10)]
    pub batch_size: usize,
    /// Producer threads calling process() concurrently.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// The processor's queue_capacity.
    #[arg(long, default_value_t = 1000)]
    pub queue_capacity: usize,
    /// The processor's dispatch_concurrency (dispatch worker threads); default: the
    /// processor's default.
    #[arg(long)]
    pub dispatch_concurrency: Option<usize>,
    /// Dispatch with the real HTTP dispatcher to a loopback server that answers 204 after
    /// this long (e.g. `0ms`, `10ms`, `50ms`), instead of discarding in-process.
    #[arg(long)]
    pub upstream_latency: Option<HumanDuration>,
    /// Print one JSON document instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Where the processor's requests go.
enum Peer {
    /// Discarded in-process.
    Discard(Arc<Discard>),
    /// Posted over HTTP to a loopback server.
    Http(LoopbackSink),
}

impl Peer {
    /// (events, body bytes) received.
    fn received(&self) -> (u64, u64) {
        match self {
            Peer::Discard(d) => (
                d.visitors.load(Ordering::Relaxed),
                d.bytes.load(Ordering::Relaxed),
            ),
            Peer::Http(sink) => (sink.events(), sink.bytes()),
        }
    }
}

/// Discards requests, counting visitors and bytes so the work cannot be skipped unseen.
#[derive(Debug, Default)]
struct Discard {
    visitors: AtomicU64,
    bytes: AtomicU64,
}

impl EventDispatcher for Discard {
    fn dispatch(&self, log_event: &LogEvent) -> Result<(), DispatchError> {
        self.visitors
            .fetch_add(log_event.visitor_count() as u64, Ordering::Relaxed);
        self.bytes
            .fetch_add(log_event.body().len() as u64, Ordering::Relaxed);
        Ok(())
    }
}

#[derive(Debug, Serialize)]
struct Latency {
    p50: u64,
    p90: u64,
    p99: u64,
    p999: u64,
    max: u64,
    mean: f64,
}

#[derive(Debug, Serialize)]
struct Outcome {
    events: usize,
    batch_size: usize,
    threads: usize,
    queue_capacity: usize,
    /// `--upstream-latency` in milliseconds; absent: the in-process discarding dispatcher.
    upstream_latency_ms: Option<f64>,
    accepted: u64,
    dropped: u64,
    dispatched: u64,
    failed: u64,
    batches: u64,
    body_bytes: u64,
    /// process() latency in nanoseconds, timer overhead included.
    latency_ns: Latency,
    /// Median cost of the `Instant::now()` pair around each call.
    timer_overhead_ns: u64,
    elapsed_s: f64,
    events_per_s: f64,
    /// The peer, measured in the same run just before the processor: `EventFactory` alone
    /// serialising the same events in batches of `batch_size` on this thread.
    factory_events_per_s: f64,
    /// `events_per_s / factory_events_per_s`: what the pipeline keeps of the factory's rate.
    /// Compare this, not the absolute figures, across runs on a shared machine.
    ratio_to_factory: f64,
}

/// Runs the benchmark; exit status 1 if the processor lost track of any event.
pub fn run(args: ProcessorArgs) -> anyhow::Result<ExitCode> {
    if args.events == 0 || args.threads == 0 {
        bail!("--events and --threads must be at least 1");
    }
    let (peer, dispatcher): (Peer, Box<dyn EventDispatcher>) = match &args.upstream_latency {
        None => {
            let discard = Arc::new(Discard::default());
            (Peer::Discard(discard.clone()), Box::new(discard))
        }
        Some(latency) => {
            let sink = LoopbackSink::start(latency.0).context("starting the loopback upstream")?;
            let http = HttpDispatcher::builder()
                .endpoint(sink.url())
                .build()
                .context("building the HTTP dispatcher")?;
            (Peer::Http(sink), Box::new(http))
        }
    };
    let factory_events_per_s = factory_rate(args.events, args.batch_size)?;
    let mut builder = BatchEventProcessor::builder()
        .dispatcher(dispatcher)
        .batch_size(args.batch_size)
        .queue_capacity(args.queue_capacity)
        .close_timeout(Duration::from_secs(600));
    if let Some(n) = args.dispatch_concurrency {
        builder = builder.dispatch_concurrency(n);
    }
    let processor = Arc::new(builder.build().context("building the processor")?);
    let timer_overhead_ns = timer_overhead();
    let barrier = Arc::new(Barrier::new(args.threads + 1));
    let mut producers = Vec::with_capacity(args.threads);
    for t in 0..args.threads {
        let n = args.events / args.threads + usize::from(t < args.events % args.threads);
        let processor = processor.clone();
        let barrier = barrier.clone();
        let capacity = args.queue_capacity;
        let producer = thread::Builder::new()
            .name(format!("producer-{t}"))
            .spawn(move || {
                let events = golden_events(t, n);
                let samples = Vec::with_capacity(n);
                barrier.wait();
                produce(&processor, events, capacity, samples)
            })
            .context("starting a producer thread")?;
        producers.push(producer);
    }
    barrier.wait();
    let started = Instant::now();
    let mut samples = Vec::with_capacity(args.events);
    let mut dropped = 0;
    for producer in producers {
        let (s, d) = producer
            .join()
            .map_err(|_| anyhow::anyhow!("a producer thread panicked"))?;
        samples.extend(s);
        dropped += d;
    }
    let report = processor.close();
    let elapsed = started.elapsed();
    let stats = processor.stats();

    samples.sort_unstable();
    let outcome = Outcome {
        events: args.events,
        batch_size: args.batch_size,
        threads: args.threads,
        queue_capacity: args.queue_capacity,
        upstream_latency_ms: args
            .upstream_latency
            .as_ref()
            .map(|l| l.0.as_secs_f64() * 1e3),
        accepted: stats.accepted,
        dropped,
        dispatched: report.dispatched,
        failed: report.failed,
        batches: stats.batches,
        body_bytes: peer.received().1,
        latency_ns: latency(&samples),
        timer_overhead_ns,
        elapsed_s: elapsed.as_secs_f64(),
        events_per_s: stats.accepted as f64 / elapsed.as_secs_f64(),
        factory_events_per_s,
        ratio_to_factory: stats.accepted as f64 / elapsed.as_secs_f64() / factory_events_per_s,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&outcome)?);
    } else {
        print_table(&outcome);
    }
    let seen = peer.received().0;
    if !report.completed() || report.dispatched != stats.accepted || seen != stats.accepted {
        eprintln!(
            "error: {} events accepted, {} dispatched, {} seen by the dispatcher, {} pending",
            stats.accepted, report.dispatched, seen, report.pending_at_timeout
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// Calls process() for every event, timing each call. Returns the samples and the drops.
fn produce(
    processor: &BatchEventProcessor,
    events: Vec<UserEvent>,
    capacity: usize,
    mut samples: Vec<u64>,
) -> (Vec<u64>, u64) {
    let mut dropped = 0;
    for event in events {
        // Wait for room outside the timed call: a full queue would drop the event.
        while processor.queue_len() >= capacity {
            thread::yield_now();
        }
        let t0 = Instant::now();
        let result = processor.process(event);
        let ns = t0.elapsed().as_nanos() as u64;
        samples.push(ns);
        if result.is_err() {
            dropped += 1;
        }
    }
    (samples, dropped)
}

/// The peer: events/s of [`EventFactory::create_log_events`] alone over the same events
/// (`events`, capped at 200,000 to bound the memory and time), in batches of `batch_size`,
/// on the calling thread. The requests are dropped as they are made, as a discarding
/// dispatcher does; the events are freed after the clock stops (in the processor, the
/// dispatch workers free them).
fn factory_rate(events: usize, batch_size: usize) -> anyhow::Result<f64> {
    let n = events.min(200_000);
    let all = golden_events(0, n);
    let factory = EventFactory::new();
    let mut visitors = 0usize;
    let started = Instant::now();
    for batch in all.chunks(batch_size.max(1)) {
        let output = factory.create_log_events(batch);
        visitors += output
            .log_events
            .iter()
            .map(|e| e.visitor_count())
            .sum::<usize>();
    }
    let elapsed = started.elapsed();
    drop(all);
    if visitors != n {
        bail!("the factory peer serialised {visitors} of {n} events");
    }
    Ok(n as f64 / elapsed.as_secs_f64().max(f64::MIN_POSITIVE))
}

/// The median cost of taking two `Instant`s back to back.
fn timer_overhead() -> u64 {
    let mut v: Vec<u64> = (0..10_001)
        .map(|_| {
            let t0 = Instant::now();
            t0.elapsed().as_nanos() as u64
        })
        .collect();
    v.sort_unstable();
    v[v.len() / 2]
}

fn latency(sorted: &[u64]) -> Latency {
    let at = |q: f64| -> u64 {
        if sorted.is_empty() {
            return 0;
        }
        let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
        sorted[rank - 1]
    };
    let mean = if sorted.is_empty() {
        0.0
    } else {
        sorted.iter().map(|&n| n as f64).sum::<f64>() / sorted.len() as f64
    };
    Latency {
        p50: at(0.50),
        p90: at(0.90),
        p99: at(0.99),
        p999: at(0.999),
        max: sorted.last().copied().unwrap_or(0),
        mean,
    }
}

fn print_table(o: &Outcome) {
    println!(
        "tributary bench processor: {} events, batch size {}, {} producer thread(s), queue {}",
        o.events, o.batch_size, o.threads, o.queue_capacity
    );
    match o.upstream_latency_ms {
        Some(ms) => {
            println!("dispatcher: HttpDispatcher to a loopback upstream answering after {ms} ms")
        }
        None => println!("dispatcher: in-process, discarding"),
    }
    println!();
    println!(
        "process() latency, ns (timer overhead of ~{} ns included)",
        o.timer_overhead_ns
    );
    println!(
        "{:>8} {:>8} {:>8} {:>8} {:>10} {:>8}",
        "p50", "p90", "p99", "p99.9", "max", "mean"
    );
    let l = &o.latency_ns;
    println!(
        "{:>8} {:>8} {:>8} {:>8} {:>10} {:>8.1}",
        l.p50, l.p90, l.p99, l.p999, l.max, l.mean
    );
    println!();
    println!(
        "throughput: {:.0} events/s ({} events in {:.3} s, first process() to close() returning)",
        o.events_per_s, o.accepted, o.elapsed_s
    );
    println!(
        "peer (same run): EventFactory alone {:.0} events/s; ratio processor/factory {:.3}",
        o.factory_events_per_s, o.ratio_to_factory
    );
    println!(
        "accepted {}, dropped {}, dispatched {}, failed {}, requests {}, body bytes {}",
        o.accepted, o.dropped, o.dispatched, o.failed, o.batches, o.body_bytes
    );
}

/// The context of the fixtures' datafile.
fn golden_context() -> Arc<EventContext> {
    let mut ctx = EventContext::new("12133785640", "21537940595", "131");
    ctx.client_name = "python-sdk".into();
    ctx.client_version = "5.7.0".into();
    ctx.bot_filtering = Some(true);
    Arc::new(ctx)
}

/// `n` events for producer `t`: the fixtures' impression and conversion, alternating.
fn golden_events(t: usize, n: usize) -> Vec<UserEvent> {
    let ctx = golden_context();
    let attributes = vec![
        VisitorAttribute::custom(
            "21554750045",
            "country",
            AttributeValue::String("DE".into()),
        ),
        VisitorAttribute::custom("21556420039", "plan", AttributeValue::String("free".into())),
        VisitorAttribute::custom("21563280023", "age", AttributeValue::Int(34)),
        VisitorAttribute::custom(
            "$opt_bot_filtering",
            "$opt_bot_filtering",
            AttributeValue::Bool(true),
        ),
    ];
    let impression = UserEventKind::Impression(Impression {
        campaign_id: "9300000010000".into(),
        experiment_id: "9300000010001".into(),
        variation_id: "410102".into(),
        variation_key: "treatment".into(),
        flag_key: "checkout_redesign".into(),
        rule_key: "checkout_redesign_ab".into(),
        rule_type: "feature-test".into(),
        enabled: true,
        cmab_uuid: None,
    });
    let mut tags = serde_json::Map::new();
    tags.insert("revenue".into(), 4200.into());
    tags.insert("value".into(), 3.5.into());
    tags.insert("category".into(), "shoes".into());
    let conversion = UserEventKind::Conversion(Conversion {
        event_id: "21549340108".into(),
        event_key: "purchase".into(),
        revenue: Some(4200),
        value: Some(3.5),
        tags: Some(tags),
    });
    (0..n)
        .map(|i| {
            let kind = if i.is_multiple_of(2) {
                impression.clone()
            } else {
                conversion.clone()
            };
            UserEvent::new(
                ctx.clone(),
                format!("user-{t}-{i}"),
                attributes.clone(),
                kind,
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn http_run_against_a_slow_loopback_upstream_delivers_every_event() {
        let code = run(ProcessorArgs {
            events: 200,
            batch_size: 10,
            threads: 2,
            queue_capacity: 1000,
            dispatch_concurrency: None,
            upstream_latency: Some(HumanDuration(Duration::from_millis(5))),
            json: true,
        })
        .unwrap();
        assert_eq!(code, ExitCode::SUCCESS);
    }

    #[test]
    fn percentiles_use_nearest_rank() {
        let sorted: Vec<u64> = (1..=1000).collect();
        let l = latency(&sorted);
        assert_eq!(
            (l.p50, l.p90, l.p99, l.p999, l.max),
            (500, 900, 990, 999, 1000)
        );
        assert_eq!(latency(&[]).max, 0);
        assert_eq!(latency(&[7]).p999, 7);
    }

    #[test]
    fn small_run_accounts_for_every_event() {
        let code = run(ProcessorArgs {
            events: 3001,
            batch_size: 7,
            threads: 3,
            queue_capacity: 64,
            dispatch_concurrency: None,
            upstream_latency: None,
            json: true,
        })
        .unwrap();
        assert_eq!(code, ExitCode::SUCCESS);
        assert!(
            run(ProcessorArgs {
                events: 0,
                batch_size: 7,
                threads: 1,
                queue_capacity: 64,
                dispatch_concurrency: None,
                upstream_latency: None,
                json: false,
            })
            .is_err()
        );
    }
}
