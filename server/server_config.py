"""The HTTP server's own settings (the engine's live in `jaxserve.config.EngineConfig`)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    served_model_names: tuple[str, ...] = ()  # empty = the engine's model name
    chat_template: str | None = None  # Jinja text (a file given on the CLI is read by then)
    response_role: str = "assistant"
    allowed_origins: tuple[str, ...] = ("*",)
    allowed_methods: tuple[str, ...] = ("*",)
    allowed_headers: tuple[str, ...] = ("*",)
    allow_credentials: bool = False
    ssl_keyfile: str | None = None
    ssl_certfile: str | None = None
    root_path: str = ""
    log_level: str = "info"
    disable_log_requests: bool = False
    max_log_len: int | None = None
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None  # server/reasoning.py: deepseek_r1 | qwen3
    return_tokens_as_token_ids: bool = False
    enable_prompt_tokens_details: bool = False  # usage.prompt_tokens_details.cached_tokens
    max_request_bytes: int = 16 * 1024 * 1024
    # Seconds a graceful shutdown waits for open requests.
    graceful_shutdown_timeout: float = 5.0
