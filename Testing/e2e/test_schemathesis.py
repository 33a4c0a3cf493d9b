"""schemathesis against the live gunicorn gateway, driven by its own /openapi.json (issue 16
item 16): generated valid and invalid requests to every operation get no 5xx, and every
answer matches the description (documented status, content type and body schema).

Bounded: EXAMPLES cases per operation and mode, derandomized (the same cases every run), no
shrinking; the whole run stays well under a minute on this machine."""
from __future__ import annotations

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                               status_code_conformance)

from Testing.conftest import app_config
from Testing.support import SYSTEM_SECRET, GatewayProcess, http_json

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "12"))  # raise it for a longer hunt (80: ~1 min more)


def _key(gateway) -> str:
    status, _, body = http_json("POST", gateway.base_url + "/v1/api-keys",
                                {"name": "fuzz", "tenant": "fuzz-tenant", "role": "admin"},
                                {"X-System-Secret": SYSTEM_SECRET})
    assert status == 201, body
    return body["key"]


@pytest.fixture(scope="module")
def gateway(pg_url, models_file, tmp_path_factory):
    """The gateway under gunicorn (2 workers); /api/chat without a model answers with the offline
    `demo` model (the test models' default category holds scripted upstream failures)."""
    env = {k: str(v) for k, v in app_config(pg_url, models_file, API_CHAT_DEFAULT_MODEL="demo").items()}
    proc = GatewayProcess(env, workers=2, log_path=tmp_path_factory.mktemp("fuzz") / "gunicorn.log").start()
    yield proc
    proc.stop()


def test_generated_requests_get_no_5xx_and_match_the_description(gateway, clean_db):
    status, _, document = http_json("GET", gateway.base_url + "/openapi.json")
    assert status == 200
    schema = schemathesis.openapi.from_dict(document)
    bearer = {"Authorization": f"Bearer {_key(gateway)}"}
    admin = {"X-System-Secret": SYSTEM_SECRET}
    operations = [result.ok() for result in schema.get_all_operations()]
    # Operations a key calls run first: admin operations may revoke that key or suspend its tenant.
    operations.sort(key=lambda op: any("systemSecret" in s for s in op.definition.raw.get("security", [])))
    failures: list[str] = []
    seen: dict[int, int] = {}  # answers by status
    for op in operations:
        security = op.definition.raw.get("security", [])
        headers = admin if any("systemSecret" in s for s in security) else bearer if security else {}
        has_input = bool(op.definition.raw.get("parameters") or op.definition.raw.get("requestBody"))
        # Invalid data needs something to make invalid: operations without input get valid calls only.
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE) if has_input else (GenerationMode.POSITIVE,):
            @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def run(case) -> None:
                response = case.call_and_validate(base_url=gateway.base_url, headers=headers, checks=CHECKS,
                                                  timeout=30)
                seen[response.status_code] = seen.get(response.status_code, 0) + 1
            try:
                run()
            except Unsatisfiable:
                continue  # no invalid input exists (a free string in the path): nothing to send
            except Exception as exc:  # one report per operation and mode, all collected
                failures.append(f"{op.label} [{mode.value}]: {exc}"[:3000])
    assert not failures, "\n\n".join(failures)
    # The run reached the operations: valid calls answered, invalid ones refused.
    assert seen.get(200, 0) > 0 and seen.get(400, 0) > 0, seen
