"""Record-level DP through the real coordinator: `consortium simulate --dp dpsgd-secagg` vs non-private.

The in-process benchmark (``privacy_utility.py``) measures the mechanisms; this one
checks that a user who types the documented command line gets the same kind of
result through Flower's simulation engine, SecAgg+ and the privacy ledger:

1. non-private FedAvg (MLP, hidden 16, 30 rounds) on 5_campaign, 5 IID banks;
2. ``dpsgd-secagg`` at ε = 1 with ``privacy_utility``'s settings (logistic model,
   100 rounds, q = 0.05, C = 3, lr 10/3, one clip bound for both classes) on the
   same split, into a fresh store;
3. a second, short DP run on the same data into the *same* store: the ledger must
   report the composition of both runs, never this run alone.

``--quick`` runs the same three steps with 5/5/2 rounds.  Writes
benchmarks/results/privacy_coordinator.{json,md}.
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import SHARED_DATA, environment, parser, write_results

from consortium.cli import main as cli

DP_FLAGS = [
    "--hidden", "", "--dp", "dpsgd-secagg", "--target-epsilon", "1", "--delta", "1e-5",
    "--dp-clip", "3", "--dp-sampling-rate", "0.05", "--dp-lr", "3.3333", "--dp-negative-clip-power", "0",
]  # fmt: skip


def simulate(store: Path, rounds: int, extra: list[str]) -> dict[str, Any]:
    """One `consortium simulate` run through the CLI's own entry point (in this process); its JSON result."""
    args = [
        "simulate", "--data", str(SHARED_DATA / "5_campaign.npz"), "--institutions", "5", "--partition", "iid",
        "--seed", "0", "--rounds", str(rounds), "--no-baselines", "--store", f"sqlite:///{store}", "--json", *extra,
    ]  # fmt: skip
    t0 = time.perf_counter()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        cli.main(args, standalone_mode=False)
    result: dict[str, Any] = json.loads(out.getvalue())
    result["seconds"] = time.perf_counter() - t0
    return result


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    rounds_ref, rounds_dp, rounds_again = (5, 5, 2) if args.quick else (30, 100, 10)
    with tempfile.TemporaryDirectory() as tmp:
        ref = simulate(Path(tmp) / "ref.db", rounds_ref, ["--hidden", "16"])
        dp = simulate(Path(tmp) / "dp.db", rounds_dp, DP_FLAGS)
        again = simulate(Path(tmp) / "dp.db", rounds_again, DP_FLAGS)
    auprc_ref, auprc_dp = ref["summary"]["federated_auprc"], dp["summary"]["federated_auprc"]
    privacy = dp["privacy"]
    result = {
        "benchmark": "privacy_coordinator",
        "quick": args.quick,
        "environment": environment(),
        "summary": {
            "auprc_nonprivate": auprc_ref,
            "auprc_dpsgd_secagg_eps1": auprc_dp,
            "auprc_ratio": auprc_dp / auprc_ref,
            "epsilon": privacy["epsilon"],
            "epsilon_if_one_colludes": privacy.get("epsilon_if_one_colludes"),
            "delta_encoding": privacy.get("delta_encoding"),
            "selected_round": dp["selected_round"],
            "second_run_epsilon_cumulative": again["privacy"]["epsilon"],
        },
        "rounds": {"nonprivate": rounds_ref, "dp": rounds_dp, "second_dp_run": rounds_again},
        "dp_flags": DP_FLAGS,
        "privacy": privacy,
        "seconds": {"nonprivate": ref["seconds"], "dp": dp["seconds"], "second_dp_run": again["seconds"]},
    }
    write_results("privacy_coordinator", result, markdown(result), json_path=args.json_path)


def markdown(result: dict[str, Any]) -> str:
    s, r = result["summary"], result["rounds"]
    collude = s["epsilon_if_one_colludes"]
    return "\n".join(
        [
            "# Record-level DP through the coordinator (`consortium simulate`)",
            "",
            f"5_campaign, 5 IID banks, seed 0, quick = {result['quick']}. Flower simulation engine, SecAgg+, ledger.",
            "",
            "| run | rounds | holdout AUPRC | ε (δ = 1e-5) |",
            "|---|---:|---:|---:|",
            f"| non-private MLP (hidden 16) | {r['nonprivate']} | {s['auprc_nonprivate']:.4f} | ∞ |",
            f"| `dpsgd-secagg`, logistic | {r['dp']} | {s['auprc_dpsgd_secagg_eps1']:.4f} | {s['epsilon']:.4f} |",
            "",
            f"Ratio {s['auprc_ratio']:.3f}; ε against the coordinator plus one colluding bank "
            f"{collude if collude is None else format(collude, '.4f')}; encoding δ {s['delta_encoding']:.2g}; "
            f"released round {s['selected_round']}.",
            "",
            f"A second DP run of {r['second_dp_run']} rounds on the same data in the same store reported "
            f"ε = {s['second_run_epsilon_cumulative']:.4f}: the ledger composes it with the first run.",
            "",
            "Flags: `" + " ".join(f'"{f}"' if f == "" else f for f in result["dp_flags"]) + "`",
        ]
    )


if __name__ == "__main__":
    main()
