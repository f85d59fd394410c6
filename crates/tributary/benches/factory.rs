//! `EventFactory::create_log_events` (batching plus JSON serialisation) on realistic events:
//! the golden impression and conversion of the Python SDK 5.7.0 fixtures, alternating.
//!
//! Run: `cargo bench -p tributary --bench factory`. The Python peer is
//! `scripts/bench_python_factory.py`; compare the two from the same machine and run.

// criterion_group! and criterion_main! generate public functions without doc comments.
#![allow(missing_docs)]

mod golden;

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use golden::events;
use tributary::EventFactory;

fn bench_factory(c: &mut Criterion) {
    let factory = EventFactory::new();
    let mut group = c.benchmark_group("create_log_events");
    for n in [10usize, 100] {
        let input = events(n);
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::from_parameter(n), &input, |b, input| {
            b.iter(|| {
                let out = factory.create_log_events(black_box(input));
                assert_eq!(out.log_events.len(), 1);
                black_box(out)
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_factory);
criterion_main!(benches);
