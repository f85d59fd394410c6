//! Running the relay in tests: in process on port 0 ([`InProcessRelay`], real HTTP, real
//! spool), or as the real `tributary` binary where a process must die or its own behaviour
//! is under test ([`RelayProcess`]: SIGTERM, SIGKILL, memory, file limits, its log). Every
//! relay started here is stopped on drop.

#![allow(dead_code, clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Path of the binary under test.
pub fn tributary_bin() -> &'static str {
    env!("CARGO_BIN_EXE_tributary")
}

/// The Python interpreter with the official SDK: `TRIBUTARY_PYTHON`, else the repo's
/// `.venv` (made by `scripts/setup-python.sh`). Panics with instructions when neither
/// exists: a test that needs the SDK must not pass without it.
pub fn python() -> PathBuf {
    if let Ok(p) = std::env::var("TRIBUTARY_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = repo_root().join(".venv/bin/python");
    assert!(
        venv.exists(),
        "no Python with optimizely-sdk: run scripts/setup-python.sh or set TRIBUTARY_PYTHON"
    );
    venv
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The shared fixtures directory.
pub fn shared_fixtures() -> PathBuf {
    repo_root().join("../shared/fixtures/python-sdk-5.7.0")
}

/// `tributary serve` run in this process by [`tributary_relay::serve::run`], on a listener
/// bound to a free loopback port, in a runtime of its own.
pub struct InProcessRelay {
    /// Address it listens on.
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

/// `serve`'s flags, parsed as the binary parses them.
#[derive(clap::Parser)]
struct ServeCli {
    #[command(flatten)]
    args: tributary_relay::serve::ServeArgs,
}

impl InProcessRelay {
    /// Starts a relay with `serve` flags `args` (`--listen` is ignored: port 0 is bound).
    /// Returns once it serves `/healthz`.
    pub fn serve<S: AsRef<str>>(args: &[S]) -> InProcessRelay {
        let argv = std::iter::once("serve").chain(args.iter().map(AsRef::as_ref));
        let cli = <ServeCli as clap::Parser>::try_parse_from(argv).unwrap();
        let (config, no_forward) = cli.args.resolve().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener)?;
                let shutdown = async {
                    let _ = stopped.await;
                };
                tributary_relay::serve::run(listener, config, !no_forward, shutdown).await
            })
        });
        let mut relay = InProcessRelay {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        };
        relay.until_serving();
        relay
    }

    /// Waits until `/healthz` answers; a relay that failed to start panics the test with
    /// its error instead of leaving requests to fail later.
    fn until_serving(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if self.thread.as_ref().is_some_and(|t| t.is_finished()) {
                let result = self.thread.take().map(std::thread::JoinHandle::join);
                panic!("the relay stopped before serving: {result:?}");
            }
            if get(&self.url("/healthz")).0 == 200 {
                return;
            }
            assert!(Instant::now() < deadline, "the relay never served /healthz");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `http://ADDR` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// For assertion messages shared with [`RelayProcess::log_text`]: an in-process relay's
    /// log is not captured (run the test with `RUST_LOG` and a subscriber to see it).
    pub fn log_text(&self) -> String {
        format!(
            "(relay in process on {}; its log is not captured)",
            self.addr
        )
    }

    /// Shuts the relay down as SIGTERM does (stop accepting, finish requests, forward for
    /// the shutdown grace, close the spool) and waits for it; panics if it failed.
    pub fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            match thread.join() {
                Ok(result) => result.unwrap(),
                Err(_) => panic!("the relay's thread panicked"),
            }
        }
    }
}

impl Drop for InProcessRelay {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A running `tributary serve` (or `drain`) process.
pub struct RelayProcess {
    child: Option<Child>,
    /// Address it listens on (for `serve`).
    pub addr: Option<SocketAddr>,
    log: Arc<Mutex<Vec<String>>>,
    /// The thread copying stderr into `log`; joined once the process has exited, so the
    /// log is complete (the lines written just before the exit may still be in the pipe
    /// when `try_wait` reports it).
    reader: Option<std::thread::JoinHandle<()>>,
}

impl RelayProcess {
    /// Starts `tributary serve --listen 127.0.0.1:0` with `args` and waits until it listens.
    pub fn serve<S: AsRef<str>>(args: &[S]) -> RelayProcess {
        Self::serve_with_env(args, &[])
    }

    /// [`RelayProcess::serve`] with extra environment variables (AWS settings for moto).
    pub fn serve_with_env<S: AsRef<str>>(args: &[S], env: &[(&str, String)]) -> RelayProcess {
        let mut all = vec!["serve", "--listen", "127.0.0.1:0"];
        all.extend(args.iter().map(AsRef::as_ref));
        Self::spawn_with_env(&all, env).until_ready()
    }

