from collections.abc import Callable

class Listener:
    def __init__(self, conninfo: bytes, listen: bytes) -> None: ...
    @property
    def backend_pid(self) -> int: ...
    def drain(
        self, expect: int, timeout_ms: int, latency: bool = False
    ) -> tuple[int, int, int, list[int] | None]: ...

def wal_drain(
    conninfo: bytes, publication: bytes, expect: int, timeout_ms: int, ready: object,
    kind: bytes = b"M", walsender: Callable[[int], object] | None = None,
) -> tuple[int, int, int]: ...
