"""From a finished federated run to a signed, registered (and announced) model bundle.

:func:`publish_run_model` works from the run store alone, so it serves every way
of training: ``consortium simulate``, the deployed ``consortium coordinator``
(whose ServerApp runs in another process) and the demo.  It

1. picks the run's kept round (the coordinator's selection, recorded when the run
   finished; else the round with the best federated validation AUPRC),
2. rebuilds the global model and the federated standardiser from that round's
   checkpoint,
3. exports ONNX with preprocessing inside, writes a bundle signed with the
   coordinator's key whose manifest carries the round's metrics, its decision
   threshold, the privacy spent (from the privacy ledger when there is one) and
   the previously promoted version as parent,
4. files it in the registry (promoted on ``channel`` unless told otherwise), and
5. optionally announces it on ``consortium/models/<channel>`` (retained).
"""

from __future__ import annotations

import logging
import math
import re
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from consortium.edge.messages import ModelAnnouncement
from consortium.errors import ConsortiumError, param_error
from consortium.models import Standardizer, build_model, set_parameters
from consortium.registry.announce import announce_bundle
from consortium.registry.export import export_bundle
from consortium.registry.registry import DEFAULT_CHANNEL, ModelRegistry, RegistryEntry
from consortium.registry.store import RunStore

logger = logging.getLogger(__name__)

__all__ = [
    "PublishedModel",
    "bundle_url",
    "publish_demo_model",
    "publish_run_model",
    "run_model_version",
    "selected_round",
]

_SELECTED = re.compile(r"selected round (\d+)")
_NOT_METRICS = ("threshold", "seconds")


@dataclass(frozen=True)
class PublishedModel:
    """What :func:`publish_run_model` did."""

    entry: RegistryEntry
    round: int
    announced: bool


def bundle_url(base_url: str, version: str) -> str:
    """Download URL of a bundle on a registry HTTP server (``GET /api/models/{version}/bundle``)."""
    return f"{base_url.rstrip('/')}/api/models/{version}/bundle"


def run_model_version(run_name: str, run_id: str, round: int) -> str:
    """Default model version: ``<run name>-<first 8 of run id>-r<round>``, restricted to safe characters."""
    name = re.sub(r"[^A-Za-z0-9._+-]+", "-", run_name).strip("-.") or "model"
    return f"{name[:80]}-{run_id[:8]}-r{round}"


def selected_round(store: RunStore, run_id: str) -> int:
    """The round whose model the coordinator kept.

    Read from the run's final message (``"selected round N ..."``); for runs that
    did not record it, the round with the best federated validation AUPRC
    (earliest among ties), else the last round.
    """
    run = store.get_run(run_id)
    match = _SELECTED.search(run.message or "")
    if match:
        return int(match.group(1))
    rounds = store.rounds(run_id)
    if not rounds:
        raise ConsortiumError(f"Run {run_id!r} has no completed round: there is no model to publish.")
    scored = [(r.global_metrics.get("val-auprc", math.nan), r.round) for r in rounds]
    finite = [(v, rnd) for v, rnd in scored if math.isfinite(v)]
    if not finite:
        return rounds[-1].round
    best = max(v for v, _ in finite)
    return min(rnd for v, rnd in finite if v == best)


def _ledger_privacy(store: RunStore, run_id: str) -> dict[str, Any] | None:
    """(ε, δ) spent by the run according to the privacy ledger, when that module is installed."""
    try:
        from consortium.privacy.ledger import PrivacyLedger  # noqa: PLC0415 - optional concern
    except ImportError:
        return None
    charges = PrivacyLedger(store).charges(run_id=run_id)
    if not charges:
        return None
    # The guarantee of the model is the weakest institution's: the largest cumulative ε.
    return {
        "epsilon": float(max(c.epsilon for c in charges)),
        "delta": float(max(c.delta for c in charges)),
        "mechanism": "+".join(sorted({str(c.mechanism) for c in charges})),
    }


