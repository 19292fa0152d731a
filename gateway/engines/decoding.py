"""From sampled token ids to what the client sees: streamed deltas and the final assistant message.

Tokens are detokenized incrementally (a byte-level BPE token can end inside a UTF-8 character, so text
is released only once it decodes cleanly). The text is then split into content and tool calls, in the
model's own tool-call format (``nextturn.tool_formats``: the local models' ``<|tool_call|>…<|/tool_call|>``,
Hermes/Qwen ``<tool_call>``, Llama 3 JSON, Mistral ``[TOOL_CALLS]``). A call that does not parse stays visible
as content, so a malformed call is seen, not silently dropped. A stop string ends the content before it. Text
that might be the start of a marker or a stop string is held back until the next token tells which it is; a
format whose calls run to the end of the answer (Llama 3, Mistral) streams them when the answer ends.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

from gateway.engines import Delta, Generation
from gateway.errors import InvalidRequest
from gateway.schemas import ChatCompletionRequest
from nextturn import events
from nextturn.conversation import prompt_token_ids
from nextturn.tool_formats import NEXTTURN, ToolFormat


class Detokenizer(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class Tokenizer(Detokenizer, Protocol):
    eos_token_id: int | None


# A sampled token, its logprob, and why generation ended after it (None: it goes on). A step with no token
# only says why generation ended (a server may send the reason after the last token).
Step = tuple[int | None, float, str | None]


def render(tokenizer: Any, request: ChatCompletionRequest, context: int) -> tuple[list[int], int]:
    """The prompt's token ids (the chat template, as the trainer renders it) and the completion's token budget.
    A request the template cannot render, or one that does not fit in ``context``, is refused here."""
    try:
        prompt = prompt_token_ids(tokenizer, request.messages, request.tool_definitions())
    except Exception as exc:  # jinja2 errors: the template cannot render these messages
        raise InvalidRequest(f"the model's chat template cannot render these messages: {exc}",
                             param="messages") from exc
    wanted = request.sampling().max_tokens or max(context - len(prompt), 1)
    if len(prompt) + wanted > context:
        raise InvalidRequest(
            f"this model's context is {context} tokens; the request needs {len(prompt) + wanted} "
            f"({len(prompt)} in the messages, {wanted} in the completion)",
            param="messages", code="context_length_exceeded")
    return prompt, wanted


async def generation(steps: AsyncIterator[Step], tokenizer: Tokenizer, request: ChatCompletionRequest,
                     prompt: list[int], tool_format: ToolFormat | None = NEXTTURN) -> AsyncIterator[Delta | Generation]:
    """What a client sees of sampled tokens: deltas as they decode, then the :class:`Generation` that
    records exactly those tokens. Every engine that samples token by token ends here, so that a turn is
    split into content and tool calls the same way whatever sampled it (in the model's ``tool_format``;
    None: the model writes no calls). A stop string ends the steps early (the caller's iterator is closed,
    which stops its generation)."""
    decoder = TextDecoder(tokenizer, stop=request.sampling().stop, calls=tool_format if request.tools else None)
    tokens: list[int] = []
    logprobs: list[float] = []
    finish: str | None = None
    async for token, logprob, finish in steps:
        if token is None:
            continue
        tokens.append(token)
        logprobs.append(logprob)
        if token != tokenizer.eos_token_id:
            for delta in decoder.feed(token):
                yield delta
        if decoder.stopped:
            finish = "stop"
            break
    for delta in decoder.finish():
        yield delta
    message = decoder.message()
    yield Generation(
        message=message, finish_reason="tool_calls" if message.tool_calls and finish == "stop" else finish or "stop",
        prompt_tokens=len(prompt), completion_tokens=len(tokens),
        prompt_token_ids=prompt, response_token_ids=tokens, response_logprobs=logprobs,
    )


class Answer:
    """An engine's answer as an async iterator that releases its request (a row of the batch, a connection
    to the model server, an adapter's count of running requests) once the answer is complete, or on
    ``aclose`` even when nobody started iterating: an async generator closed before its first step never
    runs its ``finally``, and a client may leave before the first token."""

    def __init__(self, items: AsyncIterator[Delta | Generation], release: Callable[[], Awaitable[None]]) -> None:
        self._items = items
        self._release = release
        self._released = False

    def __aiter__(self) -> Answer:
        return self

    async def __anext__(self) -> Delta | Generation:
        try:
            item = await self._items.__anext__()
        except BaseException:
            await self.aclose()
            raise
        if isinstance(item, Generation):  # the last item: release now, whether or not the caller closes
            await self.aclose()
        return item

    async def aclose(self) -> None:
        try:
            await self._items.aclose()  # type: ignore[attr-defined]
        finally:
            if not self._released:
                self._released = True
                await self._release()


class TextDecoder:
    """Feed it sampled tokens one by one; it returns the deltas each one releases. ``calls``: the format in
    which the model writes tool calls (None: everything is content).

    >>> class Chars:
    ...     def decode(self, ids, skip_special_tokens=False): return "".join(map(chr, ids))
    >>> decoder = TextDecoder(Chars(), stop=["!"], calls=NEXTTURN)
    >>> [d.content for token in 'Hi <|tool' for d in decoder.feed(ord(token))]
    ['H', 'i', ' ']
    >>> for token in '_call|>{"name": "ls", "arguments": {}}<|/tool_call|>ok! more':
    ...     _ = decoder.feed(ord(token))
    >>> message = decoder.message()
    >>> message.content, message.tool_calls[0].function.name, decoder.stopped
    ('Hi ok', 'ls', True)
    """

    def __init__(self, tokenizer: Detokenizer, *, stop: list[str] | None = None,
                 calls: ToolFormat | None = None) -> None:
        self._tokenizer = tokenizer
        self._stop = [s for s in stop or [] if s]
        self._format = calls
        mid_text = calls is not None and not calls.at_start
        self._markers = self._stop + ([calls.open] if calls is not None and mid_text else [])
        self._openers = (calls.open, *calls.opens_at_start) if calls is not None and calls.at_start else ()
        self._ids: list[int] = []
        self._prefix = 0  # detokenization window: ids[_prefix:_read] were already turned into text
        self._read = 0
        self._text = ""  # all text released by the detokenizer
        self._pos = 0  # how much of _text has been split into content and calls
        self._begun = not self._openers  # the answer has begun (a format that calls at the start only)
        self._opened = ""  # the marker that opened the calls being read (kept with them if they do not parse)
        self._in_call = False
        self._content: list[str] = []
        self._calls: list[events.ToolCall] = []
        self.stopped = False  # a stop string was generated: the caller stops generating

    def feed(self, token: int) -> list[Delta]:
        self._ids.append(token)
        self._text += self._detokenize()
        return self._split(final=False)

    def finish(self) -> list[Delta]:
        """The end of generation: release everything held back, including a trailing replacement character
        (no token will complete it now: it is what the bytes decode to, or what the model produced)."""
        self._text += self._detokenize(final=True)
        return self._split(final=True)

    def message(self) -> events.ChatMessage:
        return events.ChatMessage(role="assistant", content="".join(self._content) or None,
                                  tool_calls=self._calls or None)

    def _detokenize(self, *, final: bool = False) -> str:
        before = self._tokenizer.decode(self._ids[self._prefix:self._read], skip_special_tokens=False)
        after = self._tokenizer.decode(self._ids[self._prefix:], skip_special_tokens=False)
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return ""  # an incomplete character: wait for the token that completes it
        self._prefix, self._read = self._read, len(self._ids)
        return after[len(before):]

    def _split(self, *, final: bool) -> list[Delta]:
        deltas: list[Delta] = []
        while not self.stopped:
            pending = self._text[self._pos:]
            if self._in_call:
                if not self._read_calls(pending, final, deltas):
                    break
                continue
            if not self._begun:
                if not self._begin(pending, final):
                    break
                continue
            found = [(at, marker) for marker in self._markers if (at := pending.find(marker)) >= 0]
            if found:
                at, marker = min(found, key=lambda hit: (hit[0], -len(hit[1])))
                self._emit(pending[:at], deltas)
                if self._format is not None and marker == self._format.open:
                    self._pos += at + len(marker)
                    self._in_call, self._opened = True, marker
                    continue
                self.stopped = True
                self._pos = len(self._text)
                break
            keep = 0 if final else _held_back(pending, self._markers)
            self._emit(pending[:len(pending) - keep], deltas)
            self._pos += len(pending) - keep
            break
        return deltas

    def _begin(self, pending: str, final: bool) -> bool:
        """Where calls may only open the answer: decide whether they do, once the text tells (True: decided)."""
        body = pending.lstrip()
        opener = next((o for o in self._openers if body.startswith(o)), None)
        if opener is None and not final and (not body or any(o.startswith(body) for o in self._openers)):
            return False  # only blanks, or the start of an opener, so far
        self._begun = True
        if opener is not None:
            skipped = len(pending) - len(body) + (len(opener) if opener == self._openers[0] else 0)
            self._pos += skipped  # a bare-JSON opener ("{") is part of the call; the blanks before it go
            self._in_call, self._opened = True, pending[:skipped]
        return True

    def _read_calls(self, pending: str, final: bool, deltas: list[Delta]) -> bool:
        """Read the calls being written; True when they are done (parsed, or given back as content)."""
        assert self._format is not None
        close = self._format.close
        end = pending.find(close) if close else -1
        if end < 0 and not final:
            return False
        if end < 0 and close:  # an unterminated call: show it as the text it is
            self._emit(self._opened + pending, deltas)
            self._pos = len(self._text)
        else:
            body = pending if end < 0 else pending[:end]
            self._pos += len(pending) if end < 0 else end + len(close or "")
            calls = self._format.parse(body)
            if calls is None:
                self._emit(self._opened + body + (close if end >= 0 and close else ""), deltas)
            for call in calls or []:
                deltas.append(Delta(tool_calls=[{"index": len(self._calls), **call.model_dump()}]))
                self._calls.append(call)
        self._in_call = False
        return True

    def _emit(self, text: str, deltas: list[Delta]) -> None:
        if text:
            self._content.append(text)
            deltas.append(Delta(content=text))


def _held_back(text: str, markers: list[str]) -> int:
    """The length of the longest end of ``text`` that is the start of a marker.

    >>> _held_back("abc<|to", ["<|tool_call|>"]), _held_back("abc", ["<|tool_call|>"])
    (4, 0)
    """
    longest = 0
    for marker in markers:
        for size in range(min(len(marker) - 1, len(text)), longest, -1):
            if text.endswith(marker[:size]):
                longest = size
                break
    return longest
