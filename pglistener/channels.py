"""Channel names: checked before any SQL, so PostgreSQL never truncates or folds one."""

from __future__ import annotations

from .errors import InvalidChannelName, InvalidChannelType

#: NAMEDATALEN - 1: LISTEN truncates longer names with only a NOTICE, so a subscription with a
#: longer name would silently never receive anything.
MAX_CHANNEL_BYTES = 63


def channel_bytes(channel: object) -> bytes:
    """The UTF-8 bytes of a valid channel name, or InvalidChannelName saying the rule.

    Any non-empty string of at most 63 UTF-8 bytes without NUL is valid: names are always
    sent quoted as identifiers, so case, spaces, quotes, '*' and keywords round-trip exactly.
    """
    if not isinstance(channel, str):
        raise InvalidChannelType(
            f"a channel name is a str, not {type(channel).__name__}: pass e.g. 'orders'"
        )
    if not channel:
        raise InvalidChannelName("a channel name cannot be empty")
    if "\x00" in channel:
        raise InvalidChannelName(f"a channel name cannot contain NUL: {channel!r}")
    try:
        raw = channel.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidChannelName(f"a channel name must be valid UTF-8: {channel!r}") from exc
    if len(raw) > MAX_CHANNEL_BYTES:
        raise InvalidChannelName(
            f"a channel name is at most {MAX_CHANNEL_BYTES} bytes in UTF-8 (PostgreSQL would "
            f"truncate it and the subscription would never receive anything); "
            f"{channel[:20]!r}... is {len(raw)} bytes"
        )
    return raw