def _mechanism_params(recorded: object) -> dict[str, Any]:
    """The checkpoint's privacy record (mechanism parameters, unit, noise, collusion ε) as finite JSON.

    The ledger gives (ε, δ); the checkpoint says how they were spent.  Non-finite
    numbers (an ε of ∞ against colluders when k = 1, say) become strings, so the
    manifest stays strict JSON.
    """
    if not isinstance(recorded, Mapping):
        return {}

    def clean(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {str(k): clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [clean(v) for v in value]
        if isinstance(value, float) and not math.isfinite(value):
            return str(value)
        if value is None or isinstance(value, bool | int | float | str):
            return value
        return str(value)

    return {k: clean(v) for k, v in recorded.items() if k not in ("mechanism", "delta", "epsilon")}


def publish_run_model(
    store: RunStore,
    *,
    registry: ModelRegistry,
    private_key: Ed25519PrivateKey,
    run_id: str | None = None,
    round: int | None = None,
    channel: str = DEFAULT_CHANNEL,
    model_version: str | None = None,
    promote: bool = True,
    privacy: Mapping[str, Any] | None = None,
    broker_url: str | None = None,
    base_url: str | None = None,
    announce_options: Mapping[str, Any] | None = None,
) -> PublishedModel:
    """Export a run's global model as a signed bundle, register it and optionally announce it.

    Parameters
    ----------
    store : RunStore
        The run store holding the run and its checkpoints.
    registry : ModelRegistry
        Where the bundle is filed.
    private_key : Ed25519PrivateKey
        The coordinator's bundle-signing key.
    run_id : str, optional
        The run (default: the newest completed run in ``store``).
    round : int, optional
        Which round's model (default: :func:`selected_round`).
    channel : str, default "default"
        Registry channel (and MQTT ``consortium/models/<channel>`` topic).
    model_version : str, optional
        Default :func:`run_model_version`.
    promote : bool, default True
        Make it the channel's promoted model.
    privacy : mapping, optional
        ``{"epsilon", "delta", "mechanism"}``; default from the privacy ledger, else None.
    broker_url, base_url : str, optional
        When both are given, announce the bundle on the broker with the download
        URL ``<base_url>/api/models/<version>/bundle``.
    announce_options : mapping, optional
        Keyword arguments for :func:`~consortium.registry.announce.announce_bundle`
        (``tls_ca``, ``username``, ``password``, ``timeout``).
    """
    owner = "publish_run_model"
    if (broker_url is None) != (base_url is None):
        raise param_error("base_url", owner, "given together with broker_url (both or neither)", base_url)
    if run_id is None:
        completed = [r for r in store.list_runs() if r.status == "completed"]
        if not completed:
            raise ConsortiumError(f"The run store {store.url_masked} holds no completed run to publish.")
        run_id = completed[0].run_id
    run = store.get_run(run_id)
    if run.status != "completed":
        raise ConsortiumError(f"Run {run_id!r} is {run.status}, not completed: its model is not published.")
    chosen = selected_round(store, run_id) if round is None else round
    checkpoint = store.load_checkpoint(run_id, round=chosen)
    extra = checkpoint.extra
    try:
        n_params = int(extra["n_params"])
        feature_names = [str(f) for f in extra["feature_names"]]
        kind, hidden, threshold = str(extra["model"]), tuple(extra["hidden"]), float(extra["threshold"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ConsortiumError(
            f"The checkpoint of round {chosen} of run {run_id!r} lacks what a bundle needs ({exc!r}); "
            "it was written by an older coordinator."
        ) from None
    params = checkpoint.arrays[:n_params]
    standardizer = Standardizer(mean=checkpoint.arrays[n_params], std=checkpoint.arrays[n_params + 1])
    model = build_model(kind, len(feature_names), hidden=hidden)
    set_parameters(model, params)
    metrics = next((r.global_metrics for r in store.rounds(run_id) if r.round == chosen), {})
    version = model_version or run_model_version(run.name, run_id, chosen)
    current = registry.promoted(channel)
    parent = current.model_version if current is not None and current.model_version != version else None
    spent = dict(privacy) if privacy is not None else _ledger_privacy(store, run_id)
    if spent is not None and "params" not in spent:
        how = _mechanism_params(extra.get("privacy"))
        if how:
            spent["params"] = how
    with tempfile.TemporaryDirectory(dir=registry.blob_dir) as tmp:
        path = export_bundle(
            Path(tmp) / f"{version}.bundle",
            model=model,
            standardizer=standardizer,
            feature_names=feature_names,
            threshold=threshold,
            model_version=version,
            private_key=private_key,
            parent_version=parent,
            run_id=run_id,
            metrics={k: v for k, v in metrics.items() if k not in _NOT_METRICS},
            privacy=spent,
            extra={"round": chosen, "institutions": list(run.institutions)},
        )
        entry = registry.add(path, channel=channel, promote=promote)
    announced = False
    if broker_url is not None and base_url is not None:
        announce_bundle(
            broker_url,
            ModelAnnouncement(
                channel=channel,
                model_version=version,
                url=bundle_url(base_url, version),
                sha256=entry.sha256,
                ts=time.time(),
            ),
            **dict(announce_options or {}),
        )
        announced = True
    logger.info("Published model %s of run %s (round %d) on channel %s", version, run_id, chosen, channel)
    return PublishedModel(entry=entry, round=chosen, announced=announced)


def publish_demo_model(store: RunStore, *, out_dir: Path | str, run_id: str) -> PublishedModel:
    """The demo's publication: key and registry inside ``out_dir``, bundle promoted on "default".

    Creates ``out_dir/keys/bundle-signing.pem`` (0600, with ``.pub``) on first use
    and reuses it afterwards, so agents given the public key accept every later
    demo model; the registry's blobs go to ``out_dir/registry``.
    """
    from consortium.registry.signing import (  # noqa: PLC0415 - keep the module's import light
        generate_signing_key,
        load_private_key,
    )

    keys = Path(out_dir) / "keys"
    keys.mkdir(parents=True, exist_ok=True)
    key_path = keys / "bundle-signing.pem"
    if not key_path.exists():
        generate_signing_key(key_path)
    private_key = load_private_key(key_path)
    registry = ModelRegistry(store, Path(out_dir) / "registry", public_key=private_key.public_key())
    return publish_run_model(store, registry=registry, private_key=private_key, run_id=run_id)
