"""URL map of the gateway: every route points at one controller function."""
from __future__ import annotations

from flask import Blueprint, request

from app.api import (api_chat_controller, audit_controller, cache_controller, chat_controller, embeddings_controller,
                     health_controller, images_controller, key_controller, messages_controller, metrics_controller,
                     models_controller, my_key_controller, openapi_controller, reload_controller, requests_controller,
                     responses_controller, status_controller, tenant_controller, usage_controller)
from app.api.common import reject_unstorable_url_values
from app.errors import ANTHROPIC_PREFIX, anthropic_envelope, register_error_handlers
from app.utils import client_connection

api = Blueprint("api", __name__)
api.before_request(reject_unstorable_url_values)  # a NUL in a query parameter or path: 400, not 500


@api.before_request
def _watch_client() -> None:
    """Requests that wait (provider queues) stop when their client hangs up."""
    client_connection.watch(request.environ.get("gunicorn.socket"))


api.add_url_rule("/health", view_func=health_controller.health, methods=["GET"])
api.add_url_rule("/openapi.json", view_func=openapi_controller.openapi_document, methods=["GET"])
api.add_url_rule("/ping", view_func=health_controller.ping, methods=["GET"])
api.add_url_rule("/api/health", endpoint="api_health", view_func=health_controller.health, methods=["GET"])
api.add_url_rule("/api/chat", view_func=api_chat_controller.api_chat, methods=["POST"])
api.add_url_rule("/api/clear-cache", view_func=cache_controller.clear_cache, methods=["POST"])
for prefix in ("/v1", ""):
    api.add_url_rule(f"{prefix}/chat/completions", endpoint=f"chat{prefix}",
                     view_func=chat_controller.chat_completions, methods=["POST"])
    api.add_url_rule(f"{prefix}/embeddings", endpoint=f"embeddings{prefix}",
                     view_func=embeddings_controller.embeddings, methods=["POST"])
    api.add_url_rule(f"{prefix}/images/generations", endpoint=f"images{prefix}",
                     view_func=images_controller.generate_images, methods=["POST"])
    api.add_url_rule(f"{prefix}/models/<path:model_id>", endpoint=f"model{prefix}",
                     view_func=models_controller.retrieve_model, methods=["GET"])
    api.add_url_rule(f"{prefix}/responses", endpoint=f"responses{prefix}",
                     view_func=responses_controller.create_response, methods=["POST"])
    api.add_url_rule(f"{prefix}/responses/<response_id>", endpoint=f"response_get{prefix}",
                     view_func=responses_controller.get_response, methods=["GET"])
    api.add_url_rule(f"{prefix}/responses/<response_id>", endpoint=f"response_delete{prefix}",
                     view_func=responses_controller.delete_response, methods=["DELETE"])
    api.add_url_rule(f"{prefix}/responses/<response_id>/input_items", endpoint=f"response_items{prefix}",
                     view_func=responses_controller.list_input_items, methods=["GET"])
api.add_url_rule("/image", endpoint="image", view_func=images_controller.generate_images, methods=["POST"])
api.add_url_rule("/v1/models", view_func=models_controller.list_models, methods=["GET", "POST"])
api.add_url_rule("/models", endpoint="models", view_func=models_controller.list_models, methods=["GET", "POST"])
api.add_url_rule("/v1/usage", view_func=usage_controller.usage, methods=["GET", "POST"])
api.add_url_rule("/v1/requests", view_func=requests_controller.list_requests, methods=["GET"])
api.add_url_rule("/v1/key", view_func=my_key_controller.my_key, methods=["GET"])
api.add_url_rule("/v1/api-keys", view_func=key_controller.create_api_key, methods=["POST"])
api.add_url_rule("/v1/api-keys", view_func=key_controller.list_api_keys, methods=["GET"])
api.add_url_rule("/v1/api-keys/<int:key_id>", view_func=key_controller.get_api_key, methods=["GET"])
api.add_url_rule("/v1/api-keys/<int:key_id>", view_func=key_controller.update_api_key, methods=["PATCH"])
api.add_url_rule("/v1/api-keys/<int:key_id>", view_func=key_controller.revoke_api_key, methods=["DELETE"])
api.add_url_rule("/v1/api-keys/<int:key_id>/rotate", view_func=key_controller.rotate_api_key,
                 methods=["POST"])
api.add_url_rule("/v1/tenants", view_func=tenant_controller.create_tenant, methods=["POST"])
api.add_url_rule("/v1/tenants", view_func=tenant_controller.list_tenants, methods=["GET"])
api.add_url_rule("/v1/tenants/<tenant_ref>", view_func=tenant_controller.get_tenant, methods=["GET"])
api.add_url_rule("/v1/tenants/<tenant_ref>", view_func=tenant_controller.update_tenant,
                 methods=["PATCH"])
api.add_url_rule("/v1/audit", view_func=audit_controller.list_audit, methods=["GET"])
api.add_url_rule("/v1/uptime/<path:model_id>", view_func=status_controller.uptime, methods=["GET"])
api.add_url_rule("/v1/providers/status", view_func=status_controller.providers_status, methods=["GET"])
api.add_url_rule("/metrics", view_func=metrics_controller.prometheus, methods=["GET"])
api.add_url_rule("/api/metrics", view_func=metrics_controller.summary_json, methods=["GET"])
api.add_url_rule("/v1/admin/reload", view_func=reload_controller.reload_models, methods=["POST"])

# The Anthropic Messages API: its own blueprint, so that its errors leave in Anthropic's envelope.
messages_api = Blueprint("anthropic", __name__, url_prefix=ANTHROPIC_PREFIX)
register_error_handlers(messages_api, anthropic_envelope)
messages_api.before_request(reject_unstorable_url_values)
messages_api.add_url_rule("", view_func=messages_controller.messages, methods=["POST"])
messages_api.add_url_rule("/count_tokens", view_func=messages_controller.count_tokens, methods=["POST"])
