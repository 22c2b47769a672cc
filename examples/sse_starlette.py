"""Server-Sent Events from PostgreSQL notifications: Starlette (FastAPI is the same).

Every uvicorn worker shares one supervisor, and so one database connection:

    python -m pglistener supervise --dsn "dbname=app" -- \\
        uvicorn examples.sse_starlette:app --workers 4

    curl -N localhost:8000/events/orders        # then: NOTIFY orders, 'hello'

The lifespan finds the supervisor through PGLISTENER_ADDRESS (set by `supervise`). Each
client gets its own subscription; when it goes away, Starlette cancels the response's task
and `async with` releases the subscription (without awaiting anything, so the cancellation
cannot skip it). A Gap becomes an event of its own, so that the page can reload its state.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, StreamingResponse
from starlette.routing import Route

from pglistener import Gap, InvalidChannelName, Worker


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    app.state.worker = Worker.from_env()
    yield


async def events(request: Request) -> StreamingResponse | PlainTextResponse:
    worker: Worker = request.app.state.worker
    try:
        sub = await worker.subscribe_async(request.path_params["channel"], timeout=10)
    except InvalidChannelName as exc:
        return PlainTextResponse(str(exc), status_code=400)

    async def stream() -> AsyncIterator[str]:
        async with sub:
            yield ": subscribed\n\n"        # the LISTEN is committed: tell the client
            async for item in sub:
                if isinstance(item, Gap):
                    yield f"event: gap\ndata: {json.dumps(item.reason)}\n\n"
                else:
                    yield f"data: {json.dumps(item.payload)}\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream")


app = Starlette(routes=[Route("/events/{channel}", events)], lifespan=lifespan)
