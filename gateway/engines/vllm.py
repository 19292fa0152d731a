"""The ``vllm`` engine: a vLLM OpenAI-compatible server samples; the gateway renders and decodes.

How a request goes: the gateway renders the chat template into token ids itself (the function the trainer
renders teacher prompts with, :func:`nextturn.conversation.prompt_token_ids`), sends them to vLLM's
``/v1/completions`` as a token-id prompt with ``return_token_ids`` and ``logprobs: 0``, always streaming,
and turns the token ids that come back into content and tool calls with the same decoder as the embedded
engine (:func:`gateway.engines.decoding.generation`). A whole answer is asked for whole (streaming it costs
vLLM and the gateway about 1 ms a token on two cores), unless a stop string may cut it short. Why not
vLLM's ``/v1/chat/completions``:

* the recorded prompt is exactly the ids the trainer computes, not vLLM's rendering of the template;
* every sampled token comes back with its id and logprob, in streams too, and tool calls are parsed from
  those ids: nothing depends on a vLLM tool-call parser (its plugin interface is internal to vLLM and
  changes between releases) or on what a parser holds back mid-stream;
* a stop string is found in the decoded ids, where the embedded engine finds it; the stream to vLLM is
  then closed, which aborts the request there.

The logprobs are vLLM's default ``raw_logprobs``: the model's own distribution, before temperature and
top-p, as the embedded engine records them (the tests check the two agree on the same tokens).

Adapters, many scopes' worth: ``add_adapter`` only registers a version's directory (which the gateway and
the vLLM server both read at the same path: one machine, or a shared volume); the version is loaded into
vLLM through ``/v1/load_lora_adapter`` on its first request, one load at a time per version, and the
requests that arrive meanwhile wait for it. vLLM keeps at most ``--max-loras`` adapters on the GPU and
``--max-cpu-loras`` in memory, least recently used first out, loading an evicted one again from its path
when a request needs it: so nothing here counts or evicts. ``remove_adapter`` stops routing to the version
at once and asks vLLM to forget its name once the requests running on it here have finished. Several
replicas share one vLLM safely: forgetting a name does not touch a request already running on it (vLLM's
request holds the adapter's path), and a replica whose next request finds its version forgotten by another
replica loads it again and sends the request once more.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path
from typing import Any

from gateway.engines import Generation, Stream
from gateway.engines.decoding import Answer, Step, generation, render
from gateway.engines.origin import Origin, OriginError, OriginTimeout, StreamedResponse
from gateway.engines.upstream import sse_lines
from gateway.errors import EngineTimeout, EngineUnavailable, GatewayError, InvalidRequest, NotFound
from gateway.schemas import ChatCompletionRequest
from nextturn import events
from nextturn.tool_formats import ToolFormat, resolve

RESERVED = (events.BASE_VERSION,)


class VllmEngine:
    name = "engine"
    failure: BaseException | None = None  # no thread of its own: vLLM's health shows in the requests

    def __init__(self, base_url: str, model_dir: str | Path, *, served_model: str | None = None,
                 api_key: str | None = None, connect_timeout_s: float = 10.0, read_timeout_s: float = 120.0,
                 tool_format: str = "auto") -> None:
        self._base_url = base_url.rstrip("/")
        self._tool_format_setting = tool_format
        self.tool_format: ToolFormat | None = None  # read off the chat template at start
        self._dir = Path(model_dir)
        self._served = served_model or self._dir.name
        self._headers = [("Authorization", f"Bearer {api_key}")] if api_key else []
        self._timeouts = (connect_timeout_s, read_timeout_s)
        self._origin: Origin | None = None
        self._tokenizer: Any = None
        self._context = 0
        self._paths: dict[str, str] = {}  # version -> its directory: the versions requests may use
        self._loaded: set[str] = set()  # of them, those vLLM holds, as far as this replica knows
        self._loading: dict[str, asyncio.Lock] = {}
        self._running: Counter[str] = Counter()  # requests running here, per adapter version
        self._idle = asyncio.Condition()

    async def start(self) -> None:
        from transformers import AutoTokenizer

        self._tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, self._dir)
        self.tool_format = resolve(self._tool_format_setting, self._tokenizer.chat_template)
        self._origin = Origin(self._base_url, self._headers, connect_timeout_s=self._timeouts[0],
                              read_timeout_s=self._timeouts[1])
        served = await self._models()
        if self._served not in served:
            raise EngineUnavailable(f"vLLM at {self._base_url} serves {', '.join(served) or 'nothing'}, not "
                                    f"{self._served!r}; start it with `nextturn vllm serve` on {self._dir}")
        base = served[self._served]
        self._context = int(base.get("max_model_len") or 0) or self._config_context()

    async def close(self) -> None:
        if self._origin is not None:
            await self._origin.close()

    def models(self) -> list[str]:
        return [self._served, *sorted(self._paths)]

    def adapter_for(self, model: str) -> str | None:
        if model == self._served:
            return events.BASE_VERSION
        return model if model in self._paths else None

    # --- adapters --------------------------------------------------------------------------------------

    async def add_adapter(self, version: str, path: str | Path) -> None:
        """Route ``version`` to the adapter in ``path``, loaded into vLLM on its first request."""
        if version in (*RESERVED, self._served):
            raise InvalidRequest(f"{version!r} is reserved; name the adapter by its version", param="version")
        if version in self._paths:
            raise InvalidRequest(f"an adapter {version!r} is already loaded", code="adapter_exists")
        if not (Path(path) / "adapter_config.json").is_file():
            raise InvalidRequest(f"cannot load the adapter {version!r} from {path}: no adapter_config.json there")
        self._paths[version] = str(path)

    async def remove_adapter(self, version: str) -> None:
        """Stop sending new requests to ``version``; have vLLM forget it once the last one running on it here
        finished (another replica's running requests are not cut: see the module's docstring)."""
        if version not in self._paths:
            raise NotFound(f"no adapter {version!r} is loaded", code="adapter_not_found")
        del self._paths[version]
        async with self._idle:
            await self._idle.wait_for(lambda: not self._running[version])
        if version in self._paths:
            return  # added again meanwhile
        self._loaded.discard(version)
        self._loading.pop(version, None)
        status, text = await self._post("/v1/unload_lora_adapter", {"lora_name": version}, "unloading an adapter")
        if status >= 400 and status != 404:
            raise EngineUnavailable(f"vLLM would not unload {version!r}: {_message(text)}")

    async def _ensure(self, version: str, path: str) -> None:
        """``version`` held by vLLM: loaded now unless this replica knows it is (another replica may have
        loaded it from the same path: that counts)."""
        lock = self._loading.setdefault(version, asyncio.Lock())
        async with lock:
            if version in self._loaded:
                return
            body = {"lora_name": version, "lora_path": path}
            status, text = await self._post("/v1/load_lora_adapter", body, "loading an adapter")
            if status >= 400:
                held = (await self._models()).get(version)
                if held is None or held.get("root") != path:
                    why = (f"vLLM holds an adapter {version!r} from {held.get('root')}" if held is not None
                           else _message(text))
                    raise EngineUnavailable(f"cannot load the adapter {version!r} from {path}: {why}")
            self._loaded.add(version)

    # --- generation ------------------------------------------------------------------------------------

    async def complete(self, request: ChatCompletionRequest, adapter: str) -> Generation:
        """Whole: one answer from vLLM, decoded at once; streamed from vLLM when a stop string may cut it
        short (the gateway finds stop strings in the decoded ids, and closing the stream aborts the rest)."""
        stream = bool(request.sampling().stop)
        async with aclosing(await self._start(request, adapter, stream=stream)) as items:
            async for item in items:
                if isinstance(item, Generation):
                    return item
        raise EngineUnavailable("vLLM ended a generation without a result")  # not reached

    async def stream(self, request: ChatCompletionRequest, adapter: str) -> Stream:
        return await self._start(request, adapter, stream=True)

    async def _start(self, request: ChatCompletionRequest, adapter: str, *,
                     stream: bool) -> Stream:
        assert self._origin is not None, "start() the engine first"
        if adapter != events.BASE_VERSION and adapter not in self._paths:
            raise NotFound(f"no adapter {adapter!r} is loaded", code="model_not_found")
        prompt, wanted = render(self._tokenizer, request, self._context)
        self._running[adapter] += 1  # before any await: the version cannot be unloaded under this request
        try:
            response = await self._send(request, adapter, prompt, wanted, stream=stream)
        except BaseException:
            await self._finished(adapter)
            raise

        async def release() -> None:
            try:
                await response.aclose()  # mid-answer (a stop string, a client that left): vLLM aborts the request
            finally:
                await self._finished(adapter)

        steps = self._steps(response) if stream else self._whole(response)
        return Answer(generation(steps, self._tokenizer, request, prompt, self.tool_format), release)

    async def _send(self, request: ChatCompletionRequest, adapter: str, prompt: list[int], wanted: int, *,
                    stream: bool) -> StreamedResponse:
        """The request sent to vLLM, its adapter loaded first; when vLLM forgot the adapter meanwhile (another
        replica removed it), loaded again and sent once more."""
        assert self._origin is not None
        params = request.sampling()
        body: dict[str, Any] = {
            "model": self._served if adapter == events.BASE_VERSION else adapter, "prompt": prompt,
            "max_tokens": wanted, "temperature": 1.0 if params.temperature is None else params.temperature,
            "top_p": 1.0 if params.top_p is None else params.top_p, "stream": stream,
            "logprobs": 0, "return_token_ids": True, "add_special_tokens": False,
        }
        if params.seed is not None:
            body["seed"] = params.seed
        path = self._paths.get(adapter)  # kept: a removal may come meanwhile, and waits for this request
        for attempt in (1, 2):
            if path is not None:
                await self._ensure(adapter, path)
            try:
                response = await self._origin.stream("POST", "/v1/completions", json.dumps(body).encode())
                if response.status < 400:
                    return response
                text = (await response.read()).decode(errors="replace")
            except OriginError as exc:
                raise _translate(exc, "vLLM is unreachable") from exc
            if response.status == 404 and adapter in self._loaded and attempt == 1:
                self._loaded.discard(adapter)  # forgotten by vLLM: load it again
                continue
            if response.status == 404:
                raise NotFound(f"vLLM does not serve {body['model']!r}: {_message(text)}", code="model_not_found")
            if response.status < 500:
                raise InvalidRequest(f"vLLM refused the request: {_message(text)}")
            raise EngineUnavailable(f"vLLM failed ({response.status}): {_message(text)}")
        raise AssertionError("unreachable")

    @staticmethod
    async def _whole(response: StreamedResponse) -> AsyncIterator[Step]:
        """The steps of a whole (non-streamed) answer."""
        try:
            choice = json.loads(await response.read())["choices"][0]
            tokens = [int(token) for token in choice["token_ids"]]
            logprobs = [float(logprob) for logprob in choice["logprobs"]["token_logprobs"]]
        except OriginError as exc:
            raise _translate(exc, "vLLM failed mid-answer") from exc
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise EngineUnavailable(f"vLLM answered something that is not a completion: {exc!r}") from exc
        if len(logprobs) != len(tokens):
            raise EngineUnavailable(f"vLLM sent {len(tokens)} token ids with {len(logprobs)} logprobs")
        finish = choice.get("finish_reason") or "stop"
        for n, (token, logprob) in enumerate(zip(tokens, logprobs, strict=True)):
            yield token, logprob, finish if n == len(tokens) - 1 else None
        if not tokens:
            yield None, 0.0, finish

    @staticmethod
    async def _steps(response: StreamedResponse) -> AsyncIterator[Step]:
        """Each sampled token, its logprob, and (with the last one) why generation ended."""
        finish: str | None = None
        try:
            async for line in sse_lines(response):
                if line.strip() == b"data: [DONE]" and finish is not None:
                    return  # read to the end, so that the connection can serve the next request
                if not line.startswith(b"data:") or finish is not None:
                    continue
                chunk = json.loads(line[5:])
                if "error" in chunk:
                    raise EngineUnavailable(f"vLLM failed mid-answer: {_message(json.dumps(chunk))}")
                choice = chunk["choices"][0]
                tokens = choice.get("token_ids") or []
                logprobs = (choice.get("logprobs") or {}).get("token_logprobs") or []
                if len(logprobs) != len(tokens):
                    raise EngineUnavailable(f"vLLM sent {len(tokens)} token ids with {len(logprobs)} logprobs")
                finish = choice.get("finish_reason")
                for n, (token, logprob) in enumerate(zip(tokens, logprobs, strict=True)):
                    yield int(token), float(logprob), finish if n == len(tokens) - 1 else None
                if finish is not None and not tokens:
                    yield None, 0.0, finish
        except OriginError as exc:
            raise _translate(exc, "vLLM failed mid-answer") from exc
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise EngineUnavailable(f"vLLM streamed something that is not a completion: {exc!r}") from exc
        raise EngineUnavailable("vLLM ended the stream before the completion finished")

    async def _finished(self, adapter: str) -> None:
        async with self._idle:
            self._running[adapter] -= 1
            if not self._running[adapter]:
                del self._running[adapter]
                self._idle.notify_all()

    # --- helpers ---------------------------------------------------------------------------------------

    async def _models(self) -> dict[str, dict[str, Any]]:
        assert self._origin is not None
        try:
            response = await self._origin.get("/v1/models")
        except OriginError as exc:
            raise _translate(exc, f"vLLM at {self._base_url} is unreachable (start it with `nextturn vllm serve`)"
                             ) from exc
        if response.status >= 400:
            raise EngineUnavailable(f"vLLM's /v1/models failed ({response.status}): {_message(response.body)}")
        try:
            return {str(model["id"]): model for model in json.loads(response.body)["data"]}
        except (ValueError, KeyError, TypeError) as exc:
            raise EngineUnavailable(f"vLLM's /v1/models answered something else: {exc!r}") from exc

    async def _post(self, path: str, body: dict[str, Any], what: str) -> tuple[int, bytes]:
        assert self._origin is not None
        try:
            response = await self._origin.post(path, json.dumps(body).encode())
        except OriginError as exc:
            raise _translate(exc, f"vLLM is unreachable while {what}") from exc
        return response.status, response.body

    def _config_context(self) -> int:
        config = json.loads((self._dir / "config.json").read_text())
        return int(config["max_position_embeddings"])


def _translate(error: OriginError, what: str) -> GatewayError:
    if isinstance(error, OriginTimeout):
        return EngineTimeout(f"vLLM did not answer in time: {error}")
    return EngineUnavailable(f"{what}: {error}")


def _message(text: str | bytes) -> str:
    """vLLM's error message, from an OpenAI-style error body or the body itself."""
    try:
        found = json.loads(text)["error"]["message"]
        return str(found)
    except (ValueError, KeyError, TypeError):
        return (text.decode(errors="replace") if isinstance(text, bytes) else text)[:500]
