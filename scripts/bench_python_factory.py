#!/usr/bin/env python3
"""Python peer of `cargo bench -p tributary --bench factory`.

Measures what the official Optimizely Python SDK does to turn a batch of user events into
one request body: `EventFactory.create_log_event(user_events)` followed by
`json.dumps(log_event.params)` (what its default dispatcher sends). The user events are the
golden impression and conversion of ../shared/fixtures/python-sdk-5.7.0/, alternating, one
user each, built beforehand with `UserEventFactory` as the SDK does (so, like the Rust
benchmark, only batching and serialisation are timed).

Usage:
    python scripts/bench_python_factory.py [DATAFILE] [--seconds S] [--rounds R]

Needs `optimizely-sdk==5.7.0`. Prints events/s for batches of 10 and 100 events: the best
of R rounds of about S seconds each (best-of, like criterion's low estimates, so that
scheduling noise on a shared machine counts against neither side).
"""

import argparse
import json
import logging
import os
import sys
import time

from optimizely.config_manager import StaticConfigManager
from optimizely.event.event_factory import EventFactory
from optimizely.event.user_event_factory import UserEventFactory
from optimizely import version as sdk_version

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATAFILE = os.path.join(
    REPO_ROOT, "..", "shared", "fixtures", "python-sdk-5.7.0", "datafile.json"
)

# The attributes and tags of the golden fixtures (see the fixtures' README).
ATTRIBUTES = {"country": "DE", "plan": "free", "age": 34}
TAGS = {"revenue": 4200, "value": 3.5, "category": "shoes"}


def build_user_events(config, n):
    """n user events, impressions and conversions alternating, distinct users."""
    experiment = config.get_experiment_from_key("checkout_redesign_ab")
    if experiment is None:
        sys.exit("datafile has no experiment checkout_redesign_ab")
    events = []
    for i in range(n):
        user_id = f"user-golden-{i}"
        if i % 2 == 0:
            event = UserEventFactory.create_impression_event(
                config,
                experiment,
                "410102",
                "checkout_redesign",
                "checkout_redesign_ab",
                "feature-test",
                True,
                user_id,
                ATTRIBUTES,
                None,
            )
        else:
            event = UserEventFactory.create_conversion_event(
                config, "purchase", user_id, ATTRIBUTES, TAGS
            )
        if event is None:
            sys.exit(f"the SDK built no user event {i}")
        events.append(event)
    return events


def without_ids(params):
    """The payload with uuid and timestamp blanked, to compare with a fixture."""
    params = json.loads(json.dumps(params))
    for visitor in params["visitors"]:
        for snapshot in visitor["snapshots"]:
            for event in snapshot["events"]:
                event["uuid"] = event["timestamp"] = None
    return params


def check_against_fixtures(config, datafile):
    """The events benchmarked are the fixtures' events (up to uuid and timestamp)."""
    fixtures = os.path.dirname(os.path.abspath(datafile))
    logger = logging.getLogger("bench")
    [impression, conversion] = build_user_events(config, 2)
    for event, name in [(impression, "impression.json"), (conversion, "conversion.json")]:
        event.user_id = "user-golden-1"
        built = EventFactory.create_log_event(event, logger).params
        with open(os.path.join(fixtures, name)) as f:
            expected = json.load(f)
        if without_ids(built) != without_ids(expected):
            sys.exit(f"payload built differs from {name}")


def measure(user_events, seconds, rounds):
    logger = logging.getLogger("bench")
    create, dumps, clock = EventFactory.create_log_event, json.dumps, time.perf_counter
    # Calibrate the number of iterations per round to about `seconds`.
    iters = 1
    while True:
        start = clock()
        for _ in range(iters):
            dumps(create(user_events, logger).params)
        elapsed = clock() - start
        if elapsed >= 0.2:
            break
        iters *= 2
    iters = max(1, int(iters * seconds / elapsed))
    best = 0.0
    for _ in range(rounds):
        start = clock()
        for _ in range(iters):
            body = dumps(create(user_events, logger).params)
        elapsed = clock() - start
        best = max(best, iters * len(user_events) / elapsed)
    return best, len(body)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("datafile", nargs="?", default=DEFAULT_DATAFILE)
    parser.add_argument("--seconds", type=float, default=2.0, help="length of a round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per batch size")
    args = parser.parse_args()

    with open(args.datafile) as f:
        datafile = f.read()
    config = StaticConfigManager(datafile=datafile, skip_json_validation=True).get_config()
    if config is None:
        sys.exit(f"{args.datafile}: not a usable datafile")
    check_against_fixtures(config, args.datafile)

    print(
        f"optimizely-sdk {sdk_version.__version__}, Python {sys.version.split()[0]}: "
        "EventFactory.create_log_event + json.dumps"
    )
    for n in (10, 100):
        rate, body_len = measure(build_user_events(config, n), args.seconds, args.rounds)
        print(f"batch {n:>3}: {rate:>12,.0f} events/s  ({body_len} bytes per body)")


if __name__ == "__main__":
    main()
