"""Multi-host serving: host 0 serves HTTP and schedules; every other host replays host 0's model calls.

A jitted step over a mesh that spans several processes runs only when every process calls it with the same
inputs in the same order (multi-controller JAX). Host 0's engine reaches its runner through `LeaderRunner`,
which first sends each device call (the padded step, the sampling tensors, ...) to every follower and then
makes it itself; a `Follower` receives each call and makes it on its own runner, so all hosts run the same
compiled step and sampler on their shards in lockstep until host 0 says "stop" (or its connection drops).

The calls travel over a TCP side channel, not `multihost_utils.broadcast_one_to_all`: every broadcast is a
collective jitted computation (~10 ms over gloo on this CPU, and one compile per payload shape), while a
step's inputs are a few KB of numpy that a socket carries in microseconds. One broadcast at start-up carries
the channel's port and a random token that followers present when they connect. Followers trust host 0 as
jax.distributed does (messages are pickles): keep the hosts' network private.
"""
from __future__ import annotations

import atexit
import hmac
import logging
import os
import pickle
import secrets
import select
import socket
import struct
import threading

import numpy as np

logger = logging.getLogger(__name__)

_FRAME = struct.Struct("!Q")  # payload length before each pickled message
_CONNECT_TIMEOUT_S = 300.0


def coordinator_host(coordinator: str) -> str:
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"distributed_coordinator must be HOST:PORT, got {coordinator!r}")
    return host.strip("[]")  # [::1]:1234


def validate_multihost(config) -> None:
    if config.num_hosts < 1:
        raise ValueError(f"num_hosts must be at least 1, got {config.num_hosts}")
    if not 0 <= config.host_index < config.num_hosts:
        raise ValueError(f"host_index must be in [0, {config.num_hosts}), got {config.host_index}")
    if config.num_hosts > 1:
        if not config.distributed_coordinator:
            raise ValueError("num_hosts > 1 needs distributed_coordinator HOST:PORT (host 0's address)")
        coordinator_host(config.distributed_coordinator)
        if config.data_parallel_size != 1:
            raise ValueError("data_parallel_size > 1 is not supported across hosts; use tensor_parallel_size")


def join_hosts(config) -> bool:
    """Joins jax.distributed when config.num_hosts > 1 (once per process; before JAX starts its backend).
    Returns whether this is a multi-host run."""
    validate_multihost(config)
    if config.num_hosts == 1:
        return False
    import jax

    from jaxserve.models.sharding import initialize_multihost

    if not jax.distributed.is_initialized():
        initialize_multihost(config.distributed_coordinator, config.num_hosts, config.host_index)
    if (jax.process_count(), jax.process_index()) != (config.num_hosts, config.host_index):
        raise ValueError(f"jax.distributed runs {jax.process_count()} processes with this one as "
                         f"{jax.process_index()}, but num_hosts={config.num_hosts}, host_index={config.host_index}")
    return True


def check_mesh_spans_hosts(mesh, num_hosts: int) -> None:
    """Every host must own devices of the mesh, or it would have no shard to run the step on."""
    hosts = {d.process_index for d in mesh.devices.flat}
    if len(hosts) != num_hosts:
        raise ValueError(f"the {mesh.size}-device mesh covers {len(hosts)} of {num_hosts} hosts; with several "
                         "hosts set tensor_parallel_size to the devices of all hosts together")


def agree_on_minimum(value: int) -> int:
    """The smallest of every host's `value` (a collective: all hosts call it at the same point)."""
    from jax.experimental import multihost_utils

    return int(np.min(multihost_utils.process_allgather(np.int32(value))))


# ---- the side channel -------------------------------------------------------------------------------
def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise ConnectionError("the side channel closed")
        got += k
    return bytes(buf)


def _recv(sock: socket.socket):
    (size,) = _FRAME.unpack(_recv_exact(sock, _FRAME.size))
    return pickle.loads(_recv_exact(sock, size))


def open_leader_channel(num_hosts: int) -> list[socket.socket]:
    """Host 0: listen, broadcast (port, token), accept one authenticated connection per follower."""
    from jax.experimental import multihost_utils

    server = socket.create_server(("", 0))  # all interfaces: followers on other machines must reach it
    token = secrets.token_bytes(8)
    header = np.concatenate([[server.getsockname()[1]], np.frombuffer(token, np.int32)]).astype(np.int32)
    multihost_utils.broadcast_one_to_all(header)
    server.settimeout(_CONNECT_TIMEOUT_S)
    followers: dict[int, socket.socket] = {}
    try:
        while len(followers) < num_hosts - 1:
            conn, addr = server.accept()
            conn.settimeout(10.0)
            try:
                hello = _recv_exact(conn, 12)  # token, then the follower's host index
            except (OSError, ConnectionError):
                conn.close()
                continue
            index = int.from_bytes(hello[8:], "big")
            if not hmac.compare_digest(hello[:8], token) or not 0 < index < num_hosts or index in followers:
                logger.warning("rejected a side-channel connection from %s", addr)
                conn.close()
                continue
            conn.settimeout(None)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            followers[index] = conn
    finally:
        server.close()
    return [followers[i] for i in sorted(followers)]


def open_follower_channel(coordinator: str, host_index: int) -> socket.socket:
    """A follower: receive host 0's (port, token) broadcast and connect to it."""
    from jax.experimental import multihost_utils

    header = np.asarray(multihost_utils.broadcast_one_to_all(np.zeros(3, np.int32)), np.int32)
    sock = socket.create_connection((coordinator_host(coordinator), int(header[0])), timeout=_CONNECT_TIMEOUT_S)
    sock.sendall(header[1:].tobytes() + host_index.to_bytes(4, "big"))
    sock.settimeout(None)  # an idle server sends nothing for as long as it likes
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


