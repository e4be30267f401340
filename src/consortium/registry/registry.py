"""The model registry: signed bundles on disk, their records in the run store, one promoted version per channel.

:class:`ModelRegistry` files a bundle (checking it completely, and its signature
when the registry knows the coordinator's public key), lists and shows bundles,
promotes a version on a channel (what edge agents on that channel should run),
exports a bundle file and re-verifies a stored one.

Blobs are named by version and content hash, written before their row and never
overwritten, so a registry killed mid-``add`` leaves at most an unreferenced file
that the next ``add`` of the same bundle reuses.  The database is the run store's (SQLite by
default, PostgreSQL in production); promotion updates the channel and appends to
the promotion history in one transaction.
"""

from __future__ import annotations

import builtins
import logging
import os
import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy.orm import Session

from consortium.edge.messages import MessageError, check_name
from consortium.errors import ConsortiumError, param_error
from consortium.registry.bundle import (
    Bundle,
    BundleError,
    BundleManifest,
    inspect_bundle,
    read_bundle,
    sha256_hex,
)
from consortium.registry.model_tables import ModelBundleRow, ModelChannelRow, ModelPromotionRow
from consortium.registry.store import RunStore

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_CHANNEL", "ModelRegistry", "Promotion", "RegistryEntry", "RegistryError"]

DEFAULT_CHANNEL = "default"
_KNOWN_SHOWN = 5


class RegistryError(ConsortiumError):
    """An unknown version or channel, or a registry operation that would lose or corrupt a model."""


@dataclass(frozen=True)
class RegistryEntry:
    """One registered bundle.

    Attributes
    ----------
    model_version, channel, kind : str
        Identity, the channel it was filed under and the model family.
    run_id : str or None
        Training run that produced it.
    created_at : datetime
        When the bundle was made (from its manifest), timezone-aware UTC.
    promoted : bool
        Whether it is the promoted version of its channel.
    metrics : dict of str to float
        Evaluation metrics from the manifest.
    privacy : dict or None
        ``{"epsilon", "delta", "mechanism"}`` spent to train it.
    sha256 : str
        SHA-256 of the bundle archive.
    path : Path
        The blob on disk.
    parent_version : str or None
        The version it replaces.
    size_bytes : int
        Archive size.
    key_id : str
        Fingerprint of the signing key.
    added_at : datetime
        When it was filed in this registry.
    """

    model_version: str
    channel: str
    kind: str
    run_id: str | None
    created_at: datetime
    promoted: bool
    metrics: dict[str, float]
    privacy: dict[str, Any] | None
    sha256: str
    path: Path
    parent_version: str | None = None
    size_bytes: int = 0
    key_id: str = ""
    added_at: datetime | None = None
    manifest: dict[str, Any] = field(default_factory=dict, repr=False)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (timestamps ISO-8601, path as text, manifest included)."""
        return {
            "model_version": self.model_version,
            "channel": self.channel,
            "kind": self.kind,
            "run_id": self.run_id,
            "parent_version": self.parent_version,
            "created_at": self.created_at.isoformat(),
            "added_at": self.added_at.isoformat() if self.added_at else None,
            "promoted": self.promoted,
            "metrics": {k: (v if v == v and abs(v) != float("inf") else None) for k, v in self.metrics.items()},
            "privacy": self.privacy,
            "sha256": self.sha256,
            "size_bytes": self.size_bytes,
            "key_id": self.key_id,
            "manifest": self.manifest,
        }


@dataclass(frozen=True)
class Promotion:
    """One promotion in a channel's history."""

    channel: str
    model_version: str
    previous_version: str | None
    promoted_at: datetime


def _check_channel(channel: object, owner: str) -> str:
    try:
        return check_name(channel, what="channel")  # type: ignore[arg-type]
    except MessageError:
        raise param_error("channel", owner, "a name of letters, digits, '_', '.', '-' (at most 64)", channel) from None


