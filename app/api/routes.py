"""URL map of the gateway: every route points at one controller function."""
from __future__ import annotations

from flask import Blueprint

from app.api import controllers as c

api = Blueprint("api", __name__)

api.add_url_rule("/health", view_func=c.health, methods=["GET"])
for prefix in ("/v1", ""):
    api.add_url_rule(f"{prefix}/chat/completions", endpoint=f"chat{prefix}",
                     view_func=c.chat_completions, methods=["POST"])
api.add_url_rule("/v1/models", view_func=c.list_models, methods=["GET", "POST"])
api.add_url_rule("/v1/usage", view_func=c.usage, methods=["GET", "POST"])
api.add_url_rule("/v1/api-keys", view_func=c.create_api_key, methods=["POST"])
api.add_url_rule("/v1/api-keys", view_func=c.list_api_keys, methods=["GET"])
api.add_url_rule("/v1/api-keys/<int:key_id>", view_func=c.revoke_api_key, methods=["DELETE"])
