"""python -m pglistener.bench soak --seconds S [--dsn DSN]: both sources at once, for as long
as asked, with the listening and the replication backends killed now and then; then the
accounting, and the supervisor's memory and descriptors. Exits 1 on any miss.

Readers, each a process of its own:
  fanout-N   two readers of both sources (NOTIFY with overflow="block", and the WAL source)
  group-N    two members of a consumer group on the WAL source (overflow="block")
  churn      subscribes to both sources and unsubscribes, again and again

Faults: the listening backend and the walsender killed in turn every --kill-every seconds;
every --drop-slot-every seconds, the slot dropped under the supervisor (frozen with SIGSTOP
meanwhile, so that it cannot hold the slot), which loses what the slot held and what was sent
until the supervisor made it again.

Accounting: on NOTIFY, every number a fan-out reader did not see lies in the span of a
reconnect Gap (seen + excused == sent), and what it saw is in order, each once; on the WAL
source, each fan-out reader saw every message exactly once, in order, but where a Gap("slot")
stands, one per drop: what it skips there was sent before the slot was made again, and is
missing from every reader alike; the group's members together handled each message exactly
once, those excused apart.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import sys
import threading
import time
from contextlib import ExitStack
from typing import Any

import psycopg

from pglistener import Gap, Supervisor

from .pg import drop_slot, start_server, wait_streaming, wal_unusable
from .systems import cpu_ns

NOTIFY_CHANNEL = "soak_notify"
WAL_CHANNEL = "soak_wal"
SLOT = "pglistener_soak"
END = -1
BATCH = 100         # messages (or notifications) per transaction of a producer


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pglistener.bench soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=60.0, help="how long to run (default 60)")
    p.add_argument("--dsn", help="libpq connection string (default: an embedded PostgreSQL "
                   "with wal_level = logical)")
    p.add_argument("--kill-every", type=float, default=5.0,
                   help="seconds between backend kills (default 5)")
    p.add_argument("--drop-slot-every", type=float, default=60.0,
                   help="seconds between drops of the slot under the supervisor (default 60; "
                   "0: never)")
    return p.parse_args(argv)


# -- readers, in processes of their own --------------------------------------------------------

def fanout_reader(worker: Any, ready: Any, out: Any, name: str) -> None:
    """Both sources; reports what it saw of each."""
    note = worker.subscribe(NOTIFY_CHANNEL, overflow="block", ring_bytes=4 << 20, timeout=60)
    wal = worker.subscribe(WAL_CHANNEL, source="wal", overflow="block", ring_bytes=4 << 20,
                           timeout=60)
    ready.put(name)
    seen: dict[str, list[Any]] = {"notify": [], "wal": []}
    done = {"notify": False, "wal": False}
    while not all(done.values()):
        for source, sub in (("notify", note), ("wal", wal)):
            if done[source]:
                continue
            try:
                items = sub.get_many(4096, timeout=0.05)
            except TimeoutError:
                continue
            for item in items:
                if isinstance(item, Gap):
                    seen[source].append(item.reason)
                    continue
                value = int(item.payload)
                if value == END:
                    done[source] = True
                    break
                seen[source].append(value)
    out.put((name, seen))


def group_reader(worker: Any, ready: Any, out: Any, name: str) -> None:
    sub = worker.subscribe(WAL_CHANNEL, source="wal", group="soak", overflow="block",
                           ring_bytes=1 << 20, timeout=60)
    ready.put(name)
    seen: list[Any] = []
    while True:
        item = sub.get()
        if isinstance(item, Gap):
            seen.append(item.reason)
        elif int(item.payload) == END:
            break
        else:
            seen.append(int(item.payload))
    out.put((name, seen))


def churn_reader(worker: Any, ready: Any, out: Any, name: str, stop: Any) -> None:
    ready.put(name)
    rounds = 0
    while not stop.is_set():
        with worker.subscribe(NOTIFY_CHANNEL, timeout=60) as a, \
                worker.subscribe(WAL_CHANNEL, source="wal", timeout=60) as b:
            for sub in (a, b):
                try:
                    sub.get_many(100, timeout=0.01)
                except TimeoutError:
                    pass
        rounds += 1
    out.put((name, rounds))


# -- the run --------------------------------------------------------------------------------------

def _drop_slot_under(sup: Supervisor, dsn: str, conn: psycopg.Connection[Any],
                     sent: dict[str, int]) -> tuple[int, int]:
    """Freeze the supervisor, end its walsender, drop the slot, let the supervisor go on:
    it finds the slot gone, makes it again and says Gap("slot"). The WAL producer's count
    when the slot went and when the new one streamed: what is lost was sent before the
    second."""

    before = sup.stats()
    pid = before.wal_backend_pid
    assert sup.pid is not None
    os.kill(sup.pid, signal.SIGSTOP)
    try:
        if pid is not None:
            conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
        drop_slot(dsn, SLOT)        # once the walsender has let go of it
        if conn.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s",
                        (SLOT,)).fetchone():
            raise TimeoutError("the frozen supervisor's walsender did not let go of the slot")
        dropped = sent["wal"]
    finally:
        os.kill(sup.pid, signal.SIGCONT)
    deadline = time.monotonic() + 60
    while (now := sup.stats()).slot_losses == before.slot_losses or now.wal_state != "streaming":
        if time.monotonic() > deadline:
            raise TimeoutError(f"the supervisor did not make the slot again: "
                               f"{now.wal_last_error}")
        time.sleep(0.02)
    return dropped, sent["wal"]


def run(dsn: str, seconds: float, kill_every: float, drop_slot_every: float = 0.0) -> int:

    ctx = multiprocessing.get_context("spawn")
    with ExitStack() as stack:
        stack.callback(drop_slot, dsn, SLOT)
        sup = stack.enter_context(Supervisor(dsn, slot=SLOT, backoff_initial=0.05,
                                             backoff_max=0.5).start())
        worker = sup.worker()
        ready, out, stop_churn = ctx.Queue(), ctx.Queue(), ctx.Event()
        procs = [ctx.Process(target=fanout_reader, args=(worker, ready, out, f"fanout-{i}"))
                 for i in range(2)]
        procs += [ctx.Process(target=group_reader, args=(worker, ready, out, f"group-{i}"))
                  for i in range(2)]
        procs.append(ctx.Process(target=churn_reader,
                                 args=(worker, ready, out, "churn", stop_churn)))
        for p in procs:
            p.daemon = True
            p.start()
        for _ in procs:
            ready.get(timeout=120)
        wait_streaming(sup)
        assert sup.pid is not None
        start_fds, start_rss = _fds(sup.pid), _rss(sup.pid)
        start_cpu = cpu_ns(sup.pid)
        sent = {"notify": 0, "wal": 0}
        stop = threading.Event()
        producers = [threading.Thread(target=_produce, args=(dsn, source, sent, stop))
                     for source in ("notify", "wal")]
        for t in producers:
            t.start()
        kills = {"listen": 0, "wal": 0}
        drops: list[tuple[int, int]] = []
        began = time.monotonic()
        next_drop = began + drop_slot_every if drop_slot_every > 0 else float("inf")
        with psycopg.connect(dsn, autocommit=True) as conn:
            turn = 0
            while time.monotonic() - began < seconds:
                time.sleep(min(kill_every, max(0.0, seconds - (time.monotonic() - began))))
                if time.monotonic() - began >= seconds:
                    break
                if time.monotonic() >= next_drop:
                    drops.append(_drop_slot_under(sup, dsn, conn, sent))
                    next_drop = time.monotonic() + drop_slot_every
                    continue
                stats = sup.stats()
                which = ("listen", "wal")[turn % 2]
                pid = stats.backend_pid if which == "listen" else stats.wal_backend_pid
                if pid is not None:
                    conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
                    kills[which] += 1
                turn += 1
            stop.set()
            for t in producers:
                t.join()
            sup.wait_connected(60)
            wait_streaming(sup)
            # The end markers: once per fan-out reader's NOTIFY stream, once per WAL reader.
            conn.execute("SELECT pg_notify(%s, %s)", (NOTIFY_CHANNEL, str(END)))
            conn.execute("SELECT pg_logical_emit_message(true, %s, %s) FROM generate_series(1, 2)",
                         (WAL_CHANNEL, str(END)))
        reports = {}
        for _ in range(4):
            name, seen = out.get(timeout=300)
            reports[name] = seen
        stop_churn.set()
        name, churned = out.get(timeout=120)
        for p in procs:
            p.join(30)
        end_fds, end_rss = _fds(sup.pid), _rss(sup.pid)
        end_cpu = cpu_ns(sup.pid)
    failures, lost = _account(reports, sent, drops)
    print(f"soak: {seconds:g} s; sent NOTIFY {sent['notify']:,}, WAL {sent['wal']:,}; "
          f"killed the listening backend {kills['listen']}x, the walsender {kills['wal']}x; "
          f"dropped the slot {len(drops)}x (lost with it, each said by a Gap('slot'): "
          f"{lost:,} messages); churn {churned} subscribe rounds")
    for name, seen in sorted(reports.items()):
        print(f"  {name}: {_describe(seen)}")
    print(f"  supervisor: descriptors {start_fds} -> {end_fds}, RSS {start_rss / 1e6:.1f} -> "
          f"{end_rss / 1e6:.1f} MB, CPU {((end_cpu or 0) - (start_cpu or 0)) / 1e9:.1f} s")
    if end_fds > start_fds + 8:
        failures.append(f"the supervisor's descriptors grew: {start_fds} -> {end_fds}")
    if end_rss > start_rss + 64e6:
        failures.append(f"the supervisor's memory grew: {start_rss / 1e6:.1f} -> "
                        f"{end_rss / 1e6:.1f} MB")
    for failure in failures:
        print(f"  FAILED: {failure}")
    print("soak: " + ("FAILED" if failures else "every notification and message accounted for"))
    return 1 if failures else 0


def _produce(dsn: str, source: str, sent: dict[str, int], stop: threading.Event) -> None:
    """Numbered notifications or messages, 100 per transaction, until stopped. A batch that
    failed with the connection is sent again on a new one (the numbers stay in order)."""
    query = ("SELECT count(pg_notify(%s, i::text)) FROM generate_series(%s::int, %s::int) i"
             if source == "notify" else
             "SELECT count(pg_logical_emit_message(true, %s, i::text)) "
             "FROM generate_series(%s::int, %s::int) i")
    channel = NOTIFY_CHANNEL if source == "notify" else WAL_CHANNEL
    conn = None
    while not stop.is_set():
        try:
            if conn is None:
                conn = psycopg.connect(dsn, autocommit=True)
            n = sent[source]
            conn.execute(query, (channel, n, n + BATCH - 1))
            sent[source] = n + BATCH
            time.sleep(0.002)
        except psycopg.OperationalError:
            conn = None
            time.sleep(0.1)
    if conn is not None:
        conn.close()


def _account(reports: dict[str, Any], sent: dict[str, int],
             drops: list[tuple[int, int]]) -> tuple[list[str], int]:
    """The failures, and how many WAL messages the slot's drops lost (said, and excused)."""
    failures = [f"nothing was sent on {source}: the producer failed (its error is above)"
                for source, n in sent.items() if n == 0]
    group: list[int] = []
    lost_by: dict[str, set[int]] = {}
    for name, seen in reports.items():
        if name.startswith("group"):
            gaps = [x for x in seen if isinstance(x, str)]
            if gaps.count("slot") > len(drops) or set(gaps) - {"slot"}:
                failures.append(f"{name}: Gaps on the WAL source beside the slot's "
                                f"{len(drops)} drops: {gaps[:5]}")
            group += [x for x in seen if isinstance(x, int)]
            continue
        lost, problems = _wal_accounting(name, seen["wal"], sent["wal"], drops)
        lost_by[name] = lost
        failures += problems
        failures += _notify_accounting(name, seen["notify"], sent["notify"])
    lost = next(iter(lost_by.values()), set())
    if any(other != lost for other in lost_by.values()):
        failures.append(f"the fan-out readers lost different messages with the slot: "
                        f"{ {n: len(s) for n, s in lost_by.items()} }")
    expected = sorted(set(range(sent["wal"])) - lost)
    if sorted(group) != expected:
        failures.append(f"the WAL group handled {len(group)} messages, {len(set(group))} "
                        f"distinct, for {len(expected)} sent and not lost with the slot")
    return failures, len(lost)


