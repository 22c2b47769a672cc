"""The Supervisor: starts and stops the process that owns the listening connection."""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import shutil
import socket
import stat
import sys
import tempfile
import threading
import time
import warnings
import weakref
from collections.abc import Callable
from typing import Any

from psycopg.conninfo import make_conninfo

from . import _protocol
from ._dsn import parse as parse_dsn
from ._dsn import safe_target
from ._forksafe import started
from ._logs import SupervisorLogs
from ._sizes import DEFAULT_MAX_RING_BYTES, DEFAULT_RING_BYTES, check_ring_bytes
from ._supervisor.server import Config, main
from ._supervisor.wal.connection import check_name
from ._worker.control import Control
from .errors import SupervisorGone
from .pool import Pool
from .stats import Stats
from .worker import Worker

log = logging.getLogger("pglistener")

_EXITED = (
    "it exited. If your program starts a Supervisor at module level, put that under "
    "`if __name__ == '__main__':`: the supervisor is a spawned process, and spawn imports the "
    "main module (see 'Safe importing of main module' in the multiprocessing docs)"
)


def _check_main_module() -> None:
    """spawn runs the main module's file again in the child: refuse, saying why, when there
    is none to run (a script read from standard input has __file__ '<stdin>')."""
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if main_file is not None and not os.path.exists(main_file):
        raise RuntimeError(
            f"cannot start a supervisor from a main module without a file ({main_file!r}: "
            f"a script read from standard input?): the supervisor is a spawned process, and "
            f"spawn runs the main module's file again; save the script to a file and run that")


