//! `tributary event impression|conversion`: builds one user event from a datafile, the way the
//! SDKs do, then prints its LogEvent (`--dry-run`) or POSTs it (`--to URL`, or the Event API
//! endpoint of the datafile's region when neither is given).
//!
//! Exit status: 0 when printed or sent with a 2xx answer; 1 when sending failed (no answer or
//! a non-2xx one); 2 on usage or input errors (unreadable datafile, bad JSON, unknown keys).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::{Map, Value};
use tributary::user_event_factory::{ImpressionRequest, parse_json_object};
use tributary::{EventFactory, LogEvent, ProjectConfig, UserEventFactory};

/// Default for `--max-datafile-bytes`: real datafiles are at most a few megabytes.
const DEFAULT_MAX_DATAFILE_BYTES: u64 = 64 * 1024 * 1024;
/// At most this much of an error response's body is shown.
const MAX_SHOWN_RESPONSE_BYTES: usize = 1024;

/// Build an impression or a conversion from a datafile; print it or send it.
#[derive(Debug, clap::Subcommand)]
pub enum EventCommand {
    /// An impression: a user got a variation of a flag's rule (an experiment, "feature-test",
    /// or a rollout rule, "rollout").
    Impression(ImpressionArgs),
    /// A conversion: a user did something the datafile's events measure (`track`).
    Conversion(ConversionArgs),
}

/// Options of `tributary event impression`.
#[derive(Debug, clap::Args)]
pub struct ImpressionArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Flag key.
    #[arg(long, value_name = "KEY")]
    flag: String,
    /// Rule key: one of the flag's experiments or rollout rules.
    #[arg(long, value_name = "KEY")]
    rule: String,
    /// Variation key within the rule.
    #[arg(long, value_name = "KEY")]
    variation: String,
    /// Whether the flag was on [default: the variation's featureEnabled, as `decide` says].
    #[arg(long, value_name = "true|false")]
    enabled: Option<bool>,
    /// Contextual multi-armed bandit decision id, sent as `metadata.cmab_uuid`.
    #[arg(long, value_name = "UUID")]
    cmab_uuid: Option<String>,
}

/// Options of `tributary event conversion`.
#[derive(Debug, clap::Args)]
pub struct ConversionArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Event key.
    #[arg(long, value_name = "KEY")]
    event: String,
    /// Event tags as a JSON object, sent untouched; `revenue` (an integer) and `value` (a
    /// number or numeric string) are also taken from it, e.g. '{"revenue":4200,"value":3.5}'.
    #[arg(long, value_name = "JSON")]
    tags: Option<String>,
}

/// Options every `tributary event` command takes.
#[derive(Debug, clap::Args)]
struct CommonArgs {
    /// Version-4 datafile (JSON).
    #[arg(long, value_name = "FILE", env = "TRIBUTARY_DATAFILE")]
    datafile: PathBuf,
    /// Visitor id.
    #[arg(long, value_name = "ID")]
    user: String,
    /// Visitor attributes as a JSON object, e.g. '{"country":"DE","age":34}'. Sent in this
    /// order; keys the datafile does not declare and values that are not a string, a
    /// boolean or a finite number within ±2^53 are left out, as the SDKs do.
    #[arg(long, value_name = "JSON")]
    attrs: Option<String>,
    /// Print the LogEvent as JSON ({"url","http_verb","headers","params"}) instead of
    /// sending it.
    #[arg(long, conflicts_with = "to")]
    dry_run: bool,
    /// POST the payload here instead of the Event API endpoint of the datafile's region.
    #[arg(long, value_name = "URL", env = "TRIBUTARY_EVENT_TO")]
    to: Option<String>,
    /// Give up sending after this long.
    #[arg(long, value_name = "DURATION", default_value = "10s")]
    timeout: humantime::Duration,
    /// `client_name` sent in the payload.
    #[arg(long, value_name = "NAME", env = "TRIBUTARY_CLIENT_NAME", default_value = tributary::CLIENT_NAME)]
    client_name: String,
    /// `client_version` sent in the payload.
    #[arg(long, value_name = "VERSION", env = "TRIBUTARY_CLIENT_VERSION", default_value = tributary::CLIENT_VERSION)]
    client_version: String,
    /// Datafiles larger than this are refused unread.
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_MAX_DATAFILE_BYTES)]
    max_datafile_bytes: u64,
}