def _wal_accounting(name: str, seen: list[Any], sent: int,
                    drops: list[tuple[int, int]]) -> tuple[set[int], list[str]]:
    """Every message once, in order, but where a Gap("slot") stands (one per drop at most):
    what it skips was sent before the slot of that drop was made again. What was lost."""
    lost: set[int] = set()
    last, gaps = -1, 0
    after_gap = False
    for x in seen:
        if isinstance(x, str):
            if x != "slot" or gaps == len(drops):
                return lost, [f"{name}: a Gap({x!r}) on the WAL source beyond the slot's "
                              f"{len(drops)} drops"]
            gaps += 1
            after_gap = True
            continue
        if x != last + 1:
            if not after_gap or x <= last:
                return lost, [f"{name}: the WAL stream has {x} after {last}, with no Gap "
                              f"('slot') between"]
            # (A batch may have committed before the new slot and been counted just after.)
            if x > drops[gaps - 1][1] + BATCH:
                return lost, [f"{name}: a Gap('slot') skips to {x}, past the "
                              f"{drops[gaps - 1][1]} sent before the slot was made again"]
            lost.update(range(last + 1, x))
        after_gap = False
        last = x
    if last != sent - 1:
        return lost, [f"{name}: the WAL stream ends at {last} of {sent}"]
    return lost, []


