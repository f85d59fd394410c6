//! `tributary validate FILE...`: checks that files hold valid Event API payloads.
//!
//! A file holds either an `EventBatch` (a request body, as an SDK POSTs it) or a LogEvent
//! `{"url","http_verb","headers","params"}` as `tributary event ... --dry-run` prints it, in
//! which case `params` is the payload checked. Every problem is printed with its JSON path;
//! the exit status is 0 if all files are valid, 1 if any is invalid, 2 if any cannot be read.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use serde::Serialize;
use serde_json::Value;
use tributary::validate::{Problem, ValidatedSummary, Validator};

/// Default for `--max-file-bytes`: far above the Event API's 3.5 MB limit, so that a
/// pretty-printed LogEvent still fits, yet a bound on what one file can make us hold.
const DEFAULT_MAX_FILE_BYTES: u64 = 64 * 1024 * 1024;

/// Check that files hold valid Event API payloads (EventBatch bodies or LogEvent JSON).
///
/// Prints `OK FILE (N visitors, M events, B bytes) [KIND]` for a valid file and
/// `FILE: $.json.path: message` for each problem of an invalid one. Exit status: 0 if every
/// file is valid, 1 if any is invalid, 2 if any cannot be read.
#[derive(Debug, clap::Args)]
pub struct ValidateArgs {
    /// Files to check; `-` reads standard input.
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,

    /// Print one JSON document with the result of every file instead of text.
    #[arg(long)]
    pub json: bool,

    /// Apply only the relay's ingest rules (object, account_id, visitors with visitor_id
    /// and snapshots), without the size limit, instead of the full Event API rules.
    #[arg(long)]
    pub shape: bool,

    /// Files larger than this are reported invalid without being parsed.
    #[arg(
        long,
        value_name = "BYTES",
        env = "TRIBUTARY_VALIDATE_MAX_FILE_BYTES",
        default_value_t = DEFAULT_MAX_FILE_BYTES
    )]
    pub max_file_bytes: u64,
}

/// What a file was recognised as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum Kind {
    /// A request body.
    EventBatch,
    /// An SDK-style LogEvent whose `params` is the body.
    LogEvent,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::EventBatch => "EventBatch",
            Kind::LogEvent => "LogEvent params",
        }
    }
}

