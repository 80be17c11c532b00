"""HTTP errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

Every error a client can cause maps to a 4xx (or 503 while shutting down) with a message that
names the field at fault; 500 is reserved for bugs.
"""

from __future__ import annotations

import math
from typing import Any


class APIError(Exception):
    """An error response: status, OpenAI error ``type``, the ``param`` at fault, a ``code``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """400: a bad parameter (``param`` names it)."""
    return APIError(400, message, param=param, code=code)


def not_supported(param: str, what: str | None = None) -> APIError:
    """400 for a field this server does not implement."""
    return APIError(400, f"{what or param} is not supported by this server", param=param, code="unsupported_parameter")


def unauthorized(message: str = "invalid or missing API key (send 'Authorization: Bearer <key>')") -> APIError:
    return APIError(401, message, type="authentication_error", code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"})


def model_not_found(model: str) -> APIError:
    return APIError(404, f"the model {model!r} does not exist; GET /v1/models lists the served models",
                    type="invalid_request_error", param="model", code="model_not_found")


def too_large(message: str, param: str | None = None, code: str = "request_too_large") -> APIError:
    return APIError(413, message, param=param, code=code)


def overloaded(status: int, message: str, retry_after: float) -> APIError:
    """429 (queue full) or 503 (shutting down), with a ``Retry-After`` header in whole seconds."""
    kind = "rate_limit_error" if status == 429 else "service_unavailable"
    code = "queue_full" if status == 429 else "unavailable"
    return APIError(status, message, type=kind, code=code,
                    headers={"Retry-After": str(max(1, math.ceil(retry_after)))})


def internal(message: str = "internal server error") -> APIError:
    return APIError(500, message, type="server_error", code="internal_error")


def loc_to_param(loc: tuple[Any, ...] | list[Any]) -> str:
    """``("processors", 0, "top_k", "k")`` -> ``processors[0].top_k.k``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out
