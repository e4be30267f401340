"""Signed model bundles: one file an edge agent can verify and run without Python model code.

A bundle is a zip archive with exactly three members:

``manifest.json``
    The :class:`BundleManifest` as canonical JSON (sorted keys, no spaces, ASCII,
    no NaN).  It names the ONNX model's SHA-256 in ``files``.
``model.onnx``
    The model with its preprocessing inside the graph.
``signature``
    JSON ``{"algorithm": "ed25519", "key_id": ..., "signature": <base64>}``: an
    Ed25519 signature over the exact bytes of ``manifest.json``.

Signing the manifest (which holds the model's hash) signs the whole bundle.
:func:`read_bundle` checks, in order: archive well-formed and of bounded size,
members as expected, signature present, signed by the expected key, signature
valid, manifest well-formed and of a known format version, every file hash
correct.  Any failure raises :class:`BundleError` saying which check failed, so an
agent can log it and keep its current model.

Archives are written deterministically (fixed member order and timestamps): the
same manifest, model and key give the same bytes and so the same archive hash.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import logging
import math
import os
import re
import zipfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from consortium.errors import ConsortiumError, param_error
from consortium.registry.signing import key_fingerprint

logger = logging.getLogger(__name__)

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "MODEL_NAME",
    "SIGNATURE_NAME",
    "SUPPORTED_FORMAT_VERSIONS",
    "Bundle",
    "BundleError",
    "BundleManifest",
    "FeatureSpec",
    "canonical_manifest_json",
    "check_compatible",
    "inspect_bundle",
    "parse_manifest",
    "read_bundle",
    "sha256_hex",
    "write_bundle",
]

FORMAT_VERSION = 1
"""Bundle format version written by this code."""
SUPPORTED_FORMAT_VERSIONS: tuple[int, ...] = (1,)
"""Bundle format versions :func:`read_bundle` understands."""

MANIFEST_NAME = "manifest.json"
MODEL_NAME = "model.onnx"
SIGNATURE_NAME = "signature"
_MEMBERS = (MANIFEST_NAME, MODEL_NAME, SIGNATURE_NAME)

MAX_BUNDLE_BYTES = 512 * 1024 * 1024
"""Largest archive (and largest uncompressed model) accepted."""
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
MAX_JSON_DEPTH = 32
"""Deepest nesting accepted inside the manifest's ``extra``."""
_MAX_SIGNATURE_BYTES = 4096
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)

_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:-]{0,127}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
FEATURE_DTYPES: tuple[str, ...] = ("float32", "float64", "int64", "int32", "bool")
"""Feature dtypes a manifest may declare."""


class BundleError(ConsortiumError):
    """A bundle or manifest is malformed, unsigned, tampered with, or incompatible."""


