"""Error bodies of the recommendation service, and the OpenAPI document that declares them.

Every error the service sends has one JSON shape, ``ErrorResponse``: ``error`` (a sentence for a person,
naming the field at fault), ``code`` (stable, for programs) and, for request validation, ``detail`` (one
entry per invalid field, ``loc`` the path to it). BentoML answers some errors in its own shapes (a JSON list
for its exceptions, plain text for an unknown route); ``serving.middleware.RequestGuard`` rewrites them into
this one before they leave the process (``normalize_error``). BentoML's own 429 (too many concurrent
requests) and 504 (timeout) are sent by its outer middleware as ``{"error": ...}`` without a ``code``, which
the schema allows.

``document_service`` rewrites BentoML's generated OpenAPI document so that it says what the service really
does: the request and response bodies are pydantic's own JSON schemas (BentoML's conversion drops ``null``
from optional fields), every operation lists the error statuses it can answer with the ``ErrorResponse``
schema, and the API key is a declared security scheme.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Collection, Mapping
from http import HTTPStatus
from typing import Any, Literal

from pydantic import BaseModel, Field

ErrorCode = Literal[
    "invalid_request",
    "unauthorized",
    "not_found",
    "method_not_allowed",
    "payload_too_large",
    "unsupported_media_type",
    "unprocessable",
    "not_ready",
    "internal",
]

STATUS_CODES: dict[int, ErrorCode] = {
    400: "invalid_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "unprocessable",
    503: "not_ready",
}


class FieldError(BaseModel):
    loc: list[str | int] = Field(description="Path to the invalid value, e.g. ['history', 0, 'ts'].")
    msg: str
    type: str = Field(description="pydantic's error type, e.g. 'int_type', 'json_invalid'.")


class ErrorResponse(BaseModel):
    """The body of every 4xx/5xx answer."""

    error: str = Field(
        description="What went wrong, for a person; names the offending field when there is one."
    )
    code: ErrorCode | None = Field(
        None,
        description="Stable kind of error. Absent only on the 429 (too many concurrent requests) and 504 "
        "(timeout) answers of BentoML's outer middleware.",
    )
    detail: list[FieldError] | None = Field(None, description="Request validation: one entry per problem.")


def code_for(status: int) -> ErrorCode:
    if status in STATUS_CODES:
        return STATUS_CODES[status]
    return "internal" if status >= 500 else "invalid_request"


def error_body(status: int, message: str, detail: list[FieldError] | None = None) -> bytes:
    """The JSON bytes of an ``ErrorResponse`` for ``status``."""
    body = ErrorResponse(error=message, code=code_for(status), detail=detail)
    return body.model_dump_json(exclude_none=True).encode()


def _field_errors(raw: object) -> list[FieldError] | None:
    if not isinstance(raw, list):
        return None
    out = []
    for entry in raw:
        if not isinstance(entry, dict):
            continue
        loc = [x if isinstance(x, int) else str(x) for x in entry.get("loc", [])]
        out.append(FieldError(loc=loc, msg=str(entry.get("msg", "")), type=str(entry.get("type", "error"))))
    return out or None


def normalize_error(status: int, body: bytes) -> bytes:
    """Any error body the app produced (BentoML's JSON object or list, plain text, nothing) as an
    ``ErrorResponse``; the message is kept, a pydantic ``detail`` list becomes ``FieldError`` entries."""
    try:
        parsed: Any = json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError):
        parsed = None
        text = body.decode("utf-8", "replace").strip()
    else:
        text = ""
    if isinstance(parsed, list) and len(parsed) == 1 and isinstance(parsed[0], dict):
        parsed = parsed[0]  # BentoML sends its exceptions' 4xx bodies as a one-element list
    detail = None
    if isinstance(parsed, dict):
        if parsed.get("code") in STATUS_CODES.values() or parsed.get("code") == "internal":
            return body  # already ours
        message = parsed.get("error")
        detail = _field_errors(parsed.get("detail"))
        if message is None and isinstance(parsed.get("detail"), str):
            message = parsed["detail"]
        text = str(message) if message is not None else text
    if detail and detail[0].type == "json_invalid":
        text = f"{text}: {detail[0].msg}"
    if not text:
        text = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "error"
    return error_body(status, text, detail)


# -- the OpenAPI document ----------------------------------------------------------------------------------
ERROR_REF = "#/components/schemas/ErrorResponse"
SECURITY_SCHEME = "ApiKeyAuth"


def _error_response(status: int) -> dict[str, Any]:
    phrase = HTTPStatus(status).phrase
    return {"description": phrase, "content": {"application/json": {"schema": {"$ref": ERROR_REF}}}}


def _schema(model: type[BaseModel], mode: Literal["validation", "serialization"], defs: dict) -> dict:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}", mode=mode)
    defs.update(schema.pop("$defs", {}))
    return schema


API_ERRORS = (400, 413, 415, 429, 500, 504)  # 401 added where the key is required
NOT_FOUND_PATHS = ("/user_embedding",)  # routes that answer 404 for an id they do not hold


def document_service(
    spec: Mapping[str, Any],
    apis: Mapping[str, tuple[type[BaseModel], type[BaseModel]]],
    *,
    auth: bool,
    open_paths: Collection[str],
) -> dict[str, Any]:
    """BentoML's OpenAPI ``spec`` made truthful. ``apis``: route -> (request model, response model) of each
    POST endpoint; ``auth``: whether an API key is required (on every route but ``open_paths``)."""
    doc = copy.deepcopy(dict(spec))
    components = doc.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    defs: dict[str, Any] = {}
    schemas["ErrorResponse"] = _schema(ErrorResponse, "serialization", defs)
    for name in ("InvalidArgument", "NotFound", "InternalServerError"):  # BentoML's, never sent as such
        schemas.pop(name, None)
    if auth:
        components["securitySchemes"] = {
            SECURITY_SCHEME: {"type": "apiKey", "in": "header", "name": "X-API-Key"}
        }
    for path, operations in doc.get("paths", {}).items():
        for method, op in operations.items():
            guarded = auth and path not in open_paths
            responses: dict[str, Any] = {str(k): v for k, v in op.get("responses", {}).items()}
            if method == "post" and path in apis:
                request_model, response_model = apis[path]
                op["requestBody"] = {
                    "required": False,
                    "content": {"application/json": {"schema": _schema(request_model, "validation", defs)}},
                }
                responses = {
                    "200": {
                        "description": "Successful Response",
                        "content": {
                            "application/json": {"schema": _schema(response_model, "serialization", defs)}
                        },
                    }
                }
                for status in API_ERRORS:
                    responses[str(status)] = _error_response(status)
            if path.endswith("/readyz"):
                responses["503"] = _error_response(503)
            if path.endswith(NOT_FOUND_PATHS):
                responses["404"] = _error_response(404)
            if guarded:
                responses["401"] = _error_response(401)
                op["security"] = [{SECURITY_SCHEME: []}]
            elif auth:
                op["security"] = []
            op["responses"] = dict(sorted(responses.items()))
    schemas.update(defs)
    return doc
