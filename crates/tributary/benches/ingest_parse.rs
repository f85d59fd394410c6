//! The relay's ingest parser on SDK-made bodies (the golden impression and conversion,
//! serialised by `EventFactory`): `RawBatch::parse_shape`, one pass, against its peer in the
//! same run, the two-pass check it replaced (`validate_payload_shape`, then `RawBatch::parse`).
//!
//! Run: `cargo bench -p tributary --bench ingest_parse`.

// criterion_group! and criterion_main! generate public functions without doc comments.
#![allow(missing_docs)]

mod golden;

use std::hint::black_box;

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tributary::validate::validate_payload_shape;
use tributary::{EventFactory, RawBatch};

/// One request body of `n` visitors, as an SDK sends it.
fn body(n: usize) -> Bytes {
    let out = EventFactory::new().create_log_events(&golden::events(n));
    assert_eq!(out.log_events.len(), 1, "one request");
    out.log_events[0].body().clone()
}

fn bench_ingest_parse(c: &mut Criterion) {
    let mut group = c.benchmark_group("ingest_parse");
    for n in [1usize, 10, 100] {
        let input = body(n);
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::new("one_pass", n), &input, |b, input| {
            b.iter(|| {
                let batch = RawBatch::parse_shape(black_box(input.clone())).expect("valid body");
                assert_eq!(batch.visitors().len(), n);
                batch
            })
        });
        group.bench_with_input(BenchmarkId::new("two_pass", n), &input, |b, input| {
            b.iter(|| {
                validate_payload_shape(black_box(input)).expect("valid shape");
                let batch = RawBatch::parse(input.clone()).expect("valid body");
                assert_eq!(batch.visitors().len(), n);
                batch
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_ingest_parse);
criterion_main!(benches);
