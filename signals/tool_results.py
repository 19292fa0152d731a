"""Reading what tools said: did a call succeed, and which line says why not. Shared by the tool reward
(:mod:`signals.rewards`) and the tool hint (:mod:`signals.hints`), so that both read output alike."""

from __future__ import annotations

import re

from nextturn.events import ChatMessage, ToolOutcome

# Evidence in a tool's output that it failed or succeeded. Failure wins when both appear ("3 passed, 1 failed").
_FAILED = re.compile(
    r"traceback \(most recent call last\)|\b\w*(error|exception)\b[:\s]|\bfailed\b|\bfailures?\b|"
    r"\bexit(ed)?( with)?( code| status)?:? *[1-9]\d*\b|non-zero exit|command not found|no such file|"
    r"\bpanicked\b|\bsegmentation fault\b|\bpermission denied\b|\btimed out\b|\bcannot\b|\bnot found\b",
    re.IGNORECASE,
)
_SUCCEEDED = re.compile(r"\b\d+ passed\b|\bexit(ed)?( with)?( code| status)?:? *0\b|\bsuccess(ful(ly)?)?\b|"
                        r"\bok\b|\bdone\b|\bcompleted\b", re.IGNORECASE)
_WHY = re.compile(r"error|exception|failed|fatal", re.IGNORECASE)


def succeeded(output: str) -> bool | None:
    """True or False when the output says; None when it does not.

    >>> succeeded("===== 3 passed, 1 failed in 0.2s =====")
    False
    >>> succeeded("12 passed in 0.5s"), succeeded("hello")
    (True, None)
    """
    if _FAILED.search(output):
        return False
    if _SUCCEEDED.search(output):
        return True
    return None


def outcome_succeeded(tool: ToolOutcome) -> bool | None:
    """Structured fields first (``passed``, then ``exit_code``), then the output."""
    if tool.passed is not None:
        return tool.passed
    if tool.exit_code is not None:
        return tool.exit_code == 0
    return succeeded(tool.output or "")


def text_of(message: ChatMessage) -> str:
    if isinstance(message.content, str):
        return message.content
    return " ".join(str(part.get("text", "")) for part in message.content or [])


def gist(output: str, limit: int = 160) -> str:
    """The line that says what went wrong (a traceback's last error line), shortened.

    >>> gist("Traceback (most recent call last):\\n  File 'x.py', line 1\\nKeyError: 'name'")
    "KeyError: 'name'"
    """
    lines = [line.strip() for line in output.strip().splitlines() if line.strip()]
    if not lines:
        return ""
    line = ([line for line in lines if _WHY.search(line)] or lines)[-1]
    return line if len(line) <= limit else line[: limit - 3] + "..."