class ModelRegistry:
    """Signed model bundles, filed in the run store with their blobs in ``blob_dir``.

    Parameters
    ----------
    store : RunStore
        Where bundle records live (its ``model_*`` tables are created if missing).
    blob_dir : Path
        Directory holding the bundle files (created if missing).
    public_key : Ed25519PublicKey, optional
        The coordinator's public key.  When given, :meth:`add` refuses bundles
        not signed by it; otherwise :meth:`add` checks everything but the
        signature and :meth:`verify` must be used with a key.
    """

    def __init__(self, store: RunStore, blob_dir: Path | str, *, public_key: Ed25519PublicKey | None = None) -> None:
        if not isinstance(store, RunStore):
            raise param_error("store", "ModelRegistry", "a RunStore", type(store).__name__)
        if public_key is not None and not isinstance(public_key, Ed25519PublicKey):
            raise param_error("public_key", "ModelRegistry", "an Ed25519PublicKey or None", type(public_key).__name__)
        self.store = store
        self.blob_dir = Path(blob_dir)
        self.public_key = public_key
        try:
            self.blob_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RegistryError(f"Cannot create the registry blob directory {str(self.blob_dir)!r}: {exc}.") from exc
        store.create_missing_tables()

    # ------------------------------------------------------------------ helpers

    def _entry(self, row: ModelBundleRow, promoted_version: str | None) -> RegistryEntry:
        return RegistryEntry(
            model_version=row.model_version,
            channel=row.channel,
            kind=row.kind,
            run_id=row.run_id,
            created_at=row.created_at,
            promoted=row.model_version == promoted_version,
            metrics=dict(row.metrics),
            privacy=row.privacy,
            sha256=row.sha256,
            path=self.blob_dir / row.file_name,
            parent_version=row.parent_version,
            size_bytes=row.size_bytes,
            key_id=row.key_id,
            added_at=row.added_at,
            manifest=row.manifest,
        )

    @staticmethod
    def _promoted_versions(session: Session) -> dict[str, str]:
        return {row.channel: row.model_version for row in session.scalars(sa.select(ModelChannelRow))}

    @staticmethod
    def _unknown(session: Session, version: str) -> RegistryError:
        known = session.scalars(
            sa.select(ModelBundleRow.model_version).order_by(ModelBundleRow.id.desc()).limit(_KNOWN_SHOWN)
        ).all()
        hint = f"latest: {list(known)}" if known else "the registry is empty"
        return RegistryError(f"Model version {version!r} is not in the registry ({hint}).")

    def _row(self, session: Session, version: str) -> ModelBundleRow:
        if not isinstance(version, str) or not version:
            raise param_error("version", "ModelRegistry", "a model version string", version)
        row = session.scalar(sa.select(ModelBundleRow).where(ModelBundleRow.model_version == version))
        if row is None:
            raise self._unknown(session, version)
        return row

    def _store_blob(self, data: bytes, file_name: str) -> Path:
        path = self.blob_dir / file_name
        if path.exists():
            if sha256_hex(path.read_bytes()) == sha256_hex(data):
                return path
            raise RegistryError(
                f"The registry blob {str(path)!r} exists with other content; refusing to overwrite a stored model."
            )
        tmp = path.with_name(f".{file_name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise RegistryError(f"Cannot write the registry blob {str(path)!r}: {exc.strerror}.") from exc
        return path

    # ------------------------------------------------------------------ API

    def add(
        self, bundle_path: Path | str | bytes, *, channel: str = DEFAULT_CHANNEL, promote: bool = False
    ) -> RegistryEntry:
        """File a bundle under ``channel`` (idempotent for the identical bundle).

        Parameters
        ----------
        bundle_path : Path, str or bytes
            The bundle file (or its bytes).
        channel : str, default "default"
            Channel name (the MQTT topic segment ``consortium/models/<channel>``).
        promote : bool, default False
            Also make it the channel's promoted version.

        Raises
        ------
        BundleError
            The bundle fails a check (signature too, when the registry has a key).
        RegistryError
            Its version is already registered with different content.
        """
        channel = _check_channel(channel, "ModelRegistry.add")
        bundle: Bundle = (
            read_bundle(bundle_path, public_key=self.public_key)
            if self.public_key is not None
            else inspect_bundle(bundle_path)
        )
        data = bytes(bundle_path) if isinstance(bundle_path, bytes | bytearray) else Path(bundle_path).read_bytes()
        if sha256_hex(data) != bundle.sha256:
            raise RegistryError(f"The bundle {str(bundle_path)!r} changed while it was being registered; try again.")
        manifest = bundle.manifest
        version = manifest.model_version
        file_name = f"{version}.{bundle.sha256[:16]}.bundle"  # content-addressed: never overwritten
        self._store_blob(data, file_name)
        now = datetime.now(UTC)

        def work(session: Session) -> RegistryEntry:
            existing = session.scalar(sa.select(ModelBundleRow).where(ModelBundleRow.model_version == version))
            if existing is not None:
                if existing.sha256 != bundle.sha256:
                    raise RegistryError(
                        f"Model version {version!r} is already registered with another bundle "
                        f"(sha256 {existing.sha256[:12]}..., new {bundle.sha256[:12]}...); versions are immutable."
                    )
                if existing.channel != channel:
                    raise RegistryError(
                        f"Model version {version!r} is already registered on channel {existing.channel!r}."
                    )
                row = existing
            else:
                row = ModelBundleRow(
                    model_version=version,
                    channel=channel,
                    kind=manifest.kind,
                    run_id=manifest.run_id,
                    parent_version=manifest.parent_version,
                    created_at=datetime.fromisoformat(manifest.created_at).astimezone(UTC),
                    added_at=now,
                    sha256=bundle.sha256,
                    size_bytes=len(data),
                    file_name=file_name,
                    key_id=bundle.key_id,
                    metrics=manifest.metrics,
                    privacy=manifest.privacy,
                    manifest=manifest.to_dict(),
                )
                session.add(row)
                session.flush()
            if promote:
                self._promote(session, row, channel, now)
            return self._entry(row, self._promoted_versions(session).get(row.channel))

        entry = self.store.run_transaction(work, action=f"register model {version}")
        logger.info("Registered model %s on channel %s (sha256 %s)", version, channel, entry.sha256[:12])
        return entry

    def list(self, *, channel: str | None = None) -> builtins.list[RegistryEntry]:
        """Registered bundles, oldest first (of one channel if given)."""
        if channel is not None:
            channel = _check_channel(channel, "ModelRegistry.list")

        def work(session: Session) -> builtins.list[RegistryEntry]:
            query = sa.select(ModelBundleRow).order_by(ModelBundleRow.id)
            if channel is not None:
                query = query.where(ModelBundleRow.channel == channel)
            promoted = self._promoted_versions(session)
            return [self._entry(row, promoted.get(row.channel)) for row in session.scalars(query)]

        return self.store.run_transaction(work, action="list models")

    def get(self, version: str) -> RegistryEntry:
        """The entry of ``version``; an unknown version lists the latest known ones."""

        def work(session: Session) -> RegistryEntry:
            row = self._row(session, version)
            return self._entry(row, self._promoted_versions(session).get(row.channel))

        return self.store.run_transaction(work, action=f"read model {version}")

    def manifest(self, version: str) -> BundleManifest:
        """The stored manifest of ``version``."""
        return BundleManifest.from_dict(self.get(version).manifest)

    @staticmethod
    def _promote(session: Session, row: ModelBundleRow, channel: str, now: datetime) -> str | None:
        current = session.get(ModelChannelRow, channel)
        previous = current.model_version if current is not None else None
        if previous == row.model_version:
            return previous
        if current is None:
            session.add(ModelChannelRow(channel=channel, model_version=row.model_version, promoted_at=now))
        else:
            current.model_version = row.model_version
            current.promoted_at = now
        session.add(
            ModelPromotionRow(
                channel=channel, model_version=row.model_version, previous_version=previous, promoted_at=now
            )
        )
        return previous

    def promote(self, version: str, *, channel: str = DEFAULT_CHANNEL) -> RegistryEntry:
        """Make ``version`` the promoted model of ``channel`` (the bundle must be filed under it).

        Promotion is also how to roll back: promote the earlier version again.
        """
        channel = _check_channel(channel, "ModelRegistry.promote")

        def work(session: Session) -> tuple[RegistryEntry, str | None]:
            row = self._row(session, version)
            if row.channel != channel:
                raise RegistryError(
                    f"Model version {version!r} is filed under channel {row.channel!r}, not {channel!r}; "
                    f"promote it on {row.channel!r} or add the bundle to {channel!r} under a new version."
                )
            previous = self._promote(session, row, channel, datetime.now(UTC))
            return self._entry(row, version), previous

        entry, previous = self.store.run_transaction(work, action=f"promote model {version}")
        logger.info("Promoted model %s on channel %s (was %s)", version, channel, previous)
        return entry

    def promoted(self, channel: str = DEFAULT_CHANNEL) -> RegistryEntry | None:
        """The promoted entry of ``channel``, or None if nothing was promoted there."""
        channel = _check_channel(channel, "ModelRegistry.promoted")

        def work(session: Session) -> RegistryEntry | None:
            current = session.get(ModelChannelRow, channel)
            if current is None:
                return None
            return self._entry(self._row(session, current.model_version), current.model_version)

        return self.store.run_transaction(work, action=f"read channel {channel}")

    def history(self, channel: str = DEFAULT_CHANNEL) -> builtins.list[Promotion]:
        """Promotions of ``channel``, oldest first."""
        channel = _check_channel(channel, "ModelRegistry.history")

        def work(session: Session) -> builtins.list[Promotion]:
            rows = session.scalars(
                sa.select(ModelPromotionRow).where(ModelPromotionRow.channel == channel).order_by(ModelPromotionRow.id)
            )
            return [Promotion(r.channel, r.model_version, r.previous_version, r.promoted_at) for r in rows]

        return self.store.run_transaction(work, action=f"read the history of channel {channel}")

    def bundle_bytes(self, version: str) -> bytes:
        """The stored archive of ``version``, after checking it still has its recorded SHA-256."""
        entry = self.get(version)
        try:
            data = entry.path.read_bytes()
        except OSError as exc:
            raise RegistryError(
                f"The bundle file of model {version!r} ({str(entry.path)!r}) cannot be read: {exc.strerror}."
            ) from exc
        actual = sha256_hex(data)
        if actual != entry.sha256:
            raise BundleError(
                f"The stored bundle of model {version!r} ({str(entry.path)!r}) is tampered with: its SHA-256 is "
                f"{actual[:16]}..., the registry recorded {entry.sha256[:16]}..."
            )
        return data

    def export(self, version: str, out_path: Path | str) -> Path:
        """Copy the bundle of ``version`` to ``out_path`` (a file, or a directory to put ``<version>.bundle`` in)."""
        data = self.bundle_bytes(version)
        path = Path(out_path)
        if path.is_dir():
            path = path / f"{version}.bundle"
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_bytes(data)
            shutil.move(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise RegistryError(f"Cannot write {str(path)!r}: {exc.strerror}.") from exc
        return path

    def verify(self, version: str, *, public_key: Ed25519PublicKey | None = None) -> Bundle:
        """Re-check a stored bundle completely: recorded hash, signature (key given or the registry's), hashes.

        Raises
        ------
        BundleError
            Naming what failed.
        RegistryError
            Unknown version, or no public key to check the signature with.
        """
        key = public_key if public_key is not None else self.public_key
        if key is None:
            raise RegistryError(
                "Verifying a bundle needs the coordinator's public key (ModelRegistry(public_key=...) or "
                "public_key=...; CLI: --public-key PATH)."
            )
        bundle = read_bundle(self.bundle_bytes(version), public_key=key)
        if bundle.manifest.model_version != version:
            raise BundleError(
                f"The stored bundle of model {version!r} holds model {bundle.manifest.model_version!r}."
            )
        return bundle