/// The outcome for one file, as `--json` prints it.
#[derive(Debug, Serialize)]
struct FileReport {
    path: String,
    status: Status,
    #[serde(skip_serializing_if = "Option::is_none")]
    kind: Option<Kind>,
    #[serde(skip_serializing_if = "Option::is_none")]
    summary: Option<ValidatedSummary>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    problems: Vec<Problem>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum Status {
    Ok,
    Invalid,
    Unreadable,
}

/// Runs the command; see [`ValidateArgs`] for the exit status.
pub fn run(args: ValidateArgs) -> anyhow::Result<ExitCode> {
    let validator = if args.shape {
        Validator::shape()
    } else {
        Validator::full()
    };
    let reports: Vec<FileReport> = args
        .files
        .iter()
        .map(|path| check_file(path, &validator, args.max_file_bytes))
        .collect();

    if args.json {
        let valid = reports.iter().all(|r| r.status == Status::Ok);
        let doc = serde_json::json!({ "valid": valid, "files": reports });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        for r in &reports {
            print_text(r);
        }
    }

    let code = if reports.iter().any(|r| r.status == Status::Unreadable) {
        2
    } else if reports.iter().any(|r| r.status == Status::Invalid) {
        1
    } else {
        0
    };
    Ok(ExitCode::from(code))
}

fn print_text(r: &FileReport) {
    match r.status {
        Status::Ok => {
            let kind = r.kind.map_or("", Kind::label);
            match r.summary {
                Some(s) => {
                    let events = s
                        .events
                        .map(|m| format!("{m} events, "))
                        .unwrap_or_default();
                    println!(
                        "OK {} ({} visitors, {events}{} bytes) [{kind}]",
                        r.path, s.visitors, s.bytes
                    );
                }
                None => println!("OK {} [{kind}]", r.path),
            }
        }
        Status::Invalid => {
            for p in &r.problems {
                println!("{}: {}: {}", r.path, p.path, p.message);
            }
            let kind = r.kind.map_or("", Kind::label);
            println!(
                "INVALID {} ({} problems) [{kind}]",
                r.path,
                r.problems.len()
            );
        }
        Status::Unreadable => {
            eprintln!(
                "{}: cannot read: {}",
                r.path,
                r.error.as_deref().unwrap_or("unknown error")
            );
        }
    }
}

fn check_file(path: &PathBuf, validator: &Validator, max_bytes: u64) -> FileReport {
    let display = path.display().to_string();
    let bytes = match read_bounded(path, max_bytes) {
        Ok(Some(bytes)) => bytes,
        Ok(None) => {
            return FileReport {
                path: display,
                status: Status::Invalid,
                kind: None,
                summary: None,
                problems: vec![Problem {
                    path: "$".to_owned(),
                    message: format!(
                        "file is larger than {max_bytes} bytes (--max-file-bytes); not checked"
                    ),
                }],
                error: None,
            };
        }
        Err(e) => {
            return FileReport {
                path: display,
                status: Status::Unreadable,
                kind: None,
                summary: None,
                problems: Vec::new(),
                error: Some(e.to_string()),
            };
        }
    };
    let (kind, result) = check_bytes(&bytes, validator);
    match result {
        Ok(summary) => FileReport {
            path: display,
            status: Status::Ok,
            kind: Some(kind),
            summary: Some(summary),
            problems: Vec::new(),
            error: None,
        },
        Err(problems) => FileReport {
            path: display,
            status: Status::Invalid,
            kind: Some(kind),
            summary: None,
            problems,
            error: None,
        },
    }
}

/// The file's bytes, or `None` if it is longer than `max_bytes`.
fn read_bounded(path: &PathBuf, max_bytes: u64) -> std::io::Result<Option<Vec<u8>>> {
    let mut buf = Vec::new();
    let limit = max_bytes.saturating_add(1);
    if path.as_os_str() == "-" {
        std::io::stdin().lock().take(limit).read_to_end(&mut buf)?;
    } else {
        std::fs::File::open(path)?
            .take(limit)
            .read_to_end(&mut buf)?;
    }
    if buf.len() as u64 > max_bytes {
        return Ok(None);
    }
    Ok(Some(buf))
}

/// Detects what the bytes hold and validates them.
fn check_bytes(
    bytes: &[u8],
    validator: &Validator,
) -> (Kind, Result<ValidatedSummary, Vec<Problem>>) {
    let value: Value = match serde_json::from_slice(bytes) {
        Ok(v) => v,
        // Not JSON: the validator reports where.
        Err(_) => return (Kind::EventBatch, validator.validate(bytes)),
    };
    if !is_log_event(&value) {
        // Validate the bytes themselves: the size that matters is the file's.
        return (Kind::EventBatch, validator.validate(bytes));
    }
    let mut problems = log_event_envelope_problems(&value);
    let params = value.get("params").unwrap_or(&Value::Null);
    let result = match validator.validate_value(params, "$.params") {
        Ok(summary) if problems.is_empty() => Ok(summary),
        Ok(_) => Err(problems),
        Err(mut more) => {
            problems.append(&mut more);
            Err(problems)
        }
    };
    (Kind::LogEvent, result)
}

/// A LogEvent has `params` and `url` or `http_verb`, and none of a body's own fields.
fn is_log_event(value: &Value) -> bool {
    let Some(obj) = value.as_object() else {
        return false;
    };
    obj.contains_key("params")
        && (obj.contains_key("url") || obj.contains_key("http_verb"))
        && !obj.contains_key("visitors")
        && !obj.contains_key("account_id")
}

/// Checks the LogEvent fields around `params`.
fn log_event_envelope_problems(value: &Value) -> Vec<Problem> {
    let mut problems = Vec::new();
    let mut problem = |path: &str, message: String| {
        problems.push(Problem {
            path: path.to_owned(),
            message,
        })
    };
    match value.get("url") {
        Some(Value::String(url)) if url.starts_with("http://") || url.starts_with("https://") => {}
        Some(Value::String(_)) => problem("$.url", "expected an http(s) URL".to_owned()),
        Some(_) => problem("$.url", "expected a string".to_owned()),
        None => problem("$.url", "required field is missing".to_owned()),
    }
    match value.get("http_verb") {
        None => {}
        Some(Value::String(v)) if v.eq_ignore_ascii_case("POST") => {}
        Some(other) => problem(
            "$.http_verb",
            format!("the Event API takes POST, found {other}"),
        ),
    }
    match value.get("headers") {
        None => {}
        Some(Value::Object(headers)) => {
            for (name, v) in headers {
                if !v.is_string() {
                    problem(
                        &format!("$.headers[{}]", quote(name)),
                        "expected a string".to_owned(),
                    );
                }
            }
        }
        Some(_) => problem("$.headers", "expected an object".to_owned()),
    }
    problems
}

/// A header name as a JSONPath bracket key.
fn quote(name: &str) -> String {
    serde_json::to_string(name).unwrap_or_else(|_| format!("{name:?}"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn detects_log_events_but_not_bodies() {
        assert!(is_log_event(&serde_json::json!({
            "url": "https://logx.optimizely.com/v1/events", "http_verb": "POST",
            "headers": {"Content-Type": "application/json"}, "params": {}
        })));
        assert!(!is_log_event(
            &serde_json::json!({"account_id": "1", "visitors": [], "params": {}, "url": "x"})
        ));
        assert!(!is_log_event(&serde_json::json!([1])));
    }

    #[test]
    fn envelope_problems_are_named() {
        let (kind, result) = check_bytes(
            br#"{"url":5,"http_verb":"GET","headers":{"X":1},"params":{"account_id":"1","visitors":[]}}"#,
            &Validator::full(),
        );
        assert_eq!(kind, Kind::LogEvent);
        let paths: Vec<String> = result.unwrap_err().into_iter().map(|p| p.path).collect();
        assert_eq!(
            paths,
            [
                "$.url",
                "$.http_verb",
                "$.headers[\"X\"]",
                "$.params.visitors"
            ]
        );
    }
}
