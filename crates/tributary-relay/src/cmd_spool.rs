//! `tributary spool stats|audit|dead-letters ...`: look into a spool, prove what it holds,
//! and act on its dead letters, also while a relay is using it.

use std::process::ExitCode;

use tributary_spool::{Selection, Spool};

use crate::config::RelaySettings;

/// `tributary spool` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum SpoolCommand {
    /// Print what the spool holds, as JSON.
    Stats(SpoolArg),
    /// Check the spool's durable totals (accepted = delivered + dead + purged + pending, for
    /// events and payloads) against a count of every row; print them as JSON and exit 1 if
    /// anything does not add up (SQLite spool only).
    Audit(SpoolArg),
    /// List, retry or purge dead letters.
    #[command(subcommand)]
    DeadLetters(DeadLetterCommand),
}

/// Which spool, with the same settings (flags, environment, `--config` file) as the relay,
/// so SQS options such as `--sqs-dead-letter-queue` apply here too.
#[derive(Debug, clap::Args)]
pub struct SpoolArg {
    /// TOML file with relay settings; flags and environment variables win over it.
    #[arg(long, env = "TRIBUTARY_CONFIG", value_name = "FILE")]
    pub config: Option<std::path::PathBuf>,

    // Flattened: clap shows the inner flags' own help.
    #[allow(missing_docs)]
    #[command(flatten)]
    pub settings: RelaySettings,
}

/// Dead-letter operations.
#[derive(Debug, clap::Subcommand)]
pub enum DeadLetterCommand {
    /// One JSON line per dead letter: id, reason, times, events, and the payload body with
    /// `--with-body`.
    List {
        // Flattened: clap shows the inner flags' own help.
        #[allow(missing_docs)]
        #[command(flatten)]
        spool: SpoolArg,
        /// Most dead letters to list.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Include each payload's body.
        #[arg(long)]
        with_body: bool,
    },
    /// Put dead letters back in the queue to be forwarded again.
    Retry {
        // Flattened: clap shows the inner flags' own help.
        #[allow(missing_docs)]
        #[command(flatten)]
        spool: SpoolArg,
        /// Dead-letter ids (from `list`).
        ids: Vec<String>,
        /// All dead letters.
        #[arg(long, conflicts_with = "ids")]
        all: bool,
    },
    /// Delete dead letters for good.
    Purge {
        // Flattened: clap shows the inner flags' own help.
        #[allow(missing_docs)]
        #[command(flatten)]
        spool: SpoolArg,
        /// Dead-letter ids (from `list`).
        ids: Vec<String>,
        /// All dead letters.
        #[arg(long, conflicts_with = "ids")]
        all: bool,
    },
}

/// Runs a spool command.
pub fn run(cmd: SpoolCommand) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run_async(cmd))
}

async fn open(arg: &SpoolArg) -> anyhow::Result<std::sync::Arc<dyn Spool>> {
    let file = match &arg.config {
        Some(path) => RelaySettings::from_file(path)?,
        None => RelaySettings::default(),
    };
    let config = arg.settings.clone().resolve(file)?;
    crate::spool_addr::open(
        &config.spool,
        &config,
        crate::spool_addr::OpenMode::Existing,
    )
    .await
}

fn selection(ids: Vec<String>, all: bool) -> anyhow::Result<Selection> {
    match (all, ids.is_empty()) {
        (true, _) => Ok(Selection::All),
        (false, false) => Ok(Selection::Ids(ids)),
        (false, true) => anyhow::bail!("name dead-letter ids, or pass --all"),
    }
}

async fn run_async(cmd: SpoolCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        SpoolCommand::Stats(arg) => {
            let stats = open(&arg).await?.stats().await?;
            println!("{}", serde_json::to_string_pretty(&stats)?);
        }
        SpoolCommand::Audit(arg) => {
            let audit = open(&arg).await?.audit().await?;
            let mut out = serde_json::to_value(&audit)?;
            out["balanced"] = audit.is_balanced().into();
            println!("{}", serde_json::to_string_pretty(&out)?);
            if !audit.is_balanced() {
                for p in &audit.problems {
                    eprintln!("error: {p}");
                }
                return Ok(ExitCode::FAILURE);
            }
        }
        SpoolCommand::DeadLetters(DeadLetterCommand::List {
            spool,
            limit,
            with_body,
        }) => {
            for d in open(&spool).await?.dead_letters(limit).await? {
                let mut line = serde_json::json!({
                    "id": d.id,
                    "route": d.payload.route.as_str(),
                    "reason": d.reason,
                    "events": d.payload.visitor_count,
                    "bytes": d.payload.stored_len(),
                    "appended_at_ms": d.appended_at_ms,
                    "dead_at_ms": d.dead_at_ms,
                });
                if with_body {
                    let body = d.payload.to_batch()?.encode();
                    line["body"] = serde_json::from_slice(&body)?;
                }
                println!("{line}");
            }
        }
        SpoolCommand::DeadLetters(DeadLetterCommand::Retry { spool, ids, all }) => {
            let n = open(&spool)
                .await?
                .retry_dead_letters(selection(ids, all)?)
                .await?;
            println!("{n} dead letters queued for delivery again");
        }
        SpoolCommand::DeadLetters(DeadLetterCommand::Purge { spool, ids, all }) => {
            let n = open(&spool)
                .await?
                .purge_dead_letters(selection(ids, all)?)
                .await?;
            println!("{n} dead letters purged");
        }
    }
    Ok(ExitCode::SUCCESS)
}
