"""The control protocol between workers and the supervisor.

One AF_UNIX SOCK_SEQPACKET connection per worker process: message boundaries are kept and file
descriptors ride along with the message they belong to. Each message is a small JSON object.

worker -> supervisor                          supervisor -> worker
{"op": "subscribe", "req": n, "channel": c,   {"req": n, "ok": true, "sub": id} + [memfd, eventfd]
 "ring_bytes": b, "restart": true (optional)} (once the channel's LISTEN is committed;
                                              restart: the ring starts with Gap("restart"))
{"op": "unsubscribe", "req": n, "sub": id}    {"req": n, "ok": true}
{"op": "unsubscribe", "sub": id}              (no reply: a subscription dropped without
                                              unsubscribe(), or closed by a cancelled task)
{"op": "state", "req": n}                     {"req": n, "ok": true, "connected": bool,
                                               "last_error": str or null}
{"op": "cancel", "req": n, "of": m}           {"req": m, "ok": false, "error": "Cancelled"}
                                              (m was abandoned on timeout; no reply if m
                                              was answered already)
(close the socket)                            detach: every subscription of the worker is dropped
(connect, never send: asyncio's hang-up watch) EOF when the supervisor goes
any failure:                                  {"req": n, "ok": false, "error": name, "message": m}
                                              (nothing for a message without "req": replies
                                              nobody reads would fill the worker's socket)

owner (the Supervisor object) -> supervisor, over a socketpair made at start:
{"op": "status", "req": n}                    {"req": n, "ok": true, "backend_pid": ..., ...}
{"op": "stats", "req": n}                     {"req": n, "ok": true, "state": ..., "readers": [..]}
{"op": "stop", "req": n}                      {"req": n, "ok": true}, then the process exits
"""

from __future__ import annotations

import array
import json
import socket
from typing import Any

MAX_MESSAGE = 64 * 1024
MAX_FDS = 4


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()


def send(sock: socket.socket, message: dict[str, Any], fds: tuple[int, ...] = ()) -> None:
    data = encode(message)
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.sendall(data)


def recv(sock: socket.socket) -> tuple[dict[str, Any], list[int]] | None:
    """One message and the fds that came with it; None when the peer has closed."""
    fds = array.array("i")
    data, ancdata, flags, _ = sock.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(MAX_FDS * fds.itemsize))
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - (len(payload) % fds.itemsize)])
    if not data:
        for fd in fds:
            _close_quietly(fd)
        return None
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        for fd in fds:
            _close_quietly(fd)
        raise ValueError("control message too large")
    message = json.loads(data)
    if not isinstance(message, dict):
        for fd in fds:
            _close_quietly(fd)
        raise ValueError("control message is not an object")
    return message, list(fds)


def _close_quietly(fd: int) -> None:
    import os

    try:
        os.close(fd)
    except OSError:
        pass
