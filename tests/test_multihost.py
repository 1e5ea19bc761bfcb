"""Multi-host plumbing without JAX processes: flags and their environment variables, validation, and the
leader/follower protocol over a socket pair with stand-in runners. (Two real processes on localhost:
tests/test_tensor_parallel.py::test_two_host_serving_matches_one_process.)"""
import socket
import threading
from types import SimpleNamespace

import numpy as np
import pytest

from jaxserve.config import EngineConfig
from jaxserve.multihost import Follower, LeaderRunner, validate_multihost
from jaxserve.server.args import build_parser, configs_from_args


def engine_config(argv, monkeypatch, **env):
    for name in ("JAXSERVE_COORDINATOR", "JAXSERVE_NUM_HOSTS", "JAXSERVE_HOST_INDEX"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return configs_from_args(build_parser().parse_args(argv))[0]


def test_multihost_flags_and_environment(monkeypatch):
    config = engine_config(["--distributed-coordinator", "10.0.0.1:1234", "--num-hosts", "4", "--host-index", "2",
                            "--tensor-parallel-size", "16"], monkeypatch)
    assert (config.distributed_coordinator, config.num_hosts, config.host_index) == ("10.0.0.1:1234", 4, 2)
    env = {"JAXSERVE_COORDINATOR": "h0:99", "JAXSERVE_NUM_HOSTS": "2", "JAXSERVE_HOST_INDEX": "1"}
    config = engine_config([], monkeypatch, **env)
    assert (config.distributed_coordinator, config.num_hosts, config.host_index) == ("h0:99", 2, 1)
    assert engine_config(["--host-index", "0"], monkeypatch, **env).host_index == 0  # a flag beats the variable
    assert engine_config([], monkeypatch) == EngineConfig()
    with pytest.raises(SystemExit):
        engine_config([], monkeypatch, JAXSERVE_NUM_HOSTS="two")


def test_distributed_flags_are_grouped_and_the_replica_rank_is_not_a_flag():
    help_text = build_parser().format_help()
    group = help_text[help_text.index("distributed:"):]
    for flag in ("--tensor-parallel-size", "--data-parallel-size", "--distributed-coordinator", "--num-hosts",
                 "--host-index"):
        assert flag in group
    assert "JAXSERVE_HOST_INDEX" in help_text and "--data-parallel-rank" not in help_text


@pytest.mark.parametrize("changes, message", [
    ({"num_hosts": 2}, "needs distributed_coordinator"),
    ({"num_hosts": 2, "distributed_coordinator": "nohostport"}, "HOST:PORT"),
    ({"num_hosts": 2, "host_index": 2, "distributed_coordinator": "a:1"}, r"host_index must be in \[0, 2\)"),
    ({"num_hosts": 0}, "at least 1"),
    ({"num_hosts": 2, "distributed_coordinator": "a:1", "data_parallel_size": 2}, "not supported across hosts"),
])
def test_bad_multihost_settings_are_clear_errors(changes, message):
    with pytest.raises(ValueError, match=message):
        validate_multihost(EngineConfig(**changes))
    validate_multihost(EngineConfig(num_hosts=2, host_index=1, distributed_coordinator="[::1]:8476"))


class RecordingRunner:
    """Stands in for ModelRunner: records the calls it gets, returns placeholder device outputs."""

    def __init__(self, config="rc"):
        self.model_config, self.config, self.calls = "mc", config, []

    def prepare(self, scheduled):
        self.calls.append(("prepare", scheduled))
        return SimpleNamespace(shape=(16, 2), packed=np.arange(5, dtype=np.int32))

    def execute(self, step):
        self.calls.append(("execute", step.shape, step.packed.tolist()))
        return f"last{len(self.calls)}", f"hidden{len(self.calls)}"

    def sample(self, last_hidden, tensors, flags):
        self.calls.append(("sample", last_hidden[:4], tensors, flags))

    def prompt_logprobs(self, hidden, target_ids, num_logprobs):
        self.calls.append(("prompt_logprobs", hidden[:6], list(target_ids), num_logprobs))

    def precompile(self, shapes, sampler_flags, progress=True):
        self.calls.append(("precompile", list(shapes), list(sampler_flags), progress))
        return 0.0


def pair(follower_config="rc"):
    a, b = socket.socketpair()
    box = {}
    thread = threading.Thread(target=lambda: box.update(follower=_follower(b, follower_config, box)))
    thread.start()
    return a, box, thread


def _follower(sock, config, box):
    try:
        follower = Follower(RecordingRunner(config), sock)
    except ValueError as exc:
        box["error"] = exc
        return None
    follower.run()
    return follower


def test_followers_replay_host_0s_calls_in_order_and_stop():
    sock, box, thread = pair()
    leader = LeaderRunner(RecordingRunner(), [sock])
    assert leader.config == "rc"  # the rest of ModelRunner's interface passes through
    leader.precompile([(2, 2)], ["greedy"])
    step = leader.prepare(["seq"])
    last, hidden = leader.execute(step)
    leader.sample(last, {"temperature": [0.0]}, "greedy")
    leader.prompt_logprobs(hidden, np.array([3, 4]), 2)
    leader.close()
    thread.join(timeout=10)
    replayed = box["follower"].runner.calls
    # The follower never pads a step itself: it gets host 0's, and feeds its own step outputs to the sampler.
    assert [c[0] for c in replayed] == ["precompile", "execute", "sample", "prompt_logprobs"]
    assert replayed[0] == ("precompile", [(2, 2)], ["greedy"], False)
    assert replayed[1] == ("execute", (16, 2), [0, 1, 2, 3, 4])
    assert replayed[2] == ("sample", "last", {"temperature": [0.0]}, "greedy")
    assert replayed[3] == ("prompt_logprobs", "hidden", [3, 4], 2)
    assert box["follower"].calls == 4
    assert [c[0] for c in leader.runner.calls] == ["precompile", "prepare", "execute", "sample", "prompt_logprobs"]


def test_a_follower_whose_flags_differ_refuses_and_host_0_says_so():
    sock, box, thread = pair(follower_config="other")
    with pytest.raises(ValueError, match="host 1's model or engine flags differ"):
        LeaderRunner(RecordingRunner(), [sock])
    thread.join(timeout=10)
    assert "give every host the same model and engine flags" in str(box["error"])


def test_a_follower_stops_when_host_0_goes_away():
    sock, box, thread = pair()
    LeaderRunner(RecordingRunner(), [sock])
    sock.close()  # host 0 died without saying stop
    thread.join(timeout=10)
    assert not thread.is_alive() and box["follower"].calls == 0


def test_host_0_stops_when_a_follower_goes_away():
    """A lost follower would hang (NCCL) or fail (gloo) host 0's next collective: host 0 is told at once."""
    leader_end, follower_end = socket.socketpair()
    hello = threading.Thread(target=lambda: Follower(RecordingRunner(), follower_end))
    hello.start()
    lost = []
    leader = LeaderRunner(RecordingRunner(), [leader_end], on_follower_lost=lost.append)
    hello.join(timeout=10)
    follower_end.close()  # the follower process died
    for _ in range(100):
        if lost:
            break
        threading.Event().wait(0.05)
    assert lost == [1]
    leader.close()


def test_a_clean_stop_is_not_a_lost_follower():
    sock, box, thread = pair()
    lost = []
    leader = LeaderRunner(RecordingRunner(), [sock], on_follower_lost=lost.append)
    leader.close()  # says stop; the follower then closes its end
    thread.join(timeout=10)
    threading.Event().wait(1.5)  # a watchdog pass after the follower's close
    assert lost == [] and box["follower"].calls == 0

