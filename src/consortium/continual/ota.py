"""The OTA hook: a retrained global model becomes a signed, registered, announced bundle.

:class:`RegistryPublisher` is the ``publish`` callable of
:class:`~consortium.continual.orchestrate.RetrainingService`.  It exports the
model with the registry's exporter (ONNX with the standardisation inside),
signs the bundle with the coordinator's key, files it in the
:class:`~consortium.registry.registry.ModelRegistry` (promoted on its channel,
parent = the previously promoted version) and, when a broker and a download
base URL are given, announces it retained on ``consortium/models/<channel>`` —
from where every edge agent downloads, verifies and shadow-tests it.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from consortium.continual.retrain import GlobalModel
from consortium.edge.messages import ModelAnnouncement
from consortium.errors import param_error
from consortium.registry.announce import announce_bundle
from consortium.registry.export import export_bundle
from consortium.registry.publish import bundle_url
from consortium.registry.registry import DEFAULT_CHANNEL, ModelRegistry, RegistryEntry

logger = logging.getLogger(__name__)


class RegistryPublisher:
    """Publish retrained models to the registry (and announce them to the edge).

    Parameters
    ----------
    registry : ModelRegistry
        Where bundles are filed.
    private_key : Ed25519PrivateKey
        The coordinator's bundle-signing key.
    feature_names : sequence of str
        Feature names in model order (the bundle's schema; unchanged by retraining).
    channel : str
        Registry channel / announcement topic.
    broker_url, base_url : str, optional
        Announce on the broker with download URL ``<base_url>/api/models/<version>/bundle``
        (both or neither).
    announce_options : mapping, optional
        ``tls_ca``, ``username``, ``password``, ``timeout`` for the announcement.
    """

    def __init__(
        self,
        registry: ModelRegistry,
        *,
        private_key: Ed25519PrivateKey,
        feature_names: Sequence[str],
        channel: str = DEFAULT_CHANNEL,
        broker_url: str | None = None,
        base_url: str | None = None,
        announce_options: Mapping[str, Any] | None = None,
    ) -> None:
        if (broker_url is None) != (base_url is None):
            raise param_error("base_url", "RegistryPublisher", "given together with broker_url (both or neither)",
                              base_url)
        self.registry = registry
        self.private_key = private_key
        self.feature_names = list(feature_names)
        self.channel = channel
        self.broker_url, self.base_url = broker_url, base_url
        self.announce_options = dict(announce_options or {})
        self.published: list[RegistryEntry] = []

    def __call__(self, model: GlobalModel) -> str:
        """Export, sign, register (promoted) and announce ``model``; return its version."""
        current = self.registry.promoted(self.channel)
        parent = current.model_version if current is not None and current.model_version != model.version else None
        with tempfile.TemporaryDirectory(dir=self.registry.blob_dir) as tmp:
            path = export_bundle(
                Path(tmp) / f"{model.version}.bundle",
                model=model.build(),
                standardizer=model.standardizer,
                feature_names=self.feature_names,
                threshold=model.threshold,
                model_version=model.version,
                private_key=self.private_key,
                parent_version=parent,
                extra={"origin": "drift-triggered retraining"},
            )
            entry = self.registry.add(path, channel=self.channel, promote=True)
        self.published.append(entry)
        if self.broker_url is not None and self.base_url is not None:
            announce_bundle(
                self.broker_url,
                ModelAnnouncement(channel=self.channel, model_version=model.version,
                                  url=bundle_url(self.base_url, model.version), sha256=entry.sha256, ts=time.time()),
                **self.announce_options,
            )
        logger.info("published retrained model %s (parent %s) on channel %s", model.version, parent, self.channel)
        return model.version
