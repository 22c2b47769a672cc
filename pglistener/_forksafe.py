"""Processes we start, and the fork hook that keeps a fork child from ending them.

An os.fork() child inherits multiprocessing's record of this process's children, and
multiprocessing's exit handler terminates the daemonic ones: a forked web worker that exits
normally would kill its parent's supervisor and pool workers. The child is not their parent.
"""

from __future__ import annotations

import multiprocessing
import os
import weakref
from typing import Any

#: Supervisor and pool processes started in this process.
_STARTED: weakref.WeakSet[Any] = weakref.WeakSet()


def started(process: Any) -> None:
    """Record a process that only this process may end."""
    _STARTED.add(process)


def _not_their_parent_after_fork() -> None:
    for process in _STARTED:
        multiprocessing.process._children.discard(process)  # type: ignore[attr-defined]


os.register_at_fork(after_in_child=_not_their_parent_after_fork)
