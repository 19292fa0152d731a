"""A scripted OpenAI-compatible upstream: an upstream model cannot run here, so this one speaks its real
HTTP interface (served by real uvicorn) with answers the tests can predict.

The last message decides: "run the tools" asks for two parallel tool calls, "please fail" is a 500,
"break it" breaks the stream after a first piece, "garble it" answers something that is not a
completion, "take your time" answers after 5 s, "keep talking" streams without end (``TALKING`` counts
such streams still open), tool results are summarised; anything else is echoed.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

MODEL = "upstream-model"
TALKING = {"open": 0}  # endless streams being sent now (the upstream runs in the tests' process)
CALLS = [
    {"id": "call_a", "type": "function", "function": {"name": "pytest", "arguments": '{"path": "a"}'}},
    {"id": "call_b", "type": "function", "function": {"name": "pytest", "arguments": '{"path": "b"}'}},
]


def reply_to(messages: list[dict[str, Any]]) -> dict[str, Any]:
    last = messages[-1]
    if last["role"] == "tool":
        results = [str(m.get("content")) for m in messages if m["role"] == "tool"]
        return {"role": "assistant", "content": f"results: {' | '.join(results[-2:])}"}
    content = last.get("content") or ""
    text = content if isinstance(content, str) else "".join(str(part.get("text", "")) for part in content)
    if "run the tools" in text:
        return {"role": "assistant", "content": None, "tool_calls": CALLS}
    return {"role": "assistant", "content": f"echo: {text}"}


def create_upstream() -> FastAPI:
    app = FastAPI()

    @app.post("/v1/chat/completions", response_model=None)
    async def completions(request: Request) -> JSONResponse | StreamingResponse:
        body = await request.json()
        text = str(body["messages"][-1].get("content"))
        if "take your time" in text:
            await asyncio.sleep(5)
        if "please fail" in text:
            return JSONResponse({"error": {"message": "upstream exploded", "type": "api_error"}}, status_code=500)
        if "garble it" in text:
            if body.get("stream"):
                garbled = iter(['data: {"choices": [{"delta": {"content": "ok"}}]}\n\n', "data: {not json\n\n"])
                return StreamingResponse(garbled, media_type="text/event-stream")
            return JSONResponse({"unexpected": "shape"})
        if "keep talking" in text and body.get("stream"):
            return StreamingResponse(endless(), media_type="text/event-stream")
        message = reply_to(body["messages"])
        finish = "tool_calls" if message.get("tool_calls") else "stop"
        if not body.get("stream"):
            return JSONResponse({
                "id": "up-1", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
            })
        return StreamingResponse(chunks(message, finish, broken="break it" in text), media_type="text/event-stream")

    return app


async def endless() -> AsyncIterator[str]:
    TALKING["open"] += 1
    try:
        piece = {"id": "up-1", "object": "chat.completion.chunk", "created": 0, "model": MODEL,
                 "choices": [{"index": 0, "delta": {"content": "blah " * 200}, "finish_reason": None}]}
        line = f"data: {json.dumps(piece)}\n\n"
        while True:
            yield line
            await asyncio.sleep(0)
    finally:
        TALKING["open"] -= 1


def chunks(message: dict[str, Any], finish: str, broken: bool) -> Iterator[str]:
    def data(delta: dict[str, Any], finish_reason: str | None = None) -> str:
        body = {"id": "up-1", "object": "chat.completion.chunk", "created": 0, "model": MODEL,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}
        return f"data: {json.dumps(body)}\n\n"

    yield data({"role": "assistant"})
    if message.get("content"):
        words = message["content"].split(" ")
        for n, word in enumerate(words):
            yield data({"content": word if n == 0 else " " + word})
            if broken:
                raise RuntimeError("the upstream died mid-stream")
    for index, call in enumerate(message.get("tool_calls") or []):
        arguments = call["function"]["arguments"]
        yield data({"tool_calls": [{"index": index, "id": call["id"], "type": "function",
                                    "function": {"name": call["function"]["name"], "arguments": ""}}]})
        for cut in range(0, len(arguments), 5):  # arguments arrive in fragments
            yield data({"tool_calls": [{"index": index, "function": {"arguments": arguments[cut:cut + 5]}}]})
    yield data({}, finish)
    yield "data: [DONE]\n\n"
