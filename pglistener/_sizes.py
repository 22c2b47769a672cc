"""Ring sizes: the default, and the one check that Supervisor, Worker and the supervisor
process all apply."""

from __future__ import annotations

from ._core.reader import MAX_CAPACITY, MIN_CAPACITY

DEFAULT_RING_BYTES = 4 * 1024 * 1024

#: What one subscription may ask for unless Supervisor(max_ring_bytes=...) says otherwise.
DEFAULT_MAX_RING_BYTES = 64 * 1024 * 1024


def check_ring_bytes(ring_bytes: object, most: int = MAX_CAPACITY,
                     limit_name: str = "") -> int:
    """ring_bytes itself when it is a power of two from MIN_CAPACITY to `most`."""
    power_of_two = (isinstance(ring_bytes, int) and not isinstance(ring_bytes, bool)
                    and ring_bytes > 0 and ring_bytes & (ring_bytes - 1) == 0)
    if not power_of_two or not MIN_CAPACITY <= ring_bytes <= most:   # type: ignore[operator]
        limit = f" ({limit_name})" if limit_name else ""
        raise ValueError(
            f"ring_bytes must be a power of two from {MIN_CAPACITY} to {most}{limit}, not "
            f"{ring_bytes!r} (e.g. {DEFAULT_RING_BYTES})")
    return ring_bytes  # type: ignore[return-value]
