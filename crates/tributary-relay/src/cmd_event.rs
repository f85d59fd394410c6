//! `tributary event impression|conversion` (to be written).

use std::process::ExitCode;

/// Build events.
#[derive(Debug, clap::Subcommand)]
pub enum EventCommand {}

pub fn run(cmd: EventCommand) -> anyhow::Result<ExitCode> {
    match cmd {}
}
