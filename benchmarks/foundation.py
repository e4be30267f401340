"""Speed of the foundation's two user-facing promises: data generation and the demo.

* ``generate_federation(5, transactions_per_institution=100_000)`` (target: < 60 s
  on 2 cores), beside a baseline in the same run: drawing the same number of
  uniform random numbers with numpy (the cost floor of any generator).
* ``consortium demo`` end to end (5 institutions, 10 rounds, secure aggregation,
  baselines, plot; target: < 3 minutes on 2 cores).

Writes ``benchmarks/results/foundation.{json,md}``.

    python benchmarks/foundation.py            # full sizes
    python benchmarks/foundation.py --quick    # 5 x 20k transactions, 3-round demo
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, parser, write_results  # noqa: E402

from consortium.data import FEATURE_NAMES, generate_federation  # noqa: E402
from consortium.demo import run_demo  # noqa: E402


def time_generator(transactions: int) -> dict[str, float]:
    t0 = time.perf_counter()
    fed = generate_federation(5, transactions_per_institution=transactions, seed=0)
    seconds = time.perf_counter() - t0
    rows = sum(inst.dataset.n_rows for inst in fed.values())
    t0 = time.perf_counter()
    np.random.default_rng(0).random((rows, len(FEATURE_NAMES)), dtype=np.float32)
    baseline = time.perf_counter() - t0
    return {"rows": rows, "seconds": seconds, "numpy_fill_seconds": baseline,
            "generator_over_numpy_fill": seconds / baseline}


def time_demo(*, rounds: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = run_demo(out_dir=tmp, rounds=rounds)
        summary = out.result.summary()
    return {"rounds": rounds, "seconds": out.seconds, "summary": summary}


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    transactions = 20_000 if args.quick else 100_000
    gen = time_generator(transactions)
    print(f"generator 5 x {transactions:,}: {gen['seconds']:.2f} s", flush=True)
    demo = time_demo(rounds=3 if args.quick else 10)
    print(f"demo ({demo['rounds']} rounds): {demo['seconds']:.1f} s", flush=True)
    result = {
        "benchmark": "foundation",
        "quick": args.quick,
        "environment": environment(),
        "generator": {"institutions": 5, "transactions_per_institution": transactions, **gen},
        "demo": demo,
        "summary": {"generator_seconds": gen["seconds"], "demo_seconds": demo["seconds"],
                    "demo_federated_auprc": demo["summary"]["federated_auprc"],
                    "demo_centralized_auprc": demo["summary"]["centralized_auprc"],
                    "demo_local_only_auprc_mean": demo["summary"]["local_only_auprc_mean"]},
    }
    md = "\n".join([
        "# Foundation speed",
        "",
        f"Quick mode: {args.quick}. {result['environment']['cpus']} CPUs.",
        "",
        "| measurement | seconds | target |",
        "|---|---|---|",
        f"| generate 5 institutions x {transactions:,} transactions ({gen['rows']:,} rows) | {gen['seconds']:.2f} "
        f"({gen['generator_over_numpy_fill']:.0f}x a numpy fill of the same matrix) | < 60 |",
        f"| `consortium demo` end to end ({demo['rounds']} rounds, secure aggregation, baselines, plot) | "
        f"{demo['seconds']:.1f} | < 180 |",
        "",
        f"Demo AUPRC: federated {demo['summary']['federated_auprc']:.4f}, centralized "
        f"{demo['summary']['centralized_auprc']:.4f}, local-only mean {demo['summary']['local_only_auprc_mean']:.4f}.",
        "",
    ])
    write_results("foundation", result, md, json_path=args.json_path)
    print(md)


if __name__ == "__main__":
    main()
