//! The forwarder's merger (`forward/pack.rs`): leased payloads of 10 visitors each, as SDKs
//! send them, grouped by header and cut into upstream request bodies at the default limits
//! (3.5 MB, 10,000 events), bodies written. The peer in the same run is copying the same
//! bytes once (`concat`): the merger's floor, since every body byte is written once.
//!
//! `cargo bench -p tributary-spool --bench merge`
#![allow(missing_docs)]

use std::hint::black_box;

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tributary_spool::forward::{ForwarderConfig, merge_for_bench};
use tributary_spool::{Leased, Payload, Receipt};

/// `n` leased payloads of 10 visitors (about 600 bytes each) under `headers` distinct headers.
fn leased(n: usize, headers: usize) -> Vec<Leased> {
    (0..n)
        .map(|i| {
            let header = format!(
                r#""account_id":"12133785640","anonymize_ip":true,"client_name":"python-sdk","client_version":"5.7.0","enrich_decisions":true,"project_id":"21537940595","revision":"{}""#,
                100 + i % headers
            );
            let visitors: Vec<String> = (0..10)
                .map(|v| {
                    format!(
                        r#"{{"snapshots":[{{"events":[{{"entity_id":"21549340108","uuid":"{:032x}","key":"purchase","timestamp":1700000000000,"revenue":4200,"value":3.5,"tags":{{"category":"shoes","revenue":4200,"value":3.5}}}}]}}],"attributes":[{{"entity_id":"21554750045","key":"country","type":"custom","value":"DE"}},{{"entity_id":"21556420039","key":"plan","type":"custom","value":"free"}},{{"entity_id":"$opt_bot_filtering","key":"$opt_bot_filtering","type":"custom","value":true}}],"visitor_id":"user-{i}-{v}"}}"#,
                        i * 10 + v
                    )
                })
                .collect();
            Leased {
                receipt: Receipt(format!("{i}:1")),
                payload: Payload {
                    route: "us".into(),
                    header: Bytes::from(header),
                    visitors: Bytes::from(visitors.join(",")),
                    visitor_count: 10,
                },
                attempts: 0,
                appended_at_ms: 0,
            }
        })
        .collect()
}

fn bench_merge(c: &mut Criterion) {
    let config = ForwarderConfig::default();
    let mut group = c.benchmark_group("merge");
    for (payloads, headers) in [(1000usize, 1usize), (1000, 4)] {
        let input = leased(payloads, headers);
        let events = payloads * 10;
        group.throughput(Throughput::Elements(events as u64));
        let id = format!("{payloads}x10_events_{headers}_headers");
        group.bench_with_input(BenchmarkId::new("pack", &id), &input, |b, input| {
            b.iter(|| {
                let out = merge_for_bench(black_box(input.clone()), &config);
                assert_eq!(out.iter().map(|(n, _)| n).sum::<usize>(), events);
                out
            })
        });
        group.bench_with_input(BenchmarkId::new("concat_peer", &id), &input, |b, input| {
            b.iter(|| {
                let input = black_box(input.clone());
                let runs: Vec<&[u8]> = input.iter().map(|l| &l.payload.visitors[..]).collect();
                runs.concat()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_merge);
criterion_main!(benches);
