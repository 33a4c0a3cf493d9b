"""GET /openapi.json: an OpenAPI 3.1 description that stays in step with the URL map."""
from __future__ import annotations

import schemathesis

from app.api.openapi import openapi_path

IGNORED_METHODS = {"HEAD", "OPTIONS"}


def _described(client) -> dict:
    resp = client.get("/openapi.json")
    assert resp.status_code == 200 and resp.mimetype == "application/json"
    return resp.get_json()


def test_every_route_is_described(app, client):
    """Each rule and method of the URL map has an operation (a new route without a description
    fails here), and nothing is described that the gateway does not serve."""
    paths = _described(client)["paths"]
    served = {(openapi_path(rule.rule), method.lower()) for rule in app.url_map.iter_rules()
              if rule.endpoint != "static" for method in rule.methods - IGNORED_METHODS}
    described = {(path, method) for path, ops in paths.items() for method in ops}
    assert served - described == set(), "routes without a description"
    assert described - served == set(), "descriptions of routes that do not exist"


def test_every_operation_names_its_auth_and_errors(client):
    """Operations say who may call them and answer their errors with the one envelope."""
    document = _described(client)
    assert document["openapi"] == "3.1.0"
    assert set(document["components"]["securitySchemes"]) == {"bearerKey", "systemSecret", "anthropicKey", "metricsToken"}
    for path, ops in document["paths"].items():
        for method, op in ops.items():
            assert "security" in op, (path, method)
            errors = {s: r for s, r in op["responses"].items() if s.startswith(("4", "5"))}
            assert {"400", "405", "408", "413", "429", "503"} <= set(errors), (path, method)
            if op["security"]:
                assert "401" in errors, (path, method)
            for status, response in errors.items():
                if path in ("/health", "/api/health") and status == "503":
                    continue
                envelope = "AnthropicError" if path.startswith("/v1/messages") else "Error"
                assert response["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{envelope}"}


def test_request_bodies_come_from_the_marshmallow_schemas(client):
    """The key-creation body is the marshmallow schema's: its required field, strict extras."""
    schemas = _described(client)["components"]["schemas"]
    assert schemas["ApiKeyCreate"]["required"] == ["name"]
    assert schemas["ApiKeyCreate"]["additionalProperties"] is False
    assert sorted(schemas["ChatCompletion"]["required"]) == ["messages", "model"]


def test_the_document_loads_as_openapi(client):
    """schemathesis (which validates the document) reads every operation of it."""
    document = _described(client)
    schema = schemathesis.openapi.from_dict(document)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == sum(len(ops) for ops in document["paths"].values()) > 0
