"""Durable and scaled-out modes: a SQLite spool surviving SIGKILL, SQS through moto, and the
dispatchers for the SDK's own processor."""

import json
import os
import random
import select
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

from conftest import REPO, RecordingServer, run_in_child, uuids
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
            deadline = time.monotonic() + 60
            while p.stats()["dispatched"] < 100:  # dispatched = appended to the spool
                if time.monotonic() > deadline:
                    sys.exit(f"only {{p.stats()['dispatched']}} of 100 events spooled in 60 s")
                time.sleep(0.01)
            print(" ".join(e.uuid for e in events), flush=True)
            time.sleep(600)
            """
        )
        child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        try:
            ready, _, _ = select.select([child.stdout], [], [], 90)
            assert ready, "the child printed nothing in 90 s"
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


def log_event(uuid):
    """A LogEvent-shaped object as the SDK's processor hands its dispatcher, one conversion."""

    class LE:
        url = "https://logx.optimizely.com/v1/events"
        params = {"account_id": "1", "project_id": "2", "revision": "3", "client_name": "c",
                  "client_version": "1", "anonymize_ip": True, "enrich_decisions": True,
                  "visitors": [{"visitor_id": "u", "attributes": [], "snapshots": [
                      {"events": [{"entity_id": "9", "key": "k", "timestamp": 1, "uuid": uuid}]}]}]}

    return LE()


def test_relay_event_dispatcher_made_before_fork_sends_from_the_child(server):
    # gunicorn --preload: made in the master (threads started), used in each worker.
    d = RelayEventDispatcher(server.url[: -len("/v1/events")])
    d.dispatch_event(log_event("parent-1"))

    def child():
        d.dispatch_event(log_event("child-1"))
        return 0

    assert run_in_child(child) == 0, "the child could not send through the parent's dispatcher"
    d.dispatch_event(log_event("parent-2"))
    assert sorted(uuids(server.visitors())) == ["child-1", "parent-1", "parent-2"]


def test_sqs_event_dispatcher_made_before_fork_sends_from_the_child(moto):
    import boto3

    boto3.client("sqs").create_queue(QueueName="tributary-py-fork")
    d = SqsEventDispatcher("tributary-py-fork")
    d.dispatch_event(log_event("parent-1"))

    def child():
        d.dispatch_event(log_event("child-1"))
        return 0

    assert run_in_child(child) == 0, "the child could not send through the parent's dispatcher"
    assert sorted(uuids(sqs_visitors("tributary-py-fork"))) == ["child-1", "parent-1"]


def test_spool_event_dispatcher_made_before_fork_refuses_in_the_child(server, tmp_path):
    d = SpoolEventDispatcher(str(tmp_path / "fd"), endpoint=server.url)
    try:
        d.dispatch_event(log_event("parent-1"))

        def child():
            try:
                d.dispatch_event(log_event("child-1"))
            except RuntimeError as e:
                return 0 if "create it after the fork" in str(e) else 4
            return 5

        assert run_in_child(child) == 0, "the child's dispatch_event did not raise the after-fork error"
        server.wait_visitors(1)
    finally:
        d.close()
    assert uuids(server.visitors()) == ["parent-1"]


def test_spool_processor_made_before_fork_refuses_in_the_child(configs, fixture_calls, server, tmp_path):
    p = BatchEventProcessor(spool=str(tmp_path / "fp"), endpoint=server.url, start_on_init=True)
    events = conversions(configs["main"], "fork", random.Random(7), 3, fixture_calls)
    try:
        p.process(events[0])

        def child():
            try:
                p.process(events[1])
            except RuntimeError as e:
                return 0 if "create the processor after the fork" in str(e) else 4
            return 5

        assert run_in_child(child) == 0, "the child's process() did not raise the after-fork error"
        p.process(events[2])
    finally:
        p.stop()
    server.wait_visitors(2)
    assert sorted(uuids(server.visitors())) == sorted([events[0].uuid, events[2].uuid])


def forwarder_threads():
    names = []
    for t in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{t}/comm") as f:
                names.append(f.read().strip())
        except FileNotFoundError:
            pass  # the thread ended while listed
    return [n for n in names if n.startswith("tributary-py-fo")]


def test_a_spool_dispatcher_dropped_without_close_ends_its_forwarder(server, tmp_path):
    import gc

    before = len(forwarder_threads())
    d = SpoolEventDispatcher(str(tmp_path / "gc"), endpoint=server.url)
    # A new thread names itself once it runs.
    wait_for(lambda: len(forwarder_threads()) == before + 1, 30, "the forwarder thread to start")
    d.dispatch_event(log_event("gc-1"))
    server.wait_visitors(1)
    del d
    gc.collect()
    # Without the stop signal on drop, the thread spun at 100% CPU forever.
    wait_for(lambda: len(forwarder_threads()) == before, 30, "the forwarder thread to end")


def test_spool_dispatcher_close_checks_its_timeout(tmp_path):
    d = SpoolEventDispatcher(str(tmp_path / "c"))
    for bad in (float("inf"), float("nan"), -1.0):
        with pytest.raises(ValueError, match=r"timeout must be a number of seconds from 0 to 86400"):
            d.close(bad)
    d.close(0.5)


@pytest.mark.parametrize("mode", ["http", "spool"])
def test_relay_url_sends_eu_events_to_the_relays_eu_route(configs, fixture_calls, server, tmp_path, mode):
    base = server.url[: -len("/v1/events")]
    extra = {"spool": str(tmp_path / "eu")} if mode == "spool" else {}
    p = BatchEventProcessor(relay_url=base, start_on_init=True, batch_size=5, **extra)
    us = conversions(configs["main"], "us", random.Random(9), 7, fixture_calls)
    eu = conversions(configs["eu"], "eu", random.Random(10), 6, fixture_calls)
    try:
        for e in us + eu:
            p.process(e)
    finally:
        p.stop()
    server.wait_visitors(13)
    by_path = {}
    for path, body in zip(server.paths, server.bodies):
        by_path.setdefault(path, []).extend(uuids(body["visitors"]))
    assert sorted(by_path) == ["/eu/v1/events", "/v1/events"], by_path
    assert sorted(by_path["/v1/events"]) == sorted(e.uuid for e in us)
    assert sorted(by_path["/eu/v1/events"]) == sorted(e.uuid for e in eu)


def test_relay_url_and_endpoint_exclude_each_other(server):
    with pytest.raises(ValueError, match=r"endpoint and relay_url exclude each other"):
        BatchEventProcessor(relay_url="http://127.0.0.1:1", endpoint=server.url)
    with pytest.raises(ValueError, match=r"relay_url"):
        BatchEventProcessor(relay_url="ftp://x")
