//! [`MotoServer`]: a local SQS (moto's server, from PyPI) for tests, started on a free port
//! and stopped when dropped, or when the test process exits whatever way it exits.
//!
//! The `moto_server` executable is found, in order, at `$TRIBUTARY_MOTO_SERVER`, at
//! `<repo>/.venv/bin/moto_server`, or on `PATH`. When there is none, [`MotoServer::start`]
//! panics with instructions: a test that needs SQS must fail, not pass, without it.
//!
//! moto runs under a tiny `sh` watchdog that holds a pipe from the test process: when the
//! test process goes away (even by `SIGKILL` or an aborting panic) the pipe closes and the
//! watchdog kills moto, so no server outlives its tests. That is what makes
//! [`MotoServer::shared`] (one server per test binary, never dropped) safe.
//!
//! ```no_run
//! use tributary_testkit::MotoServer;
//! let moto = MotoServer::shared();
//! let url = moto.create_queue("events-test-1", &[("VisibilityTimeout", "5")]);
//! assert!(url.ends_with("/events-test-1"));
//! // Give the code under test moto's endpoint and fake credentials:
//! let mut cmd = std::process::Command::new("tributary");
//! cmd.envs(moto.aws_env());
//! ```

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Region moto is used with.
pub const MOTO_REGION: &str = "us-east-1";
/// Account id moto puts in queue URLs and ARNs.
pub const MOTO_ACCOUNT: &str = "123456789012";

/// A running moto server. See the [module docs](self).
#[derive(Debug)]
pub struct MotoServer {
    child: Option<Child>,
    /// Held open for the watchdog; closing it stops moto.
    lifeline: Option<ChildStdin>,
    addr: SocketAddr,
}

/// Where `moto_server` is, or why none was found.
pub fn find_moto_server() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("TRIBUTARY_MOTO_SERVER") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!(
                "TRIBUTARY_MOTO_SERVER={} does not exist",
                p.display()
            ))
        };
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/moto_server");
    if venv.is_file() {
        return Ok(venv);
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join("moto_server");
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    Err(format!(
        "moto_server not found: the SQS tests need moto's server. Install it with \
         `python3 -m venv .venv && .venv/bin/pip install 'moto[server]'` in the repository \
         root ({}), or set TRIBUTARY_MOTO_SERVER to a moto_server executable, or put one on PATH",
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .display()
    ))
}

impl MotoServer {
    /// Starts a server for this test alone. Panics when moto is missing or does not start.
    pub fn start() -> MotoServer {
        match MotoServer::try_start() {
            Ok(m) => m,
            Err(e) => panic!("{e}"),
        }
    }

