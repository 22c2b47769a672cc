"""The supervisor process's log records, delivered to this process's logging handlers."""

from __future__ import annotations

import logging
import threading
from multiprocessing.context import BaseContext

from multiprocessing_logging import MultiProcessingHandler


class _Relay(logging.Handler):
    """Hands a record from the supervisor to the logger of the same name here, so it meets
    whatever handlers, filters and propagation the application configured."""

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger(record.name).handle(record)


class SupervisorLogs(MultiProcessingHandler):  # type: ignore[misc]
    """multiprocessing-logging's receiving end: a queue the supervisor process writes with a
    QueueHandler, and a thread here that emits what arrives.

    MultiProcessingHandler.__init__ makes its queue with the *global* start method, and CPython
    refuses to hand a fork-context queue to a spawn child; so this builds the same handler
    around a queue from the supervisor's own context. The receiving loop and close() are the
    library's.
    """

    def __init__(self, ctx: BaseContext) -> None:
        logging.Handler.__init__(self)
        self.sub_handler = _Relay()
        self.queue = ctx.Queue(-1)
        self._is_closed = False
        self._receive_thread = threading.Thread(
            target=self._receive, name="pglistener-logs", daemon=True
        )
        self._receive_thread.start()
