"""Where a served run's time goes, step by step: the real server with each engine step logged.

    .venv/bin/python benchmarks/served_steps.py --log /tmp/steps.jsonl -- --port 8110   # serve, logging steps
    (drive it: ../shared/bench/loadgen.py, benchmarks/side_by_side.sh's matrix, jaxserve bench, ...)
    .venv/bin/python benchmarks/served_steps.py --summarize /tmp/steps.jsonl

Each line of the log is one step: when it was launched and collected (wall clock, seconds), its decode rows,
draft rows (prompt-lookup speculation), prompt tokens and the bucket it ran in. The summary splits the run
into steps that carry prompt tokens and decode-only steps (docs/benchmarks.md, round 16, used it for the
c=32 run). The server is jaxserve's own CLI; only LLMEngine's _launch / _collect are wrapped.
"""
from __future__ import annotations

import argparse
import json
import sys
import time


def serve_logging_steps(log_path: str, server_args: list[str]) -> None:
    from jaxserve import engine as engine_module
    from jaxserve.cli import main

    launch, collect = engine_module.LLMEngine._launch, engine_module.LLMEngine._collect
    log = open(log_path, "a", buffering=1)

    def logged_launch(self, in_flight):
        started = time.time()
        launched = launch(self, in_flight)
        if launched is not None:
            rows = launched.scheduled
            launched.step_record = {
                "launched": started,
                "launch_ms": round(1000 * (time.time() - started), 2),
                "decode_rows": sum(1 for s in rows if s.num_new_tokens == 1 and s.draft_index == 0),
                "draft_rows": sum(1 for s in rows if s.draft_index > 0),
                "prompt_tokens": sum(s.num_new_tokens for s in rows if s.num_new_tokens > 1),
                "bucket_tokens": launched.step.shape.num_tokens}
        return launched

    def logged_collect(self, launched):
        outputs = collect(self, launched)
        record = getattr(launched, "step_record", None)
        if record is not None:
            log.write(json.dumps({**record, "collected": time.time()}) + "\n")
        return outputs

    engine_module.LLMEngine._launch, engine_module.LLMEngine._collect = logged_launch, logged_collect
    sys.argv = ["jaxserve", *server_args]
    main()


def summarize(log_path: str) -> None:
    steps = [json.loads(line) for line in open(log_path) if line.strip()]
    if not steps:
        print("no steps logged")
        return
    phases = {"steps with prompt tokens": [s for s in steps if s["prompt_tokens"]],
              "decode-only steps": [s for s in steps if not s["prompt_tokens"]]}
    wall = steps[-1]["collected"] - steps[0]["launched"]
    print(f"{len(steps)} steps over {wall:.2f} s of wall clock")
    print("| phase | steps | time (s) | prompt tokens | decode rows | draft rows | ms a step (median) "
          "| launch ms (median) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, group in phases.items():
        if not group:
            continue
        times = sorted(s["collected"] - s["launched"] for s in group)
        print(f"| {name} | {len(group)} | {sum(times):.2f} | {sum(s['prompt_tokens'] for s in group)} | "
              f"{sum(s['decode_rows'] for s in group)} | {sum(s['draft_rows'] for s in group)} | "
              f"{1000 * times[len(times) // 2]:.1f} | {median_launch(group)} |")


def median_launch(steps: list[dict]) -> str:
    """The median time _launch took (schedule, drafts, prepare, dispatch), or "-" for logs without it."""
    times = sorted(s["launch_ms"] for s in steps if "launch_ms" in s)
    return f"{times[len(times) // 2]:.1f}" if times else "-"


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--log", help="serve (jaxserve's own flags after --), appending each step to this file")
    ap.add_argument("--summarize", help="print the phase table of a step log")
    args, rest = ap.parse_known_args()
    if args.summarize:
        summarize(args.summarize)
    elif args.log:
        serve_logging_steps(args.log, [a for a in rest if a != "--"])
    else:
        ap.error("give --log (to serve) or --summarize")
