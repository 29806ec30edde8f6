"""Typed errors. Every message says what happened and what the user can do about it."""
from __future__ import annotations


class HearthError(Exception):
    """Base class for all hearthlm errors."""

    http_status: int = 500
    code: str = "internal_error"


class InvalidRequestError(HearthError, ValueError):
    """The request is malformed or has out-of-range values (HTTP 400)."""

    http_status = 400
    code = "invalid_request"

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class ContextLengthError(InvalidRequestError):
    """Prompt plus requested tokens do not fit into the model's context window."""

    code = "context_length_exceeded"

    def __init__(self, prompt_tokens: int, max_tokens: int, max_model_len: int):
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.max_model_len = max_model_len
        super().__init__(
            f"prompt is {prompt_tokens:,} tokens and max_tokens is {max_tokens:,} "
            f"({prompt_tokens + max_tokens:,} in all) but max_model_len is {max_model_len:,}: "
            "shorten the prompt, lower max_tokens, raise --max-model-len, or pass truncate='left' "
            "to drop the oldest tokens (the system prompt is kept)",
            param="prompt",
        )


class ModelNotFoundError(HearthError, FileNotFoundError):
    http_status = 404
    code = "model_not_found"


class ModelLoadError(HearthError):
    """A model file exists but cannot be read (corrupt, truncated, unsupported)."""

    code = "model_load_error"


class UnsupportedModelError(ModelLoadError):
    code = "unsupported_model"


class OutOfMemoryError(HearthError, MemoryError):
    """The planned memory does not fit the device."""

    http_status = 507
    code = "out_of_memory"


class CapacityError(InvalidRequestError):
    """A request needs more KV cache than the pool can ever provide."""

    code = "kv_capacity_exceeded"


class QueueFullError(HearthError):
    http_status = 429
    code = "queue_full"


class UnavailableError(HearthError):
    """The server cannot take the request right now (loading a model, shutting down): retry later (HTTP 503)."""

    http_status = 503
    code = "service_unavailable"

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


class EngineDeadError(HearthError):
    http_status = 503
    code = "engine_dead"


class BodyTooLargeError(HearthError):
    """The request body is over --max-body-size (HTTP 413)."""

    http_status = 413
    code = "request_too_large"


class ForbiddenError(HearthError):
    """Refused Host, Origin or admin action (HTTP 403)."""

    http_status = 403
    code = "forbidden"


class UnauthorizedError(HearthError):
    """Missing or wrong API key (HTTP 401)."""

    http_status = 401
    code = "invalid_api_key"


class UnsupportedMediaTypeError(HearthError):
    """A body that is not application/json (HTTP 415)."""

    http_status = 415
    code = "unsupported_media_type"


class UnsafeBindError(HearthError):
    """A non-loopback bind without an API key."""

    code = "unsafe_bind"
