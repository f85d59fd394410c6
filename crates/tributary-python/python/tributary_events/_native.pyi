"""Type stubs of the native module (built from crates/tributary-python/src)."""

from typing import Any, Optional, Protocol, Union

__version__: str

class _Dispatcher(Protocol):
    def dispatch_event(self, log_event: Any) -> Any: ...

class _BatchEventProcessor:
    def __init__(
        self,
        event_dispatcher: Optional[_Dispatcher] = None,
        logger: Optional[Any] = None,
        start_on_init: bool = False,
        event_queue: None = None,
        batch_size: Optional[int] = None,
        flush_interval: Optional[Union[int, float]] = None,
        timeout_interval: Optional[Union[int, float]] = None,
        notification_center: Optional[Any] = None,
        *,
        queue_capacity: Optional[int] = None,
        endpoint: Optional[str] = None,
        relay_url: Optional[str] = None,
        gzip: bool = False,
        auth_token: Optional[str] = None,
        retry_attempts: Optional[int] = None,
        request_timeout: Optional[Union[int, float]] = None,
        spool: Optional[str] = None,
    ) -> None: ...
    def process(self, user_event: Any) -> None:
        """Queues the SDK's ImpressionEvent or ConversionEvent; never blocks."""
    def start(self) -> None: ...
    def flush(self) -> None: ...
    def stop(self) -> None: ...
    def qsize(self) -> int: ...
    @property
    def is_running(self) -> bool: ...
    def stats(self) -> dict[str, int]:
        """accepted, dropped_queue_full, dropped_stopped, invalid, queued, dispatched,
        failed, requests, pending, dispatcher_errors, notification_errors."""

class RelayEventDispatcher:
    def __init__(
        self,
        relay_url: str,
        *,
        auth_token: Optional[str] = None,
        gzip: bool = False,
        retry_attempts: Optional[int] = None,
        request_timeout: Optional[Union[int, float]] = None,
    ) -> None: ...
    def dispatch_event(self, log_event: Any) -> None: ...

class SpoolEventDispatcher:
    def __init__(self, path: str, *, endpoint: Optional[str] = None, retry_attempts: Optional[int] = None) -> None: ...
    def dispatch_event(self, log_event: Any) -> None: ...
    def close(self, timeout: float = 5.0) -> None: ...

class SqsEventDispatcher:
    def __init__(self, queue: str, *, retry_attempts: Optional[int] = None) -> None: ...
    def dispatch_event(self, log_event: Any) -> None: ...
