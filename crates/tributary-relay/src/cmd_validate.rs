//! `tributary validate FILE...` (to be written).

use std::process::ExitCode;

/// Validate files.
#[derive(Debug, clap::Args)]
pub struct ValidateArgs {}

pub fn run(_args: ValidateArgs) -> anyhow::Result<ExitCode> {
    Ok(ExitCode::SUCCESS)
}
