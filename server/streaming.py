"""Server-Sent Events framing for streamed responses (OpenAI's wire format).

Each chunk is one `data: {json}` event; the stream ends with `data: [DONE]`. Chunks are
JSON-encoded here (UTF-8, never NaN), framed with "\\n" separators, which the openai SDK,
curl and browsers' EventSource all read. sse-starlette sends keep-alive comments
(`: ping`) on long waits and cancels the chunk generator when the client disconnects,
so the generator's `finally` can abort the request's sequences at once.
"""

from __future__ import annotations

from typing import AsyncIterator

from sse_starlette import EventSourceResponse
from sse_starlette.sse import AppStatus

from .errors import dumps

# sse-starlette cancels every stream as soon as uvicorn starts shutting down, which cut streams off
# mid-body (no [DONE]) while non-streaming requests were allowed to finish. Shutdown is Kiln's own
# (server/__main__.py): streams run on during --shutdown-timeout like any request, and the ones
# still running near its end get an error event and [DONE] from the scheduler's stop.
AppStatus.disable_automatic_graceful_drain()

DONE = "[DONE]"
PING_SECONDS = 15


def sse_event(data: dict | str) -> bytes:
    """One `data:` event, framed. JSON text has no line breaks (json escapes them inside strings), so one
    `data:` line holds it; ServerSentEvent's per-line splitting is not needed on this path."""
    return b"data: " + (data if isinstance(data, str) else dumps(data)).encode("utf-8") + b"\n\n"


async def _framed(chunks: AsyncIterator[dict]) -> AsyncIterator[bytes]:
    try:
        async for chunk in chunks:
            yield sse_event(chunk)
        yield sse_event(DONE)
    finally:
        await chunks.aclose()  # run the producer's cleanup (abort) even when we are cancelled


class _EventStream(EventSourceResponse):
    """sse-starlette's response (pings, disconnect detection) without a cancel scope around every send
    when no send timeout is set: entering and leaving one costs about as much as the send itself, and a
    stream sends one event per token."""

    async def _send_with_timeout(self, send, message) -> None:
        if self.send_timeout is None:
            await send(message)
        else:
            await super()._send_with_timeout(send, message)


def sse_response(chunks: AsyncIterator[dict]) -> EventSourceResponse:
    return _EventStream(_framed(chunks), sep="\n", ping=PING_SECONDS,
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