def _notify_accounting(name: str, seen: list[Any], sent: int) -> list[str]:
    """Seen in order, each once; every number not seen excused by a reconnect gap."""
    last, excused, count = -1, 0, 0
    after_gap = False
    for x in seen:
        if isinstance(x, str):
            if x != "reconnect":
                return [f"{name}: a {x!r} Gap on a blocking NOTIFY reader"]
            after_gap = True
            continue
        if x <= last:
            return [f"{name}: NOTIFY {x} after {last}: out of order or twice"]
        if x != last + 1:
            if not after_gap:
                return [f"{name}: NOTIFY {last + 1}..{x - 1} missing with no Gap"]
            excused += x - last - 1
        after_gap = False
        last, count = x, count + 1
    if last != sent - 1:
        if not after_gap:
            return [f"{name}: NOTIFY {last + 1}..{sent - 1} missing with no Gap"]
        excused += sent - 1 - last
    if count + excused != sent:
        return [f"{name}: NOTIFY seen {count} + excused {excused} != sent {sent}"]
    return []


def _describe(seen: Any) -> str:
    if isinstance(seen, dict):
        return "; ".join(f"{source}: {_describe(items)}" for source, items in seen.items())
    gaps = [x for x in seen if isinstance(x, str)]
    return f"{len(seen) - len(gaps):,} items, {len(gaps)} gap(s)"


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main(argv: list[str]) -> int:
    args = parse_args(argv)

    with ExitStack() as stack:
        dsn = args.dsn
        if dsn is None:
            print("starting an embedded PostgreSQL (pgserver)...", file=sys.stderr)
            dsn = start_server(stack)
        why = wal_unusable(dsn)
        if why is not None:
            print(f"soak: the WAL source cannot run: {why}", file=sys.stderr)
            return 2
        return run(dsn, args.seconds, args.kill_every, args.drop_slot_every)
