"""Serving benchmark: the same as `jaxserve bench` (see jaxserve/bench.py), runnable from a checkout.

    .venv/bin/python benchmarks/serve.py --base-url http://127.0.0.1:8000 --num-requests 64 --concurrency 32 \
        --prompt-len 128 --output-len 128 --ignore-eos --json-out serve.json
"""

import sys

from jaxserve.bench import main

if __name__ == "__main__":
    sys.exit(main())