/// Runs `tributary event ...`.
pub fn run(cmd: EventCommand) -> anyhow::Result<ExitCode> {
    let (common, log_event) = match cmd {
        EventCommand::Impression(args) => {
            let factory = factory(&args.common)?;
            let attrs = attributes(args.common.attrs.as_deref())?;
            let mut req =
                ImpressionRequest::new(&args.common.user, &args.flag, &args.rule, &args.variation);
            req.enabled = args.enabled;
            req.cmab_uuid = args.cmab_uuid.as_deref();
            let event = factory.build_impression(&req, &attrs)?;
            (args.common, log_event(event)?)
        }
        EventCommand::Conversion(args) => {
            let factory = factory(&args.common)?;
            let attrs = attributes(args.common.attrs.as_deref())?;
            let tags = args.tags.as_deref().map(tags).transpose()?;
            let event =
                factory.conversion(&args.common.user, &attrs, &args.event, tags.as_ref())?;
            (args.common, log_event(event)?)
        }
    };
    if common.dry_run {
        let json = log_event
            .to_json()
            .context("re-reading the built payload")?;
        let mut text = serde_json::to_string_pretty(&json)?;
        text.push('\n');
        let mut stdout = std::io::stdout().lock();
        return match stdout
            .write_all(text.as_bytes())
            .and_then(|()| stdout.flush())
        {
            Ok(()) => Ok(ExitCode::SUCCESS),
            // The reader went away (`| head`): there is no one left to tell.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(ExitCode::SUCCESS),
            Err(e) => Err(e).context("writing to stdout"),
        };
    }
    let url = common.to.as_deref().unwrap_or(&log_event.url);
    Ok(send(url, &log_event, common.timeout.into()))
}

fn factory(common: &CommonArgs) -> anyhow::Result<UserEventFactory> {
    let text = read_datafile(&common.datafile, common.max_datafile_bytes)?;
    let config = ProjectConfig::from_json(&text)
        .with_context(|| format!("--datafile {}", common.datafile.display()))?;
    Ok(UserEventFactory::with_client(
        config.into(),
        common.client_name.clone(),
        common.client_version.clone(),
    ))
}

fn read_datafile(path: &Path, max_bytes: u64) -> anyhow::Result<String> {
    let len = std::fs::metadata(path)
        .with_context(|| format!("--datafile {}: cannot read", path.display()))?
        .len();
    if len > max_bytes {
        bail!(
            "--datafile {}: {len} bytes, over the {max_bytes}-byte limit (--max-datafile-bytes)",
            path.display()
        );
    }
    std::fs::read_to_string(path).with_context(|| format!("--datafile {}", path.display()))
}

fn attributes(json: Option<&str>) -> anyhow::Result<Vec<(String, Value)>> {
    match json {
        None => Ok(Vec::new()),
        Some(text) => parse_json_object(text).context("--attrs: not a JSON object"),
    }
}

fn tags(text: &str) -> anyhow::Result<Map<String, Value>> {
    match serde_json::from_str::<Value>(text).context("--tags: not valid JSON")? {
        Value::Object(map) => Ok(map),
        other => bail!("--tags: must be a JSON object, got {other}"),
    }
}

fn log_event(event: tributary::UserEvent) -> anyhow::Result<LogEvent> {
    let mut log_events = EventFactory::new()
        .create_log_events(&[event])
        .into_result()?;
    log_events
        .pop()
        .context("the event factory built no request for the event")
}

/// POSTs the body; reports on stdout (success) or stderr (failure) and returns the exit code.
fn send(url: &str, log_event: &LogEvent, timeout: Duration) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the HTTP client: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async {
        let client = reqwest::Client::builder().timeout(timeout).build()?;
        let mut request = client.post(url);
        for (name, value) in &log_event.headers {
            request = request.header(*name, *value);
        }
        let response = request.body(log_event.body().clone()).send().await?;
        let status = response.status();
        let body = if status.is_success() {
            Vec::new()
        } else {
            // Enough of the answer to say why, never an unbounded read.
            let mut shown = Vec::new();
            let mut response = response;
            while let Some(chunk) = response.chunk().await? {
                shown.extend_from_slice(&chunk);
                if shown.len() >= MAX_SHOWN_RESPONSE_BYTES {
                    shown.truncate(MAX_SHOWN_RESPONSE_BYTES);
                    break;
                }
            }
            shown
        };
        Ok::<_, reqwest::Error>((status, body))
    });
    match result {
        Ok((status, _)) if status.is_success() => {
            println!(
                "sent {} event(s), {} bytes, to {url}: {status}",
                log_event.visitor_count(),
                log_event.body().len()
            );
            ExitCode::SUCCESS
        }
        Ok((status, body)) => {
            eprintln!(
                "error: {url} answered {status}: {}",
                String::from_utf8_lossy(&body)
            );
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("error: sending to {url}: {e}");
            ExitCode::from(1)
        }
    }
}
