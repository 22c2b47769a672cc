"""A live table in the browser that loses nothing: row changes from the slot, sent as
Server-Sent Events. Starlette (FastAPI is the same), one uvicorn process:

    PGLISTENER_DSN="dbname=app" uvicorn examples.sse_changes:app
    # then open http://localhost:8000/ and change rows of the table `sse_items`

The page lists the table's rows and a log of every change. Each event's `id` is the change's
position, so a browser's EventSource that reconnects (a dropped connection, the app server
restarted) sends it back as Last-Event-ID. Each page is a consumer group of its own
(`group="sse-<page>"`, with one member at a time): while it is away, the supervisor keeps the
group's place in the slot for `group_hold` (60 s), and a supervisor started again begins
where the slot stood for the groups that come back, so what changed meanwhile arrives when it
reconnects. What was sent before a reconnect may come again: the page drops what is not past
the position it has. Where the stream cannot go on (a Gap), the page is sent the table again.

The first stream of a page: subscribe first, then read the table in a REPEATABLE READ
snapshot, and skip the changes that snapshot already sees (pglistener.Snapshot).

With several app processes, run one supervisor for all of them: `python -m pglistener
supervise --dsn ... --slot sse_changes -- uvicorn ... --workers 4` (see the README).
"""

from __future__ import annotations

import html
import json
import os
import re
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import psycopg
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

from pglistener import Change, Gap, Snapshot, Supervisor, Worker

TABLE = os.environ.get("SSE_TABLE", "sse_items")
DSN = os.environ.get("PGLISTENER_DSN", "")


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    async with AsyncExitStack() as stack:
        if os.environ.get(Worker.ENV):         # under `python -m pglistener supervise`
            app.state.worker = Worker.from_env()
        else:
            sup = stack.enter_context(Supervisor(DSN, slot=os.environ.get(
                "SSE_SLOT", "sse_changes")).start())
            app.state.worker = sup.worker()
        yield


async def snapshot() -> tuple[Snapshot, list[dict[str, Any]]]:
    """The table's rows, and the snapshot they were read in."""
    async with await psycopg.AsyncConnection.connect(DSN) as conn:
        await conn.set_isolation_level(psycopg.IsolationLevel.REPEATABLE_READ)
        async with conn.transaction():
            snap = await Snapshot.of_async(conn)
            cur = await conn.execute(f"SELECT * FROM {TABLE} ORDER BY 1")  # noqa: S608
            names = [c.name for c in cur.description or ()]
            rows = [dict(zip(names, row, strict=True)) for row in await cur.fetchall()]
    return snap, rows


def event(kind: str, data: Any, id: str | None = None) -> str:
    head = f"id: {id}\n" if id is not None else ""
    return f"{head}event: {kind}\ndata: {json.dumps(data, default=str)}\n\n"


def position(last: str | None) -> tuple[int, int] | None:
    """A Last-Event-ID back as a position ("commit:lsn"), None if it is not one."""
    found = re.fullmatch(r"(\d+):(\d+)", last or "")
    return (int(found[1]), int(found[2])) if found else None


async def events(request: Request) -> StreamingResponse | PlainTextResponse:
    page = request.query_params.get("page", "")
    if not re.fullmatch(r"[0-9a-f-]{8,64}", page):
        return PlainTextResponse("?page= names the page (its id)", status_code=400)
    worker: Worker = request.app.state.worker
    after = position(request.headers.get("last-event-id"))
    sub = await worker.subscribe_changes_async(TABLE, group=f"sse-{page}", after=after,
                                               timeout=30)

    async def stream() -> AsyncIterator[str]:
        async with sub:
            yield "retry: 500\n\n"
            seen: Snapshot | None = None
            if after is None:           # a new page: the table, then what it does not see
                seen, rows = await snapshot()
                yield event("snapshot", rows)
            async for item in sub:
                if isinstance(item, Gap):       # cannot go on: the table again
                    seen, rows = await snapshot()
                    yield event("snapshot", rows)
                    continue
                assert isinstance(item, Change)
                if seen is not None and seen.sees(item):
                    continue
                yield event("change", {"op": item.op, "new": item.new, "old": item.old},
                            id=f"{item.commit_lsn}:{item.lsn}")

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store"})


PAGE = """<!doctype html>
<meta charset="utf-8">
<title>{table}</title>
<h1>{table}</h1>
<table id="rows"><thead></thead><tbody></tbody></table>
<h2>Changes</h2>
<ol id="log"></ol>
<script>
const page = crypto.randomUUID();
const rows = new Map();     // key (the first column) -> row
let columns = [];
let last = null;            // [commit, lsn] of the last change applied

function render() {{
  const head = document.querySelector("#rows thead");
  head.innerHTML = "<tr>" + columns.map(c => "<th>" + c + "</th>").join("") + "</tr>";
  const body = document.querySelector("#rows tbody");
  body.innerHTML = "";
  for (const row of [...rows.values()].sort((a, b) => a[columns[0]] - b[columns[0]])) {{
    const tr = document.createElement("tr");
    for (const c of columns) {{
      const td = document.createElement("td");
      td.textContent = row[c];
      tr.appendChild(td);
    }}
    body.appendChild(tr);
  }}
}}

const events = new EventSource("/events?page=" + page);
events.addEventListener("snapshot", e => {{
  rows.clear();
  for (const row of JSON.parse(e.data)) {{
    if (!columns.length) columns = Object.keys(row);
    rows.set(row[Object.keys(row)[0]], row);
  }}
  render();
}});
events.addEventListener("change", e => {{
  const [commit, lsn] = e.lastEventId.split(":").map(BigInt);
  if (last && (commit < last[0] || (commit === last[0] && lsn <= last[1]))) return;
  last = [commit, lsn];
  const change = JSON.parse(e.data);
  const row = change.new || change.old;
  if (row && !columns.length) columns = Object.keys(row);
  if (change.op === "truncate") rows.clear();
  else if (change.op === "delete") rows.delete(change.old[columns[0]]);
  else {{
    if (change.old) rows.delete(change.old[columns[0]]);
    rows.set(change.new[columns[0]], change.new);
  }}
  const li = document.createElement("li");
  li.textContent = change.op + " " + JSON.stringify(row || {{}});
  document.getElementById("log").appendChild(li);
  render();
}});
</script>
"""


async def index(_request: Request) -> HTMLResponse:
    return HTMLResponse(PAGE.format(table=html.escape(TABLE)))


app = Starlette(routes=[Route("/", index), Route("/events", events)], lifespan=lifespan)
