//! `tributary bench ...`: measurements that hold the performance targets. Each variant lives
//! in its own module; this one only dispatches.

use std::process::ExitCode;

mod processor;
mod relay;

/// Benchmarks.
#[derive(Debug, clap::Subcommand)]
pub enum BenchCommand {
    /// Run the batch event processor in-process with a no-op dispatcher (or, with
    /// `--upstream-latency`, the HTTP dispatcher against a slow loopback server): process()
    /// latency percentiles and end-to-end events/s until close.
    Processor(processor::ProcessorArgs),
    /// Load a relay with realistic Event API payloads: requests/s, events/s, latency
    /// percentiles.
    Relay(relay::RelayLoadArgs),
    /// A bare axum server answering 204 to `POST /v1/events`: the peer the relay is measured
    /// against, and a local upstream that counts the events it receives.
    Sink(relay::SinkArgs),
}

/// Runs one benchmark.
pub fn run(cmd: BenchCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        BenchCommand::Processor(args) => processor::run(args),
        BenchCommand::Relay(args) => relay::run_load(args),
        BenchCommand::Sink(args) => relay::run_sink(args),
    }
}
