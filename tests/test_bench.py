"""`jaxserve bench` against a tiny in-process fake OpenAI streaming server with known timings and behaviour."""

from __future__ import annotations

import asyncio
import json
import random
import sys
import threading
from collections import Counter
from dataclasses import dataclass

import pytest

from jaxserve import bench


@dataclass
class Behaviour:
    ttft: float = 0.04  # seconds before the first content chunk
    itl: float = 0.01  # seconds between content chunks
    tokens_per_chunk: int = 1
    honour_ignore_eos: bool = True
    natural_len: int = 3  # tokens produced before "EOS" when ignore_eos is off or not honoured
    fail_every: int = 0  # every k-th request answers 503
    tokenize: bool = True  # serve /tokenize + /detokenize (one token per character)


class FakeOpenAIServer:
    """A minimal HTTP/1.1 server on 127.0.0.1 speaking just enough of the OpenAI streaming API."""

    def __init__(self, behaviour: Behaviour):
        self.behaviour = behaviour
        self.bodies: list[dict] = []
        self.in_flight = self.max_in_flight = self.count = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> "FakeOpenAIServer":
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, "127.0.0.1", 0), self._loop).result(5)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    def __exit__(self, *exc) -> None:
        async def shutdown() -> None:  # end handlers still streaming (e.g. to a client that timed out)
            self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            method, path, _ = (await reader.readline()).decode().split(" ", 2)
            length = 0
            while (line := (await reader.readline()).decode().strip()):
                name, _, value = line.partition(":")
                length = int(value) if name.lower() == "content-length" else length
            body = json.loads(await reader.readexactly(length)) if length else {}
            await self._route(method, path, body, writer)
        except ConnectionError:  # the client went away (timeouts): nothing to answer
            pass
        finally:
            writer.close()

    @staticmethod
    async def _send(writer, status: str, payload: dict | str, content_type="application/json") -> None:
        data = payload if isinstance(payload, str) else json.dumps(payload)
        writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(data)}\r\n"
                     f"Connection: close\r\n\r\n{data}".encode())
        await writer.drain()

    async def _route(self, method: str, path: str, body: dict, writer) -> None:
        b = self.behaviour
        if path == "/v1/models":
            await self._send(writer, "200 OK", {"object": "list", "data": [{"id": "fake-model"}]})
        elif path == "/tokenize" and b.tokenize:
            await self._send(writer, "200 OK", {"tokens": [ord(c) for c in body["prompt"]]})
        elif path == "/detokenize" and b.tokenize:
            await self._send(writer, "200 OK", {"prompt": "".join(chr(t) for t in body["tokens"])})
        elif path in ("/v1/completions", "/v1/chat/completions"):
            self.count += 1
            self.bodies.append(body)
            if b.fail_every and self.count % b.fail_every == 0:
                await self._send(writer, "503 Service Unavailable", "overloaded", "text/plain")
                return
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                await self._stream(body, path.endswith("chat/completions"), writer)
            finally:
                self.in_flight -= 1
        else:
            await self._send(writer, "404 Not Found", {"error": "not found"})

    async def _stream(self, body: dict, chat: bool, writer) -> None:
        b = self.behaviour
        n = body["max_tokens"] if body.get("ignore_eos") and b.honour_ignore_eos else min(b.natural_len,
                                                                                           body["max_tokens"])
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n")

        async def event(obj: dict | str) -> None:
            writer.write(f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode())
            await writer.drain()

        if chat:  # a role-only first chunk carries no content and must not count as the first token
            await event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
        await asyncio.sleep(b.ttft)
        sent = 0
        while sent < n:
            if sent:
                await asyncio.sleep(b.itl)
            k = min(b.tokens_per_chunk, n - sent)
            text = "tok " * k
            sent += k
            choice = {"index": 0, "delta": {"content": text}} if chat else {"index": 0, "text": text}
            await event({"choices": [choice]})
        if (body.get("stream_options") or {}).get("include_usage"):
            prompt = body["messages"][0]["content"] if chat else body["prompt"]
            await event({"choices": [], "usage": {"prompt_tokens": len(prompt), "completion_tokens": n}})
        await event("[DONE]")


def run_bench(tmp_path, server: FakeOpenAIServer, *args: str) -> tuple[int, dict]:
    out = tmp_path / "bench.json"
    rc = bench.main(["--base-url", server.url, "--json-out", str(out), *args])
    return rc, json.loads(out.read_text()) if out.exists() else {}


