"""Shared pieces of the tributary_events tests: the fixture datafiles, a recording
`event_dispatcher`, a recording HTTP server on 127.0.0.1, and user-event generators."""

import gzip
import json
import os
import signal
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from optimizely.config_manager import StaticConfigManager

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
FIXTURES = os.path.join(REPO, "tests", "fixtures", "python-sdk-5.7.0")
SHARED = os.path.join(REPO, "..", "shared", "fixtures", "python-sdk-5.7.0")


def load_config(path):
    with open(path) as f:
        config = StaticConfigManager(datafile=f.read(), skip_json_validation=True).get_config()
    assert config is not None, f"{path}: not a usable datafile"
    return config


@pytest.fixture(scope="session")
def configs():
    """The fixture datafiles as SDK ProjectConfigs: main (US, bot filtering), rev132, EU."""
    main = os.path.join(SHARED, "datafile.json")
    assert os.path.exists(main), f"{main} missing: the shared fixtures must sit beside the repo"
    return {
        "main": load_config(main),
        "rev132": load_config(os.path.join(FIXTURES, "datafile-rev132.json")),
        "eu": load_config(os.path.join(FIXTURES, "datafile-eu-nobot.json")),
    }


@pytest.fixture(scope="session")
def fixture_calls():
    """The `call` of every generated conformance fixture (tags and attribute shapes)."""
    calls = []
    for name in sorted(os.listdir(FIXTURES)):
        if name.endswith(".json") and not name.startswith("datafile"):
            with open(os.path.join(FIXTURES, name)) as f:
                calls.append(json.load(f)["call"])
    assert len(calls) >= 40, f"only {len(calls)} fixtures in {FIXTURES}"
    return calls


class Recorder:
    """An `event_dispatcher` that records every LogEvent and can be waited on."""

    def __init__(self):
        self.log_events = []
        self.threads = set()
        self._cond = threading.Condition()

    def dispatch_event(self, log_event):
        with self._cond:
            self.threads.add(threading.current_thread().name)
            self.log_events.append(
                {
                    "url": log_event.url,
                    "http_verb": log_event.http_verb,
                    "params": log_event.params,
                    "headers": log_event.headers,
                }
            )
            self._cond.notify_all()

    def visitors(self):
        with self._cond:
            return [v for e in self.log_events for v in e["params"]["visitors"]]

    def wait_visitors(self, n, timeout=30):
        with self._cond:
            ok = self._cond.wait_for(
                lambda: sum(len(e["params"]["visitors"]) for e in self.log_events) >= n, timeout
            )
        assert ok, f"waited {timeout} s for {n} visitors, got {len(self.visitors())}"


class RecordingServer:
    """A real HTTP server on 127.0.0.1:<free port> that records each POSTed JSON body."""

    def __init__(self, status=204, on_request=None):
        self.on_request = on_request
        self.bodies = []
        self.headers = []
        self.paths = []
        self.status = status
        cond = self._cond = threading.Condition()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if outer.on_request is not None:
                    outer.on_request()
                if self.headers.get("Content-Encoding") == "gzip":
                    raw = gzip.decompress(raw)
                with cond:
                    outer.bodies.append(json.loads(raw))
                    outer.paths.append(self.path)
                    outer.headers.append({k.lower(): v for k, v in self.headers.items()})
                    cond.notify_all()
                self.send_response(outer.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1/events"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def visitors(self):
        with self._cond:
            return [v for b in self.bodies for v in b["visitors"]]

    def wait_visitors(self, n, timeout=30):
        with self._cond:
            ok = self._cond.wait_for(lambda: sum(len(b["visitors"]) for b in self.bodies) >= n, timeout)
        assert ok, f"waited {timeout} s for {n} visitors, got {len(self.visitors())}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def recorder():
    return Recorder()


@pytest.fixture
def server():
    s = RecordingServer()
    yield s
    s.close()


def uuids(visitors):
    return [s["events"][0]["uuid"] for v in visitors for s in v["snapshots"]]


def run_in_child(body, timeout=60):
    """Runs `body()` in a forked child and returns its exit code (`body`'s return value, 1 if
    it raised). A child still running after `timeout` s is killed and fails the test."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = body()
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"the forked child was still running after {timeout} s (killed): it hung")
        time.sleep(0.02)