    /// Waits for the ready line and takes the address from it.
    fn until_ready(mut self) -> RelayProcess {
        let line = self.wait_for_log("tributary relay ready", Duration::from_secs(30));
        let addr = line
            .split("listen=")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .unwrap_or_else(|| panic!("no listen= in {line:?}"));
        self.addr = Some(addr.parse().unwrap());
        self
    }

    /// `tributary drain ARGS` (long-running), once its spool is open.
    pub fn drain_with_env<S: AsRef<str>>(args: &[S], env: &[(&str, String)]) -> RelayProcess {
        let mut all = vec!["drain"];
        all.extend(args.iter().map(AsRef::as_ref));
        let mut p = Self::spawn_with_env(&all, env);
        p.wait_for_log("tributary drain running", Duration::from_secs(60));
        p
    }

    /// Starts the binary with `args`, capturing its log.
    pub fn spawn(args: &[&str]) -> RelayProcess {
        Self::spawn_with_env(args, &[])
    }

    /// `tributary serve --listen 127.0.0.1:0 ARGS` with its open-file limit set to `nofile`
    /// (through the shell's `ulimit`), once it listens.
    pub fn serve_with_file_limit<S: AsRef<str>>(nofile: u32, args: &[S]) -> RelayProcess {
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(format!("ulimit -n {nofile} && exec \"$0\" \"$@\""))
            .arg(tributary_bin())
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(args.iter().map(AsRef::as_ref));
        Self::spawn_command(command).until_ready()
    }

    /// [`RelayProcess::spawn`] with extra environment variables.
    pub fn spawn_with_env(args: &[&str], env: &[(&str, String)]) -> RelayProcess {
        let mut command = Command::new(tributary_bin());
        command
            .args(args)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())));
        Self::spawn_command(command)
    }

    /// Starts `program` (the binary under another name, say) with `args`, capturing its log.
    pub fn spawn_program_with_env(
        program: &Path,
        args: &[&str],
        env: &[(&str, String)],
    ) -> RelayProcess {
        let mut command = Command::new(program);
        command
            .args(args)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())));
        Self::spawn_command(command)
    }

    /// Runs `command` with the log captured.
    fn spawn_command(mut command: Command) -> RelayProcess {
        let mut child = command
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap().push(line);
            }
        });
        RelayProcess {
            child: Some(child),
            addr: None,
            log,
            reader: Some(reader),
        }
    }

    /// Waits until a log line contains `needle`; returns the line. Panics with the log on
    /// timeout or if the process exits first.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.log.lock().unwrap().iter().find(|l| l.contains(needle)) {
                return line.clone();
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "relay exited ({status}) before logging {needle:?}:\n{}",
                    self.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {needle:?}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The process id (while it runs).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Resident memory now, in MiB (`VmRSS`).
    pub fn rss_mib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    }

    /// Everything logged so far.
    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// `http://ADDR` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr.unwrap(), path)
    }

    /// Sends SIGTERM and waits for the exit, up to `timeout`.
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        let child = self.child.as_mut().unwrap();
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        self.wait_exit(timeout)
    }

    /// Waits for the process to exit by itself, up to `timeout`; past it, kills it and
    /// fails the test with its log.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            let child = self.child.as_mut().unwrap();
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                self.finish_log();
                return status;
            }
            if Instant::now() >= deadline {
                self.kill9();
                panic!(
                    "process did not exit within {timeout:?}:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, no goodbye.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.finish_log();
    }

    /// Waits for the stderr reader to reach the end of the pipe (the process has exited,
    /// so its write end is closed) and so to have collected every line.
    fn finish_log(&mut self) {
        if let Some(reader) = self.reader.take() {
            // It only panics on a poisoned log, where the panic that poisoned it reports.
            let _ = reader.join();
        }
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Runs the binary to completion with `args`; returns (exit code, stdout, stderr).
pub fn run_cli(args: &[&str]) -> (i32, String, String) {
    run_cli_with_env(args, &[])
}

/// [`run_cli`] with extra environment variables.
pub fn run_cli_with_env<S: AsRef<str>>(
    args: &[S],
    env: &[(&str, String)],
) -> (i32, String, String) {
    let out = Command::new(tributary_bin())
        .args(args.iter().map(AsRef::as_ref))
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `serve` flags for the fault tests: quick merging and quick retries, then `extra`.
pub fn relay_args(upstream: &str, spool: &str, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "--upstream",
        upstream,
        "--spool",
        spool,
        "--flush-interval",
        "100ms",
        "--max-retry-delay",
        "300ms",
        "--request-timeout",
        "2s",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    args
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A client that gives up after a minute, so a relay that stops answering fails the test
/// instead of hanging it.
fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

/// Posts `body` to `url` with `headers`; returns the status and the response body.
pub fn post(url: &str, body: impl Into<Vec<u8>>, headers: &[(&str, &str)]) -> (u16, String) {
    let (status, _, text) = post_full(url, body, headers);
    (status, text)
}

/// [`post`], also returning the response headers (names lower-case). Status 0 means no
/// response; the error is then in the body.
pub fn post_full(
    url: &str,
    body: impl Into<Vec<u8>>,
    headers: &[(&str, &str)],
) -> (u16, Vec<(String, String)>, String) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let body = body.into();
    runtime.block_on(async {
        let mut req = client().post(url).body(body);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        match req.send().await {
            Ok(r) => {
                let status = r.status().as_u16();
                let headers = r
                    .headers()
                    .iter()
                    .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
                    .collect();
                (status, headers, r.text().await.unwrap_or_default())
            }
            Err(e) => (0, Vec::new(), e.to_string()),
        }
    })
}

/// Posts a JSON payload the way SDKs do.
pub fn post_json(url: &str, body: &str) -> (u16, String) {
    post(url, body, &[("content-type", "application/json")])
}

/// An Event API payload of revision `revision` with one conversion visitor per uuid. The
/// visitor id is `visitor-<uuid>`, so a uuid can be made to carry a marker.
pub fn payload(revision: &str, uuids: &[String]) -> String {
    let visitors: Vec<serde_json::Value> = uuids
        .iter()
        .map(|u| {
            serde_json::json!({
                "snapshots": [{"events": [{"entity_id": "21549340108", "uuid": u,
                    "key": "purchase", "timestamp": 1_795_443_245_068u64, "revenue": 4200,
                    "value": 3.5, "tags": {"category": "shoes"}}]}],
                "attributes": [{"entity_id": "21554750045", "key": "country",
                    "type": "custom", "value": "DE"}],
                "visitor_id": format!("visitor-{u}"),
                "session_id": "kept-as-is"
            })
        })
        .collect();
    serde_json::json!({
        "account_id": "12133785640", "project_id": "21537940595", "revision": revision,
        "client_name": "java-sdk", "client_version": "4.2.0", "anonymize_ip": true,
        "enrich_decisions": true, "visitors": visitors
    })
    .to_string()
}

/// `n` fresh uuids with a recognisable prefix.
pub fn uuids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i:06}")).collect()
}

/// `GET url`; returns the status and the body (status 0: no answer, the error in the body).
pub fn get(url: &str) -> (u16, String) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        match client().get(url).send().await {
            Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
            Err(e) => (0, e.to_string()),
        }
    })
}

