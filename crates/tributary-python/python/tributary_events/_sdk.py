"""What the native module needs from Python: the SDK's classes and its exact JSON shaping.

Imported by the native `BatchEventProcessor` on construction. Everything here runs on a
Tributary thread (conversion, dispatch), never on the caller's thread inside `process()`.
"""

import atexit
import json
import logging
import os
import weakref

from optimizely import entities
from optimizely import logger as sdk_logger
from optimizely.event import log_event as _log_event
from optimizely.event import user_event as _user_event
from optimizely.helpers import enums, event_tag_utils

ImpressionEvent = _user_event.ImpressionEvent
ConversionEvent = _user_event.ConversionEvent
Experiment = entities.Experiment
Variation = entities.Variation
LOG_EVENT = enums.NotificationTypes.LOG_EVENT
HTTP_HEADERS = {"Content-Type": "application/json"}

_NULLABLE = ("revenue", "value", "tags", "decisions")


def _dict_clean(pairs):
    # The SDK's EventBatch._dict_clean: drops these keys when None, at any depth (tags too).
    return {k: v for k, v in pairs if not (v is None and k in _NULLABLE)}


def tags_json(tags):
    """The event tags as the SDK's payload carries them, as a JSON string."""
    shaped = json.loads(json.dumps(tags, default=lambda o: o.__dict__), object_pairs_hook=_dict_clean)
    return json.dumps(shaped)


def revenue_and_value(tags, logger):
    """`revenue` and `value` as the SDK's EventFactory takes them from the tags."""
    return event_tag_utils.get_revenue_value(tags), event_tag_utils.get_numeric_value(tags, logger)


def make_log_event(url, body):
    """The SDK's own LogEvent for one request body: url, params (a dict), http_verb, headers."""
    return _log_event.LogEvent(url, json.loads(body), "POST", dict(HTTP_HEADERS))


def default_logger():
    return logging.getLogger("tributary_events")


def no_op_logger():
    return sdk_logger.NoOpLogger()


# Every live processor, weakly: one atexit entry and one fork hook for all of them, so
# creating processors registers nothing that outlives them.
_PROCESSORS = weakref.WeakSet()


def _stop_all_at_exit():
    for p in list(_PROCESSORS):
        p._at_exit()
    # Threads still working (a stop() that timed out) must not take the GIL from here on.
    from . import _native

    _native._interpreter_exiting()


def _renew_all_in_child():
    for p in list(_PROCESSORS):
        try:
            p._after_fork_in_child()
        except Exception:  # noqa: BLE001 - one processor's failure must not skip the others
            logging.getLogger("tributary_events").exception("BatchEventProcessor: renewing after fork failed")


atexit.register(_stop_all_at_exit)
os.register_at_fork(after_in_child=_renew_all_in_child)


def register_lifecycle(processor):
    """Stops `processor` at interpreter exit and renews it in a forked child.

    Holds only a weak reference, so registering does not keep the processor alive.
    """
    _PROCESSORS.add(processor)

def adapt_logger(logger):
    """The SDK's own adaptation: its SimpleLogger/NoOpLogger become the `logging.Logger` they wrap.

    Their `.warning()`/`.error()` are no-ops inherited from `BaseLogger`; the SDK never calls them.
    """
    return sdk_logger.adapt_logger(logger)
