"""The layout shows the processes: nothing on the worker side imports the supervisor's
modules, or the other way; both may import the compiled core, the protocol and the shared
checks. Read from the source (the imports and cimports), not by importing it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "pglistener"

#: Each side: its modules, and the modules of the other side it must not import.
WORKER = (["_worker", "worker.py", "aio.py"],
          ("pglistener._supervisor", "pglistener.supervisor"))
SUPERVISOR = (["_supervisor"],
              ("pglistener._worker", "pglistener.worker", "pglistener.aio", "pglistener.pool",
               "pglistener.supervisor"))

CIMPORT = re.compile(r"^\s*(?:from\s+([\w.]+)\s+c?import\s+([\w, ()*]+)|c?import\s+([\w.]+))",
                     re.MULTILINE)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    """Every module `path` imports (and, for `from X import a`, X.a too: a may be one)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    text = path.read_text()
    found: set[str] = set()
    if path.suffix in (".pyx", ".pxd"):
        for m in CIMPORT.finditer(text):
            base = m.group(1) or m.group(3)
            found.add(base)
            names = (m.group(2) or "").replace("(", " ").replace(")", " ")
            found |= {f"{base}.{n.strip()}" for n in names.split(",") if n.strip().isidentifier()}
        return found
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1]
                                + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return found


def files(side: list[str]) -> list[Path]:
    out: list[Path] = []
    for entry in side:
        path = PACKAGE / entry
        out += sorted(p for p in path.rglob("*") if p.suffix in (".py", ".pyx", ".pxd")) \
            if path.is_dir() else [path]
    return out


def crossings(side: tuple[list[str], tuple[str, ...]]) -> tuple[list[str], set[str]]:
    modules, forbidden = side
    bad, seen = [], set()
    for path in files(modules):
        names = imported(path)
        seen |= names
        bad += [f"{path.relative_to(ROOT)} imports {n}" for n in sorted(names)
                if n.startswith(forbidden)]
    return bad, seen


def test_the_worker_side_imports_nothing_of_the_supervisors() -> None:
    bad, seen = crossings(WORKER)
    assert not bad, bad
    assert "pglistener._core.reader" in seen        # it was read: the core, by the worker
    assert "pglistener._protocol" in seen


def test_the_supervisor_side_imports_nothing_of_the_workers() -> None:
    bad, seen = crossings(SUPERVISOR)
    assert not bad, bad
    assert "pglistener._core.dispatch" in seen      # the .pyx decoders' cimport too
    assert any(n.startswith("pglistener._core.dispatch.") for n in seen
               if n.split(".")[-1] == "Dispatcher")


def test_the_reading_finds_a_crossing() -> None:
    """The check bites: a module on the worker side that imported the server would be said."""
    assert crossings((["_supervisor/wal"], ("pglistener._supervisor.listen",)))[0]
    assert "pglistener._supervisor.server.Config" in imported(
        PACKAGE / "_supervisor" / "source.py")


def test_no_test_module_imports_another() -> None:
    """What tests share is in tests/fix_*.py (and conftest); a test module imports none of
    the others."""
    tests = Path(__file__).resolve().parent
    bad = [f"{path.name} imports {n}" for path in sorted(tests.glob("test_*.py"))
           for n in sorted(imported(path)) if n.split(".")[0].startswith("test_")]
    assert not bad, bad


def named_sources(path: Path) -> list[str]:
    """Where `path` names a source: its modules imported, its name as a string, an attribute
    or variable called by it."""
    names = {"notify", "wal"}
    found = [n for n in imported(path)
             if any(f"._supervisor.{s}" in n or n.endswith(f".{s}") for s in names)]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and node.value in names:
            found.append(f"line {node.lineno}: {node.value!r}")
        elif isinstance(node, ast.Attribute) and node.attr in names:
            found.append(f"line {node.lineno}: .{node.attr}")
    return found


def test_the_server_names_no_source() -> None:
    """The server holds its sources by name from one table (sources.py) and drives them
    alike: adding a source is a folder, an entry there, and its stats fields."""
    assert named_sources(PACKAGE / "_supervisor" / "server.py") == []
    table = named_sources(PACKAGE / "_supervisor" / "sources.py")
    assert "pglistener._supervisor.wal.source" in table     # the check reads what it must


def test_the_sources_table_and_the_workers_check_agree() -> None:
    """A worker checks source= against _checks.SOURCES before the trip (it may not import the
    supervisor's table); the two name the same sources, the default first."""
    from pglistener._checks import SOURCES as CHECKED
    from pglistener._supervisor.sources import SOURCES

    assert tuple(SOURCES) == CHECKED
    assert all(kind.name == name for name, kind in SOURCES.items())
