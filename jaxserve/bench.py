"""`jaxserve bench`: a streaming serving benchmark for any OpenAI-compatible server.

Sends N seeded requests (prompts of an exact token length) at a fixed concurrency and/or a Poisson request rate,
streams every answer, and reports request throughput, output and total tokens/s, TTFT / TPOT / ITL / end-to-end
percentiles and failures, as a table and as JSON. The same seed gives every server the same prompts.

Definitions (client monotonic clock, per request):
  TTFT = first content-carrying chunk - request sent;  E2E = last byte - request sent
  TPOT = (E2E - TTFT) / (output_tokens - 1);  ITL = gaps between consecutive content chunks (pooled)
  output_tokens = the server's `usage.completion_tokens` when it streams usage, else the content-chunk count.
Output lengths are verified from the stream: content chunks are counted and compared with `usage`, and (with
--ignore-eos) with the requested length; mismatches are reported, never silently dropped.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

import httpx
import numpy as np

# Prompts are seeded sequences of these words: plain text that every tokenizer splits predictably.
WORDS = (
    "apple river stone cloud paper window garden music silver forest bridge market winter summer candle "
    "letter orange planet doctor engine island pocket ladder mirror basket rocket violin castle harbor meadow "
    "thunder lantern marble button pencil kettle blanket compass feather jungle oyster saddle tunnel velvet "
    "walnut yellow zebra anchor bottle copper dragon elbow falcon ginger hammer insect jacket kitten lemon "
    "the of and to in is was for that on as with by at from an were are this be or had not but one their"
).split()
PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class LengthSpec:
    """A fixed length (lo == hi) or a uniform draw from [lo, hi]."""

    lo: int
    hi: int

    @classmethod
    def parse(cls, fixed: int, dist: str | None) -> "LengthSpec":
        if not dist:
            return cls(fixed, fixed)
        kind, _, rest = dist.partition(":")
        lo, _, hi = rest.partition(":")
        if kind != "uniform" or not lo.isdigit() or not hi.isdigit() or int(lo) > int(hi) or int(lo) < 1:
            raise ValueError(f"length distribution must be uniform:LO:HI with 1 <= LO <= HI, got {dist!r}")
        return cls(int(lo), int(hi))

    def draw(self, rng: random.Random) -> int:
        return self.lo if self.lo == self.hi else rng.randint(self.lo, self.hi)


@dataclass(frozen=True)
class BenchConfig:
    base_url: str
    endpoint: str = "completions"
    model: str | None = None
    num_requests: int = 32
    concurrency: int | None = None
    request_rate: float | None = None
    seed: int = 0
    prompt_len: LengthSpec = LengthSpec(128, 128)
    output_len: LengthSpec = LengthSpec(128, 128)
    tokenizer: str | None = None
    ignore_eos: bool = False
    extra_body: dict = field(default_factory=dict)
    temperature: float = 0.0
    include_usage: bool = True
    warmup: int = 0
    timeout: float = 300.0
    max_duration: float = 3600.0
    allow_remote: bool = False


@dataclass
class RequestResult:
    prompt_len: int
    expected_output_len: int
    ok: bool = False
    error: str | None = None
    ttft: float | None = None
    latency: float | None = None
    content_chunks: int = 0
    usage_completion_tokens: int | None = None
    usage_prompt_tokens: int | None = None
    chunk_gaps: list[float] = field(default_factory=list)

    @property
    def output_tokens(self) -> int:
        return self.usage_completion_tokens if self.usage_completion_tokens is not None else self.content_chunks


def is_loopback_url(url: str) -> bool:
    """True for URLs whose host is literally loopback (no DNS lookup: a name could resolve anywhere)."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def server_root(base_url: str) -> str:
    """The server's root URL: accepts both http://h:p and http://h:p/v1."""
    root = base_url.rstrip("/")
    return root[: -len("/v1")] if root.endswith("/v1") else root


