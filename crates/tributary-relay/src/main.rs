//! `tributary`: the store-and-forward relay for Event API payloads, and its tools.

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

use tributary_relay::{bench, cmd_drain, cmd_event, cmd_spool, cmd_validate, config, serve};

/// Tributary: batch, store and forward experimentation events to the Optimizely Event API.
#[derive(Debug, Parser)]
#[command(name = "tributary", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the relay: accept Event API payloads, spool them durably, forward them upstream.
    Serve(serve::ServeArgs),
    /// Forward what a spool holds, without accepting new payloads.
    Drain(cmd_drain::DrainArgs),
    /// Inspect a spool and manage its dead letters.
    #[command(subcommand)]
    Spool(cmd_spool::SpoolCommand),
    /// Build an impression or conversion from a datafile; print it or send it.
    #[command(subcommand)]
    Event(cmd_event::EventCommand),
    /// Check that files hold valid Event API payloads.
    Validate(cmd_validate::ValidateArgs),
    /// Measure the processor or a relay.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Run as an AWS Lambda custom runtime (also what a binary named `bootstrap` does).
    #[cfg(feature = "lambda")]
    Lambda(tributary_relay::cmd_lambda::LambdaArgs),
}

fn main() -> ExitCode {
    init_tracing();
    // `--help` shows each setting's default as `config` has it, not as typed in a doc.
    let matches = config::document_defaults(Cli::command()).get_matches_from(arguments());
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let result = match cli.command {
        Command::Serve(args) => serve::main(args),
        Command::Drain(args) => cmd_drain::run(args),
        Command::Spool(cmd) => cmd_spool::run(cmd),
        Command::Event(cmd) => cmd_event::run(cmd),
        Command::Validate(args) => cmd_validate::run(args),
        Command::Bench(cmd) => bench::run(cmd),
        #[cfg(feature = "lambda")]
        Command::Lambda(args) => tributary_relay::cmd_lambda::run(args),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(2)
        }
    }
}

/// The command line; a binary named `bootstrap` started without arguments (how Lambda starts
/// a custom runtime) runs `lambda`, configured by its environment.
fn arguments() -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let bootstrap = args.first().is_some_and(|a| {
        std::path::Path::new(a).file_name() == Some(std::ffi::OsStr::new("bootstrap"))
    });
    if cfg!(feature = "lambda") && bootstrap && args.len() == 1 {
        args.push("lambda".into());
    }
    args
}

/// Logs to stderr; `RUST_LOG` filters (default `info`). `TRIBUTARY_LOG_FORMAT=json` for
/// one JSON object per line.
fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if std::env::var("TRIBUTARY_LOG_FORMAT").is_ok_and(|f| f == "json") {
        builder.json().init();
    } else {
        builder.init();
    }
}
