"""The Sanic application: routes, auth, CORS, body limits and OpenAI-shaped errors.

`build_app(engine, server_config)` may be given `engine=None`: the server then answers /health with
503 (and the API with 503) until `attach_engine(app, engine)` is called once loading has finished.
"""
from __future__ import annotations

import hmac
import importlib.metadata
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from sanic import Request, Sanic, response
from sanic.exceptions import SanicException


from jaxserve.server.chat_template import ChatTemplateRenderer
from jaxserve.server.errors import APIError, bad_request, error_response, from_validation_error, not_found
from jaxserve.server.metrics import CONTENT_TYPE, ServerMetrics
from jaxserve.server.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                      TokenizeRequest)
from jaxserve.server.responses import ModelCard, ModelList
from jaxserve.server.serving_chat import create_chat_completion
from jaxserve.server.serving_common import ServingContext
from jaxserve.server.serving_completions import create_completion
from jaxserve.server.serving_responses import ResponsesRequest, create_response
from jaxserve.server.server_config import ServerConfig

logger = logging.getLogger("jaxserve.server")

_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")

# Paths that stay open when an API key is set.
_OPEN_PATHS = ("/health", "/ping", "/metrics", "/version")


@dataclass
class AppState:
    config: ServerConfig
    engine: Any = None
    serving: ServingContext | None = None
    metrics: ServerMetrics | None = None


def attach_engine(app: Sanic, engine: Any) -> None:
    """Make a loaded engine serve this app's requests (and /health turn 200 once engine.ready)."""
    state: AppState = app.ctx.state
    names = state.config.served_model_names or (engine.model_name,)
    state.metrics = ServerMetrics(lambda: state.engine, names[0])
    state.serving = ServingContext(
        engine=engine, served_model_names=tuple(names),
        renderer=ChatTemplateRenderer(engine.tokenizer, state.config.chat_template),
        metrics=state.metrics, response_role=state.config.response_role,
        enable_auto_tool_choice=state.config.enable_auto_tool_choice,
        tool_call_parser=state.config.tool_call_parser, reasoning_parser=state.config.reasoning_parser,
        return_tokens_as_token_ids=state.config.return_tokens_as_token_ids,
        enable_prompt_tokens_details=state.config.enable_prompt_tokens_details,
        log_requests=not state.config.disable_log_requests, max_log_len=state.config.max_log_len)
    state.engine = engine


def _serving(request: Request) -> ServingContext:
    state: AppState = request.app.ctx.state
    if state.serving is None or not getattr(state.engine, "ready", False):
        raise APIError("The model is still loading; retry when /health answers 200.", 503)
    return state.serving


def _parse(request: Request, model_cls):
    try:
        data = json.loads(request.body or b"")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_request(f"The request body is not valid JSON: {exc}")
    if not isinstance(data, dict):
        raise bad_request("The request body must be a JSON object.")
    if _SURROGATE_ESCAPE.search(request.body):  # paired halves are fine; a lone one cannot be encoded
        try:
            json.dumps(data, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise bad_request("The request body has a lone UTF-16 surrogate escape (\\ud800-\\udfff).")
    try:
        parsed = model_cls.model_validate(data)
    except ValidationError as exc:
        raise from_validation_error(exc)
    if parsed.model_extra:
        logger.warning("Ignoring unknown request fields: %s", sorted(parsed.model_extra))
    return parsed


# --- handlers ----------------------------------------------------------------------------------------
async def health(request: Request):
    state: AppState = request.app.ctx.state
    error = getattr(state.engine, "error", None)
    if error is not None:  # a dead engine fails every request: load balancers must stop sending here
        return error_response(APIError(f"The engine stopped after an error: {error!r}", 503))
    if state.engine is not None and getattr(state.engine, "ready", False):
        return response.raw(b"", status=200, content_type="text/plain")
    return error_response(APIError("The model is still loading.", 503))


async def ping(request: Request):
    """vLLM's /ping (GET or POST, as SageMaker probes it): the same answer as /health."""
    return await health(request)


async def version(request: Request):
    return response.json({"version": importlib.metadata.version("jaxserve")})


def _model_cards(ctx: ServingContext) -> list[ModelCard]:
    root = getattr(getattr(ctx.engine, "engine_config", None), "model", None) or ctx.engine.model_name
    return [ModelCard(id=name, root=root, max_model_len=ctx.engine.max_model_len)
            for name in ctx.served_model_names]


async def list_models(request: Request):
    return response.json(ModelList(data=_model_cards(_serving(request))).model_dump())


async def get_model(request: Request, model_id: str):
    for card in _model_cards(_serving(request)):
        if card.id == model_id:
            return response.json(card.model_dump())
    raise not_found(f"The model `{model_id}` does not exist.", "model")


async def completions(request: Request):
    ctx = _serving(request)
    return await create_completion(ctx, _parse(request, CompletionRequest), request)


async def chat_completions(request: Request):
    ctx = _serving(request)
    return await create_chat_completion(ctx, _parse(request, ChatCompletionRequest), request)


async def create_responses(request: Request):
    ctx = _serving(request)
    return await create_response(ctx, _parse(request, ResponsesRequest), request)


async def tokenize(request: Request):
    ctx = _serving(request)
    body: TokenizeRequest = _parse(request, TokenizeRequest)
    ctx.check_model(body.model)
    if body.messages is not None:
        text = ctx.renderer.render(body.messages, chat_template=body.chat_template,
                                   chat_template_kwargs=body.chat_template_kwargs,
                                   add_generation_prompt=body.add_generation_prompt,
                                   continue_final_message=body.continue_final_message, tools=body.tools)
        add_special = bool(body.add_special_tokens)
    else:
        text = body.prompt
        add_special = True if body.add_special_tokens is None else body.add_special_tokens
    tokens = ctx.tokenizer.encode(text, add_special_tokens=add_special)
    token_strs = ctx.tokenizer.convert_ids_to_tokens(tokens) if body.return_token_strs else None
    return response.json({"count": len(tokens), "max_model_len": ctx.engine.max_model_len, "tokens": tokens,
                          "token_strs": token_strs})


async def detokenize(request: Request):
    ctx = _serving(request)
    body: DetokenizeRequest = _parse(request, DetokenizeRequest)
    ctx.check_model(body.model)
    vocab = ctx.engine.model_config.vocab_size
    if any(not 0 <= t < vocab for t in body.tokens):
        raise bad_request(f"tokens must be in [0, {vocab}).", "tokens")
    return response.json({"prompt": ctx.tokenizer.decode(body.tokens)})


async def metrics(request: Request):
    state: AppState = request.app.ctx.state
    body = state.metrics.render() if state.metrics is not None else b""
    return response.raw(body, content_type=CONTENT_TYPE)


_ROUTES = (
    ("/health", health, ["GET"]), ("/ping", ping, ["GET", "POST"]), ("/version", version, ["GET"]),
    ("/metrics", metrics, ["GET"]),
    ("/v1/models", list_models, ["GET"]), ("/v1/models/<model_id:path>", get_model, ["GET"]),
    ("/v1/completions", completions, ["POST"]), ("/v1/chat/completions", chat_completions, ["POST"]),
    ("/v1/responses", create_responses, ["POST"]),
    ("/tokenize", tokenize, ["POST"]), ("/detokenize", detokenize, ["POST"]),
)


# --- cross-cutting: auth, CORS, errors ----------------------------------------------------------------
def _strip_root(path: str, root: str) -> str:
    return path[len(root):] or "/" if root and path.startswith(root + "/") else path


def _authorized(request: Request, api_key: str) -> bool:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    # Constant-time comparison, so response timing does not leak how much of a guess was right.
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())