class Supervisor:
    """Owns one PostgreSQL connection in a separate process and fans its notifications out to
    any number of subscriptions, in any number of processes, through shared-memory rings.

    >>> with Supervisor("dbname=app").start() as sup:
    ...     with sup.worker().subscribe("orders") as sub:
    ...         for item in sub:
    ...             print(item)

    Options:

    - ring_bytes: capacity of each subscription's ring (a power of two, at least 16 KiB). A
      reader that falls this far behind sees Gap(reason="overflow", missed=N).
    - max_ring_bytes: the most one subscription may ask for with subscribe(ring_bytes=...)
      (default: ring_bytes or 64 MiB, whichever is larger).
    - application_name: used unless the DSN names one (default "pglistener").
    - backoff_initial, backoff_max, backoff_reset_after: reconnect delays in seconds; the first
      retry is immediate, then backoff_initial doubling to backoff_max, with jitter; the
      sequence restarts once a connection has stayed up for backoff_reset_after.
    - connect_timeout: seconds for one connection attempt.
    - liveness_timeout: seconds the server may stay silent. A heartbeat goes out every third
      of it, and every query must be answered within it; past it the connection is declared
      dead and the reconnect path runs (readers see a reconnect Gap).
      It also sets libpq's TCP keepalives and tcp_user_timeout, unless the DSN sets them.
    - max_subscriptions_per_worker, max_channels_per_worker: per worker process (a
      subscription may cover several channels; each counts).
    - start_timeout: seconds start() waits for the supervisor process to come up.
    - address: where to listen for workers, a Unix socket path that other processes of this
      user find it by (Worker.from_address(), or PGLISTENER_ADDRESS and Worker.from_env()).
      Default: a fresh private directory. A stale socket there is replaced; one where a
      supervisor answers is refused. The directory is not created or removed.
    - block_timeout: seconds a subscription with overflow="block" may hold the connection
      at a time while its ring is full; past it, that subscription misses what does not fit
      (an overflow Gap counts it) until it makes room, and a warning is logged once.
      (The WAL source's blocking readers hold its stream without a limit: the slot keeps
      the rest, so they lose nothing.)
    - slot: read logical decoding messages (pglistener.emit) from this replication slot,
      beside LISTEN: subscribe(..., source="wal"), and the row changes of the publication's
      tables: worker.subscribe_changes(). The slot (pgoutput) and the publication are
      created when missing. Needs wal_level = logical (replica is enough on PostgreSQL 19)
      and a role with REPLICATION. See the README, "Durable channels" and "Table changes".
    - slot_dsn: read the slot from another server than `dsn` (a PostgreSQL 16+ hot standby).
    - publication: the publication pgoutput is given (default "pglistener"): empty for
      messages; subscribe_changes() adds the tables it is asked for.
    - slot_lag_warning: bytes of WAL the slot may hold before a warning is logged.
    - group_hold: seconds a consumer group on the WAL source keeps its place in the slot
      after its last member went (even killed): a member that joins meanwhile gets what
      the last one had not consumed and everything after (default 60; 0: none). For as
      long after start, the slot also keeps the place it had then for the groups of the
      supervisor before this one: a group new to this one starts there (at least once).
    - failover: make the slot a failover slot (PostgreSQL 17+), kept by a standby that
      synchronises slots and usable there once it is promoted; None (the default): where the
      server can, on a primary. True on a server that cannot is an error that says why.
      With a DSN naming several hosts and target_session_attrs=read-write, the supervisor
      follows the primary. stats().failover_ready says whether a failover keeps the slot.
    """

    def __init__(
        self,
        dsn: str = "",
        *,
        ring_bytes: int = DEFAULT_RING_BYTES,
        max_ring_bytes: int | None = None,
        application_name: str = "pglistener",
        backoff_initial: float = 0.5,
        backoff_max: float = 60.0,
        backoff_reset_after: float = 30.0,
        connect_timeout: float = 10.0,
        liveness_timeout: float = 15.0,
        max_subscriptions_per_worker: int = 1024,
        max_channels_per_worker: int = 4096,
        start_timeout: float = 30.0,
        address: str | None = None,
        block_timeout: float = 60.0,
        slot: str | None = None,
        slot_dsn: str | None = None,
        publication: str = "pglistener",
        slot_lag_warning: int = 1 << 30,
        group_hold: float = 60.0,
        failover: bool | None = None,
    ) -> None:
        params = parse_dsn(dsn)
        if not ("application_name" in params or os.environ.get("PGAPPNAME")):
            params["application_name"] = application_name
        check_ring_bytes(ring_bytes)
        if max_ring_bytes is None:
            max_ring_bytes = max(ring_bytes, DEFAULT_MAX_RING_BYTES)
        check_ring_bytes(max_ring_bytes)
        if max_ring_bytes < ring_bytes:
            raise ValueError("max_ring_bytes must be at least ring_bytes")
        for name, value in (("backoff_initial", backoff_initial), ("backoff_max", backoff_max),
                            ("connect_timeout", connect_timeout),
                            ("liveness_timeout", liveness_timeout),
                            ("start_timeout", start_timeout),
                            ("block_timeout", block_timeout)):
            if not 0 < value < math.inf:
                raise ValueError(f"{name} must be a positive number of seconds, not {value!r}")
        for key, setting in _tcp_liveness(liveness_timeout).items():
            params.setdefault(key, setting)
        if backoff_max < backoff_initial:
            raise ValueError("backoff_max must be at least backoff_initial")
        if max_subscriptions_per_worker < 1 or max_channels_per_worker < 1:
            raise ValueError("max_subscriptions_per_worker and max_channels_per_worker must be "
                             "at least 1")
        slot_params = None
        if slot is not None:
            check_name("slot", slot)
            check_name("publication", publication)
            if not 0 <= group_hold < math.inf:
                raise ValueError(f"group_hold must be a number of seconds, 0 or more, not "
                                 f"{group_hold!r}")
            if failover is not None and not isinstance(failover, bool):
                raise TypeError(f"failover is True, False or None (where the server can), "
                                f"not {failover!r}")
            if not isinstance(slot_lag_warning, int) or slot_lag_warning < 1:
                raise ValueError(f"slot_lag_warning is a positive number of bytes, not "
                                 f"{slot_lag_warning!r}")
            if slot_dsn is not None:
                slot_params = parse_dsn(slot_dsn)
                if not ("application_name" in slot_params or os.environ.get("PGAPPNAME")):
                    slot_params["application_name"] = application_name
                for key, setting in _tcp_liveness(liveness_timeout).items():
                    slot_params.setdefault(key, setting)
        elif slot_dsn is not None:
            raise ValueError("slot_dsn= names where to read the slot: give slot= too")
        self._config = Config(
            conninfo=make_conninfo("", **params),
            safe_target=safe_target(params),
            ring_bytes=ring_bytes,
            max_ring_bytes=max_ring_bytes,
            backoff_initial=backoff_initial,
            backoff_max=backoff_max,
            backoff_reset_after=backoff_reset_after,
            connect_timeout=connect_timeout,
            liveness_timeout=liveness_timeout,
            max_subscriptions_per_worker=max_subscriptions_per_worker,
            max_channels_per_worker=max_channels_per_worker,
            log_level=logging.NOTSET,       # start() takes the level in force then
            block_timeout=block_timeout,
            slot=slot,
            slot_conninfo=None if slot_params is None else make_conninfo("", **slot_params),
            slot_safe_target=safe_target(slot_params if slot_params is not None else params),
            publication=publication,
            slot_lag_warning=slot_lag_warning,
            group_hold=group_hold,
            failover=failover,
        )
        self._start_timeout = start_timeout
        if address is not None and not isinstance(address, str):
            raise TypeError(f"address is a socket path (str), not {type(address).__name__}")
        self._address = None if address is None else os.path.abspath(address)
        self._config.private_dir = address is None
        self._owner_pid = os.getpid()
        self._process: Any = None
        self._owner: socket.socket | None = None
        self._owner_lock = threading.Lock()
        self._dir: str | None = None
        self._logs: SupervisorLogs | None = None
        self._release: Callable[[], Any] = lambda: None
        self._req = 0
        self._pools: list[tuple[Pool, float]] = []

    def __repr__(self) -> str:
        state = "running" if self._process is not None else "not running"
        return f"<Supervisor {self._config.safe_target} {state}>"

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> Supervisor:
        """Start the supervisor process; returns self once it serves workers. Connecting to
        the server goes on in the background (subscribe() waits for it)."""
        if self._process is not None:
            raise RuntimeError("this Supervisor is already started")
        _check_main_module()
        if self._address is None:
            self._dir = tempfile.mkdtemp(prefix="pglistener-")     # mode 0700: our user only
            path = os.path.join(self._dir, "control")
        else:
            path = self._address
            _clear_stale_socket(path)
        listen_sock = owner = theirs = None
        bound = False
        try:
            listen_sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            owner, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            listen_sock.bind(path)
            bound = True
            os.chmod(path, 0o600)
            listen_sock.listen(128)
            # spawn: safe whatever the default start method is and whatever threads run here.
            ctx = multiprocessing.get_context("spawn")
            self._logs = SupervisorLogs(ctx)
            self._config.log_level = logging.getLogger("pglistener").getEffectiveLevel()
            self._process = ctx.Process(
                target=main, args=(self._config, listen_sock, theirs, self._logs.queue),
                name="pglistener-supervisor", daemon=True)
            self._process.start()
            started(self._process)
        except BaseException:
            # The sockets first: out of descriptors, what they hold is what the rest needs.
            for sock in (listen_sock, theirs, owner):
                if sock is not None:
                    sock.close()
            _release(self._owner_pid, self._process, self._dir, self._logs,
                     self._address if bound else None)
            self._process = None
            raise
        finally:
            for sock in (listen_sock, theirs):
                if sock is not None:
                    sock.close()
        self._owner = owner
        self._path = path
        # Also when the Supervisor is dropped without stop(), or at interpreter exit.
        self._release = weakref.finalize(
            self, _release, self._owner_pid, self._process, self._dir, self._logs,
            self._address)
        try:
            owner.settimeout(self._start_timeout)
            got = _protocol.recv(owner)
            owner.settimeout(None)
        except (OSError, ValueError) as exc:
            self.stop()
            raise RuntimeError(f"the supervisor process did not start: {exc}") from None
        if got is None or not got[0].get("ready"):
            message = got[0] if got else {}
            self.stop()
            raise RuntimeError(
                "the supervisor process did not start: " + message.get("message", _EXITED))
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the pools it spawned (their readers finish the item in hand), then the
        supervisor process: close its connection and free every ring. Readers still blocked
        get SupervisorGone. Idempotent; does nothing in a forked child."""
        if os.getpid() != self._owner_pid or self._process is None:
            return
        # Readers first, each finishing the item in hand; then the connection.
        pools, self._pools = self._pools, []
        for pool, stop_timeout in pools:
            pool.stop(stop_timeout)
        if self._owner is not None:
            Control.stopping(self._path)    # readers here: a clean end, not an outage
            try:
                self._request({"op": "stop"}, timeout=timeout)
            except (SupervisorGone, TimeoutError, OSError):
                pass
            self._process.join(timeout)
        self._cleanup()

    def _cleanup(self) -> None:
        if self._owner is not None:
            self._owner.close()
            self._owner = None
        self._release()      # the weakref.finalize of start(): runs once
        self._process = None
        self._logs = None
        self._dir = None

    def __enter__(self) -> Supervisor:
        if self._process is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what users ask -----------------------------------------------------------------------

    def worker(self) -> Worker:
        """A handle for subscribing, picklable: pass it to child processes (fork or spawn)."""
        if self._owner is None:
            raise RuntimeError("start() the Supervisor before asking for workers")
        return Worker(self._path)

    def spawn(self, target: Callable[..., Any], *args: Any, processes: int = 1,
              start_method: str | None = None, stop_timeout: float = 10.0,
              group: str | None = None, source: str = "notify") -> Pool:
        """Start `processes` children, each running target(worker, *args) with its own
        Worker, and restart any that crashes (with the connection's backoff). target must be
        importable (a module-level function). start_method: "forkserver" by default (else
        "spawn"), both safe from a threaded parent. stop() stops the pool first. group: the
        children's subscriptions join this consumer group (each notification to one child)
        unless they name another. source: the children's subscriptions read this source
        ("notify" or "wal") unless they name the other."""
        if self._owner is None:
            raise RuntimeError("start() the Supervisor before spawning workers")
        c = self._config
        pool = Pool(self._path, target, args, processes, start_method,
                    (c.backoff_initial, c.backoff_max, c.backoff_reset_after),
                    name=getattr(target, "__name__", "pool"), group=group, source=source)
        self._pools.append((pool, stop_timeout))
        return pool

    @property
    def pid(self) -> int | None:
        """The supervisor process's pid."""
        return self._process.pid if self._process is not None else None

    @property
    def backend_pid(self) -> int | None:
        """Server pid of the listening connection; None while disconnected."""
        return self.stats().backend_pid

    def status(self) -> dict[str, Any]:
        """Deprecated: stats() has all of it (connected, channels, subscriptions, ...)."""
        warnings.warn("Supervisor.status() is deprecated: use stats(), which has the same "
                      "figures as attributes", DeprecationWarning, stacklevel=2)
        s = self.stats()
        return {"connected": s.connected, "backend_pid": s.backend_pid,
                "last_error": s.last_error, "last_error_permanent": s.last_error_permanent,
                "reconnects": s.reconnects, "workers": s.workers, "received": s.received,
                "unrouted": s.unrouted, "subscriptions": s.subscriptions,
                "channels": list(s.channels)}

    def stats(self) -> Stats:
        """Connection state, backend pid, reconnects and total outage time, the server's
        notification queue fill, the channels and subscriptions, and per reader: delivered,
        missed, ring size and lag."""
        return Stats._from_reply(self._request({"op": "stats"}, timeout=10.0))

    def wait_connected(self, timeout: float = 30.0) -> Stats:
        """Wait until the listening connection is up (start() returns before it is: the
        supervisor connects in the background and answers meanwhile); its stats(). Raises
        TimeoutError saying why it is not, after `timeout` seconds. For a readiness probe, or
        before reading backend_pid."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats()
            if stats.connected:
                return stats
            if time.monotonic() >= deadline:
                raise TimeoutError(f"not connected within {timeout} s: "
                                   f"{stats.last_error or 'still connecting'}")
            time.sleep(0.01)

    def _request(self, message: dict[str, Any], timeout: float) -> dict[str, Any]:
        with self._owner_lock:
            if self._owner is None:
                raise SupervisorGone("the supervisor is not running")
            self._req += 1
            message = {**message, "req": self._req}
            try:
                _protocol.send(self._owner, message)
                self._owner.settimeout(timeout)
                while True:
                    got = _protocol.recv(self._owner)
                    if got is None:
                        raise SupervisorGone("the supervisor process is gone")
                    if got[0].get("req") == self._req:
                        return got[0]
            except TimeoutError:
                raise TimeoutError(f"the supervisor did not answer within {timeout} s") from None
            except (BrokenPipeError, ConnectionResetError):
                raise SupervisorGone("the supervisor process is gone") from None
            finally:
                if self._owner is not None:
                    self._owner.settimeout(None)


def _release(owner_pid: int, process: Any, directory: str | None,
             logs: SupervisorLogs | None, socket_path: str | None = None,
             timeout: float = 5.0) -> None:
    """End the supervisor process and remove what start() made. Only in the process that
    started it: a fork child that exits must not take its parent's supervisor along."""
    if os.getpid() != owner_pid:
        return
    if process is not None and process.pid is not None:
        for end in (process.terminate, process.kill):
            if not process.is_alive():
                break
            end()
            process.join(timeout)
        process.join()
        process.close()
    if directory is not None:
        _remove_private_dir(directory)
    if socket_path is not None:     # a given address: the socket only, not its directory
        try:
            os.unlink(socket_path)
        except OSError:
            pass
    if logs is not None:
        logs.close()


def _remove_private_dir(directory: str) -> None:
    """Remove start()'s directory. It holds the control socket only, and unlink() and
    rmdir() need no descriptor: this works when the process has none left, where rmtree(),
    which opens the directory, would fail (anything else in it: rmtree())."""
    try:
        os.unlink(os.path.join(directory, "control"))
    except OSError:
        pass
    try:
        os.rmdir(directory)
    except FileNotFoundError:
        pass
    except OSError:
        shutil.rmtree(directory, ignore_errors=True)


def _clear_stale_socket(path: str) -> None:
    """Make way at `path` for our socket: remove a socket nobody answers on; refuse anything
    else."""
    if not os.path.lexists(path):
        return
    if not stat.S_ISSOCK(os.lstat(path).st_mode):
        raise FileExistsError(f"{path} exists and is not a socket: choose another address")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)             # left by a supervisor that died
        return
    finally:
        probe.close()
    raise FileExistsError(f"a supervisor already listens at {path}")


def _tcp_liveness(liveness_timeout: float) -> dict[str, str]:
    """libpq's TCP settings that notice a dead peer within about liveness_timeout: keepalive
    probes after a third of it, and tcp_user_timeout for data the peer never acknowledges.
    Ignored on Unix sockets; the heartbeat covers every transport."""
    idle = max(1, int(liveness_timeout / 3))
    return {
        "keepalives": "1",
        "keepalives_idle": str(idle),
        "keepalives_interval": str(max(1, int(liveness_timeout / 9))),
        "keepalives_count": "3",
        "tcp_user_timeout": str(max(1, int(liveness_timeout * 1000))),
    }
