"""An event dispatcher for the official Optimizely Python SDK that sends to a Tributary relay.

With the `tributary-events` package installed (`pip install ./crates/tributary-python`),
use `tributary_events.RelayEventDispatcher` instead: the same, in Rust (keep-alive, retries
with `Retry-After`, the GIL released while it sends). This file stays for services that
cannot install the package.

The SDK calls ``dispatch_event(log_event)`` with the Event API request it built. This
dispatcher posts the same body to the relay instead of the Event API, keeping EU payloads on
the relay's EU route (they are only ever forwarded to the EU endpoint). The relay answers
204 once the payload is on disk, so a short timeout and a few retries on 503 or a connection
error are all the client needs; the relay does the long retries upstream.

Usage::

    from optimizely import optimizely
    from relay_dispatcher import RelayEventDispatcher

    client = optimizely.Optimizely(
        datafile=datafile,
        event_dispatcher=RelayEventDispatcher("http://127.0.0.1:8080"),
    )

Environment: ``TRIBUTARY_RELAY_URL`` is used when no URL is given; ``TRIBUTARY_TOKEN`` is sent
as a bearer token when set (the relay's ``--auth-tokens``).
"""

import json
import logging
import os
import time

import requests

logger = logging.getLogger(__name__)


class RelayEventDispatcher:
    """Posts each LogEvent's params to a Tributary relay."""

    def __init__(self, relay_url=None, timeout=5.0, attempts=3, token=None, session=None):
        self.relay_url = (relay_url or os.environ.get("TRIBUTARY_RELAY_URL", "http://127.0.0.1:8080")).rstrip("/")
        self.timeout = timeout
        self.attempts = max(1, int(attempts))
        self.token = token or os.environ.get("TRIBUTARY_TOKEN")
        # One session: keep-alive connections to the relay.
        self.session = session or requests.Session()

    def _target(self, log_event):
        path = "/eu/v1/events" if "://eu." in (log_event.url or "") else "/v1/events"
        return self.relay_url + path

    def dispatch_event(self, log_event):
        """Posts the payload; returns True once the relay has stored it (the SDK ignores it)."""
        body = json.dumps(log_event.params)
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = "Bearer " + self.token
        url = self._target(log_event)
        delay = 0.1
        for attempt in range(1, self.attempts + 1):
            try:
                response = self.session.post(url, data=body, headers=headers, timeout=self.timeout)
            except requests.RequestException as error:
                logger.warning("relay unreachable (attempt %d): %s", attempt, error)
            else:
                if response.status_code < 300:
                    return True
                if response.status_code != 503:
                    # 400/401/413/415: retrying the same body will not help.
                    logger.error("relay refused the payload: %d %s", response.status_code, response.text[:200])
                    return False
                delay = max(delay, float(response.headers.get("Retry-After", delay)))
                logger.warning("relay busy (attempt %d)", attempt)
            if attempt < self.attempts:
                time.sleep(min(delay, 5.0))
                delay *= 2
        logger.error("event not delivered to the relay after %d attempts", self.attempts)
        return False