# ---------------------------------------------------------------- tokenizers and prompts
@dataclass(frozen=True)
class TextTokenizer:
    """encode/decode without special tokens; `source` says where it came from (reported in the JSON)."""

    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]
    source: str


def _hf_tokenizer(tok: Any, source: str) -> TextTokenizer:
    return TextTokenizer(lambda t: list(tok.encode(t, add_special_tokens=False)),
                         lambda ids: tok.decode(ids), source)


def load_local_tokenizer(spec: str | None) -> TextTokenizer:
    """A tokenizer.json file, an HF directory, a GGUF file, or (None) the project's default model's tokenizer."""
    if spec and spec.endswith(".json") and Path(spec).is_file():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(spec)
        return TextTokenizer(lambda t: tok.encode(t, add_special_tokens=False).ids,
                             lambda ids: tok.decode(ids), spec)
    try:  # the project's weights API knows GGUF, HF dirs and the embedded default model
        from jaxserve.models.weights import load_tokenizer, resolve_model_source

        if spec is None:
            return _hf_tokenizer(load_tokenizer(resolve_model_source(None)), "default model")
        return _hf_tokenizer(load_tokenizer(None, spec), spec)  # a tokenizer needs no model config
    except ImportError:
        if spec is None:
            raise
    from transformers import AutoTokenizer

    path = Path(spec)
    if path.suffix == ".gguf":
        return _hf_tokenizer(AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name), spec)
    return _hf_tokenizer(AutoTokenizer.from_pretrained(spec), spec)


def remote_tokenizer(client: httpx.Client, root: str, model: str) -> TextTokenizer | None:
    """The server's /tokenize + /detokenize (vLLM's or llama-server's request shape), or None when absent."""
    styles = (
        (lambda t: {"model": model, "prompt": t, "add_special_tokens": False},
         lambda ids: {"model": model, "tokens": ids}, "prompt"),
        (lambda t: {"content": t, "add_special": False}, lambda ids: {"tokens": ids}, "content"),
    )
    for tok_body, detok_body, text_key in styles:
        try:
            r = client.post(f"{root}/tokenize", json=tok_body("hello world"))
            d = client.post(f"{root}/detokenize", json=detok_body(r.json()["tokens"]))
            if r.status_code == 200 and d.status_code == 200 and isinstance(d.json().get(text_key), str):
                def encode(t: str, body=tok_body) -> list[int]:
                    return client.post(f"{root}/tokenize", json=body(t)).raise_for_status().json()["tokens"]

                def decode(ids: list[int], body=detok_body, key=text_key) -> str:
                    return client.post(f"{root}/detokenize", json=body(ids)).raise_for_status().json()[key]

                return TextTokenizer(encode, decode, f"{root}/tokenize")
        except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError):
            continue
    return None


def make_prompt(rng: random.Random, length: int, tok: TextTokenizer | None) -> tuple[str, bool]:
    """A prompt of exactly `length` tokens under `tok` (returns exact=True), or `length` words without one."""
    words = [rng.choice(WORDS) for _ in range(length + 8)]
    if tok is None:
        return " ".join(words[:length]), False
    ids = tok.encode(" ".join(words))
    while len(ids) < length:
        words += [rng.choice(WORDS) for _ in range(length)]
        ids = tok.encode(" ".join(words))
    ids = ids[:length]
    for _ in range(16):  # decode(encode(x)) can merge or split at the cut: trim or pad until it round-trips
        text = tok.decode(ids)
        n = len(tok.encode(text))
        if n == length:
            return text, True
        ids = ids[: len(ids) - (n - length)] if n > length else tok.encode(f"{text} {rng.choice(WORDS)}")[:length]
    raise RuntimeError(f"could not build a prompt of exactly {length} tokens with {tok.source}")


def poisson_arrivals(n: int, rate: float | None, seed: int) -> list[float]:
    """Send offsets in seconds: exponential gaps at `rate` requests/s, or all zero (closed loop) without one."""
    if not rate or rate == float("inf"):
        return [0.0] * n
    rng = random.Random(seed + 1)  # own stream: the prompts do not depend on the rate
    offsets, t = [], 0.0
    for _ in range(n):
        offsets.append(t)
        t += rng.expovariate(rate)
    return offsets


