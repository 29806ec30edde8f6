"""Errors -> (status, code, message) and each dialect's error body."""
from __future__ import annotations

import json
import logging
from typing import Any

from fastapi.responses import JSONResponse
from pydantic import ValidationError

from ..errors import HearthError, InvalidRequestError

log = logging.getLogger("hearthlm.serve")


def dialect_of(path: str) -> str:
    return "openai" if path.startswith("/v1/") else "ollama" if path.startswith("/api/") else "tgi"


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """Readable message and first offending parameter of pydantic/FastAPI validation errors."""
    parts, param = [], None
    for e in errors[:5]:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        if e.get("type") == "json_invalid":
            return f"request body is not valid JSON: {e.get('ctx', {}).get('error', e.get('msg'))}", None
        where = ".".join(loc)
        param = param or where or None
        if not where and e.get("type") in ("model_attributes_type", "model_type", "dict_type"):
            parts.append("request body must be a JSON object")
            continue
        parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
    return "; ".join(parts), param


def as_hearth_error(exc: BaseException) -> HearthError:
    if isinstance(exc, HearthError):
        return exc
    if isinstance(exc, ValidationError):
        msg, param = validation_message(exc.errors(include_input=False))
        return InvalidRequestError(msg, param=param)
    if isinstance(exc, json.JSONDecodeError):
        return InvalidRequestError(f"request body is not valid JSON: {exc}")
    err = HearthError(f"internal server error ({type(exc).__name__}: {exc})")
    return err


def openai_type(status: int) -> str:
    return {404: "not_found_error", 429: "rate_limit_error", 503: "service_unavailable"}.get(
        status, "invalid_request_error" if status < 500 else "server_error")


def error_body(dialect: str, err: HearthError) -> dict[str, Any]:
    message, status = str(err), err.http_status
    if dialect == "openai":
        return {"error": {"message": message, "type": openai_type(status), "param": getattr(err, "param", None),
                          "code": err.code}}
    if dialect == "ollama":
        return {"error": message}
    return {"error": message, "error_type": "validation" if status < 500 else err.code}


def error_response(dialect: str, exc: BaseException) -> JSONResponse:
    err = as_hearth_error(exc)
    if err.http_status >= 500 and err.http_status != 503:  # 503: loading or draining, expected and retried
        log.error("%s error: %s", dialect, err, exc_info=exc if not isinstance(exc, HearthError) else None)
    headers = {"Retry-After": str(getattr(err, "retry_after", 1))} if err.http_status in (429, 503) else None
    return JSONResponse(error_body(dialect, err), status_code=err.http_status, headers=headers)
