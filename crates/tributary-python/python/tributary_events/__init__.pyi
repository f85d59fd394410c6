from ._native import (
    RelayEventDispatcher as RelayEventDispatcher,
    SpoolEventDispatcher as SpoolEventDispatcher,
    SqsEventDispatcher as SqsEventDispatcher,
    _BatchEventProcessor,
    __version__ as __version__,
)

class BatchEventProcessor(_BatchEventProcessor):
    """A drop-in for optimizely.event.event_processor.BatchEventProcessor."""

__all__ = ["BatchEventProcessor", "RelayEventDispatcher", "SpoolEventDispatcher", "SqsEventDispatcher", "__version__"]
