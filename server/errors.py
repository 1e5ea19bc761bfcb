"""OpenAI-style error objects: `{"error": {"message", "type", "param", "code"}}` with an HTTP status."""
from __future__ import annotations

from http import HTTPStatus

from pydantic import ValidationError
from sanic import response

# OpenAI's error `type` for each status the server answers with.
_TYPE_FOR_STATUS = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    405: "MethodNotAllowed",
    413: "RequestTooLargeError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


class APIError(Exception):
    """Raised anywhere in request handling; the app turns it into an OpenAI error response."""

    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 code: str | int | None = None, err_type: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code if code is not None else status
        self.err_type = err_type or _TYPE_FOR_STATUS.get(status, HTTPStatus(status).phrase)

    def to_dict(self) -> dict:
        return {"error": {"message": self.message, "type": self.err_type,
                          "param": self.param, "code": self.code}}


class ParamError(ValueError):
    """A request model validator's ValueError naming the parameter at fault (pydantic keeps the exception in the
    error's ctx, so a check across fields still reports its `param`)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(message, 400, param)


def not_found(message: str, param: str | None = None) -> APIError:
    return APIError(message, 404, param)


def error_response(error: APIError) -> response.HTTPResponse:
    return response.json(error.to_dict(), status=error.status)


def from_validation_error(exc: ValidationError) -> APIError:
    """Pydantic's report, reduced to one readable message naming the first offending field."""
    errors = exc.errors(include_url=False)
    parts, param = [], None
    for err in errors:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p is not None)
        param = param or getattr((err.get("ctx") or {}).get("error"), "param", None) or (loc or None)
        # Pydantic's error type is kept as vLLM reports it ("[type=less_than_equal, ...]").
        text = f"{err.get('msg')} [type={err.get('type')}]"
        parts.append(f"{loc}: {text}" if loc else text)
    message = "; ".join(parts) or str(exc)
    return APIError(message, 400, param.split(".")[0] if param else None)
