//! The Tributary relay as a library: what the `tributary` binary runs, for programs and tests
//! that embed it.
//!
//! [`serve::run`] serves ingest, health and metrics on a listener the caller bound, with a
//! forwarder beside it, until a shutdown future resolves:
//!
//! ```no_run
//! use tributary_relay::config::RelaySettings;
//!
//! # async fn example() -> anyhow::Result<()> {
//! let config = RelaySettings {
//!     spool: Some("/var/lib/tributary".into()),
//!     ..RelaySettings::default()
//! }
//! .resolve(RelaySettings::default())?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
//! let relay = tokio::spawn(tributary_relay::serve::run(listener, config, true, async {
//!     let _ = stopped.await;
//! }));
//! // ... post Event API payloads to the listener's address ...
//! let _ = stop.send(());
//! relay.await??;
//! # Ok(())
//! # }
//! ```
//!
//! The other modules are the binary's subcommands (`drain`, `spool`, `event`, `validate`,
//! `bench`); the store-and-forward machinery itself lives in [`tributary_spool::forward`].

pub mod account_labels;
pub mod auth;
pub mod bench;
pub mod cmd_drain;
pub mod cmd_event;
#[cfg(feature = "lambda")]
pub mod cmd_lambda;
pub mod cmd_spool;
pub mod cmd_validate;
pub mod config;
pub mod dedup;
pub mod forwarding;
pub mod http_server;
pub mod ingest;
mod json_fields;
pub mod privacy;
pub mod quota;
pub mod rules;
pub mod serve;
pub mod signal;
pub mod spool_addr;
pub mod status;
pub mod telemetry;
