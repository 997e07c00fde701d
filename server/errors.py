"""Every error becomes an OpenAI error body: `{"error": {"message", "type", "param", "code"}}`.

`APIError` is what handlers raise; `install_error_handlers(app)` maps it, Starlette's
HTTP errors (404 route, 405 method), FastAPI's validation errors (a 400 here, not 422:
OpenAI clients expect 400) and anything unexpected (500) to that body.
`JSONBody` is the response class of the whole app: it never fails to encode (NaN and
infinities become null, lone surrogates are escaped) so no input can turn into a 500.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("kiln.server")

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def dumps(content: Any) -> str:
    """JSON text of a response body: UTF-8-safe, and non-finite floats as null."""
    try:
        return json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except ValueError:  # NaN or infinity somewhere
        return json.dumps(_finite(content), ensure_ascii=False, separators=(",", ":"))


class JSONBody(JSONResponse):
    def render(self, content: Any) -> bytes:
        text = dumps(content)
        try:
            return text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate from the request: escape everything
            return json.dumps(_finite(content), ensure_ascii=True, separators=(",", ":")).encode("ascii")


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error" if status < 500
                                                                   else "server_error"),
                      "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONBody:
    return JSONBody(error_body(status, message, param, code), status_code=status, headers=headers)


# fields whose type is a union: pydantic reports one error per branch; say what is allowed instead
UNION_FIELDS = {
    "prompt": "a string, a list of strings, a list of token ids, or a list of token-id lists",
    "input": "a string, a list of strings, a list of token ids, or a list of token-id lists",
    "stop": "a string, a list of strings, or null",
}


def _validation_message(exc: RequestValidationError, content_type: str = "") -> tuple[str, str | None]:
    errors = exc.errors()
    # pydantic names union branches in the location ("str", "list[int]"...): keep field names and indexes
    locs = [[str(x) for x in err.get("loc", ()) if x != "body"] for err in errors]
    fields = [[x for x in loc if not any(c in x for c in "[]-") and x not in ("str", "int", "float", "bool")]
              for loc in locs]
    # a union field whose list branch had the right type but broke a bound (17 stop strings): say that,
    # not what the field may be
    bounded = {loc[0] for err, loc, field in zip(errors, locs, fields)
               if len(field) < len(loc) and loc[0] in UNION_FIELDS and not err.get("type", "").endswith("_type")}
    parts, param = [], None
    for err, loc_with_branch, loc in zip(errors, locs, fields):
        if err.get("type") == "json_invalid":
            detail = (err.get("ctx") or {}).get("error", "")
            parts.append(f"the request body is not valid JSON ({detail})" if detail
                         else "the request body is not valid JSON")
            continue
        if not loc and err.get("type") == "missing":
            parts.append("the request body is empty: send a JSON object")
            continue
        if not loc and err.get("type") in ("model_attributes_type", "dict_type"):
            if content_type and "json" not in content_type:  # FastAPI reads JSON only when the header says so
                parts.append("the request body must be a JSON object sent with Content-Type: application/json "
                             f"(got {content_type!r})")
            else:
                parts.append("the request body must be a JSON object")
            continue
        if param is None and loc:
            param = loc[0]
        if loc and loc[0] in UNION_FIELDS and len(loc) < len(loc_with_branch) and err.get("type") != "missing":
            if loc[0] not in bounded:
                parts.append(f"{loc[0]} must be {UNION_FIELDS[loc[0]]}")
                continue
            if err.get("type", "").endswith("_type"):
                continue  # a branch of the wrong type
        where = ".".join(loc)
        parts.append(f"{where}: {err.get('msg', 'invalid')}" if where else err.get("msg", "invalid"))
    unique = list(dict.fromkeys(parts))
    if len(unique) > 5:
        unique = unique[:5] + [f"... and {len(unique) - 5} more"]
    return "invalid request: " + "; ".join(unique), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONBody:
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONBody:
        message, param = _validation_message(exc, request.headers.get("content-type", ""))
        return error_response(400, message, param, "invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONBody:
        status = exc.status_code
        if status == 404:
            message = f"no route {request.method} {request.url.path}; see /openapi.json for the API"
        elif status == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        code = "request_too_large" if status == 413 else None
        return error_response(status, message, code=code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONBody:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal server error ({type(exc).__name__}); this is a bug in Kiln")