    /// One server shared by every test of this test binary (queues must then have names
    /// unique per test). It stops when the test process exits.
    pub fn shared() -> &'static MotoServer {
        static SHARED: OnceLock<MotoServer> = OnceLock::new();
        SHARED.get_or_init(MotoServer::start)
    }

    /// Starts a server, or says why it could not.
    pub fn try_start() -> Result<MotoServer, String> {
        let exe = find_moto_server()?;
        let port = free_port().map_err(|e| format!("no free port: {e}"))?;
        // The watchdog: start moto, wait for stdin to close, then stop moto.
        let script = r#""$0" -H 127.0.0.1 -p "$1" >/dev/null 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null' EXIT
read -r _ignored
kill $pid 2>/dev/null
wait $pid 2>/dev/null"#;
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg(&exe)
            .arg(port.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", exe.display()))?;
        let lifeline = child.stdin.take();
        let mut server = MotoServer {
            child: Some(child),
            lifeline,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        };
        server.wait_ready(Duration::from_secs(60))?;
        Ok(server)
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.request("GET", "/moto-api/", "").is_ok() {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(format!("moto_server exited at start ({status})"));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "moto_server did not answer on {} within {timeout:?}",
                    self.addr
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The environment an AWS SDK (or the `tributary` binary) needs to use this server:
    /// endpoint, region and fake static credentials.
    pub fn aws_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_REGION", MOTO_REGION.to_owned()),
            ("AWS_ACCESS_KEY_ID", "test".to_owned()),
            ("AWS_SECRET_ACCESS_KEY", "test".to_owned()),
            // Keep a developer's own profile and IMDS out of it.
            ("AWS_EC2_METADATA_DISABLED", "true".to_owned()),
            ("AWS_CONFIG_FILE", "/dev/null".to_owned()),
            ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null".to_owned()),
        ]
    }

    /// The ARN of queue `name` (for a redrive policy).
    pub fn queue_arn(name: &str) -> String {
        format!("arn:aws:sqs:{MOTO_REGION}:{MOTO_ACCOUNT}:{name}")
    }

    /// Creates queue `name` with `attributes` (`VisibilityTimeout`, `RedrivePolicy`, ...)
    /// and returns its URL. Panics on failure.
    pub fn create_queue(&self, name: &str, attributes: &[(&str, &str)]) -> String {
        let mut form = format!(
            "Action=CreateQueue&Version=2012-11-05&QueueName={}",
            encode(name)
        );
        for (i, (k, v)) in attributes.iter().enumerate() {
            let n = i + 1;
            form.push_str(&format!(
                "&Attribute.{n}.Name={}&Attribute.{n}.Value={}",
                encode(k),
                encode(v)
            ));
        }
        let response = self
            .request("POST", "/", &form)
            .unwrap_or_else(|e| panic!("CreateQueue {name}: {e}"));
        let url = between(&response, "<QueueUrl>", "</QueueUrl>")
            .unwrap_or_else(|| panic!("CreateQueue {name}: no QueueUrl in {response}"));
        url.to_owned()
    }

    /// `(visible, in flight)` message counts of queue `name`. Panics on failure.
    pub fn queue_counts(&self, name: &str) -> (u64, u64) {
        let url = format!("{}/{MOTO_ACCOUNT}/{name}", self.endpoint());
        let form = format!(
            "Action=GetQueueAttributes&Version=2012-11-05&QueueUrl={}&AttributeName.1=All",
            encode(&url)
        );
        let response = self
            .request("POST", "/", &form)
            .unwrap_or_else(|e| panic!("GetQueueAttributes {name}: {e}"));
        let attr = |key: &str| -> u64 {
            let marker = format!("<Name>{key}</Name><Value>");
            between(&response, &marker, "</Value>")
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no {key} in {response}"))
        };
        (
            attr("ApproximateNumberOfMessages"),
            attr("ApproximateNumberOfMessagesNotVisible"),
        )
    }

    /// One HTTP/1.1 request with `Connection: close`; returns the body of a 2xx answer.
    fn request(&self, method: &str, path: &str, form: &str) -> Result<String, String> {
        let mut stream = TcpStream::connect_timeout(&self.addr, Duration::from_secs(2))
            .map_err(|e| e.to_string())?;
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(|e| e.to_string())?;
        // moto picks the service from the credential scope of the (unchecked) signature.
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\
             Authorization: AWS4-HMAC-SHA256 Credential=test/20260101/{MOTO_REGION}/sqs/aws4_request, \
             SignedHeaders=host, Signature=0\r\n\
             Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{form}",
            self.addr,
            form.len()
        );
        stream
            .write_all(request.as_bytes())
            .map_err(|e| e.to_string())?;
        let mut response = String::new();
        stream
            .read_to_string(&mut response)
            .map_err(|e| e.to_string())?;
        let status = response
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse::<u16>().ok())
            .unwrap_or(0);
        let body = response
            .split_once("\r\n\r\n")
            .map_or("", |(_, b)| b)
            .to_owned();
        if (200..300).contains(&status) {
            Ok(body)
        } else {
            Err(format!("HTTP {status}: {body}"))
        }
    }

    /// Stops the server now.
    pub fn stop(&mut self) {
        self.lifeline.take();
        if let Some(mut child) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn between<'a>(text: &'a str, start: &str, end: &str) -> Option<&'a str> {
    let from = text.find(start)? + start.len();
    let len = text[from..].find(end)?;
    Some(&text[from..from + len])
}

/// Percent-encoding for form values.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_encoding_and_xml_lookup() {
        assert_eq!(encode(r#"{"a": 1}"#), "%7B%22a%22%3A%201%7D");
        assert_eq!(between("<a>x</a>", "<a>", "</a>"), Some("x"));
        assert_eq!(between("<a>x", "<a>", "</a>"), None);
    }
}