def sha256_hex(data: bytes) -> str:
    """Lower-case hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- manifest


def _is_real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _finite(value: object, where: str, *, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    try:
        number = float(value) if _is_real(value) else math.nan  # type: ignore[arg-type]
    except OverflowError:  # an int beyond float range
        number = math.inf
    if not math.isfinite(number):
        expected = "a finite number" + (" or null" if allow_none else "")
        raise BundleError(f"Manifest field {where!r} must be {expected}. Got {str(value)[:80]!r} instead.")
    return number


def _text(value: object, where: str, pattern: re.Pattern[str] | None = None, *, max_length: int = 200) -> str:
    if not isinstance(value, str) or not value or len(value) > max_length:
        raise BundleError(
            f"Manifest field {where!r} must be a non-empty string of at most {max_length} characters. "
            f"Got {value!r:.80} instead."
        )
    if pattern is not None and not pattern.match(value):
        raise BundleError(
            f"Manifest field {where!r} must match {pattern.pattern}. Got {value!r:.80} instead."
        )
    return value


def _json_value(value: object, where: str, depth: int = 0) -> Any:
    """A deep copy of ``value`` if it is plain JSON without NaN/inf, else BundleError."""
    if depth > MAX_JSON_DEPTH:
        raise BundleError(f"Manifest field {where[:80]!r} is nested deeper than {MAX_JSON_DEPTH} levels.")
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise BundleError(f"Manifest field {where!r} must be JSON without NaN or infinity. Got {value!r}.")
        return value
    if isinstance(value, Mapping):
        out = {}
        for key, sub in value.items():
            if not isinstance(key, str):
                raise BundleError(f"Manifest field {where!r} must have string keys. Got {key!r:.80} instead.")
            out[key] = _json_value(sub, f"{where}.{key}", depth + 1)
        return out
    if isinstance(value, list | tuple):
        return [_json_value(sub, f"{where}[{i}]", depth + 1) for i, sub in enumerate(value)]
    raise BundleError(
        f"Manifest field {where!r} must hold JSON data. Got {type(value).__name__} {value!r:.80} instead."
    )


@dataclass(frozen=True)
class FeatureSpec:
    """One model input column, in the order the model expects.

    Attributes
    ----------
    name : str
        Column name in the agent's input rows.
    dtype : str
        One of :data:`FEATURE_DTYPES` (the ONNX input is float32 in any case).
    min, max : float or None
        Range seen in training (from the federated statistics); informational,
        used for drift and input sanity reports, never to clip.
    """

    name: str
    dtype: str = "float32"
    min: float | None = None
    max: float | None = None

    def __post_init__(self) -> None:
        _text(self.name, "features[].name", _NAME_RE, max_length=128)
        if self.dtype not in FEATURE_DTYPES:
            raise BundleError(
                f"Manifest field 'features[{self.name}].dtype' must be one of {FEATURE_DTYPES}. "
                f"Got {self.dtype!r:.80} instead."
            )
        lo = _finite(self.min, f"features[{self.name}].min", allow_none=True)
        hi = _finite(self.max, f"features[{self.name}].max", allow_none=True)
        if lo is not None and hi is not None and lo > hi:
            raise BundleError(
                f"Manifest field 'features[{self.name}]' must have min <= max. Got min={lo}, max={hi} instead."
            )
        object.__setattr__(self, "min", lo)
        object.__setattr__(self, "max", hi)

    @classmethod
    def from_dict(cls, raw: object, *, where: str = "features[]") -> FeatureSpec:
        """Build from decoded JSON, naming the missing or unexpected key."""
        if not isinstance(raw, Mapping):
            raise BundleError(f"Manifest field {where!r} must be an object. Got {raw!r:.80} instead.")
        known = {f.name for f in fields(cls)}
        extra = set(raw) - known
        if extra:
            raise BundleError(f"Manifest field {where!r} has unexpected key(s) {sorted(map(str, extra))}.")
        if "name" not in raw:
            raise BundleError(f"Manifest field {where!r} is missing the key 'name'.")
        return cls(**{key: raw[key] for key in known if key in raw})


def _utc_now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class BundleManifest:
    """What a bundle holds and where it came from; signed as canonical JSON.

    Attributes
    ----------
    model_version : str
        Unique version of this model (letters, digits, ``._+-``; used in file
        names and URLs), e.g. ``"fraud-20261204-r20"``.
    kind : str
        Model family: ``"mlp"``, ``"autoencoder"``, ``"gbdt"``, ``"detector"``...
    features : tuple of FeatureSpec
        Input columns in model order (mappings are converted).
    thresholds : dict of str to float
        Decision thresholds on the model's output; ``"default"`` is required
        and is what the edge agent alerts on.
    input_name, output_name : str
        Names of the ONNX graph's input (float32 ``(n, d)``) and score output
        (float32 ``(n,)``).
    parent_version : str or None
        The model this one replaces (None for the first of a line).
    run_id : str or None
        The federated training run that produced it.
    metrics : dict of str to float
        Held-out evaluation metrics (finite values only).
    privacy : dict or None
        ``{"epsilon": float, "delta": float, "mechanism": str}`` spent to train it
        (optionally ``"params"``: the mechanism's parameters as a JSON object), or
        None for a model trained without differential privacy.
    created_at : str
        ISO-8601 UTC timestamp (default: now).
    files : dict of str to str
        ``{member name: sha256 hex}``; filled in by :func:`write_bundle`.
    extra : dict
        Further JSON data (e.g. score semantics, exporter version).
    format_version : int
        Bundle format version (:data:`FORMAT_VERSION`).
    """

    model_version: str
    kind: str
    features: tuple[FeatureSpec, ...]
    thresholds: dict[str, float]
    input_name: str = "input"
    output_name: str = "score"
    parent_version: str | None = None
    run_id: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    privacy: dict[str, Any] | None = None
    created_at: str = field(default_factory=_utc_now_iso)
    files: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        fv = self.format_version
        if not isinstance(fv, int) or isinstance(fv, bool):
            raise BundleError(f"Manifest field 'format_version' must be an integer. Got {fv!r:.80} instead.")
        if fv not in SUPPORTED_FORMAT_VERSIONS:
            raise BundleError(
                f"Unknown bundle format version {fv}: this consortium understands "
                f"{list(SUPPORTED_FORMAT_VERSIONS)}. Upgrade the agent to read newer bundles."
            )
        _text(self.model_version, "model_version", _VERSION_RE, max_length=128)
        if self.parent_version is not None:
            _text(self.parent_version, "parent_version", _VERSION_RE, max_length=128)
        _text(self.kind, "kind", _NAME_RE, max_length=64)
        _text(self.input_name, "input_name", _NAME_RE, max_length=128)
        _text(self.output_name, "output_name", _NAME_RE, max_length=128)
        if self.run_id is not None:
            _text(self.run_id, "run_id", max_length=64)
        self._set_features()
        object.__setattr__(self, "thresholds", self._float_map(self.thresholds, "thresholds"))
        if "default" not in self.thresholds:
            raise BundleError(
                f"Manifest field 'thresholds' must contain the key 'default'. Got keys {sorted(self.thresholds)}."
            )
        object.__setattr__(self, "metrics", self._float_map(self.metrics, "metrics"))
        object.__setattr__(self, "privacy", self._privacy(self.privacy))
        self._check_created_at()
        object.__setattr__(self, "files", self._files(self.files))
        if not isinstance(self.extra, Mapping):
            raise BundleError(f"Manifest field 'extra' must be an object. Got {self.extra!r:.80} instead.")
        object.__setattr__(self, "extra", _json_value(self.extra, "extra"))

    def _set_features(self) -> None:
        raw = self.features
        if isinstance(raw, str | bytes | Mapping) or not isinstance(raw, list | tuple) or not raw:
            raise BundleError(f"Manifest field 'features' must be a non-empty list. Got {raw!r:.80} instead.")
        specs = tuple(
            item if isinstance(item, FeatureSpec) else FeatureSpec.from_dict(item, where=f"features[{i}]")
            for i, item in enumerate(raw)
        )
        names = [spec.name for spec in specs]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise BundleError(f"Manifest field 'features' must have unique names. Got duplicates {duplicates}.")
        object.__setattr__(self, "features", specs)

    @staticmethod
    def _float_map(raw: object, where: str) -> dict[str, float]:
        if not isinstance(raw, Mapping):
            raise BundleError(f"Manifest field {where!r} must be an object of numbers. Got {raw!r:.80} instead.")
        out: dict[str, float] = {}
        for key, value in raw.items():
            _text(key, f"{where} key", max_length=128)
            out[key] = _finite(value, f"{where}.{key}")  # type: ignore[assignment]
        return out

    @staticmethod
    def _privacy(raw: object) -> dict[str, Any] | None:
        if raw is None:
            return None
        if not isinstance(raw, Mapping):
            raise BundleError(f"Manifest field 'privacy' must be an object or null. Got {raw!r:.80} instead.")
        if not {"epsilon", "delta", "mechanism"} <= set(raw) <= {"epsilon", "delta", "mechanism", "params"}:
            raise BundleError(
                "Manifest field 'privacy' must have the keys ['delta', 'epsilon', 'mechanism'] and optionally "
                f"'params'. Got {sorted(map(str, raw))} instead."
            )
        epsilon = _finite(raw["epsilon"], "privacy.epsilon")
        delta = _finite(raw["delta"], "privacy.delta")
        assert epsilon is not None and delta is not None
        if epsilon < 0:
            raise BundleError(f"Manifest field 'privacy.epsilon' must be >= 0. Got {epsilon} instead.")
        if not 0 <= delta < 1:
            raise BundleError(f"Manifest field 'privacy.delta' must be in [0, 1). Got {delta} instead.")
        mechanism = _text(raw["mechanism"], "privacy.mechanism", max_length=128)
        out: dict[str, Any] = {"epsilon": epsilon, "delta": delta, "mechanism": mechanism}
        if "params" in raw:
            out["params"] = _privacy_params(raw["params"])
        return out

    def _check_created_at(self) -> None:
        value = _text(self.created_at, "created_at", max_length=64)
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            parsed = None
        if parsed is None or parsed.utcoffset() is None or parsed.utcoffset().total_seconds() != 0:  # type: ignore[union-attr]
            raise BundleError(
                f"Manifest field 'created_at' must be an ISO-8601 UTC timestamp like "
                f"'2026-12-04T12:00:00Z'. Got {value!r:.80} instead."
            )

    @staticmethod
    def _files(raw: object) -> dict[str, str]:
        if not isinstance(raw, Mapping):
            raise BundleError(f"Manifest field 'files' must be an object. Got {raw!r:.80} instead.")
        out: dict[str, str] = {}
        for name, digest in raw.items():
            if name not in (MODEL_NAME,):
                raise BundleError(f"Manifest field 'files' names an unknown member {name!r:.80}; only {MODEL_NAME!r}.")
            if not isinstance(digest, str) or not _SHA256_RE.match(digest):
                raise BundleError(
                    f"Manifest field 'files.{name}' must be a lower-case hex SHA-256. Got {digest!r:.80} instead."
                )
            out[name] = digest
        return out

    # ----------------------------------------------------------------- conversion

    @property
    def feature_names(self) -> tuple[str, ...]:
        """Input column names in model order."""
        return tuple(spec.name for spec in self.features)

    @property
    def threshold(self) -> float:
        """The default decision threshold (``thresholds["default"]``)."""
        return self.thresholds["default"]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (features as a list of objects)."""
        data = asdict(self)
        data["features"] = [asdict(spec) for spec in self.features]
        return data

    @classmethod
    def from_dict(cls, raw: object) -> BundleManifest:
        """Build from decoded JSON, checking every field; raises :class:`BundleError`."""
        if not isinstance(raw, Mapping):
            raise BundleError(f"A bundle manifest must be a JSON object. Got {type(raw).__name__} instead.")
        known = {f.name for f in fields(cls)}
        extra = set(raw) - known
        if extra:
            raise BundleError(f"Manifest has unexpected field(s) {sorted(map(str, extra))}.")
        if "format_version" not in raw:
            raise BundleError("Manifest field 'format_version' is missing.")
        for name in ("model_version", "kind", "features", "thresholds", "input_name", "output_name",
                     "created_at", "files"):
            if name not in raw:
                raise BundleError(f"Manifest field {name!r} is missing.")
        try:
            return cls(**{key: raw[key] for key in known if key in raw})
        except BundleError:
            raise
        except (TypeError, ValueError, AttributeError) as exc:  # a value of a type no check foresaw
            raise BundleError(f"Manifest is malformed: {exc}.") from None


def canonical_manifest_json(manifest: BundleManifest) -> bytes:
    """The exact bytes that are stored as ``manifest.json`` and signed."""
    if not isinstance(manifest, BundleManifest):
        raise param_error("manifest", "canonical_manifest_json", "a BundleManifest", type(manifest).__name__)
    return json.dumps(
        manifest.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def parse_manifest(data: bytes | str) -> BundleManifest:
    """Decode and check a manifest; every problem is a :class:`BundleError` naming it."""
    if isinstance(data, str):
        data = data.encode("utf-8", errors="surrogatepass")
    if not isinstance(data, bytes):
        raise param_error("data", "parse_manifest", "bytes or str", type(data).__name__)
    if len(data) > MAX_MANIFEST_BYTES:
        raise BundleError(f"The bundle manifest is {len(data)} bytes; the limit is {MAX_MANIFEST_BYTES}.")

    def refuse_constant(name: str) -> Any:
        raise BundleError(f"A bundle manifest must be JSON without NaN or infinity. Got {name}.")

    try:
        raw = json.loads(data.decode("utf-8"), parse_constant=refuse_constant)
    except UnicodeDecodeError as exc:
        raise BundleError(f"The bundle manifest is not UTF-8 text (byte {exc.start}).") from None
    except json.JSONDecodeError as exc:
        raise BundleError(f"The bundle manifest is malformed JSON: {exc.msg} at line {exc.lineno} "
                          f"column {exc.colno}.") from None
    except RecursionError:
        raise BundleError("The bundle manifest is malformed JSON: nested too deeply.") from None
    return BundleManifest.from_dict(raw)


def check_compatible(old: BundleManifest, new: BundleManifest) -> None:
    """Refuse ``new`` if it cannot replace ``old`` on the same input stream.

    Compatible means the same input columns, in the same order, with the same
    dtypes: the agent feeds rows to the new model exactly as to the old one.
    Model kind, thresholds, ranges and metrics may change.

    Raises
    ------
    BundleError
        Naming the first difference (added, removed, reordered or retyped column).
    """
    for name, value in (("old", old), ("new", new)):
        if not isinstance(value, BundleManifest):
            raise param_error(name, "check_compatible", "a BundleManifest", type(value).__name__)
    prefix = f"Model {new.model_version} is schema-incompatible with the active model {old.model_version}"
    old_names, new_names = old.feature_names, new.feature_names
    missing = [n for n in old_names if n not in new_names]
    added = [n for n in new_names if n not in old_names]
    if missing or added:
        raise BundleError(f"{prefix}: feature(s) removed {missing}, added {added}.")
    if old_names != new_names:
        position = next(i for i, (a, b) in enumerate(zip(old_names, new_names, strict=True)) if a != b)
        raise BundleError(
            f"{prefix}: feature order differs at position {position} "
            f"(expected {old_names[position]!r}, got {new_names[position]!r})."
        )
    for old_spec, new_spec in zip(old.features, new.features, strict=True):
        if old_spec.dtype != new_spec.dtype:
            raise BundleError(
                f"{prefix}: feature {old_spec.name!r} changes dtype from {old_spec.dtype} to {new_spec.dtype}."
            )


# --------------------------------------------------------------------------- archive


@dataclass(frozen=True, eq=False)
class Bundle:
    """A verified bundle, as returned by :func:`read_bundle`.

    Attributes
    ----------
    manifest : BundleManifest
        The signed manifest.
    onnx_bytes : bytes
        The ONNX model (its hash matches ``manifest.files``).
    sha256 : str
        SHA-256 of the whole archive (what :class:`~consortium.edge.messages.ModelAnnouncement` carries).
    key_id : str
        Fingerprint of the key that signed it.
    """

    manifest: BundleManifest
    onnx_bytes: bytes
    sha256: str
    key_id: str


def _signature_document(private_key: Ed25519PrivateKey, manifest_bytes: bytes) -> bytes:
    signature = private_key.sign(manifest_bytes)
    document = {
        "algorithm": "ed25519",
        "key_id": key_fingerprint(private_key),
        "signature": base64.b64encode(signature).decode("ascii"),
    }
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode("ascii")


def bundle_bytes(*, onnx_model: bytes, manifest: BundleManifest, private_key: Ed25519PrivateKey) -> bytes:
    """The archive :func:`write_bundle` writes, in memory.

    ``manifest.files`` is replaced by the model's hash.
    """
    owner = "write_bundle"
    if not isinstance(onnx_model, bytes | bytearray) or not onnx_model:
        raise param_error("onnx_model", owner, "non-empty ONNX bytes", type(onnx_model).__name__)
    if len(onnx_model) > MAX_BUNDLE_BYTES:
        raise param_error("onnx_model", owner, f"at most {MAX_BUNDLE_BYTES} bytes", f"{len(onnx_model)} bytes")
    if not isinstance(manifest, BundleManifest):
        raise param_error("manifest", owner, "a BundleManifest", type(manifest).__name__)
    if not isinstance(private_key, Ed25519PrivateKey):
        raise param_error("private_key", owner, "an Ed25519PrivateKey (load_private_key)", type(private_key).__name__)
    onnx_model = bytes(onnx_model)
    signed = replace(manifest, files={MODEL_NAME: sha256_hex(onnx_model)})
    manifest_bytes = canonical_manifest_json(signed)
    members = {
        MANIFEST_NAME: manifest_bytes,
        MODEL_NAME: onnx_model,
        SIGNATURE_NAME: _signature_document(private_key, manifest_bytes),
    }
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name in _MEMBERS:
            info = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, members[name])
    return buffer.getvalue()


def write_bundle(
    out_path: Path | str, *, onnx_model: bytes, manifest: BundleManifest, private_key: Ed25519PrivateKey
) -> Path:
    """Sign and write a bundle file (atomically: a reader never sees half a bundle).

    Parameters
    ----------
    out_path : Path or str
        Destination file (conventionally ``<model_version>.bundle``).
    onnx_model : bytes
        The serialized ONNX model.
    manifest : BundleManifest
        Everything but ``files``, which is set to the model's SHA-256.
    private_key : Ed25519PrivateKey
        The coordinator's signing key (:func:`~consortium.registry.signing.load_private_key`).

    Returns
    -------
    Path
        ``out_path``.
    """
    path = Path(out_path)
    data = bundle_bytes(onnx_model=onnx_model, manifest=manifest, private_key=private_key)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise BundleError(f"Cannot write the bundle {str(path)!r}: {exc.strerror}.") from exc
    logger.info(
        "Wrote bundle %s (model %s, %d bytes, sha256 %s)",
        path, manifest.model_version, len(data), sha256_hex(data)[:12],
    )
    return path


def _read_source(path_or_bytes: Path | str | bytes) -> tuple[bytes, str]:
    if isinstance(path_or_bytes, bytes | bytearray | memoryview):
        return bytes(path_or_bytes), "bundle"
    if not isinstance(path_or_bytes, str | os.PathLike):
        raise param_error("path_or_bytes", "read_bundle", "a path or the bundle's bytes", type(path_or_bytes).__name__)
    path = Path(path_or_bytes)
    where = f"bundle {str(path)!r}"
    try:
        size = path.stat().st_size
        if size > MAX_BUNDLE_BYTES:
            raise BundleError(f"The {where} is {size} bytes; the limit is {MAX_BUNDLE_BYTES}.")
        return path.read_bytes(), where
    except FileNotFoundError:
        raise BundleError(f"The {where} does not exist.") from None
    except OSError as exc:
        raise BundleError(f"Cannot read the {where}: {exc.strerror}.") from exc


def _members(data: bytes, where: str) -> dict[str, bytes]:
    if len(data) > MAX_BUNDLE_BYTES:
        raise BundleError(f"The {where} is {len(data)} bytes; the limit is {MAX_BUNDLE_BYTES}.")
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except Exception as exc:  # noqa: BLE001 - zipfile raises many types on hostile input; all mean "not a bundle"
        raise BundleError(
            f"The {where} is not a bundle archive (not a readable zip file: {type(exc).__name__}: {exc})."
        ) from None
    with archive:
        infos = archive.infolist()
        names = [info.filename for info in infos]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise BundleError(f"The {where} is tampered with: duplicate member(s) {duplicated}.")
        unexpected = sorted(set(names) - set(_MEMBERS))
        if unexpected:
            raise BundleError(
                f"The {where} holds unexpected member(s) {str(unexpected[:5])[:200]}; expected {list(_MEMBERS)}."
            )
        if SIGNATURE_NAME not in names:
            raise BundleError(f"The {where} is unsigned: it has no '{SIGNATURE_NAME}' member.")
        for name in (MANIFEST_NAME, MODEL_NAME):
            if name not in names:
                raise BundleError(f"The {where} is incomplete: member {name!r} is missing.")
        limits = {MANIFEST_NAME: MAX_MANIFEST_BYTES, MODEL_NAME: MAX_BUNDLE_BYTES, SIGNATURE_NAME: _MAX_SIGNATURE_BYTES}
        out: dict[str, bytes] = {}
        for info in infos:
            limit = limits[info.filename]
            if info.file_size > limit:
                raise BundleError(
                    f"The {where} member {info.filename!r} is {info.file_size} bytes; the limit is {limit}."
                )
            try:
                with archive.open(info) as handle:
                    content = handle.read(limit + 1)
            except Exception as exc:  # noqa: BLE001 - as above: CRC, zlib, header and version errors alike
                raise BundleError(
                    f"The {where} is corrupt or tampered with: member {info.filename!r} cannot be read "
                    f"({type(exc).__name__}: {exc})."
                ) from None
            if len(content) > limit:
                raise BundleError(f"The {where} member {info.filename!r} exceeds {limit} bytes.")
            out[info.filename] = content
    return out


def _check_signature(
    document: bytes, manifest_bytes: bytes, public_key: Ed25519PublicKey | None, where: str
) -> str:
    try:
        raw = json.loads(document.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise BundleError(f"The {where} has a malformed signature (not JSON).") from None
    if not isinstance(raw, dict) or set(raw) != {"algorithm", "key_id", "signature"}:
        raise BundleError(
            f"The {where} has a malformed signature: expected keys ['algorithm', 'key_id', 'signature']."
        )
    if raw["algorithm"] != "ed25519":
        raise BundleError(f"The {where} is signed with {raw['algorithm']!r:.40}; only 'ed25519' is accepted.")
    if not isinstance(raw["key_id"], str) or not re.match(r"^[0-9a-f]{16}$", raw["key_id"]):
        raise BundleError(f"The {where} has a malformed signature: bad key id {raw['key_id']!r:.40}.")
    if public_key is None:
        return raw["key_id"]
    expected_id = key_fingerprint(public_key)
    if raw["key_id"] != expected_id:
        raise BundleError(
            f"The {where} is signed by the wrong key: key id {raw['key_id']!r:.40}, "
            f"expected the coordinator's key {expected_id!r}."
        )
    try:
        if not isinstance(raw["signature"], str):
            raise ValueError
        signature = base64.b64decode(raw["signature"].encode("ascii"), validate=True)
    except (ValueError, binascii.Error, UnicodeEncodeError):
        raise BundleError(f"The {where} has a malformed signature (not base64).") from None
    try:
        public_key.verify(signature, manifest_bytes)
    except InvalidSignature:
        raise BundleError(
            f"The {where} has a bad signature: its manifest was modified after signing (tampered)."
        ) from None
    return expected_id


def read_bundle(path_or_bytes: Path | str | bytes, *, public_key: Ed25519PublicKey) -> Bundle:
    """Open a bundle and verify everything before anything in it is used.

    Parameters
    ----------
    path_or_bytes : Path, str or bytes
        A bundle file, or the archive's bytes (e.g. just downloaded).
    public_key : Ed25519PublicKey
        The coordinator's public key (:func:`~consortium.registry.signing.load_public_key`).

    Returns
    -------
    Bundle
        Manifest, ONNX bytes, archive SHA-256 and signer key id.

    Raises
    ------
    BundleError
        Naming the failed check: not an archive, unexpected/missing members,
        unsigned, wrong key, bad signature, malformed manifest, unknown format
        version, or hash mismatch.
    """
    if not isinstance(public_key, Ed25519PublicKey):
        raise param_error(
            "public_key", "read_bundle", "an Ed25519PublicKey (load_public_key)", type(public_key).__name__
        )
    return _open_bundle(path_or_bytes, public_key)


def inspect_bundle(path_or_bytes: Path | str | bytes) -> Bundle:
    """Every check of :func:`read_bundle` except verifying the signature against a key.

    For tools that only file or display bundles (the registry without a configured
    public key).  The signature must still be present and well-formed; never run
    a model obtained this way — use :func:`read_bundle`.
    """
    return _open_bundle(path_or_bytes, None)


def _open_bundle(path_or_bytes: Path | str | bytes, public_key: Ed25519PublicKey | None) -> Bundle:
    data, where = _read_source(path_or_bytes)
    members = _members(data, where)
    key_id = _check_signature(members[SIGNATURE_NAME], members[MANIFEST_NAME], public_key, where)
    try:
        manifest = parse_manifest(members[MANIFEST_NAME])
    except BundleError as exc:
        raise BundleError(f"The {where} has an invalid manifest: {exc}") from None
    if set(manifest.files) != {MODEL_NAME}:
        raise BundleError(f"The {where} manifest must list the hash of {MODEL_NAME!r} in 'files'.")
    actual = sha256_hex(members[MODEL_NAME])
    if actual != manifest.files[MODEL_NAME]:
        raise BundleError(
            f"The {where} is tampered with: hash mismatch for {MODEL_NAME!r} "
            f"(manifest says {manifest.files[MODEL_NAME][:16]}..., file has {actual[:16]}...)."
        )
    return Bundle(manifest=manifest, onnx_bytes=members[MODEL_NAME], sha256=sha256_hex(data), key_id=key_id)


MAX_PRIVACY_PARAMS_CHARS = 8192
"""Size cap of ``privacy.params`` in canonical JSON (a manifest is read before anything is trusted)."""


def _privacy_params(raw: object) -> dict[str, Any]:
    """The mechanism's parameters (σ, C, q, steps, noise, collusion ε, ...): a JSON object of finite values."""
    if not isinstance(raw, Mapping) or not all(isinstance(k, str) for k in raw):
        raise BundleError(
            f"Manifest field 'privacy.params' must be an object with string keys. Got {raw!r:.80} instead."
        )
    try:
        text = json.dumps(raw, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise BundleError(f"Manifest field 'privacy.params' must hold finite JSON values only ({exc}).") from None
    if len(text) > MAX_PRIVACY_PARAMS_CHARS:
        raise BundleError(
            f"Manifest field 'privacy.params' must be at most {MAX_PRIVACY_PARAMS_CHARS} characters of JSON. "
            f"Got {len(text)} instead."
        )
    parsed: dict[str, Any] = json.loads(text)
    return parsed
