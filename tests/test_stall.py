"""The supervisor's one loop never stalls: while it connects to a server that accepts TCP and
never answers, while a blocking reader holds the connection, while a host name resolves.

The bounds here are generous (half a second for a round trip that takes about a millisecond)
so that a slow machine cannot fail them; the code before issue 17 took 9.5-10 s (a blocking
connect) and failed every one of them.
"""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import psycopg
import pytest
from fix_proxy import Proxy, proxied

from fix_pg import notify
from fix_supervisor import wait_for
from pglistener import Gap, Supervisor
from pglistener._core.dispatch import libpq_version
from pglistener._supervisor.resolve import ResolveError, Resolver, resolve_conninfo

FAST = 0.5      # a control round trip is about 1 ms; the old loop took up to 10 s


def timed(call: Any, *args: Any, **kwargs: Any) -> tuple[float, Any]:
    t0 = time.monotonic()
    result = call(*args, **kwargs)
    return time.monotonic() - t0, result


def test_control_answers_while_connecting_to_a_silent_server(dsn: str, proxy: Proxy) -> None:
    sup = Supervisor(proxied(dsn, proxy), connect_timeout=10, liveness_timeout=1.5,
                     backoff_initial=0.05, backoff_max=0.2).start()
    try:
        worker = sup.worker()
        held = worker.subscribe("stall-known")          # listened while the server answered
        proxy.mute()
        proxy.freeze()          # the live connection goes silent; every new one too
        wait_for(lambda: sup.stats().state == "connecting" and sup.stats().reconnects == 1,
                 "a reconnect into the silent server")
        assert proxy.muted and proxy.silent, "the supervisor is not connecting to it"

        took = [timed(sup.stats)[0] for _ in range(50)]
        assert max(took) < FAST, f"stats() took up to {max(took):.3f} s while connecting"

        # A channel listened already: answered at once, its stream begins with the gap its
        # neighbour got when the connection went.
        t, again = timed(worker.subscribe, "stall-known", timeout=5)
        assert t < FAST
        assert again.get(timeout=1) == Gap("reconnect")
        assert held.get(timeout=1) == Gap("reconnect")
        t, _ = timed(again.unsubscribe)
        assert t < FAST
        # A new channel needs the server: the subscribe waits, and says why when it gives up.
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="connecting|cannot listen"):
            worker.subscribe("stall-new", timeout=0.3)
        assert time.monotonic() - t0 < 0.3 + FAST
        assert sup.stats().state == "connecting"
    finally:
        t, _ = timed(sup.stop)
    assert t < 1.0, f"stop() took {t:.2f} s while connecting"


def test_stats_answered_while_a_blocking_reader_holds_the_connection(
        supervisor: Supervisor, conn: psycopg.Connection) -> None:
    worker = supervisor.worker()
    slow = worker.subscribe("stall-hold", overflow="block", ring_bytes=16384)
    notify(conn, "stall-hold", [f"{i:0>300}" for i in range(200)])   # far past 16 KiB
    wait_for(lambda: supervisor.stats().held_seconds > 0.2, "a hold")
    took = [timed(supervisor.stats)[0] for _ in range(50)]
    assert max(took) < FAST, f"stats() took up to {max(took):.3f} s during a hold"
    stats = supervisor.stats()
    assert stats.connected and stats.held_seconds > 0.2
    got = [slow.get(timeout=10).payload for _ in range(200)]     # nothing was lost
    assert got == [f"{i:0>300}" for i in range(200)]


def test_a_host_name_is_resolved_beside_the_loop(dsn: str, proxy: Proxy,
                                                 conn: psycopg.Connection) -> None:
    """"localhost" goes through the resolver thread and connects like an address."""
    named = proxied(dsn, proxy).replace("hostaddr=127.0.0.1", "").replace(
        "host=127.0.0.1", "host=localhost")
    assert "localhost" in named and "hostaddr" not in named
    with Supervisor(named).start() as sup:
        with sup.worker().subscribe("stall-named") as sub:
            notify(conn, "stall-named", ["x"])
            assert sub.get(timeout=10).payload == "x"


def test_resolve_conninfo() -> None:
    assert resolve_conninfo("host=/tmp port=5432") == "host=/tmp port=5432"    # a socket
    assert resolve_conninfo("host=h hostaddr=10.0.0.1") == "host=h hostaddr=10.0.0.1"
    out = resolve_conninfo("host=localhost,/tmp,127.0.0.2 port=5,6,7 dbname=x")
    params = dict(item.split("=", 1) for item in out.split())
    hosts, addrs, ports = (params[k].split(",") for k in ("host", "hostaddr", "port"))
    assert len(hosts) == len(addrs) == len(ports) >= 3
    assert hosts[0] == "localhost" and addrs[0] in ("127.0.0.1", "::1") and ports[0] == "5"
    assert (hosts[-2:], addrs[-2:], ports[-2:]) == (["/tmp", "127.0.0.2"], ["", ""], ["6", "7"])
    assert params["dbname"] == "x"
    with pytest.raises(ResolveError, match="could not resolve 'no-such-host.invalid'"):
        resolve_conninfo("host=no-such-host.invalid")


def test_a_slow_lookup_does_not_block_its_caller(monkeypatch: pytest.MonkeyPatch) -> None:
    """The supervisor's loop starts a lookup and goes on; a lookup that outlives its attempt
    serves the next one instead of starting another."""
    release = threading.Event()
    calls = []
    real = socket.getaddrinfo

    def slow(*args: Any, **kwargs: Any) -> Any:
        calls.append(args[0])
        release.wait(10)
        return real("127.0.0.1", *args[1:], **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", slow)
    resolver = Resolver()
    try:
        t, _ = timed(resolver.start, "host=db.example port=5432")
        assert t < FAST
        resolver.start("host=db.example port=5432")     # the next attempt: no second lookup
        assert not _readable(resolver.fileno())
        release.set()
        wait_for(lambda: _readable(resolver.fileno()), "the lookup's answer", 10)
        assert "hostaddr=127.0.0.1" in resolver.result() and calls == ["db.example"]
    finally:
        resolver.close()


def _readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


@pytest.mark.every_python
def test_the_readme_example_under_psycopg_binary(dsn: str, tmp_path: Any) -> None:
    """The extension owns its connections: with psycopg's binary implementation (its own
    bundled libpq, a different version from ours) the README's example works as it is."""
    script = tmp_path / "example.py"
    script.write_text(f'''
import psycopg
from pglistener import Gap, Supervisor, notify

assert psycopg.pq.__impl__ == "binary", psycopg.pq.__impl__

def main():
    with Supervisor({dsn!r}).start() as sup:
        worker = sup.worker()
        with worker.subscribe("orders") as sub:
            with psycopg.connect({dsn!r}, autocommit=True) as conn:
                notify(conn, "orders", "42")
            for item in sub:
                assert not isinstance(item, Gap)
                print(item.channel, item.payload, psycopg.pq.version())
                break

if __name__ == "__main__":
    main()
''')
    out = subprocess.run([sys.executable, str(script)], env={**os.environ,
                         "PSYCOPG_IMPL": "binary"}, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    channel, payload, version = out.stdout.split()
    assert (channel, payload) == ("orders", "42")
    # The refused case before: psycopg's libpq is not the one our extension runs.
    assert int(version) != libpq_version()
