//! `tributary drain`: a forward-only node. Long-running, or `--once` to empty the spool and
//! exit with a summary (for cron, a Kubernetes CronJob or a scheduled function).

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::{Duration, Instant};

use tokio::sync::{Notify, watch};

use crate::config::RelaySettings;

/// `tributary drain` flags.
#[derive(Debug, clap::Args)]
pub struct DrainArgs {
    /// TOML file with any of the settings; flags and environment variables win over it.
    #[arg(long, env = "TRIBUTARY_CONFIG", value_name = "FILE")]
    pub config: Option<std::path::PathBuf>,

    /// Forward until nothing is visible in the spool, print a JSON summary and exit:
    /// 0 when everything leased was delivered, 1 when some payloads were left for a later
    /// retry or moved to dead letters.
    #[arg(long)]
    pub once: bool,

    /// With `--once`: stop after this long even if the spool is not empty.
    #[arg(long, value_name = "DURATION", default_value = "10m")]
    pub max_time: crate::config::HumanDuration,

    // Flattened: clap shows the inner flags' own help.
    #[allow(missing_docs)]
    #[command(flatten)]
    pub settings: RelaySettings,
}

/// Runs `tributary drain`.
pub fn run(args: DrainArgs) -> anyhow::Result<ExitCode> {
    let file = match &args.config {
        Some(path) => RelaySettings::from_file(path)?,
        None => RelaySettings::default(),
    };
    let config = args.settings.resolve(file)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let spool = crate::spool_addr::open(
            &config.spool,
            &config,
            crate::spool_addr::OpenMode::Existing,
        )
        .await?;
        let forwarder = crate::forwarding::forwarder(
            &config,
            spool.clone(),
            Arc::new(Notify::new()),
            Arc::new(AtomicUsize::new(0)),
            crate::forwarding::Beside::Nothing,
        )?;
        if args.once {
            let deadline = Instant::now() + args.max_time.0;
            let summary = forwarder.drain(deadline).await?;
            let stats = spool.stats().await?;
            println!(
                "{}",
                serde_json::json!({ "summary": summary, "spool": stats })
            );
            let _ = spool.close().await;
            let clean = summary.payloads_retried == 0 && summary.payloads_dead == 0;
            return Ok(if clean {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            });
        }
        let (stop_tx, stop_rx) = watch::channel(false);
        tracing::info!(spool = %config.spool, "tributary drain running");
        let task = tokio::spawn(async move { forwarder.run(stop_rx).await });
        crate::signal::shutdown_signal().await;
        let _ = stop_tx.send(true);
        // A cycle in progress finishes its sends; bounded by the request timeout.
        let _ =
            tokio::time::timeout(config.request_timeout * 6 + Duration::from_secs(1), task).await;
        let _ = spool.close().await;
        Ok(ExitCode::SUCCESS)
    })
}
