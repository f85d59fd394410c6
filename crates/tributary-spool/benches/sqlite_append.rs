//! Throughput of the SQLite spool: durable appends of single-event payloads from N concurrent
//! appenders (group commit at work), lease + ack as the forwarder does it, and both for
//! ten-visitor payloads with the visitors stored zstd-compressed (the default) and as
//! received, so that what the compression costs and saves shows side by side.
//!
//! `cargo bench -p tributary-spool --bench sqlite_append`
#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tributary_spool::{Compression, Payload, Receipt, Spool, SqliteConfig, SqliteSpool, SyncMode};

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

/// Ten visitors of the SDK's conversion shape, each its own uuid and visitor id.
fn ten_visitors(n: u64) -> Payload {
    let one = payload(n);
    let run: Vec<String> = (0..10)
        .map(|i| {
            format!(
                r#"{{"snapshots":[{{"events":[{{"entity_id":"21549340108","uuid":"{:032x}","key":"purchase","timestamp":{},"revenue":4200,"tags":{{"revenue":4200,"category":"shoes"}}}}]}}],"attributes":[{{"entity_id":"21554750045","key":"country","type":"custom","value":"DE"}},{{"entity_id":"$opt_bot_filtering","key":"$opt_bot_filtering","type":"custom","value":true}}],"visitor_id":"user-{}"}}"#,
                n * 10 + i,
                1_795_443_245_068 + n * 7 + i,
                n * 10 + i
            )
        })
        .collect();
    Payload {
        visitors: Bytes::from(run.join(",")),
        visitor_count: 10,
        ..one
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

fn compression(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("sqlite_compression");
    group.throughput(Throughput::Elements(10));
    group.measurement_time(Duration::from_secs(5));
    group.sample_size(10);
    for (compression, name) in [(Compression::Zstd, "zstd"), (Compression::None, "none")] {
        let config = SqliteConfig {
            compression,
            ..config(SyncMode::Full)
        };
        // Durable appends of ten-visitor payloads from 64 appenders.
        group.bench_function(BenchmarkId::new("append_64", name), |b| {
            b.iter_custom(|iters| {
                let dir = tempfile::tempdir().unwrap();
                let spool = Arc::new(SqliteSpool::open(dir.path(), config.clone()).unwrap());
                let elapsed = rt.block_on(async {
                    let started = Instant::now();
                    let mut tasks = tokio::task::JoinSet::new();
                    for t in 0..64u64 {
                        let spool = spool.clone();
                        let mine = iters / 64 + u64::from(t < iters % 64);
                        tasks.spawn(async move {
                            for i in 0..mine {
                                spool
                                    .append(vec![ten_visitors((t << 32) | i)])
                                    .await
                                    .unwrap();
                            }
                        });
                    }
                    while tasks.join_next().await.is_some() {}
                    started.elapsed()
                });
                rt.block_on(spool.close()).unwrap();
                elapsed
            });
        });
        // Lease and ack of 100 such payloads at a time, as the forwarder does.
        group.bench_function(BenchmarkId::new("lease_ack_100", name), |b| {
            let dir = tempfile::tempdir().unwrap();
            let spool = SqliteSpool::open(dir.path(), config.clone()).unwrap();
            b.iter_custom(|iters| {
                rt.block_on(async {
                    for i in 0..iters {
                        spool
                            .append((0..100).map(|n| ten_visitors(i * 100 + n)).collect())
                            .await
                            .unwrap();
                    }
                    let started = Instant::now();
                    for _ in 0..iters {
                        let leased = spool
                            .lease(100, usize::MAX, Duration::from_secs(60))
                            .await
                            .unwrap();
                        let receipts: Vec<Receipt> =
                            leased.into_iter().map(|l| l.receipt).collect();
                        spool.ack(&receipts).await.unwrap();
                    }
                    // Per payload of ten events, as the appends are counted.
                    started.elapsed() / 100
                })
            });
        });
    }
    group.finish();
}

criterion_group!(benches, append, lease_ack, compression);
criterion_main!(benches);
