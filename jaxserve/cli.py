"""`jaxserve [serve] [MODEL] [flags]` serves the OpenAI-compatible API; `jaxserve bench ...` benchmarks.

The HTTP server runs in this single process with the engine: Sanic's event loop handles requests while
the engine steps in its own thread, so the loop never waits on a model step. The server listens at
once (so /health can say 503 while loading) and loads the engine in a worker thread. On a multi-host run
only host 0 serves; `--host-index I > 0` joins jax.distributed and replays host 0's steps (multihost.py).
"""
from __future__ import annotations

import asyncio
import logging
import sys

logger = logging.getLogger("jaxserve")

_USAGE = """usage: jaxserve [serve] [MODEL] [flags]      serve the OpenAI-compatible API (see: jaxserve serve --help)
       jaxserve bench [flags]                 benchmark a running server (see: jaxserve bench --help)
"""


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("jaxserve").setLevel(level.upper())


def _public_url(server_config) -> str:
    scheme = "https" if server_config.ssl_certfile else "http"
    host = server_config.host if server_config.host not in ("0.0.0.0", "::") else "127.0.0.1"
    return f"{scheme}://{host}:{server_config.port}{server_config.root_path}"


def run_server(engine_config, server_config) -> int:
    """Serve until interrupted; returns the process exit code."""
    from jaxserve.server.app import attach_engine, build_app

    app = build_app(None, server_config, name="jaxserve")
    failure: list[BaseException] = []

    async def load_engine(app) -> None:
        from jaxserve.data_parallel import build_async_engine
        try:
            loop = asyncio.get_running_loop()
            # Loading and compiling take a while; a worker thread keeps the loop answering /health.
            engine = await loop.run_in_executor(None, build_async_engine, engine_config)
            await engine.start()
            attach_engine(app, engine)
        except Exception as exc:
            logger.exception("Failed to start the engine")
            failure.append(exc)
            app.stop()
            return
        url = _public_url(server_config)
        logger.info("jaxserve is ready: serving %s at %s/v1 (health: %s/health)",
                    engine.model_name, url, url)

    async def stop_engine(app) -> None:
        engine = app.ctx.state.engine
        for name in ("shutdown", "stop", "close"):
            method = getattr(engine, name, None)
            if method is not None:
                result = method()
                if asyncio.iscoroutine(result):
                    await result
                break

    app.after_server_start(lambda app: app.add_task(load_engine(app)))
    app.before_server_stop(stop_engine)
    ssl = None
    if server_config.ssl_certfile or server_config.ssl_keyfile:
        ssl = {"cert": server_config.ssl_certfile, "key": server_config.ssl_keyfile}
    logger.info("Starting jaxserve on %s (loading the model; /health answers 503 until ready)",
                _public_url(server_config))
    # The engine thread and the event loop share the GIL. When a step's outputs reach the loop, its streaming
    # work held the GIL for Python's default 5 ms slices while the engine thread waited to launch the next
    # step: a 32-sequence launch took 12-14 ms served against 5 offline, 8.5 ms with 0.5 ms slices.
    sys.setswitchinterval(0.0005)
    app.run(host=server_config.host, port=server_config.port, ssl=ssl, single_process=True,
            motd=False, access_log=server_config.log_level == "debug")
    return 1 if failure else 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        from jaxserve.bench import main as bench_main
        return bench_main(argv[1:]) or 0
    if argv and argv[0] in ("-h", "--help") and len(argv) == 1:
        sys.stdout.write(_USAGE + "\n")
    if argv and argv[0] == "serve":
        argv = argv[1:]
    from jaxserve.server.args import build_parser, configs_from_args

    args = build_parser().parse_args(argv)
    engine_config, server_config = configs_from_args(args)
    _configure_logging(server_config.log_level)
    if engine_config.num_hosts > 1:
        from jaxserve.multihost import join_hosts, run_follower

        try:
            join_hosts(engine_config)  # before anything starts JAX's backend
        except ValueError as exc:
            raise SystemExit(f"error: {exc}")
        if engine_config.host_index > 0:  # no HTTP server: load the shards and replay host 0's steps
            return run_follower(engine_config)
    return run_server(engine_config, server_config)
