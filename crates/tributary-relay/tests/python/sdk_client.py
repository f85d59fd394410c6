"""Drives the official Optimizely Python SDK against a Tributary relay, for the end-to-end tests.

    python sdk_client.py RELAY_URL DATAFILE USERS [--batch-size N] [--queue-size N]

For each of USERS users it calls ``decide('checkout_redesign')`` and ``track('purchase')``.
Events go through the SDK's own event processor (its default, or a
BatchEventProcessor with --batch-size) to examples/python/relay_dispatcher.py. Prints one JSON
object: the uuid of every event the relay acknowledged, and how many requests failed.
"""

import argparse
import json
import os
import queue
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "..", "..", "examples", "python"))

from optimizely import optimizely  # noqa: E402
from optimizely.event import event_processor  # noqa: E402
from relay_dispatcher import RelayEventDispatcher  # noqa: E402


class RecordingRelayDispatcher(RelayEventDispatcher):
    def __init__(self, url):
        super().__init__(url, timeout=10.0, attempts=5)
        self.acked = []
        self.failed = 0

    def dispatch_event(self, log_event):
        uuids = [
            e["uuid"]
            for v in log_event.params["visitors"]
            for s in v["snapshots"]
            for e in s["events"]
        ]
        if super().dispatch_event(log_event):
            self.acked.extend(uuids)
        else:
            self.failed += 1


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("relay_url")
    parser.add_argument("datafile")
    parser.add_argument("users", type=int)
    parser.add_argument("--batch-size", type=int, default=0)
    # The SDK's own queue holds 1,000 events and drops the rest silently; a test that
    # counts every event gives it room.
    parser.add_argument("--queue-size", type=int, default=0)
    args = parser.parse_args()

    with open(args.datafile) as f:
        datafile = f.read()
    dispatcher = RecordingRelayDispatcher(args.relay_url)
    processor = None
    if args.batch_size:
        event_queue = queue.Queue(maxsize=args.queue_size) if args.queue_size else None
        processor = event_processor.BatchEventProcessor(
            dispatcher,
            batch_size=args.batch_size,
            flush_interval=1,
            start_on_init=True,
            event_queue=event_queue,
            timeout_interval=60,
        )
    client = optimizely.Optimizely(
        datafile=datafile, event_dispatcher=dispatcher, event_processor=processor
    )
    for i in range(args.users):
        user = client.create_user_context(
            "user-%d" % i, {"country": "DE" if i % 2 else "FR", "plan": "free", "age": 20 + i % 50}
        )
        user.decide("checkout_redesign")
        client.track("purchase", "user-%d" % i, {"plan": "free"}, {"revenue": 100 + i, "category": "shoes"})
    client.close()
    print(json.dumps({"acked": dispatcher.acked, "failed": dispatcher.failed}))


if __name__ == "__main__":
    main()
