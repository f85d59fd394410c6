//! `tributary bench ...`: measurements that hold the performance targets. Each variant lives
//! in its own module; this one only dispatches.

use std::process::ExitCode;

mod processor;

/// Benchmarks.
#[derive(Debug, clap::Subcommand)]
pub enum BenchCommand {
    /// Run the batch event processor in-process with a no-op dispatcher: process() latency
    /// percentiles and end-to-end events/s until close.
    Processor(processor::ProcessorArgs),
}

/// Runs one benchmark.
pub fn run(cmd: BenchCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        BenchCommand::Processor(args) => processor::run(args),
    }
}
