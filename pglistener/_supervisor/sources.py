"""The supervisor's sources, by name: the one place that names them. The server runs each
that its config enables (Source.enabled), in this order (a source may borrow the plain
connection one before it lends: Source.lends), and never names one itself; the name is a
subscribe request's `source` and ReaderStats.source.

Adding a source is a folder of its own (its shell and its decoder), an entry here, and its
fields of Stats (stats.py; Source.off_stats for a supervisor without it).
"""

from __future__ import annotations

from .notify.source import NotifySource
from .source import Source
from .wal.source import WalSource

SOURCES: dict[str, type[Source]] = {"notify": NotifySource, "wal": WalSource}
