"""The supervisor's control side at its documented limits and against hostile peers: no size
cliff, no crash, nothing left behind (real server, real sockets, real signals)."""

from __future__ import annotations

import errno
import json
import logging
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from fix_pg import notify
from fix_supervisor import process_gone, wait_for
from pglistener import PGListenerError, Supervisor, TooManySubscriptions, Worker, _protocol
from pglistener._worker.control import Control

#: 63 bytes, the longest a channel may be, and escaped at worst in JSON (\u0001 each).
LONG = "\x01" * 59


def long_channel(i: int) -> str:
    return f"{LONG}{i:04d}"


def connect_raw(address: str, hello: bool = False) -> socket.socket:
    """A control connection by hand; with hello, past the hello as a worker of ours."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(10)
    sock.connect(address)
    if hello:
        sock.send(json.dumps({**_protocol.hello(), "req": 0}).encode())
        assert json.loads(sock.recv(65536))["ok"]
    return sock


def serves(sup: Supervisor, conn: psycopg.Connection, channel: str) -> bool:
    """The supervisor still subscribes, delivers and answers stats()."""
    with sup.worker().subscribe(channel, timeout=30) as sub:
        notify(conn, channel, ["alive"])
        assert sub.get(timeout=30).payload == "alive"
    return sup.stats().state == "listening"


# -- no size cliff inside the documented limits ----------------------------------------------


def test_stats_with_every_limit_at_its_maximum(dsn: str, conn: psycopg.Connection) -> None:
    """1024 subscriptions (max_subscriptions_per_worker's default) of 4 channels of 63 bytes
    each (4096, max_channels_per_worker's default) in one worker: stats() is a reply of
    about 1 MB, past any socket buffer."""
    with Supervisor(dsn, ring_bytes=16 * 1024).start() as sup:
        worker = sup.worker()
        subs = [worker.subscribe([long_channel(4 * i + k) for k in range(4)], timeout=60)
                for i in range(1024)]
        with pytest.raises(TooManySubscriptions, match="at most 1024 subscriptions"):
            worker.subscribe("one-more", timeout=30)
        stats = sup.stats()
        assert len(stats.readers) == stats.subscriptions == 1024
        assert len(stats.channels) == 4096
        assert len(json.dumps([r.channels for r in stats.readers])) > 1_000_000
        assert sup.backend_pid == stats.backend_pid is not None
        notify(conn, long_channel(4095), ["last"])
        assert subs[-1].get(timeout=30).payload == "last"
        for sub in subs:
            sub.unsubscribe()
        assert sup.stats().channels == ()


def test_one_subscribe_of_every_channel_a_worker_may_hold(dsn: str,
                                                          conn: psycopg.Connection) -> None:
    """4096 channels of 63 bytes in one subscribe: a request of 1.5 MB. One more channel is
    refused with an error reply, and the connection serves on."""
    channels = [long_channel(i) for i in range(4096)]
    with Supervisor(dsn).start() as sup:
        worker = sup.worker()
        ctl = Control.get(worker.address)
        with worker.subscribe(channels, timeout=60) as sub:
            notify(conn, channels[4095], ["far"])
            assert sub.get(timeout=30).payload == "far"
            with pytest.raises(TooManySubscriptions, match="at most 4096 channels"):
                worker.subscribe("one-more", timeout=30)
        with pytest.raises(TooManySubscriptions, match="at most 4096 channels"):
            worker.subscribe([*channels, "one-more"], timeout=30)
        assert serves(sup, conn, "after-the-refusal")
        assert Control.get(worker.address) is ctl       # never dropped


def test_a_request_past_every_limit_gets_an_error_reply(dsn: str,
                                                        conn: psycopg.Connection) -> None:
    """A subscribe bigger than the supervisor reads at all (its limits allow 4 channels):
    answered with TooManySubscriptions by its request id, the connection kept."""
    with Supervisor(dsn, max_channels_per_worker=4).start() as sup:
        worker = sup.worker()
        ctl = Control.get(worker.address)
        with pytest.raises(TooManySubscriptions, match="max_channels_per_worker"):
            worker.subscribe([long_channel(i) for i in range(3000)], timeout=30)
        assert Control.get(worker.address) is ctl
        assert serves(sup, conn, "still-served")


def test_a_dropped_control_connection_is_reopened_by_the_next_request(
        dsn: str, conn: psycopg.Connection) -> None:
    with Supervisor(dsn).start() as sup:
        worker = sup.worker()
        with worker.subscribe("before-drop", timeout=30) as sub:
            ctl = Control.get(worker.address)
            ctl.sock.shutdown(socket.SHUT_RDWR)     # as when the supervisor cuts it off
            with pytest.raises(Exception):          # noqa: B017 - the stream ends with it
                sub.get(timeout=10)
        assert serves(sup, conn, "after-drop")
        assert Control.get(worker.address) is not ctl


# -- hostile peers: each is dropped, the supervisor serves on ---------------------------------


def _hostile_messages() -> Iterator[tuple[str, bytes, list[int]]]:
    yield "nested JSON", b"[" * 40_000 + b"]" * 40_000, []
    yield "not JSON", b"\xff\xfe garbage", []
    yield "not an object", b"[1, 2, 3]", []
    read_end, write_end = os.pipe()
    os.close(write_end)
    yield "a body that is a pipe", json.dumps({"$body": 10, "req": 1}).encode(), [read_end]
    os.close(read_end)
    yield "a body without its descriptor", json.dumps({"$body": 10, "req": 1}).encode(), []


def test_hostile_messages_drop_that_peer_only(dsn: str, conn: psycopg.Connection,
                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="pglistener")
    with Supervisor(dsn).start() as sup:
        worker = sup.worker()
        held = worker.subscribe("held", timeout=30)
        for what, data, fds in _hostile_messages():
            peer = connect_raw(worker.address)
            if fds:
                socket.send_fds(peer, [data], fds)
            else:
                peer.send(data)
            assert peer.recv(100) == b"", f"{what}: the peer was not dropped"
            peer.close()
            assert sup.stats().state == "listening", what
        assert serves(sup, conn, "after-hostile")
        notify(conn, "held", ["kept"])
        assert held.get(timeout=30).payload == "kept"       # others' streams are untouched
        wait_for(lambda: sum("dropping worker" in r.getMessage()
                             for r in caplog.records) >= 5, "one log line per dropped peer")
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_bad_requests_are_answered_not_dropped(dsn: str) -> None:
    with Supervisor(dsn).start() as sup:
        peer = connect_raw(sup.worker().address, hello=True)
        for message, error in (({"op": "nope"}, "ValueError"),
                                ({"op": "subscribe", "channels": "x"}, "ValueError"),
                                ({"op": "subscribe", "channels": [7]}, "InvalidChannelType"),
                                ({"op": "subscribe", "channels": ["a"], "ring_bytes": 3},
                                 "ValueError"),
                                ({"op": "unsubscribe", "sub": 99}, "KeyError")):
            peer.send(json.dumps({**message, "req": 5}).encode())
            reply = json.loads(peer.recv(65536))
            assert (reply["req"], reply["ok"], reply["error"]) == (5, False, error), message
        peer.close()


def connect_patiently(address: str) -> socket.socket:
    """A connection that waits while the listen backlog is full (a non-blocking connect says
    EAGAIN then), so that every peer reaches the supervisor's accept, however slow it runs."""
    deadline = time.monotonic() + 60
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.settimeout(10)
        try:
            sock.connect(address)
            sock.setblocking(False)
            return sock
        except BlockingIOError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.002)


def ended(sock: socket.socket) -> bool:
    """The other side closed this connection (sock is non-blocking)."""
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False


def test_running_out_of_descriptors_refuses_new_peers_only(
        dsn: str, conn: psycopg.Connection, caplog: pytest.LogCaptureFixture) -> None:
    """1100 idle connections against a supervisor allowed 256 descriptors: those past the
    limit are refused (with one log line), and the supervisor serves on."""
    caplog.set_level(logging.WARNING, logger="pglistener")
    with Supervisor(dsn).start() as sup:
        worker = sup.worker()
        held = worker.subscribe("held-through", timeout=30)
        before = sup.stats().connections
        hard = resource.prlimit(sup.pid, resource.RLIMIT_NOFILE)[1]
        resource.prlimit(sup.pid, resource.RLIMIT_NOFILE, (256, hard))
        peers: list[socket.socket] = []
        try:
            for _ in range(1100):
                peers.append(connect_patiently(worker.address))
            # The supervisor closed what it could not keep: those peers see the end.
            wait_for(lambda: sum(map(ended, peers)) > 0, "the supervisor to refuse peers")
            assert sup.stats().connections < 256
            assert sup.stats().state == "listening"
        finally:
            for sock in peers:
                sock.close()
        wait_for(lambda: sup.stats().connections <= before, "the idle peers to be detached")
        assert serves(sup, conn, "after-emfile")
        notify(conn, "held-through", ["kept"])
        assert held.get(timeout=30).payload == "kept"
        lines = [r for r in caplog.records if "refused a control connection" in r.getMessage()]
        assert 1 <= len(lines) <= 3          # one per burst, not one per peer
        assert "Too many open files" in lines[0].getMessage()


# -- nothing left behind ---------------------------------------------------------------------

_OWNER = textwrap.dedent("""
    import sys, time
    from pglistener import Supervisor
    if __name__ == "__main__":
        sup = Supervisor(sys.argv[1]).start()
        sub = sup.worker().subscribe("term", timeout=30)
        print(sup.worker().address, sup.pid, flush=True)
        time.sleep(600)
""")


@pytest.mark.every_python
def test_sigterm_to_the_process_group_removes_the_control_directory(
        dsn: str, tmp_path: os.PathLike[str]) -> None:
    """What systemd, `docker stop` and `timeout` do: SIGTERM to every process at once. The
    owner dies without running stop(); the supervisor cleans up after itself."""
    script = os.path.join(tmp_path, "owner.py")
    with open(script, "w") as f:
        f.write(_OWNER)
    owner = subprocess.Popen([sys.executable, script, dsn], stdout=subprocess.PIPE,
                             text=True, start_new_session=True)
    try:
        address, pid = owner.stdout.readline().split()      # type: ignore[union-attr]
        directory = os.path.dirname(address)
        assert os.path.isdir(directory)
        os.killpg(owner.pid, signal.SIGTERM)
        assert owner.wait(30) == -signal.SIGTERM
        wait_for(lambda: process_gone(int(pid)), "the supervisor process to exit")
        wait_for(lambda: not os.path.exists(directory), "the control directory to go")
    finally:
        if owner.poll() is None:
            os.killpg(owner.pid, signal.SIGKILL)
            owner.wait()


def test_a_start_that_fails_leaves_nothing_behind(
        dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A temporary directory of this test's own: other test runs on the machine make theirs.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    sup = Supervisor(dsn, start_timeout=0.001)
    with pytest.raises(RuntimeError, match="did not start"):
        sup.start()
    assert sup.pid is None
    assert os.listdir(tmp_path) == []
    # ... and the same Supervisor starts afterwards.
    sup._start_timeout = 30
    with sup.start():
        assert isinstance(sup.worker(), Worker)
        assert len(os.listdir(tmp_path)) == 1
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("fails", ["socket", "socketpair"])
def test_a_start_out_of_descriptors_for_its_sockets_leaves_nothing_behind(
        dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fails: str) -> None:
    """The sockets are made after the directory: a failure there removes it too."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    def out_of_descriptors(*args: object, **kwargs: object) -> object:
        # socket: the control socket cannot be made; socketpair: it was, the pair cannot.
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    before = set(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(socket, fails, out_of_descriptors)
    sup = Supervisor(dsn)
    with pytest.raises(OSError, match="Too many open files"):
        sup.start()
    monkeypatch.undo()
    assert sup.pid is None and os.listdir(tmp_path) == []
    assert set(os.listdir("/proc/self/fd")) <= before, "a descriptor leaked"


#: Run in a process of its own: its descriptors really run out (RLIMIT_NOFILE lowered, the
#: rest filled with open files), `free` of them left for start().
_OUT_OF_DESCRIPTORS = textwrap.dedent("""
    import errno, os, resource, sys, tempfile
    from pglistener import Supervisor

    dsn, free = sys.argv[1], int(sys.argv[2])
    tempfile.gettempdir()           # looked up before: it opens a file the first time
    sup = Supervisor(dsn)
    before = set(os.listdir("/proc/self/fd"))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
    filler = []
    try:
        while True:
            filler.append(os.open("/dev/null", os.O_RDONLY))
    except OSError as exc:
        assert exc.errno == errno.EMFILE, exc
    for fd in filler[len(filler) - free:]:
        os.close(fd)
    try:
        sup.start()
    except OSError as exc:
        outcome = "EMFILE" if exc.errno == errno.EMFILE else repr(exc)
    except RuntimeError as exc:
        outcome = "RuntimeError"
    else:
        outcome = "started"
    for fd in filler[:len(filler) - free]:
        os.close(fd)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    if outcome == "started":
        sup.stop()
    leaked = set(os.listdir("/proc/self/fd")) - before
    print(outcome, sorted(leaked), os.listdir(tempfile.gettempdir()))
""")


@pytest.mark.parametrize("free", [0, 1, 2, 3])
def test_a_start_that_really_runs_out_of_descriptors_leaves_nothing_behind(
        dsn: str, tmp_path: Path, free: int) -> None:
    """The process's descriptors used up, with 0 to 3 of them left: start() fails with
    EMFILE wherever it runs out (the control socket, the owner's pair, the log queue's
    pipe), and leaves no descriptor and no directory behind."""
    proc = subprocess.run([sys.executable, "-c", _OUT_OF_DESCRIPTORS, dsn, str(free)],
                          env={**os.environ, "TMPDIR": str(tmp_path)}, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[0] == "EMFILE [] []", proc.stdout + proc.stderr
    assert os.listdir(tmp_path) == []


def test_the_supervisor_raises_its_open_files_limit(dsn: str) -> None:
    """One descriptor per subscription: a soft limit of 256 in the starting process does not
    cap the supervisor below its documented limits."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    try:
        sup = Supervisor(dsn).start()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    with sup:
        assert resource.prlimit(sup.pid, resource.RLIMIT_NOFILE)[0] == hard
        subs = [sup.worker().subscribe("many", ring_bytes=16 * 1024, timeout=30)
                for _ in range(400)]
        assert len(sup.stats().readers) == 400
        for sub in subs:
            sub.unsubscribe()


def _limit_leaving(fd_dir: str, free: int) -> int:
    """The open-files limit under which exactly `free` more descriptors fit (new ones take
    the lowest free numbers, and must be below the limit)."""
    used = {int(fd) for fd in os.listdir(fd_dir)}
    limit = 0
    while limit - len({fd for fd in used if fd < limit}) < free or limit in used:
        limit += 1
    return limit


def test_a_subscribe_that_runs_out_of_descriptors_leaks_none(dsn: str) -> None:
    """Making a ring takes four descriptors (memfd, eventfd, its duplicate, the reader's
    wake eventfd); whichever fails, the ones made are closed, and the worker gets an error
    reply. With enough room, the same subscribe works."""
    with Supervisor(dsn).start() as sup:
        worker = sup.worker()
        worker.subscribe("warm-up", timeout=30).unsubscribe()
        assert sup.pid is not None
        fd_dir = f"/proc/{sup.pid}/fd"
        at_rest = sorted(os.listdir(fd_dir))
        hard = resource.prlimit(sup.pid, resource.RLIMIT_NOFILE)[1]
        for free in range(5):
            resource.prlimit(sup.pid, resource.RLIMIT_NOFILE, (_limit_leaving(fd_dir, free),
                                                                hard))
            try:
                if free < 4:
                    with pytest.raises(PGListenerError, match="Too many open files"):
                        worker.subscribe("no-room", timeout=30)
                else:
                    worker.subscribe("no-room", timeout=30).unsubscribe()
            finally:
                resource.prlimit(sup.pid, resource.RLIMIT_NOFILE, (hard, hard))
            assert sorted(os.listdir(fd_dir)) == at_rest, f"leaked with {free} free"
        assert sup.stats().subscriptions == 0