# ---------------------------------------------------------------- one streamed request
def request_body(cfg: BenchConfig, model: str, prompt: str, max_tokens: int) -> dict:
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "stream": True,
                            "temperature": cfg.temperature}
    if cfg.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if cfg.include_usage:
        body["stream_options"] = {"include_usage": True}
    if cfg.ignore_eos:  # both knobs: servers honour one or the other (llama-cpp-python ignores ignore_eos)
        body["ignore_eos"] = True
        body["min_tokens"] = max_tokens
    body.update(cfg.extra_body)
    return body


def _chunk_content(chunk: dict, chat: bool) -> str:
    text = ""
    for choice in chunk.get("choices") or ():
        if chat:
            delta = choice.get("delta") or {}
            text += (delta.get("content") or "") + (delta.get("reasoning_content") or "")
        else:
            text += choice.get("text") or ""
    return text


async def stream_one(client: httpx.AsyncClient, url: str, body: dict, cfg: BenchConfig,
                     result: RequestResult) -> RequestResult:
    chat = cfg.endpoint == "chat"
    start = last = time.perf_counter()
    try:
        async with asyncio.timeout(cfg.timeout):
            async with client.stream("POST", url, json=body) as resp:
                if resp.status_code != 200:
                    detail = (await resp.aread()).decode(errors="replace")[:160]
                    result.error = f"HTTP {resp.status_code}: {detail}"
                    return result
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if chunk.get("error"):
                        result.error = f"stream error: {str(chunk['error'])[:160]}"
                        return result
                    now = time.perf_counter()
                    if _chunk_content(chunk, chat):
                        if result.ttft is None:
                            result.ttft = now - start
                        else:
                            result.chunk_gaps.append(now - last)
                        last = now
                        result.content_chunks += 1
                    if usage := chunk.get("usage"):
                        result.usage_completion_tokens = usage.get("completion_tokens")
                        result.usage_prompt_tokens = usage.get("prompt_tokens")
        result.latency = time.perf_counter() - start
        result.ok = result.content_chunks > 0
        if not result.ok:
            result.error = "no content streamed"
    except TimeoutError:
        result.error = f"timeout after {cfg.timeout:g}s"
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {str(exc)[:160]}"
    except json.JSONDecodeError as exc:
        result.error = f"bad SSE JSON: {exc}"
    return result


# ---------------------------------------------------------------- the load
async def run_load(cfg: BenchConfig, url: str, model: str, prompts: list[tuple[str, int]],
                   output_lens: list[int]) -> tuple[list[RequestResult], float]:
    """All requests; returns their results and the wall time from the first send to the last answer."""
    # No keep-alive: one connection per request (pooled connections gave spurious failures on llama-server).
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(cfg.timeout)) as client:
        for i in range(cfg.warmup):
            text, plen = prompts[i % len(prompts)]
            await stream_one(client, url, request_body(cfg, model, text, output_lens[0]), cfg,
                             RequestResult(plen, output_lens[0]))
        results = [RequestResult(plen, olen) for (_, plen), olen in zip(prompts, output_lens)]
        sem = asyncio.Semaphore(cfg.concurrency or len(prompts))
        offsets = poisson_arrivals(len(prompts), cfg.request_rate, cfg.seed)
        t0 = time.perf_counter()

        async def one(i: int) -> None:
            await asyncio.sleep(max(0.0, t0 + offsets[i] - time.perf_counter()))
            async with sem:
                await stream_one(client, url, request_body(cfg, model, prompts[i][0], output_lens[i]), cfg,
                                 results[i])

        tasks = [asyncio.create_task(one(i)) for i in range(len(prompts))]
        _, pending = await asyncio.wait(tasks, timeout=cfg.max_duration)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        elapsed = time.perf_counter() - t0
    for r in results:
        if not r.ok and r.error is None:
            r.error = f"not finished within --max-duration {cfg.max_duration:g}s"
    return results, elapsed


