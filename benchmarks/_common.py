"""Shared helpers of the benchmark scripts: argument parsing, data paths, result files."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
_DEFAULT_SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
SHARED_DATA = Path(os.environ.get("CONSORTIUM_SHARED_DATA", _DEFAULT_SHARED)).resolve()
"""Benchmark data (ADBench .npz files), read in place and never copied into the repo."""


def parser(description: str) -> argparse.ArgumentParser:
    """ArgumentParser with the flags every benchmark takes (``--quick``, ``--json``)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="Same code path, small sizes (< 60 s).")
    p.add_argument("--json", dest="json_path", default=None, help="Also write the JSON result here.")
    return p


def environment() -> dict[str, Any]:
    """Machine facts recorded next to every result."""
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def json_safe(obj: Any) -> Any:
    """NaN/inf to null, numpy scalars to Python."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "item"):
        return json_safe(obj.item())
    return obj


def write_results(name: str, result: dict[str, Any], markdown: str, *, json_path: str | None) -> Path:
    """Write ``results/NAME.json`` and ``results/NAME.md`` (and ``json_path`` if given)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    text = json.dumps(json_safe(result), indent=2)
    out = RESULTS_DIR / f"{name}.json"
    out.write_text(text)
    (RESULTS_DIR / f"{name}.md").write_text(markdown)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(text)
    return out