# ---- the two roles ----------------------------------------------------------------------------------
class LeaderRunner:
    """Host 0's runner: ModelRunner's interface; each device call goes to the followers, then runs here."""

    def __init__(self, runner, followers: list[socket.socket], on_follower_lost=None):
        self.runner = runner
        self._followers = followers
        self._closed = False
        atexit.register(self.close)  # runs before jax.distributed's own atexit shutdown (registered earlier)
        # Different flags on a follower would compile different steps and hang the first collective; each
        # follower compares its model and runner config (page count, buckets, dtype, ...) with these.
        self._broadcast("hello", runner.model_config, runner.config)
        for index, sock in enumerate(followers, start=1):
            if _recv_exact(sock, 1) != b"\x01":
                raise ValueError(f"host {index}'s model or engine flags differ from host 0's; give every host "
                                 "the same model and engine flags")
        self._on_follower_lost = on_follower_lost or _exit_for_restart
        threading.Thread(target=self._watch_followers, name="jaxserve-followers", daemon=True).start()

    def _watch_followers(self) -> None:
        """Followers send nothing after the hello, so a readable socket means one has gone. No step can run
        without it (over NCCL the next collective would hang; over gloo it fails), so host 0 stops too."""
        while not self._closed:
            try:
                ready, _, _ = select.select(self._followers, [], [], 1.0)
            except (OSError, ValueError):  # closed under us: host 0 is shutting down
                return
            if ready and not self._closed and ready[0].fileno() != -1:
                self._on_follower_lost(self._followers.index(ready[0]) + 1)
                return

    def __getattr__(self, name):  # config, mesh, model_config, kv_cache, params, ...
        return getattr(self.runner, name)

    def _broadcast(self, *message) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        frame = _FRAME.pack(len(data)) + data
        for sock in self._followers:
            sock.sendall(frame)

    def prepare(self, scheduled, previous_rows=None):
        # host-side padding only: followers get its result in execute; the engine keeps one step at a time
        # across hosts, so no step reads one in flight
        if previous_rows:
            raise ValueError("a multi-host step cannot read the tokens of a step in flight")
        return self.runner.prepare(scheduled)

    def execute(self, step, previous_tokens=None):
        if getattr(step, "reads_previous", False):
            raise ValueError("a multi-host step cannot read the tokens of a step in flight")
        self._broadcast("execute", step)
        return self.runner.execute(step)

    def sample(self, last_hidden, tensors, flags):
        self._broadcast("sample", tensors, flags)
        return self.runner.sample(last_hidden, tensors, flags)

    def prompt_logprobs(self, hidden, target_ids, num_logprobs: int):
        self._broadcast("prompt_logprobs", np.asarray(target_ids), num_logprobs)
        return self.runner.prompt_logprobs(hidden, target_ids, num_logprobs)

    def precompile(self, shapes, sampler_flags, progress: bool = True) -> float:
        self._broadcast("precompile", list(shapes), list(sampler_flags))
        return self.runner.precompile(shapes, sampler_flags, progress)

    def close(self) -> None:
        """Tells the followers to stop (idempotent; also at exit)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._broadcast("stop")
        except OSError:
            pass  # a follower already gone
        for sock in self._followers:
            sock.close()


def _exit_for_restart(host_index: int) -> None:
    logger.critical("host %d left (its side channel closed); a multi-host engine cannot run without it: host 0 "
                    "exits so that every host can be restarted", host_index)
    logging.shutdown()
    os._exit(1)


class Follower:
    """A follower host's side: replays host 0's calls on the local runner until told to stop."""

    def __init__(self, runner, sock: socket.socket):
        self.runner = runner
        self.sock = sock
        self.calls = 0
        _, model_config, runner_config = _recv(sock)  # host 0's "hello"
        same = (model_config, runner_config) == (runner.model_config, runner.config)
        sock.sendall(b"\x01" if same else b"\x00")
        if not same:
            raise ValueError(f"host 0 runs {model_config} with {runner_config}, this host {runner.model_config} "
                             f"with {runner.config}; give every host the same model and engine flags")

    def run(self) -> None:
        last_hidden = hidden = None  # this host's views of the step outputs the next calls consume
        try:
            while True:
                try:
                    kind, *args = _recv(self.sock)
                except ConnectionError:
                    logger.warning("host 0 closed the side channel without saying stop; stopping")
                    return
                if kind == "stop":
                    return
                if kind == "execute":
                    last_hidden, hidden = self.runner.execute(*args)
                elif kind == "sample":
                    self.runner.sample(last_hidden, *args)
                elif kind == "prompt_logprobs":
                    self.runner.prompt_logprobs(hidden, *args)
                elif kind == "precompile":
                    self.runner.precompile(*args, progress=False)
                else:
                    raise ValueError(f"unknown call from host 0: {kind!r}")
                self.calls += 1
        finally:
            self.sock.close()


def connect_hosts(runner, config):
    """Called by every host right after its runner is built (the same point in each program, since the
    channel's set-up is a collective): host 0 gets a LeaderRunner, the others a Follower to run()."""
    if config.host_index == 0:
        return LeaderRunner(runner, open_leader_channel(config.num_hosts))
    return Follower(runner, open_follower_channel(config.distributed_coordinator, config.host_index))


def run_follower(config) -> int:
    """`jaxserve --host-index I` for I > 0: load the model onto this host's devices, replay host 0's steps."""
    from jaxserve.engine_setup import load_engine_model

    join_hosts(config)
    follower = load_engine_model(config).runner
    logger.info("host %d of %d: following host 0's steps", config.host_index, config.num_hosts)
    follower.run()
    logger.info("host %d: stopped after %d calls from host 0", config.host_index, follower.calls)
    return 0
