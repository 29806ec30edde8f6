"""/openapi.json with real request bodies: handlers parse their bodies themselves (common.parse), so FastAPI cannot
see them; this module declares each POST/DELETE route's pydantic model, generated from the models at runtime."""
from __future__ import annotations

import importlib
import warnings
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from .. import __version__

REF = "#/components/schemas/{model}"

# (method, path) -> "module:Model" under hearthlm.serve, the model its handler passes to parse(request, Model)
REQUEST_BODIES: dict[tuple[str, str], str] = {
    ("POST", "/v1/completions"): "openai:CompletionRequest",
    ("POST", "/v1/chat/completions"): "openai:ChatRequest",
    ("POST", "/api/generate"): "ollama:GenerateBody",
    ("POST", "/api/chat"): "ollama:ChatBody",
    ("POST", "/api/show"): "ollama:NameBody",
    ("POST", "/api/pull"): "ollama:NameBody",
    ("DELETE", "/api/delete"): "ollama:NameBody",
    ("POST", "/generate"): "tgi:Body",
    ("POST", "/generate_stream"): "tgi:Body",
    ("POST", "/"): "tgi:Body",
    ("POST", "/tokenize"): "app:TokenizeBody",
    ("POST", "/v1/embeddings"): "embeddings:OpenAIEmbeddingRequest",
    ("POST", "/api/embed"): "embeddings:OllamaEmbedBody",
    ("POST", "/api/embeddings"): "embeddings:OllamaEmbeddingsBody",
}


def request_model(ref: str) -> type[BaseModel]:
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(f"hearthlm.serve.{module}"), name)


def build_openapi(app: FastAPI) -> dict[str, Any]:
    with warnings.catch_warnings():  # a route with several methods (GET, HEAD /) repeats its operationId
        warnings.simplefilter("ignore")
        schema = get_openapi(title=app.title, version=__version__, routes=app.routes,
                             description="OpenAI (/v1), Ollama (/api) and TGI (/generate, /info) dialects of hearthlm")
    seen: set[str] = set()
    for path, ops in schema.get("paths", {}).items():
        for method, op in ops.items():
            if op.get("operationId") in seen:
                op["operationId"] = f"{op['operationId']}_{method}"
            seen.add(op.get("operationId", ""))
    models = {ref: request_model(ref) for ref in set(REQUEST_BODIES.values())}
    # one call for all models: pydantic qualifies names that collide across modules (tgi.Body vs ...)
    refs, defs = models_json_schema([(m, "validation") for m in models.values()], ref_template=REF)
    components = schema.setdefault("components", {})
    components.setdefault("schemas", {}).update(defs.get("$defs", {}))
    for (method, path), ref in REQUEST_BODIES.items():
        op = schema.get("paths", {}).get(path, {}).get(method.lower())
        if op is None:
            continue  # no such route (tests/e2e/test_schemathesis.py checks the table against app.routes)
        op["requestBody"] = {"required": True, "content": {
            "application/json": {"schema": refs[(models[ref], "validation")]}}}
    components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer",
                                                "description": "--api-key / HEARTH_API_KEY"}}
    policy = getattr(app.state, "security", None)
    if policy is not None and policy.keys:
        schema["security"] = [{"bearer": []}]
        health = schema.get("paths", {}).get("/health", {}).get("get")
        if health is not None:
            health["security"] = []
    return schema


def install_openapi(app: FastAPI) -> None:
    """Serve build_openapi(app) at /openapi.json (built on first request, then cached)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
