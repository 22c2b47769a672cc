"""Host names resolved off the supervisor's loop.

libpq resolves a host name inside PQconnectPoll, with a blocking getaddrinfo(): a slow or
silent DNS server would stall the one loop that serves every worker. So before an attempt the
names are resolved in a thread of their own, and libpq gets the addresses (hostaddr) beside the
names (host, still used for TLS verification, .pgpass and messages), one entry per address, as
psycopg's async connect does. The loop watches `Resolver.fileno()`, readable once the answer is
there.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import threading

from psycopg.conninfo import conninfo_to_dict, make_conninfo


class ResolveError(Exception):
    """No host of the conninfo could be resolved."""


def resolve_conninfo(conninfo: str) -> str:
    """conninfo with every host name that has no hostaddr resolved: a blocking call. A name
    that resolves to several addresses becomes as many entries, tried in order."""
    params = conninfo_to_dict(conninfo)
    host = str(params.get("host") or os.environ.get("PGHOST") or "")
    if not host or params.get("hostaddr") or os.environ.get("PGHOSTADDR"):
        return conninfo         # a Unix socket (libpq's default), or addresses given
    hosts = host.split(",")
    ports = str(params.get("port") or os.environ.get("PGPORT") or "").split(",")
    if len(ports) == 1:
        ports = ports * len(hosts)
    if len(ports) != len(hosts):
        return conninfo         # libpq says what is wrong with it
    out_hosts: list[str] = []
    out_addrs: list[str] = []
    out_ports: list[str] = []
    errors = []
    for name, port in zip(hosts, ports, strict=True):
        if not name or name.startswith("/") or name.startswith("@") or _is_ip(name):
            addrs = [""]        # nothing to resolve: libpq takes it as it is
        else:
            try:
                infos = socket.getaddrinfo(name, port or 5432, proto=socket.IPPROTO_TCP,
                                           type=socket.SOCK_STREAM)
            except (OSError, UnicodeError) as exc:
                errors.append(f"could not resolve {name!r}: {exc}")
                continue
            addrs = list(dict.fromkeys(str(info[4][0]) for info in infos))
        for addr in addrs:
            out_hosts.append(name)
            out_addrs.append(addr)
            out_ports.append(port)
    if not out_hosts:
        raise ResolveError("; ".join(errors))
    if not any(out_addrs):
        return conninfo         # nothing was a name
    extra = {"host": ",".join(out_hosts), "hostaddr": ",".join(out_addrs)}
    if any(out_ports):
        extra["port"] = ",".join(out_ports)
    return make_conninfo(conninfo, **extra)


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class Resolver:
    """resolve_conninfo() in a daemon thread; fileno() becomes readable when result() has
    the answer. A lookup that outlives its attempt (a silent DNS server) finishes in its
    thread, and the next attempt waits for it rather than starting another: at most one lookup
    runs at a time."""

    def __init__(self) -> None:
        self._r, self._w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._thread: threading.Thread | None = None
        self._result: str | None = None
        self._error: Exception | None = None
        self._conninfo = ""
        self._lock = threading.Lock()      # close() against a late answer's write
        self._closed = False

    def fileno(self) -> int:
        return self._r

    def start(self, conninfo: str) -> None:
        """Resolve `conninfo` (again); watch fileno(). A lookup still running goes on and its
        answer serves this call."""
        if self._thread is not None and self._thread.is_alive():
            return
        self.done()     # drop an answer nobody took
        self._conninfo = conninfo
        self._thread = threading.Thread(target=self._run, name="pglistener-resolve",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._result = resolve_conninfo(self._conninfo)
        except Exception as exc:  # noqa: BLE001 - handed to the loop, which reports it
            self._error = exc
        with self._lock:
            if not self._closed:
                os.write(self._w, b"x")

    def result(self) -> str:
        """The resolved conninfo, once fileno() was readable; raises what the lookup raised."""
        self.done()
        error, self._error = self._error, None
        result, self._result = self._result, None
        if error is not None:
            raise error
        if result is None:
            raise ResolveError("the lookup gave no answer")
        return result

    def done(self) -> None:
        try:
            os.read(self._r, 64)
        except BlockingIOError:
            pass

    def close(self) -> None:
        with self._lock:
            self._closed = True
            os.close(self._r)
            os.close(self._w)
