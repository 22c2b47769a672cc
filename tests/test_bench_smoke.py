"""The benchmark runs end to end and writes well-formed JSON (figures are not judged here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_bench_quick_writes_json_and_a_plot(dsn: str, tmp_path: Path) -> None:
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    proc = subprocess.run(
        [sys.executable, "-m", "pglistener.bench", "--quick", "--workers", "2", "--dsn", dsn,
         "--scenario", "drain", "--scenario", "fanout", "--scenario", "latency",
         "--scenario", "burst", "--scenario", "group",
         "--notifications", "2000", "--json", str(out), "--plot", str(png)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert set(data["results"]) == {"drain", "fanout", "latency", "burst", "group"}
    assert set(data["results"]["drain"]) == {
        "raw", "pglistener", "pglistener-for", "pglistener-callback", "pglistener-async",
        "pglistener-dispatch", "psycopg", "asyncpg"}
    for system, rounds in data["results"]["drain"].items():
        (r,) = rounds
        assert r["received"] + r["missed"] == 2000, system
        assert r["per_reader_per_s"] > 0
        # 2000 notifications drain in milliseconds: too short to time, and said so.
        assert r["valid"] is False, system
        assert r["cpu_reader_ns"] > 0, system       # every process on the path is timed
        if system.startswith("pglistener") or system == "raw":
            assert r["cpu_backend_ns"] > 0, system
        if system.startswith("pglistener"):
            assert r["cpu_supervisor_ns"] > 0, system
    drain_targets = [t for t in data["targets"] if t["target"].startswith("drain")]
    assert drain_targets and all(t["met"] is None and "too short" in t["why"]
                                 for t in drain_targets)
    assert any("CPU/notification" in t["target"] for t in drain_targets)
    (fan,) = data["results"]["fanout"]["pglistener"]
    assert fan["readers"] == 2 and fan["received"] == 4000
    (lat,) = data["results"]["latency"]["raw"]
    assert lat["samples"] == 2000 and 0 < lat["p50_us"] <= lat["p99_us"]
    assert {t["target"].split(":")[0] for t in data["targets"]} >= {"drain", "fanout", "latency"}
    burst = {system: rounds[0] for system, rounds in data["results"]["burst"].items()}
    assert burst["pglistener-block"]["missed"] == 0 == burst["psycopg"]["missed"]
    assert burst["pglistener-block"]["received"] == 2000 == burst["psycopg"]["received"]
    gap = burst["pglistener-gap"]
    assert gap["received"] + gap["missed"] == 2000
    for system, rounds in data["results"]["group"].items():    # 2 readers share 2000 jobs
        assert (rounds[0]["received"], rounds[0]["exact"]) == (2000, 1.0), system
    assert png.stat().st_size > 10_000
    assert "== drain" in proc.stdout and "== targets" in proc.stdout
    assert "invalid drain" in proc.stdout and "MISSED drain" not in proc.stdout