/// The value of an unlabelled Prometheus sample `name` in `metrics` text (0 when absent).
pub fn metric(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            (key == name).then(|| value.parse().ok()).flatten()
        })
        .unwrap_or(0.0)
}

/// Runs `python sdk_client.py RELAY DATAFILE USERS` (the official SDK): with `batch_size`,
/// through the SDK's `BatchEventProcessor` with a queue large enough to drop nothing, else
/// through its default processor. Returns the uuids the relay acknowledged.
pub fn python_sdk_events(relay_url: &str, users: usize, batch_size: Option<usize>) -> Vec<String> {
    let datafile = shared_fixtures().join("datafile.json");
    let script = repo_root().join("crates/tributary-relay/tests/python/sdk_client.py");
    let mut command = Command::new(python());
    command
        .arg(&script)
        .arg(relay_url)
        .arg(&datafile)
        .arg(users.to_string());
    if let Some(n) = batch_size {
        command
            .arg("--batch-size")
            .arg(n.to_string())
            .arg("--queue-size")
            .arg((users * 2 + 100).to_string());
    }
    let out = command.output().unwrap();
    assert!(
        out.status.success(),
        "sdk client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["failed"], 0, "the relay refused SDK requests");
    report["acked"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect()
}

/// `tributary spool audit --spool SPOOL`: panics unless it exits 0 and balances; returns the
/// audit as JSON.
pub fn audit_balances(spool: &str) -> serde_json::Value {
    let (code, out, err) = run_cli(&["spool", "audit", "--spool", spool]);
    assert_eq!(code, 0, "spool audit failed:\n{out}\n{err}");
    let audit: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(audit["balanced"], true, "{audit}");
    audit
}

/// Every dead letter of the spool, with its body.
pub fn dead_letters(spool: &str) -> Vec<serde_json::Value> {
    let (code, out, err) = run_cli(&[
        "spool",
        "dead-letters",
        "list",
        "--spool",
        spool,
        "--with-body",
        "--limit",
        "1000000",
    ]);
    assert_eq!(code, 0, "{err}");
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}
