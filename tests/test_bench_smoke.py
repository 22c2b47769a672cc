"""The benchmark runs end to end and writes well-formed JSON (figures are not judged here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_bench_quick_writes_json(dsn: str, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pglistener.bench", "--quick", "--workers", "2",
         "--dsn", dsn, "--json", str(out)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert set(data["results"]) == {"pglistener", "psycopg"}
    for rounds in data["results"].values():
        assert len(rounds) == 1 and rounds[0]["per_reader_per_s"] > 0
    assert data["results"]["pglistener"][0]["readers"] == 2
    assert "pglistener" in proc.stdout and "deliveries/s" in proc.stdout
