"""Tributary's event pipeline inside the official Optimizely Python SDK.

Change one import::

    from tributary_events import BatchEventProcessor   # was: optimizely.event.event_processor

    processor = BatchEventProcessor(start_on_init=True)
    client = optimizely.Optimizely(datafile, event_processor=processor)

See docs/python.md for every option.
"""

from . import _sdk
from ._native import (
    RelayEventDispatcher,
    SpoolEventDispatcher,
    SqsEventDispatcher,
    _BatchEventProcessor,
    __version__,
)

__all__ = [
    "BatchEventProcessor",
    "RelayEventDispatcher",
    "SpoolEventDispatcher",
    "SqsEventDispatcher",
    "__version__",
]


class BatchEventProcessor(_BatchEventProcessor):
    """A drop-in for ``optimizely.event.event_processor.BatchEventProcessor``.

    Same parameters in the same order and the same defaults (batch 10, flush every 30 s,
    ``stop()`` waits up to ``timeout_interval``, 5 s, in all), backed by Tributary's Rust pipeline: ``process()`` only
    queues the SDK's event object; conversion, batching, payload building and dispatch run
    on Tributary threads with the GIL released while Rust works.

    Keyword-only options: ``queue_capacity`` (events queued, default 10,000),
    ``endpoint`` (URL to POST to when there is no ``event_dispatcher``), ``gzip``,
    ``auth_token`` (sent as ``Authorization: Bearer ...``), ``retry_attempts`` (attempts
    per request, default 5), ``request_timeout`` (seconds per attempt, default 10),
    ``spool`` (a directory: a local SQLite spool forwarded in-process; or
    ``"sqs://QUEUE"``: batches written to SQS for ``tributary drain``).

    The processor is stopped at interpreter exit, and after ``os.fork()`` the child gets a
    fresh one of its own (the parent's queued events are sent by the parent only).
    """

    def __init__(self, *args, **kwargs):
        # The native __new__ took and checked the arguments; this only hooks the lifecycle.
        _sdk.register_lifecycle(self)
