"""The documented interface matches the code: README's API table lists exactly the routes of
app/api/routes.py (method and path); `.env.example` documents exactly the settings of
app/config.py plus the variables data/models.json and the server files read; docker-compose.yml
passes every provider variable through to the gateway. Each would drift silently otherwise."""
from __future__ import annotations

import json
import re
from dataclasses import fields

from flask import Flask

from app.api.routes import api
from app.config import ROOT_DIR, Settings

METHODS = ("GET", "POST", "PATCH", "PUT", "DELETE")
# URL parameters as the README names them.
PARAM_NAMES = {"key_id": "<id>", "tenant_id": "<id>", "tenant_ref": "<id>", "model_id": "<model>"}


def readme_routes() -> set[tuple[str, str]]:
    """(method, path) pairs of the README's API table. A cell reads like
    "`GET`/`POST /v1/usage`" or "`POST /v1/chat/completions` (also `/chat/completions`)"."""
    text = (ROOT_DIR / "README.md").read_text()
    table = text[text.index("| method and path |"):]
    table = table[:table.index("\n\n")]
    routes: set[tuple[str, str]] = set()
    for line in table.splitlines()[2:]:
        cell = line.split("|")[1]
        pending: list[str] = []
        last: list[str] = []
        for span in re.findall(r"`([^`]+)`", cell):
            parts = span.split()
            if len(parts) == 1 and parts[0] in METHODS:
                pending.append(parts[0])
            elif parts[0] in METHODS:
                last = pending + [parts[0]]
                routes.update((m, parts[1]) for m in last)
                pending = []
            elif span.startswith("/"):
                routes.update((m, span) for m in last)  # "(also `/path`)": same methods
    return routes


def code_routes() -> set[tuple[str, str]]:
    app = Flask(__name__)
    app.register_blueprint(api)
    routes = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = re.sub(r"<(?:[^:>]+:)?([^>]+)>", lambda m: PARAM_NAMES.get(m.group(1), f"<{m.group(1)}>"),
                      rule.rule)
        routes.update((method, path) for method in rule.methods or () if method in METHODS)
    return routes


def test_readme_api_table_lists_exactly_the_routes():
    """Every route (method and path) is in the README's API table, and the table lists no route
    the gateway does not have."""
    documented, served = readme_routes(), code_routes()
    assert served - documented == set(), "routes missing from the README's API table"
    assert documented - served == set(), "README's API table lists routes the gateway does not have"


def env_example_names() -> set[str]:
    text = (ROOT_DIR / ".env.example").read_text()
    return set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", text, re.M))


def provider_variables() -> set[str]:
    """The variables data/models.json reads: api_key_env names and ${VAR} in URLs."""
    raw = (ROOT_DIR / "data" / "models.json").read_text()
    names = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)\}", raw))
    for provider in json.loads(raw)["providers"].values():
        if provider.get("api_key_env"):
            names.add(provider["api_key_env"])
    return names


def server_variables() -> set[str]:
    """What gunicorn.config.py and run.py read from the environment themselves."""
    found: set[str] = set()
    for name in ("gunicorn.config.py", "run.py"):
        source = (ROOT_DIR / name).read_text()
        found |= set(re.findall(r"""(?:_env\(|environ\.get\(|environ\[)["']([A-Z][A-Z0-9_]+)["']""", source))
    return found


def test_env_example_documents_exactly_the_settings():
    """Every Settings field, provider variable and server variable is in .env.example, and
    .env.example names nothing the gateway does not read."""
    settings = {f.name for f in fields(Settings) if f.name != "extra"}
    read = settings | provider_variables() | server_variables()
    documented = env_example_names()
    assert settings - documented == set(), "settings missing from .env.example"
    assert provider_variables() - documented == set(), "provider variables missing from .env.example"
    assert server_variables() - documented == set(), "server variables missing from .env.example"
    assert documented - read == set(), ".env.example documents variables nothing reads"


def test_docker_compose_passes_every_provider_variable_to_the_gateway():
    """A provider configured in .env reaches the container: docker-compose.yml's shared gateway
    environment names every variable data/models.json reads."""
    compose = (ROOT_DIR / "docker-compose.yml").read_text()
    shared = compose[compose.index("environment: &gateway-env"):compose.index("depends_on:")]
    passed = set(re.findall(r"^\s+([A-Z][A-Z0-9_]+): ", shared, re.M))
    assert provider_variables() - passed == set()
