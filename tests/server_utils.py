"""Helpers that run the server for tests: in-process (an app over a fake engine) or as the real
`jaxserve` subprocess on a free port."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Iterator

from sanic import Sanic


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.asynccontextmanager
async def serve_in_process(app: Sanic):
    """Serve `app` on the running event loop; yields its base URL (http://127.0.0.1:PORT)."""
    port = free_port()
    # Sanic's touch-up recompiles its protocol classes once per process; a second in-process app
    # in the same process trips over that, and it is only a speed optimisation.
    app.config.TOUCHUP = False
    server = await app.create_server(host="127.0.0.1", port=port, return_asyncio_server=True,
                                     access_log=False)
    await server.startup()
    await server.before_start()
    await server.after_start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await server.before_stop()
        # Drop idle keep-alive connections (clients' pools) so closing does not wait for them.
        for conn in list(server.connections):
            conn.close_if_idle()
        await server.close()
        await server.after_stop()


def wait_for_health(base_url: str, proc: subprocess.Popen | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before becoming healthy")
        try:
            with urllib.request.urlopen(base_url + "/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{base_url}/health did not answer 200 within {timeout:.0f}s")


@contextlib.contextmanager
def jaxserve_subprocess(*extra_args: str, timeout: float = 600.0, env: dict | None = None) -> Iterator[str]:
    """Start `python -m jaxserve serve ... --port <free>`, wait for /health 200, yield the base URL.

    The server's output goes to a temporary log file, printed if startup fails."""
    port = free_port()
    cmd = [sys.executable, "-m", "jaxserve", "serve", "--host", "127.0.0.1", "--port", str(port), *extra_args]
    log = tempfile.NamedTemporaryFile("w+", prefix="jaxserve-test-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    base_url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_for_health(base_url, proc, timeout)
        except Exception:
            log.flush()
            log.seek(0)
            sys.stderr.write(log.read()[-8000:])
            raise
        yield base_url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        os.unlink(log.name)