def test_completions_counts_timings_and_json(tmp_path):
    with FakeOpenAIServer(Behaviour(ttft=0.04, itl=0.01)) as server:
        rc, s = run_bench(tmp_path, server, "--num-requests", "6", "--concurrency", "2", "--prompt-len", "12",
                          "--output-len", "5", "--ignore-eos", "--extra-body", '{"top_k": 3}')
    assert rc == 0
    assert (s["completed"], s["failed"], s["failures"]) == (6, 0, {})
    assert s["total_output_tokens"] == 30 and s["total_prompt_tokens"] == 72
    assert s["model"] == "fake-model" and s["prompt_lens_exact"] and s["tokenizer"].endswith("/tokenize")
    assert server.max_in_flight == 2
    for body in server.bodies:
        assert len(body["prompt"]) == 12  # exact length under the server's (per-character) tokenizer
        assert body["ignore_eos"] is True and body["min_tokens"] == body["max_tokens"] == 5
        assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
        assert body["top_k"] == 3 and body["model"] == "fake-model"
    assert s["length_check"] == {"requests_with_usage": 6, "chunks_differ_from_usage": 0,
                                 "output_len_mismatches": 0, "total_content_chunks": 30}
    assert 40 <= s["ttft_ms"]["p50"] < s["e2e_ms"]["p50"]
    assert s["ttft_ms"]["p50"] <= s["ttft_ms"]["p90"] <= s["ttft_ms"]["p99"]
    assert s["itl_ms"]["p50"] >= 9 and s["tpot_ms"]["mean"] >= 9
    # Six requests of ~0.08 s two at a time: at least three rounds of work.
    assert s["duration_s"] >= 0.2 and s["output_tok_per_s"] == pytest.approx(30 / s["duration_s"])
    assert s["total_tok_per_s"] == pytest.approx(102 / s["duration_s"])
    assert s["request_throughput"] == pytest.approx(6 / s["duration_s"])
    assert s["config"]["concurrency"] == 2 and s["config"]["prompt_len"] == {"lo": 12, "hi": 12}


def test_same_seed_same_prompts_and_lengths_from_distributions(tmp_path):
    def prompts(seed: str) -> list[tuple[str, int]]:
        with FakeOpenAIServer(Behaviour(ttft=0, itl=0)) as server:
            rc, s = run_bench(tmp_path, server, "--num-requests", "5", "--concurrency", "5", "--seed", seed,
                              "--prompt-len-dist", "uniform:3:30", "--output-len-dist", "uniform:1:4",
                              "--ignore-eos")
        assert rc == 0 and s["completed"] == 5 and s["length_check"]["output_len_mismatches"] == 0
        return sorted((b["prompt"], b["max_tokens"]) for b in server.bodies)

    first = prompts("7")
    assert first == prompts("7") and first != prompts("8")
    assert all(3 <= len(p) <= 30 and 1 <= m <= 4 for p, m in first)


def test_failures_and_short_outputs_are_accounted(tmp_path):
    with FakeOpenAIServer(Behaviour(ttft=0.01, itl=0, fail_every=3, honour_ignore_eos=False,
                                    natural_len=2)) as server:
        rc, s = run_bench(tmp_path, server, "--num-requests", "6", "--concurrency", "1", "--prompt-len", "4",
                          "--output-len", "5", "--ignore-eos")
    assert rc == 0 and (s["completed"], s["failed"]) == (4, 2)
    assert s["failures"] == {"HTTP 503: overloaded": 2}
    assert s["total_output_tokens"] == 8 and s["length_check"]["output_len_mismatches"] == 4


def test_chat_counts_chunks_and_compares_with_usage(tmp_path):
    with FakeOpenAIServer(Behaviour(ttft=0.02, itl=0.005, tokens_per_chunk=2, tokenize=False)) as server:
        rc, s = run_bench(tmp_path, server, "--endpoint", "chat", "--num-requests", "3", "--prompt-len", "6",
                          "--output-len", "6", "--ignore-eos", "--tokenizer", str(_bpe_tokenizer(tmp_path)))
    assert rc == 0 and s["completed"] == 3
    assert "messages" in server.bodies[0] and "prompt" not in server.bodies[0]
    assert s["total_output_tokens"] == 18  # from usage
    assert s["length_check"]["total_content_chunks"] == 9  # 2 tokens per chunk: the stream disagrees
    assert s["length_check"]["chunks_differ_from_usage"] == 3
    assert s["ttft_ms"]["p50"] >= 20  # the role-only chunk did not count as the first token


def test_without_usage_output_is_counted_from_the_stream(tmp_path):
    with FakeOpenAIServer(Behaviour(ttft=0, itl=0)) as server:
        rc, s = run_bench(tmp_path, server, "--num-requests", "2", "--prompt-len", "3", "--output-len", "4",
                          "--no-usage")
    assert rc == 0 and "stream_options" not in server.bodies[0] and "ignore_eos" not in server.bodies[0]
    assert s["total_output_tokens"] == 6  # natural_len 3 each, counted from content chunks
    assert s["length_check"]["requests_with_usage"] == 0 and s["length_check"]["output_len_mismatches"] is None


