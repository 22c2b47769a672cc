"""Worker pools: reader processes that the Supervisor starts, watches and restarts.

    def handle(worker, *args):          # runs in each child process
        for item in worker.subscribe("jobs"):
            ...

    pool = sup.spawn(handle, *args, processes=4)

The parent watches its children from one thread per pool. A child that exits abnormally (a
non-zero code, a signal) is started again after the connection's backoff (the first restart
at once, then backoff_initial doubling to backoff_max, with jitter; the delay starts over once
a child has run for backoff_reset_after), so a child that crashes on start cannot spin a core.
A restarted child's Worker opens every stream with Gap("restart"). A child that returns
normally is done and stays down.

stop() sends SIGTERM: in the child, the next get() raises SubscriptionClosed, so a reader
finishes the item in hand and its loop ends; after `timeout` the rest get SIGKILL.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ._backoff import Backoff
from ._checks import check_group, check_source
from ._forksafe import started
from .errors import SupervisorGone
from .worker import Worker, request_stop

log = logging.getLogger("pglistener.pool")


def _default_start_method() -> str:
    # Both are safe from a threaded parent; forkserver starts children faster.
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


@dataclass
class SlotStats:
    """One place in a pool, across the processes that have filled it."""

    slot: int
    pid: int | None         # the current process, None while down
    starts: int             # processes started in this slot
    restarts: int           # of those, after an abnormal exit
    last_exit: str | None   # how the last one ended: "code 1", "signal SIGKILL", ...


class _Slot:
    def __init__(self, index: int, backoff: Backoff) -> None:
        self.index = index
        self.backoff = backoff
        self.process: Any = None
        self.starts = 0
        self.restarts = 0
        self.last_exit: str | None = None
        self.restart_at: float | None = 0.0     # due now: the first start
        self.done = False                        # returned normally: stays down


class Pool:
    """Child processes running `target(worker, *args)`, restarted when they crash."""

    def __init__(self, path: str, target: Callable[..., Any], args: tuple[Any, ...],
                 processes: int, start_method: str | None, backoff: tuple[float, float, float],
                 name: str, group: str | None = None, source: str = "notify") -> None:
        if processes < 1:
            raise ValueError("processes must be at least 1")
        if not callable(target):
            raise TypeError("target is a function: target(worker, *args) runs in each child")
        qualname = getattr(target, "__qualname__", "")
        if "<" in qualname:
            raise ValueError(
                f"target must be importable by the child processes (a module-level function), "
                f"not {qualname!r}")
        self._path = path
        self._group = check_group(group)
        self._source = check_source(source)
        self._target = target
        self._args = args
        self._ctx: Any = multiprocessing.get_context(start_method or _default_start_method())
        self._name = name
        self._slots = [_Slot(i, Backoff(*backoff)) for i in range(processes)]
        self._lock = threading.Lock()
        self._stopping = False
        self._wake_r, self._wake_w = self._ctx.Pipe(duplex=False)
        self._thread = threading.Thread(target=self._watch, name=f"pglistener-pool-{name}",
                                        daemon=True)
        self._thread.start()
        # At interpreter exit, multiprocessing terminates daemonic children: do not restart
        # them then. (Registered after multiprocessing's own handler, so it runs before.)
        atexit.register(self._halt)

    def __repr__(self) -> str:
        return f"<Pool {self._name} {len(self._slots)} processes>"

    @property
    def pids(self) -> list[int]:
        """The running children's pids."""
        with self._lock:
            return [s.process.pid for s in self._slots
                    if s.process is not None and s.process.is_alive()]

    def stats(self) -> list[SlotStats]:
        with self._lock:
            return [SlotStats(s.index, s.process.pid if s.process is not None else None,
                              s.starts, s.restarts, s.last_exit) for s in self._slots]

    # -- the watching thread ------------------------------------------------------------------

    def _watch(self) -> None:
        while True:
            with self._lock:
                if self._stopping:
                    return
                now = time.monotonic()
                for slot in self._slots:
                    if slot.restart_at is not None and slot.restart_at <= now:
                        self._start(slot)
                running = {s.process.sentinel: s for s in self._slots if s.process is not None}
                due = [s.restart_at for s in self._slots if s.restart_at is not None]
            timeout = max(0.0, min(due) - time.monotonic()) if due else None
            ready = multiprocessing.connection.wait([*running, self._wake_r], timeout)
            with self._lock:
                if self._stopping:
                    return
                for sentinel in ready:
                    if sentinel in running:
                        self._exited(running[sentinel])
                if self._wake_r in ready:
                    self._wake_r.recv()

    def _start(self, slot: _Slot) -> None:
        restarted = slot.starts > 0
        process = self._ctx.Process(
            target=_child_main,
            args=(self._path, restarted, self._target, self._args, self._group,
                  self._source),
            name=f"pglistener-{self._name}-{slot.index}", daemon=True)
        process.start()
        started(process)
        slot.process = process
        slot.starts += 1
        slot.restarts += restarted
        slot.restart_at = None
        slot.backoff.succeeded(time.monotonic())

    def _exited(self, slot: _Slot) -> None:
        process = slot.process
        process.join()
        code, pid = process.exitcode, process.pid
        slot.process = None
        process.close()
        if code == 0:
            slot.last_exit = "code 0"
            slot.done = True
            log.info("%s slot %d finished (its function returned)", self._name, slot.index)
            return
        slot.last_exit = _describe(code)
        delay = slot.backoff.failed(time.monotonic())
        slot.restart_at = time.monotonic() + delay
        log.warning("%s slot %d (pid %d) ended with %s; restarting %s", self._name,
                    slot.index, pid, slot.last_exit,
                    "now" if delay == 0 else f"in {delay:.1f} s")

    # -- stopping -----------------------------------------------------------------------------

    def _halt(self) -> None:
        """Stop restarting; the children are left to whoever ends them."""
        with self._lock:
            if not self._stopping:
                self._stopping = True
                self._wake_w.send(None)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM every child (each finishes its current item), SIGKILL those still running
        after `timeout` seconds, and stop restarting. Idempotent."""
        atexit.unregister(self._halt)
        with self._lock:
            if self._wake_w.closed:
                return
            if not self._stopping:
                self._stopping = True
                self._wake_w.send(None)
            processes = [s.process for s in self._slots if s.process is not None]
        self._thread.join()
        for p in processes:
            if p.is_alive():
                os.kill(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in processes:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                log.warning("%s: pid %d did not stop within %g s: killing it", self._name,
                            p.pid, timeout)
                p.kill()
                p.join()
        with self._lock:
            for slot in self._slots:
                if slot.process is not None:
                    slot.last_exit = _describe(slot.process.exitcode)
                    slot.process.close()
                    slot.process = None
        self._wake_r.close()
        self._wake_w.close()


def _describe(code: int | None) -> str:
    if code is None:
        return "unknown"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"code {code}"


def _child_main(path: str, restarted: bool, target: Callable[..., Any],
                args: tuple[Any, ...], group: str | None = None,
                source: str = "notify") -> None:
    """A pool child: Ctrl-C is the parent's to handle; SIGTERM ends reading after the
    current item; an exception is logged and ends the process with code 1 (restarted)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: request_stop())
    try:
        target(Worker(path, restarted=restarted, group=group, source=source), *args)
    except SupervisorGone:
        log.info("the supervisor is gone: pool worker pid %d stops", os.getpid())
    except Exception:
        logging.getLogger("pglistener.pool").exception(
            "pool worker pid %d failed", os.getpid())
        raise SystemExit(1) from None
