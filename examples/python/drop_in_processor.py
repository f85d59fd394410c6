"""The Optimizely Python SDK with Tributary's pipeline in-process: one changed import.

    pip install optimizely-sdk ./crates/tributary-python
    python examples/python/drop_in_processor.py DATAFILE [ENDPOINT]

Without ENDPOINT the events go to the Event API of the datafile's region. See docs/python.md.
"""

import sys

from optimizely import optimizely

# was: from optimizely.event.event_processor import BatchEventProcessor
from tributary_events import BatchEventProcessor


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    with open(sys.argv[1]) as f:
        datafile = f.read()
    endpoint = sys.argv[2] if len(sys.argv) > 2 else None
    processor = BatchEventProcessor(start_on_init=True, endpoint=endpoint)
    client = optimizely.Optimizely(datafile=datafile, event_processor=processor)
    user = client.create_user_context("user-1", {"country": "DE"})
    decision = user.decide("checkout_redesign")
    print(f"checkout_redesign: {decision.variation_key}")
    client.track("purchase", "user-1", {"country": "DE"}, {"revenue": 4200})
    processor.stop()  # also done at exit
    print(processor.stats())


if __name__ == "__main__":
    main()
