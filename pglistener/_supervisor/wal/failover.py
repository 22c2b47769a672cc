"""Whether a failover of the primary would keep the slot, judged as one conversation on the
primary's plain connection (a generator: conversation.py): from what the setup found of the
server and the slot, then the physical slots synchronized_standby_slots names. No I/O: the
WAL source drives it, and asks the standbys the DSN names itself (in a thread: each may
take its connect_timeout); tests drive it with canned answers.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..conversation import Command, Conversation


@dataclass(frozen=True)
class Verdict:
    """ready: True, False (reason says why), or None where it cannot be judged from here
    (a standby's own slot; a slot read elsewhere than the primary the DSN names).
    ask_standbys: the primary is set up for it; what the standbys hold decides."""

    ready: bool | None
    reason: str | None = None
    ask_standbys: bool = False


def needs(slot: str, what: str) -> str:
    """A failover slot that a failover would not keep, and what a failover needs."""
    return (f"slot {slot!r} is a failover slot, but a failover would not keep it: {what}. A "
            f"failover needs, on the primary, synchronized_standby_slots = '<the standby's "
            f"physical slot>'; on the standby, sync_replication_slots = on, "
            f"hot_standby_feedback = on, primary_slot_name, and a dbname in primary_conninfo")


def judge(slot: str, recovery: bool, server_version: int, slot_failover: bool,
          sync_slots: str, primary_here: bool, standbys: int) -> Conversation[Verdict | None]:
    """The verdict; None when the primary could not be asked (judged again later).
    `primary_here`: the plain connection is to the primary the slot lives on; `standbys`:
    how many other servers the DSN names."""
    if recovery:
        return Verdict(None)            # a standby's own slot survives its promotion
    if server_version < 170000:
        return Verdict(False, f"PostgreSQL {server_version // 10000} cannot keep a logical "
                              f"slot across a failover: a promoted standby does not have slot "
                              f"{slot!r}. The supervisor then makes it again, and every WAL "
                              f"subscription gets Gap('slot') (PostgreSQL 17 keeps failover "
                              f"slots; or read the slot on a standby with slot_dsn=)")
    if not slot_failover:
        return Verdict(False, f"slot {slot!r} is not a failover slot (Supervisor("
                              f"failover=False)): a failover loses it, and every WAL "
                              f"subscription then gets Gap('slot')")
    names = [n.strip().strip('"') for n in sync_slots.split(",") if n.strip()]
    if not names:
        return Verdict(False, needs(slot, "synchronized_standby_slots is not set on the "
                                          "primary"))
    if not primary_here:
        return Verdict(None)            # not seen from here: the primary is elsewhere
    quoted = ", ".join("'" + n.replace("'", "''") + "'" for n in names)
    answer = yield Command(f"SELECT slot_name, slot_type, active FROM pg_replication_slots "
                           f"WHERE slot_name IN ({quoted})".encode())
    if answer.error is not None:
        return None
    rows = {(r[0] or b"").decode(): r for r in answer.rows()}
    missing = [n for n in names if n not in rows or rows[n][1] != b"physical"]
    inactive = [n for n in names if n in rows and rows[n][2] != b"t"]
    if missing:
        return Verdict(False, needs(slot, f"synchronized_standby_slots names "
                                          f"{', '.join(missing)}, which is not a physical slot "
                                          f"on the primary: every logical reader there waits "
                                          f"for it (a stall); create it, or correct the "
                                          f"setting"))
    if inactive:
        return Verdict(False, needs(slot, f"the standby's slot {', '.join(inactive)} "
                                          f"(synchronized_standby_slots) is not in use: no "
                                          f"standby receives through it, and every logical "
                                          f"reader on the primary waits for it"))
    if standbys == 0:
        # The DSN names one server: its standbys cannot be asked; the primary's settings
        # are what can be judged.
        return Verdict(True)
    return Verdict(None, ask_standbys=True)
