"""A WAL dispatcher and the readers of its rings, in this process, without a server: what
the compiled core's tests feed bytes to and read items from."""

from __future__ import annotations

import os
import socket

from pglistener._core.dispatch import HEADER_BYTES
from pglistener._core.reader import MIN_CAPACITY, RingReader
from pglistener._supervisor.wal.decoder import WalDispatcher


class Rings:
    """A WAL dispatcher with rings 1..n, and their readers."""

    def __init__(self, n: int, capacity: int = MIN_CAPACITY, block: bool = False) -> None:
        self.d = WalDispatcher()
        self.readers: dict[int, RingReader] = {}
        self.ctl, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.efds: list[int] = []
        for ring_id in range(1, n + 1):
            self.add(ring_id, capacity, block)

    def add(self, ring_id: int, capacity: int = MIN_CAPACITY, block: bool = False) -> None:
        memfd = os.memfd_create("test-wal-ring")
        os.ftruncate(memfd, HEADER_BYTES + capacity)
        efd = os.eventfd(0, os.EFD_NONBLOCK)
        self.efds.append(efd)
        self.d.add_ring(ring_id, memfd, os.dup(efd), capacity, block)
        self.readers[ring_id] = RingReader(memfd, efd, self.ctl.fileno(),
                                           os.dup(self.d.wake_fd))
        os.close(memfd)

    def take(self, ring_id: int) -> list[object]:
        """Everything in the ring, consumed (as a stream does when asked for more)."""
        reader = self.readers[ring_id]
        items = reader.get_many(1 << 20)
        reader.mark_consumed()
        return items

    def close(self) -> None:
        for ring_id, reader in self.readers.items():
            reader.close()
            self.d.remove_ring(ring_id)
        for efd in self.efds:
            os.close(efd)
        self.ctl.close()
        self.peer.close()
