"""The ``consortium`` command: complete help, clear errors, demo JSON contract."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from consortium.cli import main

SUBCOMMANDS = [
    [], ["demo"], ["simulate"], ["data"], ["data", "generate"], ["data", "split"], ["certs"],
    ["coordinator"], ["node"], ["runs"], ["runs", "list"], ["runs", "show"],
]


@pytest.mark.parametrize("args", SUBCOMMANDS, ids=lambda a: " ".join(a) or "root")
def test_every_subcommand_has_help(args: list[str]) -> None:
    result = CliRunner().invoke(main, [*args, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
    # Every option is documented: no bare option lines without text for commands with options.
    assert len(result.output.splitlines()) > 3


def test_simulate_with_missing_label_column_is_a_one_line_error(tmp_path: Path) -> None:
    csv = tmp_path / "tx.csv"
    csv.write_text("amount,hour,label\n1.0,2,0\n3.0,4,1\n")
    result = CliRunner().invoke(main, ["simulate", "--data", str(csv), "--label-column", "is_fraud"])
    assert result.exit_code == 2
    assert "is_fraud" in result.output and "Traceback" not in result.output


def test_simulate_with_corrupt_npz_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.npz"
    np.savez(bad, X=np.zeros((10, 3)))  # no y
    result = CliRunner().invoke(main, ["simulate", "--data", str(bad)])
    assert result.exit_code == 2
    assert "bad.npz" in result.output and "'y'" in result.output


@pytest.mark.slow
def test_demo_json_has_summary_keys(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main,
        ["demo", "--json", "--out", str(tmp_path / "demo"), "--institutions", "3", "--transactions", "3000",
         "--rounds", "2", "--no-secure-aggregation"],
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output[result.output.index("{"):])
    summary = payload["summary"]
    for key in ("federated_auprc", "centralized_auprc", "local_only_auprc_mean"):
        assert isinstance(summary[key], float), key
    assert len(payload["rounds"]) == 2
    assert (tmp_path / "demo" / "auprc_per_round.png").stat().st_size > 1000