def _cors_headers(config: ServerConfig, origin: str | None) -> dict[str, str]:
    if origin is None:
        return {}
    if "*" in config.allowed_origins:
        allow = "*" if not config.allow_credentials else origin
    elif origin in config.allowed_origins:
        allow = origin
    else:
        return {}
    headers = {"Access-Control-Allow-Origin": allow, "Vary": "Origin"}
    if config.allow_credentials:
        headers["Access-Control-Allow-Credentials"] = "true"
    return headers


def _install_middleware(app: Sanic, config: ServerConfig) -> None:
    @app.on_request
    async def preflight_and_auth(request: Request):
        request.ctx.started = time.monotonic()
        request.ctx.request_id = uuid.uuid4().hex[:12]
        if request.method == "OPTIONS":
            headers = _cors_headers(config, request.headers.get("origin"))
            if headers:
                methods = request.headers.get("access-control-request-method", "")
                headers["Access-Control-Allow-Methods"] = (
                    ", ".join(config.allowed_methods) if "*" not in config.allowed_methods
                    else methods or "GET, POST, OPTIONS")
                headers["Access-Control-Allow-Headers"] = (
                    ", ".join(config.allowed_headers) if "*" not in config.allowed_headers
                    else request.headers.get("access-control-request-headers", "*"))
                headers["Access-Control-Max-Age"] = "600"
            return response.empty(status=204, headers=headers)
        path = _strip_root(request.path, config.root_path)
        if config.api_key and path not in _OPEN_PATHS and not _authorized(request, config.api_key):
            return error_response(APIError("Invalid or missing API key (send 'Authorization: Bearer <key>').",
                                           401, code="invalid_api_key"))

    @app.on_response
    async def add_cors(request: Request, resp):
        if resp is not None:
            for key, value in _cors_headers(config, request.headers.get("origin")).items():
                resp.headers[key] = value


def _install_error_handlers(app: Sanic) -> None:
    @app.exception(APIError)
    async def api_error(request: Request, exc: APIError):
        return error_response(exc)

    @app.exception(SanicException)
    async def sanic_error(request: Request, exc: SanicException):
        status = getattr(exc, "status_code", 500) or 500
        if status == 413:
            message = "The request body is too large."
        elif status == 404:
            message = f"Not found: {request.path if request else ''}"
        else:
            message = str(exc) or "Bad request."
        return error_response(APIError(message, status))

    @app.exception(Exception)
    async def internal_error(request: Request, exc: Exception):
        request_id = getattr(getattr(request, "ctx", None), "request_id", "?")
        logger.exception("Internal error in request %s", request_id)
        return error_response(APIError(f"Internal server error (request {request_id}).", 500))


def build_app(engine: Any, server_config: ServerConfig, name: str | None = None) -> Sanic:
    app = Sanic(name or f"jaxserve_{uuid.uuid4().hex[:8]}")
    app.config.REQUEST_MAX_SIZE = server_config.max_request_bytes
    app.config.RESPONSE_TIMEOUT = 24 * 3600  # long generations are normal
    app.config.REQUEST_TIMEOUT = 120
    app.config.GRACEFUL_SHUTDOWN_TIMEOUT = server_config.graceful_shutdown_timeout
    app.config.NOISY_EXCEPTIONS = False
    app.ctx.state = AppState(config=server_config)
    prefixes = [""] + ([server_config.root_path] if server_config.root_path else [])
    for prefix in prefixes:
        for path, handler, methods in _ROUTES:
            app.add_route(handler, prefix + path, methods=methods + ["OPTIONS"],
                          name=f"{handler.__name__}{'_root' if prefix else ''}")
    _install_middleware(app, server_config)
    _install_error_handlers(app)
    if engine is not None:
        attach_engine(app, engine)
    return app
