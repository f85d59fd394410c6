//! Throughput of the SQLite spool: durable appends of single-event payloads from N concurrent
//! appenders (group commit at work), and lease + ack as the forwarder does it.
//!
//! `cargo bench -p tributary-spool --bench sqlite_append`
#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tributary_spool::{Payload, Receipt, Spool, SqliteConfig, SqliteSpool, SyncMode};

/// About the size of one impression from an SDK: a 250-byte header, a 600-byte visitor.
fn payload(n: u64) -> Payload {
    let header = format!(
        r#""account_id":"12345678","project_id":"23456789","revision":"101","client_name":"python-sdk","client_version":"5.7.0","anonymize_ip":false,"enrich_decisions":true,"pad":"{}""#,
        "x".repeat(80)
    );
    let visitor = format!(
        r#"{{"visitor_id":"user-{n}","attributes":[{{"entity_id":"1","key":"plan","type":"custom","value":"gold"}}],"snapshots":[{{"decisions":[{{"campaign_id":"1","experiment_id":"2","variation_id":"3","metadata":{{"flag_key":"f","rule_key":"r","rule_type":"ab-test","variation_key":"on","enabled":true}}}}],"events":[{{"entity_id":"1","type":"campaign_activated","timestamp":1700000000000,"uuid":"{:032x}"}}]}}],"pad":"{}"}}"#,
        n,
        "y".repeat(150)
    );
    Payload {
        route: "us".into(),
        header: Bytes::from(header),
        visitors: Bytes::from(visitor),
        visitor_count: 1,
    }
}

fn config(sync: SyncMode) -> SqliteConfig {
    SqliteConfig {
        sync,
        max_bytes: u64::MAX,
        max_payloads: u64::MAX,
        ..SqliteConfig::default()
    }
}

fn append(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("sqlite_append");
    group.throughput(Throughput::Elements(1));
    group.measurement_time(Duration::from_secs(5));
    group.sample_size(10);
    for (sync, name) in [(SyncMode::Full, "full"), (SyncMode::Normal, "normal")] {
        for appenders in [1u64, 64, 256] {
            group.bench_with_input(
                BenchmarkId::new(name, appenders),
                &appenders,
                |b, &appenders| {
                    b.iter_custom(|iters| {
                        let dir = tempfile::tempdir().unwrap();
                        let spool = Arc::new(SqliteSpool::open(dir.path(), config(sync)).unwrap());
                        let elapsed = rt.block_on(async {
                            let started = Instant::now();
                            let mut tasks = tokio::task::JoinSet::new();
                            for t in 0..appenders {
                                let spool = spool.clone();
                                let mine = iters / appenders + u64::from(t < iters % appenders);
                                tasks.spawn(async move {
                                    for i in 0..mine {
                                        spool.append(vec![payload((t << 32) | i)]).await.unwrap();
                                    }
                                });
                            }
                            while tasks.join_next().await.is_some() {}
                            started.elapsed()
                        });
                        rt.block_on(spool.close()).unwrap();
                        elapsed
                    });
                },
            );
        }
    }
    group.finish();
}

fn lease_ack(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spool = SqliteSpool::open(dir.path(), config(SyncMode::Full)).unwrap();
    let window = 1000u64;
    let mut group = c.benchmark_group("sqlite_lease_ack");
    group.throughput(Throughput::Elements(window));
    group.sample_size(20);
    group.bench_function("window_1000", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                // Refill outside the measurement.
                for _ in 0..iters {
                    spool
                        .append((0..window).map(payload).collect())
                        .await
                        .unwrap();
                }
                let started = Instant::now();
                for _ in 0..iters {
                    let leased = spool
                        .lease(window as usize, usize::MAX, Duration::from_secs(60))
                        .await
                        .unwrap();
                    let receipts: Vec<Receipt> = leased.into_iter().map(|l| l.receipt).collect();
                    spool.ack(&receipts).await.unwrap();
                }
                started.elapsed()
            })
        });
    });
    group.finish();
}

criterion_group!(benches, append, lease_ack);
criterion_main!(benches);