def _stats_ms(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}}
    arr = np.asarray(values) * 1000.0
    return {"mean": float(arr.mean()), **{f"p{p}": float(np.percentile(arr, p)) for p in PERCENTILES}}


def summarize(cfg: BenchConfig, results: list[RequestResult], elapsed: float) -> dict:
    ok = [r for r in results if r.ok]
    failures = Counter(r.error for r in results if not r.ok)
    out_tokens = sum(r.output_tokens for r in ok)
    prompt_tokens = sum(r.usage_prompt_tokens if r.usage_prompt_tokens is not None else r.prompt_len for r in ok)
    duration = elapsed  # first send to last answer, Poisson waits included (as vLLM's benchmark counts it)
    with_usage = [r for r in ok if r.usage_completion_tokens is not None]
    length_check = {
        "requests_with_usage": len(with_usage),
        "chunks_differ_from_usage": sum(r.content_chunks != r.usage_completion_tokens for r in with_usage),
        # Only meaningful when every request was told to produce exactly max_tokens.
        "output_len_mismatches": sum(r.output_tokens != r.expected_output_len for r in ok) if cfg.ignore_eos else None,
        "total_content_chunks": sum(r.content_chunks for r in ok),
    }
    return {
        "endpoint": cfg.endpoint, "num_requests": len(results), "concurrency": cfg.concurrency,
        "request_rate": cfg.request_rate, "completed": len(ok), "failed": len(results) - len(ok),
        "duration_s": duration, "request_throughput": len(ok) / duration if duration else 0.0,
        "total_output_tokens": out_tokens, "total_prompt_tokens": prompt_tokens,
        "output_tok_per_s": out_tokens / duration if duration else 0.0,
        "total_tok_per_s": (out_tokens + prompt_tokens) / duration if duration else 0.0,
        "ttft_ms": _stats_ms([r.ttft for r in ok]),
        "tpot_ms": _stats_ms([(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]),
        "itl_ms": _stats_ms([gap for r in ok for gap in r.chunk_gaps]),
        "e2e_ms": _stats_ms([r.latency for r in ok]),
        "failures": dict(failures.most_common()), "length_check": length_check,
    }


def format_table(summary: dict) -> str:
    def fmt(v: Any) -> str:
        return "-" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = [f"{'=' * 22} Serving Benchmark Result {'=' * 22}"]
    for key in ("completed", "failed", "duration_s", "request_throughput", "total_output_tokens",
                "total_prompt_tokens", "output_tok_per_s", "total_tok_per_s"):
        lines.append(f"{key:<36}{fmt(summary[key]):>34}")
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        stats = summary[key]
        lines.append(f"{key:<16}" + "".join(f"{name}={fmt(v):>10}  " for name, v in stats.items()))
    for key, value in summary["length_check"].items():
        lines.append(f"{key:<36}{fmt(value):>34}")
    for reason, count in summary["failures"].items():
        lines.append(f"failure x{count}: {reason}")
    return "\n".join(lines)


# ---------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxserve bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (or root/v1)")
    p.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    p.add_argument("--model", help="model name to send (default: first of GET /v1/models)")
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--concurrency", type=int, help="max requests in flight (default 1 without --request-rate)")
    p.add_argument("--request-rate", type=float, help="Poisson arrivals, requests/s (with --seed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--prompt-len-dist", help="uniform:LO:HI instead of a fixed --prompt-len")
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--output-len-dist", help="uniform:LO:HI instead of a fixed --output-len")
    p.add_argument("--tokenizer", help="tokenizer.json, HF dir or GGUF (default: server /tokenize, else local)")
    p.add_argument("--ignore-eos", action="store_true", help="send ignore_eos and min_tokens=max_tokens")
    p.add_argument("--extra-body", type=json.loads, default={}, help="JSON object merged into every body")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--no-usage", action="store_true", help="don't send stream_options.include_usage")
    p.add_argument("--warmup", type=int, default=0, help="unmeasured requests sent first, one at a time")
    p.add_argument("--timeout", type=float, default=300.0, help="per-request limit, seconds")
    p.add_argument("--max-duration", type=float, default=3600.0, help="whole-run limit, seconds")
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --base-url")
    p.add_argument("--json-out", help="write the summary (and config) here as JSON")
    return p


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    if args.num_requests < 1 or (args.concurrency is not None and args.concurrency < 1):
        raise ValueError("--num-requests and --concurrency must be >= 1")
    if not isinstance(args.extra_body, dict):
        raise ValueError("--extra-body must be a JSON object")
    concurrency = args.concurrency if args.concurrency or args.request_rate else 1
    return BenchConfig(
        base_url=args.base_url, endpoint=args.endpoint, model=args.model, num_requests=args.num_requests,
        concurrency=concurrency, request_rate=args.request_rate, seed=args.seed,
        prompt_len=LengthSpec.parse(args.prompt_len, args.prompt_len_dist),
        output_len=LengthSpec.parse(args.output_len, args.output_len_dist), tokenizer=args.tokenizer,
        ignore_eos=args.ignore_eos, extra_body=args.extra_body, temperature=args.temperature,
        include_usage=not args.no_usage, warmup=args.warmup, timeout=args.timeout,
        max_duration=args.max_duration, allow_remote=args.allow_remote)


def prepare(cfg: BenchConfig) -> tuple[str, TextTokenizer | None, list[tuple[str, int]], list[int], bool]:
    """Resolve the model name and tokenizer, and build the seeded prompts and output lengths."""
    root = server_root(cfg.base_url)
    with httpx.Client(timeout=30.0) as client:
        model = cfg.model or client.get(f"{root}/v1/models").raise_for_status().json()["data"][0]["id"]
        tok = load_local_tokenizer(cfg.tokenizer) if cfg.tokenizer else remote_tokenizer(client, root, model)
        if tok is None:
            try:
                tok = load_local_tokenizer(None)
            except Exception as exc:  # any failure here only costs exactness, which is reported
                print(f"warning: no tokenizer ({exc}); prompt lengths are approximate (words)", file=sys.stderr)
        rng = random.Random(cfg.seed)
        prompts, exact = [], True
        for _ in range(cfg.num_requests):
            length = cfg.prompt_len.draw(rng)
            text, is_exact = make_prompt(rng, length, tok)
            prompts.append((text, length))
            exact &= is_exact
        output_lens = [cfg.output_len.draw(rng) for _ in range(cfg.num_requests)]
    return model, tok, prompts, output_lens, exact


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not cfg.allow_remote and not is_loopback_url(cfg.base_url):
        print(f"error: {cfg.base_url} is not a loopback URL; pass --allow-remote to benchmark it", file=sys.stderr)
        return 2
    try:
        model, tok, prompts, output_lens, exact = prepare(cfg)
    except (httpx.HTTPError, KeyError, IndexError, ValueError, RuntimeError, OSError) as exc:
        print(f"error: cannot prepare the benchmark against {cfg.base_url}: {exc}", file=sys.stderr)
        return 1
    path = "/v1/chat/completions" if cfg.endpoint == "chat" else "/v1/completions"
    results, elapsed = asyncio.run(run_load(cfg, server_root(cfg.base_url) + path, model, prompts, output_lens))
    summary = summarize(cfg, results, elapsed)
    summary.update(model=model, tokenizer=tok.source if tok else None, prompt_lens_exact=exact)
    print(format_table(summary))
    if args.json_out:
        config = {k: v for k, v in asdict(cfg).items() if k not in ("prompt_len", "output_len")}
        config.update(prompt_len=asdict(cfg.prompt_len), output_len=asdict(cfg.output_len))
        Path(args.json_out).write_text(json.dumps({**summary, "config": config}, indent=2))
    return 0 if summary["completed"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