def test_timeout_is_a_failure_with_its_reason(tmp_path):
    with FakeOpenAIServer(Behaviour(ttft=3.0)) as server:
        rc, s = run_bench(tmp_path, server, "--num-requests", "2", "--concurrency", "2", "--prompt-len", "3",
                          "--output-len", "2", "--timeout", "0.3")
    assert rc == 1 and (s["completed"], s["failed"]) == (0, 2)
    assert list(s["failures"]) == ["timeout after 0.3s"] and s["duration_s"] < 2


def test_poisson_rate_run_and_arrival_schedule(tmp_path):
    with FakeOpenAIServer(Behaviour(ttft=0, itl=0)) as server:
        rc, s = run_bench(tmp_path, server, "--num-requests", "4", "--request-rate", "40", "--prompt-len", "3",
                          "--output-len", "2")
    assert rc == 0 and s["completed"] == 4 and s["request_rate"] == 40 and s["concurrency"] is None
    offsets = bench.poisson_arrivals(4000, 20.0, seed=1)
    assert offsets == bench.poisson_arrivals(4000, 20.0, seed=1) and offsets[0] == 0.0
    gaps = [b - a for a, b in zip(offsets, offsets[1:])]
    assert all(g >= 0 for g in gaps) and sum(gaps) / len(gaps) == pytest.approx(1 / 20.0, rel=0.1)
    assert bench.poisson_arrivals(3, None, seed=1) == [0.0, 0.0, 0.0]


def test_refuses_non_loopback_and_bad_arguments(capsys):
    assert bench.main(["--base-url", "http://192.0.2.1:8000"]) == 2
    assert "--allow-remote" in capsys.readouterr().err
    assert bench.is_loopback_url("http://localhost:1/v1") and bench.is_loopback_url("http://[::1]:8000")
    assert not bench.is_loopback_url("http://example.com")
    assert bench.main(["--base-url", "http://127.0.0.1:9", "--extra-body", "[1]"]) == 2
    assert bench.main(["--base-url", "http://127.0.0.1:9", "--prompt-len-dist", "normal:1:2"]) == 2


def test_unreachable_server_fails_cleanly(capsys):
    assert bench.main(["--base-url", "http://127.0.0.1:9", "--num-requests", "1"]) == 1
    assert "cannot prepare" in capsys.readouterr().err


def _bpe_tokenizer(tmp_path):
    """A small byte-level BPE trained on the bench's own words: merges make round trips non-trivial."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    rng = random.Random(0)
    corpus = [" ".join(rng.choice(bench.WORDS) for _ in range(30)) for _ in range(200)]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path


def test_prompts_have_exact_token_lengths_under_a_real_bpe(tmp_path):
    tok = bench.load_local_tokenizer(str(_bpe_tokenizer(tmp_path)))
    rng = random.Random(3)
    for length in (1, 2, 7, 33, 128):
        text, exact = bench.make_prompt(rng, length, tok)
        assert exact and len(tok.encode(text)) == length


def test_a_tokenizer_directory_needs_no_model_config(tmp_path):
    """`--tokenizer DIR` takes a saved tokenizer (tokenizer.json + tokenizer_config.json) without config.json."""
    from transformers import PreTrainedTokenizerFast

    saved = tmp_path / "tok"
    PreTrainedTokenizerFast(tokenizer_file=str(_bpe_tokenizer(tmp_path))).save_pretrained(saved)
    assert not (saved / "config.json").exists()
    tok = bench.load_local_tokenizer(str(saved))
    ids = tok.encode("alpha beta gamma")
    assert ids and tok.decode(ids) == "alpha beta gamma"


def test_length_spec():
    assert bench.LengthSpec.parse(5, None) == bench.LengthSpec(5, 5)
    spec = bench.LengthSpec.parse(5, "uniform:2:4")
    draws = {spec.draw(random.Random(i)) for i in range(50)}
    assert draws == {2, 3, 4}
    for bad in ("uniform:4:2", "uniform:0:3", "uniform:a:3", "zipf:1:2"):
        with pytest.raises(ValueError):
            bench.LengthSpec.parse(5, bad)


def test_roofline_probe_reports_positive_rates(tmp_path, monkeypatch):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "roofline.py"
    spec = importlib.util.spec_from_file_location("roofline", path)
    roofline = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "roofline", roofline)  # dataclasses look their module up there
    spec.loader.exec_module(roofline)
    out = tmp_path / "roofline.json"
    assert roofline.main(["--size-mb", "4", "--sizes", "32", "--dtypes", "float32", "--budget-s", "0.01",
                          "--json-out", str(out)]) == 0
    data = json.loads(out.read_text())
    units = Counter(r["unit"] for r in data["results"])
    assert units == {"GB/s": 7, "GFLOP/s": 5, "us/call": 2}
    assert all(r["best_rate"] > 0 and r["best_s"] <= r["median_s"] for r in data["results"])
    assert data["machine"]["cpu_count"] >= 1
