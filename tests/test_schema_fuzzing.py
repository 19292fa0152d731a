"""Schema-driven fuzzing (schemathesis): requests generated from the gateway's own OpenAPI schema, valid ones
and ones that break it on purpose, against every route of a running gateway. Whatever is sent, the answer is
below 500 and every error is OpenAI-style JSON; afterwards the gateway still serves and records.

The hand-written cases that a schema cannot describe (bytes that are not UTF-8, lone surrogates in every
string field, clients that leave mid-stream) are in tests/test_hostile_input.py; arbitrary JSON in every
field of the main bodies in tests/test_fuzzing.py.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from gateway.app import create_app
from nextturn.settings import Settings

from support.event_logs import recorded
from support.services import Uvicorn
from support.upstream import MODEL

pytestmark = pytest.mark.slow  # ~2,400 requests: make test runs them, make check does not
CASES_PER_ROUTE = 200
TENANT, ADMIN = "Bearer sk-acme", "Bearer sk-admin"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("schema-fuzz")


@pytest.fixture(scope="module")
def gateway(upstream: Uvicorn, data_dir: Path) -> Iterator[Uvicorn]:
    settings = Settings(data_dir=data_dir, engine="openai", upstream_url=f"{upstream.url}/v1", model=MODEL,
                        api_keys="sk-acme:acme", admin_key="sk-admin", rollout_check_interval_s=0.5)
    with Uvicorn(create_app(settings)) as server:
        yield server


def openai_style(response: Any, what: str) -> None:
    """Below 500; an error is ``{"error": {"message", "type", "param", "code"}}`` with a message."""
    assert response.status_code < 500, f"{what}: {response.status_code}: {response.text[:500]}"
    if response.status_code >= 400:
        error = json.loads(response.content)["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], (what, error)


def _fuzz(strategy: st.SearchStrategy[schemathesis.Case], gateway: Uvicorn, key: str, label: str,
          sent: Counter[str], statuses: Counter[int]) -> None:
    @given(case=strategy)
    @settings(max_examples=CASES_PER_ROUTE, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def probe(case: schemathesis.Case) -> None:
        response = case.call(base_url=gateway.url, headers={"Authorization": key}, timeout=30)
        sent[label] += 1
        statuses[response.status_code] += 1
        openai_style(response, f"{label} {case.as_curl_command()}")

    probe()


def test_every_route_answers_generated_requests_below_500_with_openai_style_errors(
    gateway: Uvicorn, data_dir: Path, tmp_path: Path
) -> None:
    schema_of = create_app(Settings(data_dir=tmp_path, engine="openai", upstream_url=f"{gateway.url}/v1",
                                    model=MODEL, api_docs=True)).openapi()
    schema = schemathesis.openapi.from_dict(schema_of)
    sent: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    for result in schema.get_all_operations():
        operation = result.ok()
        takes_input = bool(operation.path_parameters or operation.query or operation.body
                           or any(param.name.lower() != "authorization" for param in operation.headers))
        modes = [GenerationMode.POSITIVE, *([GenerationMode.NEGATIVE] if takes_input else [])]
        # Admin routes get the admin key, the others a tenant's: the cases reach past authentication.
        key = ADMIN if operation.path.startswith(("/v1/admin", "/metrics")) else TENANT
        strategy = st.one_of(*(operation.as_strategy(generation_mode=mode) for mode in modes))
        _fuzz(strategy, gateway, key, operation.label, sent, statuses)
    total = sum(sent.values())
    print(f"\nschema fuzzing: {total} cases over {len(sent)} routes, statuses {dict(sorted(statuses.items()))}")
    assert set(sent) == {f"{method.upper()} {path}" for path, methods in schema_of["paths"].items()
                         for method in methods}
    assert total >= 2000 and not [status for status in statuses if status >= 500]

    # After all of it, the gateway still answers, is healthy and records.
    answered = httpx.post(f"{gateway.url}/v1/chat/completions", headers={"Authorization": TENANT}, timeout=30,
                          json={"model": MODEL, "messages": [{"role": "user", "content": "after the schema fuzz"}]})
    assert answered.status_code == 200 and httpx.get(f"{gateway.url}/healthz").json() == {"status": "ok"}
    assert recorded(data_dir, answered.json()["id"]).messages[-1].content == "after the schema fuzz"
