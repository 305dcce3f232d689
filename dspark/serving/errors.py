"""API errors in OpenAI's body: {"error": {"message", "type", "param", "code"}} (docs/serving.md "Errors").

Client mistakes are 4xx and name the field (`param`, a dotted path such as "messages.0.content"); only a
failure of the server itself is 5xx.
"""

from __future__ import annotations

from dataclasses import dataclass

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 408: "timeout_error", 413: "invalid_request_error",
               429: "rate_limit_error", 503: "service_unavailable_error"}


@dataclass
class APIError(Exception):
    """An HTTP error answered with OpenAI's error body. headers: extra response headers (Retry-After)."""

    status: int
    message: str
    param: str | None = None
    code: str | None = None
    headers: dict | None = None

    def __str__(self) -> str:
        return self.message

    @property
    def type(self) -> str:
        return ERROR_TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
