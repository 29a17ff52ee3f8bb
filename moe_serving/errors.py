"""The one error type of the serving API, shared by servers and clients.

A `ServingError` carries a code named like gRPC's status codes (lower case), so the HTTP status and
the gRPC status are both looked up here and nowhere else.
"""

from __future__ import annotations

# code -> HTTP status. gRPC uses grpc.StatusCode[code.upper()].
HTTP_STATUS = {
    "invalid_argument": 400,
    "unauthenticated": 401,  # no API key, or a wrong one (OpenAI's `invalid_api_key`)
    "permission_denied": 403,  # a valid key that may not do this (an API key on an admin route)
    "not_found": 404,
    "failed_precondition": 409,  # the cluster is busy with another change (scale, rebalance)
    "resource_exhausted": 413,  # a request over a size limit; a full queue is "unavailable" (503)
    "unimplemented": 501,
    "unavailable": 503,
    "internal": 500,
    "cancelled": 499,
}


class ServingError(Exception):
    """A request the server refused or could not serve, with a code clients can branch on.

    Server side: raised by validation and mapped to an HTTP status / gRPC status by the ingress.
    Client side: raised by the Python clients for any non-OK answer (`status` is the HTTP status or
    the gRPC status name).

    `reason`: OpenAI's more specific error code where there is one (`context_length_exceeded`,
    `model_not_found`), what SDKs branch on (litellm raises ContextWindowExceededError for the
    first); the HTTP body's `code` is the reason when set, else `code`.
    """

    def __init__(self, code: str, message: str, status: int | str | None = None, reason: str | None = None):
        if code not in HTTP_STATUS:
            raise ValueError(f"unknown ServingError code {code!r}; one of {sorted(HTTP_STATUS)}")
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status
        self.reason = reason

    @property
    def http_status(self) -> int:
        return HTTP_STATUS[self.code]

    def to_json(self) -> dict:
        """The body of an HTTP error answer (OpenAI's error shape: message, type, param, code)."""
        kind = "invalid_request_error" if self.http_status < 500 else "server_error"
        return {
            "error": {"message": self.message, "type": kind, "param": None, "code": self.reason or self.code}
        }

    def __reduce__(self):  # crosses Ray (deployment -> handle) as itself
        return (type(self), (self.code, self.message, self.status, self.reason))

    def __repr__(self) -> str:
        return f"ServingError({self.code!r}, {self.message!r})"


def invalid(message: str) -> ServingError:
    return ServingError("invalid_argument", message)


def too_large(message: str) -> ServingError:
    return ServingError("resource_exhausted", message)


def context_exceeded(context: int, prompt_tokens: int, max_tokens: int | None) -> ServingError:
    """A 400 for a request past the model's context, in OpenAI's words (vLLM's too), with
    OpenAI's `context_length_exceeded` code. `max_tokens` None: the request did not give one."""
    if max_tokens is None:
        detail = (
            f"However, your messages resulted in {prompt_tokens} tokens. "
            "Please reduce the length of the messages."
        )
    else:
        detail = (
            f"However, you requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the "
            f"messages, {max_tokens} in the completion). Please reduce the length of the messages "
            "or completion."
        )
    return ServingError(
        "invalid_argument",
        f"This model's maximum context length is {context} tokens. {detail}",
        reason="context_length_exceeded",
    )
