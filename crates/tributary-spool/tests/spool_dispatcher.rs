//! The library's BatchEventProcessor -> SpoolDispatcher -> a real spool (SQLite in a
//! tempdir; SQS on moto's server, started by the testkit), then the spool is leased to
//! check that every event is there exactly once, on the right route.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_sqs::config::{Credentials, Region as AwsRegion};
use tributary::{
    AttributeValue, BatchEventProcessor, Conversion, DispatchError, EventContext, EventDispatcher,
    EventFactory, Region, UserEvent, UserEventKind, VisitorAttribute,
};
use tributary_spool::{
    Leased, Spool, SpoolDispatcher, SpoolDispatcherBuilder, SqliteConfig, SqliteSpool, SqsConfig,
    SqsSpool,
};
use tributary_testkit::MotoServer;

fn context(region: Region) -> Arc<EventContext> {
    let mut ctx = EventContext::new("12133785640", "21537940595", "131");
    ctx.region = region;
    Arc::new(ctx)
}

fn event(ctx: &Arc<EventContext>, user: &str, attributes: Vec<VisitorAttribute>) -> UserEvent {
    UserEvent::new(
        ctx.clone(),
        user,
        attributes,
        UserEventKind::Conversion(Conversion {
            event_id: "21549340108".into(),
            event_key: "purchase".into(),
            revenue: Some(4200),
            value: None,
            tags: None,
        }),
    )
}

/// 150 US and 100 EU events through a BatchEventProcessor into `dispatcher`; returns
/// uuid -> region of what the processor reported dispatched.
fn produce<D: EventDispatcher>(dispatcher: D) -> HashMap<String, &'static str> {
    let processor = BatchEventProcessor::builder()
        .dispatcher(dispatcher)
        .batch_size(10)
        .flush_interval(Duration::from_secs(3600))
        .close_timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let (us, eu) = (context(Region::Us), context(Region::Eu));
    let mut sent = HashMap::new();
    for i in 0..250 {
        // A context change flushes a batch: 150 US events, then 100 EU, make 25 batches.
        let (ctx, route) = if i < 150 { (&us, "us") } else { (&eu, "eu") };
        let e = event(ctx, &format!("user-{i}"), vec![]);
        sent.insert(e.uuid.to_string(), route);
        processor.process(e).unwrap();
    }
    let report = processor.close();
    assert!(report.completed(), "{report:?}");
    assert_eq!((report.dispatched, report.failed), (250, 0), "{report:?}");
    sent
}

/// Leases everything from `spool` (on `runtime`): uuid -> (route, times seen).
fn drain<S: Spool>(
    runtime: &tokio::runtime::Runtime,
    spool: &S,
) -> HashMap<String, (String, usize)> {
    runtime.block_on(async {
        let mut seen: HashMap<String, (String, usize)> = HashMap::new();
        loop {
            let leased: Vec<Leased> = spool
                .lease(1000, 64 << 20, Duration::from_secs(600))
                .await
                .unwrap();
            if leased.is_empty() {
                return seen;
            }
            for l in &leased {
                let body = l.payload.to_batch().unwrap().encode();
                for u in tributary_testkit::event_uuids(&body) {
                    seen.entry(u)
                        .or_insert_with(|| (l.payload.route.to_string(), 0))
                        .1 += 1;
                }
            }
        }
    })
}

fn check(sent: &HashMap<String, &'static str>, seen: &HashMap<String, (String, usize)>) {
    assert_eq!(seen.len(), sent.len(), "every event stored, nothing else");
    for (uuid, route) in sent {
        let (stored_route, n) = &seen[uuid];
        assert_eq!((stored_route.as_str(), *n), (*route, 1), "{uuid}");
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn processor_to_sqlite_spool() {
    let dir = tempfile::tempdir().unwrap();
    let spool = SqliteSpool::open(dir.path(), SqliteConfig::default()).unwrap();
    let dispatcher = Arc::new(SpoolDispatcher::new(spool).unwrap());
    let sent = produce(dispatcher.clone());
    let stats = dispatcher.stats();
    assert_eq!((stats.appended, stats.failed), (25, 0), "{stats:?}");
    let spool = dispatcher.spool().clone();
    check(&sent, &drain(&runtime(), &*spool));
}

async fn moto_sdk() -> aws_config::SdkConfig {
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(AwsRegion::new("us-east-1"))
        .credentials_provider(Credentials::new("test", "test", None, None, "static"))
        .endpoint_url(MotoServer::shared().endpoint())
        .load()
        .await
}

fn sqs_config(queue: &str) -> SqsConfig {
    SqsConfig {
        wait_time: Duration::ZERO,
        ..SqsConfig::new(queue)
    }
}

#[test]
fn processor_to_sqs_spool() {
    MotoServer::shared().create_queue("dispatcher-sqs", &[]);
    let dispatcher = SpoolDispatcherBuilder::new()
        .build_with(|| async {
            SqsSpool::open(&moto_sdk().await, sqs_config("dispatcher-sqs")).await
        })
        .unwrap();
    let dispatcher = Arc::new(dispatcher);
    let sent = produce(dispatcher.clone());
    assert_eq!(dispatcher.stats().appended, 25);

    // A drain node's view: its own client on its own runtime.
    let rt = runtime();
    let spool = rt.block_on(async {
        SqsSpool::open(&moto_sdk().await, sqs_config("dispatcher-sqs"))
            .await
            .unwrap()
    });
    check(&sent, &drain(&rt, &spool));
}

#[test]
fn a_visitor_too_large_for_sqs_is_a_permanent_413() {
    MotoServer::shared().create_queue("dispatcher-too-large", &[]);
    let dispatcher = SpoolDispatcherBuilder::new()
        .build_with(|| async {
            SqsSpool::open(&moto_sdk().await, sqs_config("dispatcher-too-large")).await
        })
        .unwrap();
    let big = VisitorAttribute::custom(
        "1",
        "blob",
        AttributeValue::String("x".repeat(300_000).into()),
    );
    let output =
        EventFactory::default().create_log_events(&[event(&context(Region::Us), "u", vec![big])]);
    let err = dispatcher.dispatch(&output.log_events[0]).unwrap_err();
    assert!(
        matches!(err, DispatchError::Permanent { status: 413, .. }),
        "{err}"
    );
    assert_eq!(dispatcher.stats().retries, 0, "not retried");
}

#[test]
fn a_full_spool_is_retried_then_transient() {
    let dir = tempfile::tempdir().unwrap();
    let config = SqliteConfig {
        max_bytes: 100,
        ..SqliteConfig::default()
    };
    let spool = SqliteSpool::open(dir.path(), config).unwrap();
    let dispatcher = SpoolDispatcherBuilder::new()
        .attempts(3)
        .backoff(Duration::from_millis(1), Duration::from_millis(5))
        .build(spool)
        .unwrap();
    let output =
        EventFactory::default().create_log_events(&[event(&context(Region::Us), "u", vec![])]);
    let err = dispatcher.dispatch(&output.log_events[0]).unwrap_err();
    assert!(err.is_retryable(), "{err}");
    let stats = dispatcher.stats();
    assert_eq!(
        (stats.appended, stats.retries, stats.failed),
        (0, 2, 1),
        "{stats:?}"
    );
}

#[test]
fn a_spool_that_cannot_open_fails_the_build() {
    let err = SpoolDispatcherBuilder::new()
        .build_with(|| async {
            SqsSpool::open(&moto_sdk().await, sqs_config("dispatcher-no-such-queue")).await
        })
        .unwrap_err();
    assert!(
        err.to_string().contains("dispatcher-no-such-queue"),
        "{err}"
    );
}
