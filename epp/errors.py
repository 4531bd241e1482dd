"""Rejections the picker answers itself (as an Envoy ImmediateResponse), with an OpenAI-style JSON body."""

from __future__ import annotations

import orjson


class Rejection(Exception):
    """A request we refuse: HTTP `status`, a machine-readable `code` and a message the user can act on.

    Codes are stable and documented: bad_request, model_required, model_not_found, body_too_large,
    no_endpoints, subset_empty, saturated_shed, internal_error; flow control adds queue_full (429),
    queue_timeout and shutting_down (503); the wire's limits add body_timeout (408), buffers_full and
    too_many_streams (503).
    """

    __slots__ = ("code", "message", "status")

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    @property
    def error_type(self) -> str:
        if self.status == 429:
            return "rate_limit_error"
        if self.status >= 500:
            return "server_error" if self.status == 500 else "service_unavailable"
        return "invalid_request_error" if self.status != 404 else "not_found_error"

    def body(self) -> bytes:
        """OpenAI clients read `error.message`, `error.type` and `error.code`."""
        return orjson.dumps(
            {"error": {"message": self.message, "type": self.error_type, "param": None, "code": self.code}}
        )


def bad_request(message: str, code: str = "bad_request") -> Rejection:
    return Rejection(400, code, message)
