//! `--spool`: a directory for the embedded SQLite spool, or `sqs://QUEUE` for AWS SQS.

use std::path::PathBuf;
use std::sync::Arc;

use tributary_spool::{Spool, SqsConfig, SqsSpool};
use tributary_spool::{SqliteConfig, SqliteSpool};

use crate::config::RelayConfig;

/// Where the spool is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpoolAddr {
    /// A directory holding the SQLite spool.
    Sqlite(PathBuf),
    /// An SQS queue name or URL.
    Sqs(String),
}

impl SpoolAddr {
    /// Reads a `--spool` value.
    pub fn parse(s: &str) -> SpoolAddr {
        match s.strip_prefix("sqs://") {
            Some(queue) => SpoolAddr::Sqs(queue.to_owned()),
            None => SpoolAddr::Sqlite(PathBuf::from(s)),
        }
    }
}

/// Whether opening may create a new spool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// The relay: create the spool if it does not exist.
    Create,
    /// Tools: fail when there is no spool at the address (a typo must not look empty).
    Existing,
}

/// Opens the spool `addr` names, with the limits of `config`.
pub async fn open(
    addr: &str,
    config: &RelayConfig,
    mode: OpenMode,
) -> anyhow::Result<Arc<dyn Spool>> {
    match SpoolAddr::parse(addr) {
        SpoolAddr::Sqlite(dir) => {
            let sqlite = SqliteConfig {
                max_bytes: config.spool_max_bytes,
                reserve_bytes: config.spool_reserve_bytes,
                retention: config.retention,
                sync: config.spool_sync,
                compression: config.spool_compression,
                ..SqliteConfig::default()
            };
            let opened = match mode {
                OpenMode::Create => SqliteSpool::open(&dir, sqlite),
                OpenMode::Existing => SqliteSpool::open_existing(&dir, sqlite),
            };
            let spool =
                opened.map_err(|e| anyhow::anyhow!("cannot open spool {}: {e}", dir.display()))?;
            Ok(Arc::new(spool))
        }
        // Both modes need an existing queue: queues are infrastructure (see docs/sqs.md).
        SpoolAddr::Sqs(queue) => {
            let spool = SqsSpool::from_env(sqs_config(queue.clone(), config))
                .await
                .map_err(|e| anyhow::anyhow!("cannot open spool sqs://{queue}: {e}"))?;
            Ok(Arc::new(spool))
        }
    }
}

/// The SQS spool settings of `config` for `queue`; the spool crate's defaults for the rest.
pub fn sqs_config(queue: String, config: &RelayConfig) -> SqsConfig {
    SqsConfig {
        dead_letter_queue: config.sqs_dead_letter_queue.clone(),
        max_receives: config.sqs_max_receives,
        wait_time: config.sqs_wait_time,
        receivers: config.sqs_receivers,
        max_message_bytes: config.sqs_max_message_bytes,
        ..SqsConfig::new(queue)
    }
}
