"""Durable and scaled-out modes: a SQLite spool surviving SIGKILL, SQS through moto, and the
dispatchers for the SDK's own processor."""

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request

import pytest
from optimizely.event.event_processor import BatchEventProcessor as SdkBatchEventProcessor

from tributary_events import (
    BatchEventProcessor,
    RelayEventDispatcher,
    SpoolEventDispatcher,
    SqsEventDispatcher,
)

from conftest import REPO, RecordingServer, uuids
from events import conversions


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.05)


def test_the_sqlite_spool_survives_a_sigkill_of_the_python_process(tmp_path):
    spool = str(tmp_path / "spool")
    down = RecordingServer(status=503)  # the upstream refuses while the first process lives
    try:
        script = textwrap.dedent(
            f"""
            import sys, time, random
            sys.path.insert(0, {os.path.dirname(__file__)!r})
            from conftest import load_config, SHARED
            from events import conversions
            import os
            from tributary_events import BatchEventProcessor
            config = load_config(os.path.join(SHARED, "datafile.json"))
            p = BatchEventProcessor(spool={spool!r}, endpoint={down.url!r}, start_on_init=True, batch_size=10)
            events = conversions(config, "killed", random.Random(1), 100, [{{"kind": "conversion", "tags": {{"revenue": 1}}}}])
            for e in events:
                p.process(e)
            while p.stats()["dispatched"] < 100:  # dispatched = appended to the spool
                time.sleep(0.01)
            print(" ".join(e.uuid for e in events), flush=True)
            time.sleep(600)
            """
        )
        child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        try:
            line = child.stdout.readline()
            assert line, "the child exited before spooling its events"
            spooled = line.split()
            assert len(spooled) == 100
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=30)
        assert child.returncode == -signal.SIGKILL
    finally:
        down.close()

    up = RecordingServer()
    try:
        # A new process on the same spool forwards what the killed one appended.
        p = BatchEventProcessor(spool=spool, endpoint=up.url, start_on_init=True)
        # The killed forwarder's leases (60 s) may have to run out first.
        up.wait_visitors(100, timeout=120)
        p.stop()
        assert sorted(set(uuids(up.visitors()))) == sorted(spooled)
    finally:
        up.close()


def test_spool_mode_delivers_through_the_in_process_forwarder(configs, fixture_calls, server, tmp_path):
    p = BatchEventProcessor(spool=str(tmp_path / "s"), endpoint=server.url, start_on_init=True, timeout_interval=30)
    events = conversions(configs["main"], "sp", random.Random(2), 250, fixture_calls)
    for e in events:
        p.process(e)
    p.stop()
    assert p.stats()["dispatched"] == 250
    server.wait_visitors(250)
    assert sorted(uuids(server.visitors())) == sorted(e.uuid for e in events)
    # The forwarder merged the 25 batches into fewer, larger requests.
    assert len(server.bodies) < 25


def test_bad_spool_settings_are_refused():
    with pytest.raises(ValueError, match=r"spool=.*sqs://QUEUE"):
        BatchEventProcessor(spool="sqs://")
    class Discard:
        def dispatch_event(self, log_event):
            pass

    with pytest.raises(ValueError, match=r"exclude each other"):
        BatchEventProcessor(Discard(), spool="/tmp/x")


