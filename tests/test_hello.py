"""The hello on every control connection: a worker and a supervisor of different protocol
versions get one clear error naming both, on both sides."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from pglistener import ProtocolMismatch, Supervisor, Worker, __version__, _protocol


def exchange(path: str, *messages: dict[str, Any]) -> list[dict[str, Any]]:
    """Send each message on one new control connection; the reply to each."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(10)
    sock.connect(path)
    replies = []
    with sock:
        for message in messages:
            _protocol.send(sock, message)
            got = _protocol.recv(sock)
            assert got is not None, "the supervisor hung up"
            replies.append(got[0])
    return replies


def test_the_supervisor_answers_another_protocol_with_both_versions(
        supervisor: Supervisor) -> None:
    path = supervisor.worker().address
    hello, subscribe = exchange(
        path, {"op": "hello", "req": 1, "protocol": 999, "version": "9.9.9"},
        {"op": "subscribe", "req": 2, "channels": ["x"]})
    for reply in (hello, subscribe):
        assert reply["ok"] is False and reply["error"] == "ProtocolMismatch"
        message = reply["message"]
        assert f"protocol {_protocol.PROTOCOL} (pglistener {__version__})" in message
        assert "protocol 999 (pglistener 9.9.9)" in message
    assert (hello["req"], subscribe["req"]) == (1, 2)
    # A worker from before hellos sends its request straight away.
    (old,) = exchange(path, {"op": "subscribe", "req": 7, "channels": ["x"]})
    assert old["error"] == "ProtocolMismatch" and "before hellos" in old["message"]
    # Nothing was subscribed for either; a worker of our version is served as ever.
    assert supervisor.stats().subscriptions == 0
    with supervisor.worker().subscribe("hello-ok", timeout=30):
        assert supervisor.stats().subscriptions == 1


class FakeSupervisor:
    """A control socket that answers hellos as told: another protocol, or an old supervisor
    that knows no hello."""

    def __init__(self, tmp: str, answer: dict[str, Any]) -> None:
        self.path = os.path.join(tmp, "control")
        self.answer = answer
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.bind(self.path)
        self.sock.listen(8)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                peer, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._peer, args=(peer,), daemon=True).start()

    def _peer(self, peer: socket.socket) -> None:
        with peer:
            while True:
                try:
                    got = _protocol.recv(peer)
                except OSError:
                    return
                if got is None:
                    return
                _protocol.send(peer, {**self.answer, "req": got[0].get("req")})


@pytest.fixture(params=["newer", "older"])
def fake(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[FakeSupervisor]:
    if request.param == "newer":
        answer = {"ok": True, "protocol": 999, "version": "9.9.9"}
    else:   # pglistener 0.1.0's answer to an operation it does not know
        answer = {"ok": False, "error": "ValueError", "message": "unknown operation 'hello'"}
    fake = FakeSupervisor(str(tmp_path), answer)
    yield fake
    fake.sock.close()


def test_a_worker_names_both_versions(fake: FakeSupervisor) -> None:
    theirs = ("protocol 999 (pglistener 9.9.9)" if fake.answer["ok"]
              else "the first protocol (pglistener 0.1.0, before hellos)")
    ours = f"protocol {_protocol.PROTOCOL} (pglistener {__version__})"
    with pytest.raises(ProtocolMismatch) as sync:
        Worker.from_address(fake.path)

    async def subscribe() -> None:
        await Worker(fake.path).subscribe_async("x", timeout=10)

    with pytest.raises(ProtocolMismatch) as asynchronous:
        asyncio.run(subscribe())
    for error in (sync.value, asynchronous.value):
        assert ours in str(error) and theirs in str(error), str(error)
        assert "same pglistener version" in str(error)
