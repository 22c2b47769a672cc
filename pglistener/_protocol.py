"""The control protocol between workers and the supervisor.

One AF_UNIX SOCK_SEQPACKET connection per worker process: message boundaries are kept and file
descriptors ride along with the message they belong to. Each message is a JSON object; one
past INLINE_MAX bytes travels in a memfd instead, its descriptor first among the message's,
behind an envelope {"$body": size, "req": n, "op": ...}, so that no documented limit (a stats()
of thousands of readers, a subscribe naming thousands of channels) meets a datagram size. The
supervisor reads a worker's body only up to a size derived from its limits, and answers a
larger one with an error, by the envelope's request id.

Every control connection begins with a hello, so that a worker and a supervisor of different
pglistener versions (a `supervise` sidecar outlives app deploys) say so in one clear error
instead of misreading each other:

worker -> supervisor                          supervisor -> worker
{"op": "hello", "req": n, "protocol": p,      {"req": n, "ok": true, "protocol": p,
 "version": v}                                 "version": v}; or, when p is not PROTOCOL,
                                              {"req": n, "ok": false, "error":
                                               "ProtocolMismatch", "message": ...} naming
                                              both, and the same answer to every request
                                              after it (also to a request with no hello)
{"op": "subscribe", "req": n, "channels": cs, {"req": n, "ok": true, "sub": id}
 "ring_bytes": b, "restart": true,             + [memfd, eventfd, wake eventfd]
 "overflow": "block", "group": g (optional)}  (once the channels' LISTENs are committed, or
                                              during an outage at once when all of them are
                                              wanted already, the ring starting with
                                              Gap("reconnect"); restart: the ring starts
                                              with Gap("restart"))
{"op": "unsubscribe", "req": n, "sub": id}    {"req": n, "ok": true}
{"op": "unsubscribe", "sub": id}              (no reply: a subscription dropped without
                                              unsubscribe(), or closed by a cancelled task)
{"op": "state", "req": n}                     {"req": n, "ok": true, "connected": bool,
                                               "last_error": str or null}
{"op": "cancel", "req": n, "of": m}           {"req": m, "ok": false, "error": "Cancelled"}
                                              (m was abandoned on timeout; no reply if m
                                              was answered already)
(close the socket)                            detach: every subscription of the worker is dropped
any failure:                                  {"req": n, "ok": false, "error": name, "message": m}
                                              (nothing for a message without "req": replies
                                              nobody reads would fill the worker's socket)

owner (the Supervisor object) -> supervisor, over a socketpair made at start:
{"op": "stats", "req": n}                     {"req": n, "ok": true, "state": ..., "readers": [..]}
{"op": "stop", "req": n}                      {"req": n, "ok": true}, then the process exits
"""

from __future__ import annotations

import array
import json
import os
import socket
import stat
from typing import Any

#: The control protocol's version, sent in the hello of every control connection. Bumped
#: whenever a message changes shape; the first protocol (pglistener 0.1.0) had no hello.
PROTOCOL = 2

#: A message up to this size travels inline, in one datagram; a larger one in a memfd whose
#: descriptor rides along. Well under the default socket buffer (about 208 KiB), so a
#: datagram always fits: no message size is refused for lack of buffer.
INLINE_MAX = 32 * 1024
#: The receive buffer: an inline message and its envelope.
MAX_MESSAGE = 64 * 1024
MAX_FDS = 4
#: The marker of a message whose body is in the first descriptor; the envelope keeps the
#: request id and operation, so a body that is refused can still be answered.
BODY = "$body"


def hello() -> dict[str, Any]:
    from . import __version__
    return {"op": "hello", "protocol": PROTOCOL, "version": __version__}


def mismatch(theirs: Any, their_version: Any, side: str) -> str:
    """The error text for a peer speaking protocol `theirs`; `side` is what the peer is."""
    from . import __version__
    said = (f"protocol {theirs} (pglistener {their_version})" if theirs is not None
            else "the first protocol (pglistener 0.1.0, before hellos)")
    here = "supervisor" if side == "worker" else "worker"
    return (f"this {here} speaks control protocol {PROTOCOL} (pglistener {__version__}), "
            f"the {side} speaks {said}: run the same pglistener version on both sides "
            f"(restart the supervisor, or `python -m pglistener supervise`, after upgrading)")


class MessageTooLarge(ValueError):
    """A message whose body is past what the receiver takes; `head` is its envelope."""

    def __init__(self, head: dict[str, Any], size: int, limit: int) -> None:
        super().__init__(f"a control message of {size} bytes is past the limit of {limit}")
        self.head = head


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()


def send(sock: socket.socket, message: dict[str, Any], fds: tuple[int, ...] = ()) -> None:
    data = encode(message)
    if len(data) <= INLINE_MAX:
        if fds:
            socket.send_fds(sock, [data], list(fds))
        else:
            sock.sendall(data)
        return
    body = os.memfd_create("pglistener-message", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(body, view):]
        head: dict[str, Any] = {key: message[key] for key in ("req", "op") if key in message}
        head[BODY] = len(data)
        socket.send_fds(sock, [encode(head)], [body, *fds])
    finally:
        os.close(body)


def recv(sock: socket.socket, limit: int | None = None
         ) -> tuple[dict[str, Any], list[int]] | None:
    """One message and the fds that came with it; None when the peer has closed. A body
    past `limit` bytes raises MessageTooLarge, having read nothing of it."""
    fds = array.array("i")
    data, ancdata, flags, _ = sock.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(MAX_FDS * fds.itemsize))
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - (len(payload) % fds.itemsize)])
    received = list(fds)
    try:
        if not data:
            _close_all(received)
            return None
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            raise ValueError("control message too large for one datagram")
        message = _object(data)
        if BODY in message:
            if not received:
                raise ValueError("a control message's body descriptor is missing")
            body_fd = received.pop(0)
            try:
                message = _object(_read_body(body_fd, message, limit))
            finally:
                os.close(body_fd)
    except BaseException:
        _close_all(received)
        raise
    return message, received


def _object(data: bytes) -> dict[str, Any]:
    message = json.loads(data)
    if not isinstance(message, dict):
        raise ValueError("control message is not an object")
    return message


def _read_body(fd: int, head: dict[str, Any], limit: int | None) -> bytes:
    size = head[BODY]
    info = os.fstat(fd)
    # A regular file (a memfd): reading it cannot block, whatever the peer does.
    if not stat.S_ISREG(info.st_mode) or not isinstance(size, int) or info.st_size != size:
        raise ValueError("a control message's body is not a file of the stated size")
    if limit is not None and size > limit:
        raise MessageTooLarge({k: v for k, v in head.items() if k != BODY}, size, limit)
    chunks = []
    offset = 0
    while offset < size:
        chunk = os.pread(fd, size - offset, offset)
        if not chunk:
            raise ValueError("a control message's body is shorter than stated")
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