@pytest.fixture(scope="module")
def moto():
    exe = shutil.which("moto_server", path=os.path.dirname(sys.executable)) or shutil.which("moto_server")
    assert exe, "moto_server not found: install requirements-dev.txt (scripts/setup-python.sh)"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"

    def up():
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1)
            return True
        except OSError:
            return proc.poll() is not None

    wait_for(up, 30, "moto_server")
    assert proc.poll() is None, "moto_server exited"
    env = {
        "AWS_ENDPOINT_URL": url,
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield url
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    proc.terminate()
    proc.wait(timeout=10)


def sqs_visitors(queue_name):
    import boto3

    sqs = boto3.client("sqs")
    q = sqs.get_queue_url(QueueName=queue_name)["QueueUrl"]
    out = []
    while True:
        r = sqs.receive_message(QueueUrl=q, MaxNumberOfMessages=10, WaitTimeSeconds=0)
        msgs = r.get("Messages", [])
        if not msgs:
            return out
        for m in msgs:
            out += json.loads(m["Body"])["visitors"]
            sqs.delete_message(QueueUrl=q, ReceiptHandle=m["ReceiptHandle"])


def test_sqs_mode_writes_every_batch_to_the_queue(configs, fixture_calls, moto):
    import boto3

    boto3.client("sqs").create_queue(QueueName="tributary-py-1")
    p = BatchEventProcessor(spool="sqs://tributary-py-1", start_on_init=True)
    events = conversions(configs["main"], "sqs", random.Random(3), 95, fixture_calls)
    for e in events:
        p.process(e)
    p.stop()
    assert p.stats()["dispatched"] == 95
    assert sorted(uuids(sqs_visitors("tributary-py-1"))) == sorted(e.uuid for e in events)


def test_sqs_event_dispatcher_under_the_sdks_processor(configs, fixture_calls, moto):
    import boto3

    boto3.client("sqs").create_queue(QueueName="tributary-py-2")
    sp = SdkBatchEventProcessor(SqsEventDispatcher("tributary-py-2"), start_on_init=True, batch_size=10)
    events = conversions(configs["main"], "sqsd", random.Random(4), 30, fixture_calls)
    for e in events:
        sp.process(e)
    sp.stop()
    assert sorted(uuids(sqs_visitors("tributary-py-2"))) == sorted(e.uuid for e in events)


def test_a_missing_sqs_queue_is_a_clear_error(moto):
    p = BatchEventProcessor(spool="sqs://no-such-queue")
    with pytest.raises(ValueError, match=r"sqs://no-such-queue"):
        p.start()


def test_relay_event_dispatcher_posts_to_the_relay_routes(configs, fixture_calls, server):
    base = server.url[: -len("/v1/events")]
    d = RelayEventDispatcher(base, auth_token="t0k")
    sp = SdkBatchEventProcessor(d, start_on_init=True, batch_size=10)
    events = conversions(configs["main"], "relay", random.Random(5), 20, fixture_calls)
    for e in events:
        sp.process(e)
    sp.stop()
    assert sorted(uuids(server.visitors())) == sorted(e.uuid for e in events)
    assert all(h["authorization"] == "Bearer t0k" for h in server.headers)


def test_relay_event_dispatcher_raises_when_the_relay_refuses(configs, fixture_calls):
    refusing = RecordingServer(status=400)
    try:
        d = RelayEventDispatcher(refusing.url[: -len("/v1/events")], retry_attempts=1)

        class LE:
            url = "https://logx.optimizely.com/v1/events"
            params = {"account_id": "1", "project_id": "2", "revision": "3", "client_name": "c",
                      "client_version": "1", "anonymize_ip": True, "enrich_decisions": True,
                      "visitors": [{"visitor_id": "u", "attributes": [], "snapshots": []}]}

        with pytest.raises(RuntimeError, match=r"dispatch_event failed"):
            d.dispatch_event(LE())
    finally:
        refusing.close()


def test_spool_event_dispatcher_under_the_sdks_processor(configs, fixture_calls, server, tmp_path):
    d = SpoolEventDispatcher(str(tmp_path / "d"), endpoint=server.url)
    sp = SdkBatchEventProcessor(d, start_on_init=True, batch_size=10)
    events = conversions(configs["main"], "spd", random.Random(6), 40, fixture_calls)
    for e in events:
        sp.process(e)
    sp.stop()
    server.wait_visitors(40)
    d.close()
    assert sorted(uuids(server.visitors())) == sorted(e.uuid for e in events)
