"""fork() and interpreter exit: real child processes, a real loopback server."""

import os
import random
import subprocess
import sys
import textwrap

from tributary_events import BatchEventProcessor

from conftest import REPO, run_in_child, uuids
from events import conversions


def test_after_fork_the_child_has_its_own_processor_and_the_parent_sends_its_events_once(configs, fixture_calls, server):
    rng = random.Random(5)
    parent_events = conversions(configs["main"], "parent", rng, 30, fixture_calls)
    child_events = conversions(configs["main"], "child", rng, 20, fixture_calls)
    # Nothing is sent before stop(): the parent's events are still queued or batched at the fork.
    p = BatchEventProcessor(endpoint=server.url, start_on_init=True, batch_size=1000, flush_interval=3600)
    for e in parent_events:
        p.process(e)

    def child():
        ok = p.is_running and p.stats()["accepted"] == 0
        for e in child_events:
            p.process(e)
        p.stop()
        s = p.stats()
        return 0 if ok and s["accepted"] == 20 and s["dispatched"] == 20 else 3

    try:
        assert run_in_child(child) == 0, "the child's processor did not deliver its own events"
    finally:
        p.stop()
    assert p.stats()["dispatched"] == 30
    sent = uuids(server.visitors())
    assert sorted(sent) == sorted(e.uuid for e in parent_events + child_events), "each event sent once, by its own process"


def test_atexit_stops_the_processor_and_delivers_what_was_queued(server):
    script = textwrap.dedent(
        f"""
        import os
        from optimizely import optimizely
        from tributary_events import BatchEventProcessor
        datafile = open(os.path.join({REPO!r}, "..", "shared", "fixtures", "python-sdk-5.7.0", "datafile.json")).read()
        p = BatchEventProcessor(endpoint={server.url!r}, start_on_init=True, batch_size=1000, flush_interval=3600)
        client = optimizely.Optimizely(datafile=datafile, event_processor=p)
        for i in range(50):
            client.track("purchase", f"user-{{i}}", {{"country": "DE"}})
        # No stop(): the atexit hook must deliver them.
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    assert len(server.visitors()) == 50


def test_processors_register_no_per_instance_hooks_and_are_freed(recorder):
    import atexit
    import gc
    import weakref

    hooks = atexit._ncallbacks()
    refs = []
    for _ in range(50):
        p = BatchEventProcessor(recorder)
        refs.append(weakref.ref(p))
        del p
    gc.collect()
    assert all(r() is None for r in refs), "a processor was kept alive by its lifecycle hooks"
    assert atexit._ncallbacks() == hooks, "each processor added an atexit entry"
