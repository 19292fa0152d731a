"""The ``embedded`` engine: a transformers model and its LoRA adapters, in this process.

One generation thread owns the model. Each pass of its loop:

1. applies adapter commands: an added adapter is loaded while fewer than ``max_adapters`` are in memory
   (else it is only checked to be an adapter directory, and loaded by its first request); a removed one
   is deleted once no request that started on it is still running (in-flight requests finish on the
   adapter they started with). At most ``max_adapters`` stay resident: past that, the least recently used
   one that no running request is on is dropped from memory (it stays added, and is loaded again from its
   directory by the next request for it, which waits for the load; a request is never served by another
   adapter, and never fails because its adapter was dropped);
2. admits waiting requests up to ``max_batch``: each new prompt is prefilled on its own, its first token
   sampled, and its KV cache joins the running batch, left-padded to the batch's length;
3. runs one decode step for the whole batch, each row on its own adapter (:mod:`gateway.engines.lora_bank`),
   samples one token per row and hands it to the request's asyncio queue;
4. drops finished and cancelled rows, and trims the pad columns no row needs any more.

So a request that arrives while a long one runs starts at the next step, not after the long one.

What is recorded is what was sampled: the token ids and, for each, its log-probability under the
model's own distribution (the raw logits, before temperature and top-p, as vLLM reports them by
default). That is the number the trainer recomputes, so a policy ratio starts at exactly 1.

torch and transformers are imported only when this engine is built (gateway/app.py imports this
module lazily), so a gateway in front of an upstream never loads them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import logging
import queue
import threading
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from gateway.engines import Generation, Stream
from gateway.engines.decoding import Answer, Step, generation, render
from gateway.engines.lora_bank import LoraBank
from gateway.errors import EngineUnavailable, InvalidRequest, NotFound
from gateway.schemas import ChatCompletionRequest
from nextturn import events
from nextturn.tool_formats import ToolFormat, resolve

log = logging.getLogger(__name__)

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys and values, [batch, kv_heads, length, head_dim]
# A temperature this low samples the most likely token anyway, and dividing logits by it overflows (as vLLM).
GREEDY_BELOW = 1e-5


@dataclass(eq=False)
class _Sequence:
    prompt: list[int]
    adapter: str
    max_tokens: int
    temperature: float
    top_p: float
    generator: torch.Generator | None
    deliver: Callable[[object], object]  # thread-safe: puts into the request's asyncio queue
    generated: int = 0
    cancelled: bool = False  # set by the request's side: its client left, or a stop string was generated


@dataclass
class _Command:
    action: str  # "add" | "remove"
    version: str
    path: Path | None
    done: concurrent.futures.Future[None] = field(default_factory=concurrent.futures.Future)


class _Batch:
    """The running rows and their shared, left-padded KV cache."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.rows: list[_Sequence] = []
        self.kv: KV = []
        self.mask = torch.zeros(0, 0, dtype=torch.long)  # [batch, length]: 1 where a real token is cached
        self.positions = torch.zeros(0, dtype=torch.long)  # [batch]: the position of each row's next token
        self.next_tokens = torch.zeros(0, dtype=torch.long)  # [batch]: sampled, not yet fed to the model
        self.cache: Any = None  # the DynamicCache of the last step, reused while the rows stay the same

    def join(self, row: _Sequence, kv: KV, token: int) -> None:
        self._settle()
        length = kv[0][0].shape[2]
        width = max(length, self.mask.shape[1])
        if self.rows:
            self.kv = [(torch.cat([_pad_left(k, width), _pad_left(nk, width)]),
                        torch.cat([_pad_left(v, width), _pad_left(nv, width)]))
                       for (k, v), (nk, nv) in zip(self.kv, kv, strict=True)]
        else:
            self.kv = kv
        device = kv[0][0].device
        mask = F.pad(torch.ones(1, length, dtype=torch.long, device=device), (width - length, 0))
        self.mask = torch.cat([F.pad(self.mask.to(device), (width - self.mask.shape[1], 0)), mask])
        self.positions = torch.cat([self.positions.to(device), torch.tensor([length], device=device)])
        self.next_tokens = torch.cat([self.next_tokens.to(device), torch.tensor([token], device=device)])
        self.rows.append(row)
        self.cache = None

    def keep(self, keep: list[int]) -> None:
        """Keep only these rows, and drop the leading columns that are padding in all of them."""
        if len(keep) == len(self.rows):
            return
        self._settle()
        self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self.reset()
            return
        index = torch.tensor(keep, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        start = int(mask.any(0).nonzero()[0])
        self.mask = mask[:, start:]
        self.kv = [(k.index_select(0, index)[:, :, start:], v.index_select(0, index)[:, :, start:])
                   for k, v in self.kv]
        self.positions = self.positions.index_select(0, index)
        self.next_tokens = self.next_tokens.index_select(0, index)
        self.cache = None

    def step_inputs(self, cache_keyword: str) -> dict[str, Any]:
        if self.cache is None:
            self.cache = DynamicCache()
            for layer, (k, v) in enumerate(self.kv):
                self.cache.update(k, v, layer)
        ones = torch.ones(len(self.rows), 1, dtype=torch.long, device=self.mask.device)
        self.mask = torch.cat([self.mask, ones], dim=1)
        inputs = {"input_ids": self.next_tokens[:, None], "attention_mask": self.mask,
                  "position_ids": self.positions[:, None], cache_keyword: self.cache}
        self.positions = self.positions + 1
        return inputs

    def _settle(self) -> None:
        """Take the tensors back out of the cache the last steps grew."""
        if self.cache is not None:
            self.kv = _cache_tensors(self.cache)


class EmbeddedEngine:
    name = "engine"

    def __init__(self, model_dir: str | Path, *, max_batch: int = 16, device: str | None = None,
                 max_adapters: int = 16, tool_format: str = "auto") -> None:
        self._dir = Path(model_dir)
        self._tool_format_setting = tool_format
        self.tool_format: ToolFormat | None = None  # read off the chat template when the model loads
        self._served = self._dir.name
        self._max_batch = max_batch
        self._max_adapters = max_adapters
        # The generation thread's own: each added adapter's directory, and those in memory, least recent first.
        self._paths: dict[str, Path] = {}
        self._resident: OrderedDict[str, int] = OrderedDict()  # version -> its slot in the bank
        self.loads = 0  # adapters loaded again after being dropped
        self.evictions = 0
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self._inbox: queue.Queue[_Sequence | _Command | None] = queue.Queue()
        self._available: frozenset[str] = frozenset()  # adapters a new request may use
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.failure: BaseException | None = None
        self._load_now = 0  # requests running or waiting, as the generation thread last counted
        self._model: Any = None
        self._cache_keyword = "cache"  # set from the model's forward when it is loaded
        self._bank: LoraBank | None = None
        self._tokenizer: Any = None

    # --- the request side (event loop) ----------------------------------------------------------------

    async def start(self) -> None:
        await asyncio.to_thread(self._load)
        self._thread = threading.Thread(target=self._run, name="nextturn-engine", daemon=True)
        self._thread.start()

    async def close(self) -> None:
        self._stop.set()
        self._inbox.put(None)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30.0)

    def models(self) -> list[str]:
        return [self._served, *sorted(self._available)]

    def load(self) -> int:
        """Requests running or waiting for a row."""
        return self._load_now

    def adapter_for(self, model: str) -> str | None:
        """The adapter a request for ``model`` names: the base for the served model, else a loaded version."""
        if model == self._served:
            return events.BASE_VERSION
        return model if model in self._available else None

    async def add_adapter(self, version: str, path: str | Path) -> None:
        if version in (events.BASE_VERSION, self._served):
            raise InvalidRequest(f"{version!r} is reserved; name the adapter by its version", param="version")
        await self._command(_Command("add", version, Path(path)))

    async def remove_adapter(self, version: str) -> None:
        """Stop sending new requests to ``version``; returns once the last one running on it finished."""
        if version not in self._available:
            raise NotFound(f"no adapter {version!r} is loaded", code="adapter_not_found")
        self._available = self._available - {version}
        await self._command(_Command("remove", version, None))

    async def complete(self, request: ChatCompletionRequest, adapter: str) -> Generation:
        async with aclosing(await self.stream(request, adapter)) as items:
            async for item in items:
                if isinstance(item, Generation):
                    return item
        raise EngineUnavailable("the engine ended a generation without a result")  # not reached

    async def stream(self, request: ChatCompletionRequest, adapter: str) -> Stream:
        sequence, inbox = self._submit(request, adapter)  # a bad request fails here, before any chunk is sent

        async def release() -> None:
            sequence.cancelled = True  # a no-op when it finished; otherwise frees its row at the next step

        return Answer(generation(self._steps(inbox), self._tokenizer, request, sequence.prompt,
                                 self.tool_format), release)

    @staticmethod
    async def _steps(inbox: asyncio.Queue[Any]) -> AsyncIterator[Step]:
        finish: str | None = None
        while finish is None:
            item = await inbox.get()
            if isinstance(item, BaseException):
                raise EngineUnavailable(f"the model failed: {item!r}") from item
            token, logprob, finish = item
            yield token, logprob, finish

    def _submit(self, request: ChatCompletionRequest, adapter: str) -> tuple[_Sequence, asyncio.Queue[Any]]:
        if self.failure is not None or self._thread is None or not self._thread.is_alive():
            raise EngineUnavailable("the embedded engine is not running; see /healthz")
        if adapter != events.BASE_VERSION and adapter not in self._available:
            raise NotFound(f"no adapter {adapter!r} is loaded", code="model_not_found")
        prompt, wanted = render(self._tokenizer, request, int(self._model.config.max_position_embeddings))
        params = request.sampling()
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[Any] = asyncio.Queue()
        generator = None
        if params.seed is not None:
            generator = torch.Generator(self._device).manual_seed(params.seed)
        sequence = _Sequence(
            prompt=prompt, adapter=adapter, max_tokens=wanted,
            temperature=1.0 if params.temperature is None else params.temperature,
            top_p=1.0 if params.top_p is None else params.top_p, generator=generator,
            deliver=lambda item: loop.call_soon_threadsafe(inbox.put_nowait, item),
        )
        self._inbox.put(sequence)
        return sequence, inbox

    async def _command(self, command: _Command) -> None:
        if self.failure is not None:
            raise EngineUnavailable("the embedded engine is not running; see /healthz")
        self._inbox.put(command)
        await asyncio.wrap_future(command.done)

    # --- the generation thread -------------------------------------------------------------------------

    def _load(self) -> None:
        self._tokenizer = AutoTokenizer.from_pretrained(self._dir)
        self.tool_format = resolve(self._tool_format_setting, self._tokenizer.chat_template)
        self._model = AutoModelForCausalLM.from_pretrained(self._dir).to(self._device).eval()
        self._cache_keyword = cache_keyword(self._model)
        self._bank = LoraBank(self._model, slots=min(self._max_adapters, 64))

    def _run(self) -> None:
        batch = _Batch()
        waiting: deque[_Sequence] = deque()
        removals: list[_Command] = []
        try:
            with torch.inference_mode():
                while not self._stop.is_set():
                    self._receive(waiting, removals, block=not batch.rows and not waiting)
                    self._load_now = len(batch.rows) + len(waiting)
                    self._remove_idle(removals, batch, waiting)
                    self._evict(batch)
                    while waiting and len(batch.rows) < self._max_batch:
                        self._admit(waiting.popleft(), batch)
                    if batch.rows:
                        self._step(batch)
        except BaseException as exc:
            self.failure = exc
            log.exception("the embedded engine's generation thread died")
            raise
        finally:
            reason = EngineUnavailable("the embedded engine stopped")
            for sequence in [*batch.rows, *waiting]:
                sequence.deliver(reason)
            for command in removals:
                command.done.set_exception(reason)

    def _receive(self, waiting: deque[_Sequence], removals: list[_Command], *, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            while True:
                if isinstance(item, _Sequence):
                    waiting.append(item)
                elif isinstance(item, _Command) and item.action == "remove":
                    removals.append(item)
                elif isinstance(item, _Command):
                    self._add(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            return

    def _add(self, command: _Command) -> None:
        try:
            if command.version in self._paths:
                raise InvalidRequest(f"an adapter {command.version!r} is already loaded", code="adapter_exists")
            assert command.path is not None
            if len(self._resident) < self._max_adapters:
                self._load_adapter(command.version, command.path)  # room for it: checked in full, and ready
            elif not (command.path / "adapter_config.json").is_file():
                raise InvalidRequest(f"cannot load the adapter {command.version!r} from {command.path}: "
                                     "no adapter_config.json there")
            self._paths[command.version] = command.path  # else loaded on its first request
        except InvalidRequest as exc:
            command.done.set_exception(exc)
        except Exception as exc:  # config/safetensors/OS errors: the directory is not a servable adapter
            command.done.set_exception(
                InvalidRequest(f"cannot load the adapter {command.version!r} from {command.path}: {exc}"))
        else:
            self._available = self._available | {command.version}
            command.done.set_result(None)

    def _load_adapter(self, version: str, path: Path) -> None:
        assert self._bank is not None
        self._resident[version] = self._bank.load(path)

    def _drop_adapter(self, version: str) -> None:
        """Free an adapter's slot (it may stay added: see _ensure)."""
        if version in self._resident:
            assert self._bank is not None
            self._bank.free(self._resident.pop(version))

    def _ensure(self, version: str) -> None:
        """The adapter in memory, loaded again from its directory if it was dropped; the most recent now."""
        if version == events.BASE_VERSION:
            return
        if version in self._resident:
            self._resident.move_to_end(version)
            return
        self._load_adapter(version, self._paths[version])
        self.loads += 1

    def _evict(self, batch: _Batch) -> None:
        """Drop least recently used adapters past ``max_adapters``; never one a running request is on (so at
        most ``max_adapters`` plus one per row are in memory). A waiting request's adapter is loaded again
        when the request is admitted."""
        if len(self._resident) <= self._max_adapters:
            return
        busy = {sequence.adapter for sequence in batch.rows}
        for version in [version for version in self._resident if version not in busy]:
            if len(self._resident) <= self._max_adapters:
                return
            self._drop_adapter(version)
            self.evictions += 1

    def _remove_idle(self, removals: list[_Command], batch: _Batch, waiting: deque[_Sequence]) -> None:
        busy = {sequence.adapter for sequence in [*batch.rows, *waiting]}
        for command in [command for command in removals if command.version not in busy]:
            removals.remove(command)
            try:
                self._drop_adapter(command.version)
                self._paths.pop(command.version, None)
            except Exception as exc:  # the engine keeps serving; the caller learns why the removal failed
                log.exception("removing adapter %s failed", command.version)
                command.done.set_exception(EngineUnavailable(f"removing the adapter failed: {exc!r}"))
            else:
                command.done.set_result(None)

    def _forward(self, adapters: list[str], **inputs: Any) -> torch.Tensor:
        """Logits of the last position, [rows, vocab]; each row on its adapter."""
        assert self._bank is not None
        slots = [0 if adapter == events.BASE_VERSION else self._resident[adapter] for adapter in adapters]
        with self._bank.rows(slots):
            output = self._model(**inputs, use_cache=True, logits_to_keep=1)
        return output.logits[:, -1].float()

    def _admit(self, sequence: _Sequence, batch: _Batch) -> None:
        if sequence.cancelled:
            return
        try:
            self._ensure(sequence.adapter)
            cache = DynamicCache()
            prompt = torch.tensor([sequence.prompt], device=self._device)
            logits = self._forward([sequence.adapter], input_ids=prompt, **{self._cache_keyword: cache})
            (token,) = self._sample(logits, [sequence])
        except Exception as exc:
            log.exception("prefill failed")
            sequence.deliver(exc)
            return
        if not self._emit(sequence, token):
            batch.join(sequence, _cache_tensors(cache), token[0])

    def _step(self, batch: _Batch) -> None:
        batch.keep([i for i, row in enumerate(batch.rows) if not row.cancelled])
        if not batch.rows:
            return
        try:
            logits = self._forward([row.adapter for row in batch.rows], **batch.step_inputs(self._cache_keyword))
            sampled = self._sample(logits, batch.rows)
        except Exception as exc:
            log.exception("a decode step failed; failing the requests in it")
            for row in batch.rows:
                row.deliver(exc)
            batch.keep([])
            return
        batch.next_tokens = torch.tensor([token for token, _ in sampled], device=self._device)
        batch.keep([i for i, (row, token) in enumerate(zip(batch.rows, sampled, strict=True))
                    if not self._emit(row, token)])

    def _emit(self, sequence: _Sequence, token: tuple[int, float]) -> bool:
        """Hand a sampled token to its request; True when the sequence is finished."""
        sequence.generated += 1
        finish = None
        if token[0] == self._tokenizer.eos_token_id:
            finish = "stop"
        elif sequence.generated >= sequence.max_tokens:
            finish = "length"
        sequence.deliver((token[0], token[1], finish))
        return finish is not None

    @staticmethod
    def _sample(logits: torch.Tensor, rows: list[_Sequence]) -> list[tuple[int, float]]:
        """One token per row, with that row's temperature, top-p and generator; its raw logprob."""
        logprobs = torch.log_softmax(logits, dim=-1)  # [rows, vocab]
        sampled = []
        for row, (raw, logprob) in enumerate(zip(logits, logprobs, strict=True)):
            sequence = rows[row]
            if sequence.temperature < GREEDY_BELOW:
                token = int(raw.argmax())
            else:
                probs = _top_p(torch.softmax(raw / sequence.temperature, dim=-1), sequence.top_p)
                token = int(torch.multinomial(probs, 1, generator=sequence.generator))
            sampled.append((token, float(logprob[token])))
        return sampled


def _top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches ``top_p``."""
    if top_p >= 1.0:
        return probs
    ordered, order = probs.sort(descending=True)
    outside = ordered.cumsum(-1) - ordered >= top_p  # the mass before a token already reached top_p
    ordered[outside] = 0.0
    return torch.zeros_like(probs).scatter(-1, order, ordered)


def _pad_left(tensor: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad a [batch, heads, length, dim] cache tensor on the left of its length."""
    return F.pad(tensor, (0, 0, length - tensor.shape[2], 0))


def cache_keyword(model: Any) -> str:
    """The name under which the model's forward takes a KV cache.

    transformers 5.24 renamed ``past_key_values`` to ``cache``; the old name warns until 5.40 removes it.
    Earlier releases know only ``past_key_values``. The decorators on ``forward`` keep its signature.
    """
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_tensors(cache: Any) -> KV:
    """The keys and values a DynamicCache holds, layer by layer."""
    return [(layer.keys, layer.values) for layer in cache.layers]
