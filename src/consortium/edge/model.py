"""The model an agent serves: a scorer, its input schema, its threshold and where it came from."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from consortium.edge.inputs import RowParser
from consortium.edge.scorer import OnnxScorer
from consortium.errors import ConfigError


@dataclass(frozen=True)
class ActiveModel:
    """One loaded model version, immutable: the agent swaps whole objects between transactions."""

    version: str
    scorer: OnnxScorer
    parser: RowParser
    threshold: float
    manifest: Any = None
    """The bundle's :class:`~consortium.registry.bundle.BundleManifest` (None for a bare ONNX file)."""
    sha256: str = ""
    """SHA-256 of the bundle archive (or of the ONNX bytes for a bare model)."""

    @classmethod
    def from_onnx(
        cls,
        onnx_model: bytes,
        *,
        feature_names: Sequence[str],
        threshold: float,
        version: str,
        input_name: str | None = None,
        output_name: str | None = None,
        intra_op_threads: int = 1,
    ) -> ActiveModel:
        """Serve a bare ONNX model (tests, benchmarks; deployments use signed bundles)."""
        scorer = OnnxScorer(
            onnx_model, feature_names=feature_names, input_name=input_name, output_name=output_name,
            intra_op_threads=intra_op_threads,
        )
        return cls(version, scorer, RowParser(feature_names), float(threshold), None,
                   hashlib.sha256(onnx_model).hexdigest())

    @classmethod
    def from_bundle(cls, bundle: Any, *, intra_op_threads: int = 1) -> ActiveModel:
        """Serve a verified :class:`~consortium.registry.bundle.Bundle` (signature already checked)."""
        manifest = bundle.manifest
        names = list(manifest.feature_names)
        if "default" not in manifest.thresholds:
            raise ConfigError(
                f"Bundle {manifest.model_version!r} has no 'default' threshold "
                f"(thresholds: {sorted(manifest.thresholds)})."
            )
        scorer = OnnxScorer(
            bundle.onnx_bytes, feature_names=names, input_name=manifest.input_name or None,
            output_name=manifest.output_name or None, intra_op_threads=intra_op_threads,
        )
        return cls(str(manifest.model_version), scorer, RowParser(names), float(manifest.thresholds["default"]),
                   manifest, str(bundle.sha256))
