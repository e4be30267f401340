"""Run-store tables of the model registry: bundles, each channel's promoted version, promotion history.

Bundle files live on disk (the registry's ``blob_dir``); the database holds what
is needed to list, choose and check them: the manifest, the archive's SHA-256 and
size, and the signer's key fingerprint (never a key).  ``run_id`` is not a
foreign key: bundles trained elsewhere (imported with ``registry add``) may name
runs this store never saw.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from consortium.registry.store_schema import NAME_LENGTH, RUN_ID_LENGTH, Base, MetricsJSON, UTCDateTime

VERSION_LENGTH = 128


class ModelBundleRow(Base):
    """One registered bundle (``model_version`` unique)."""

    __tablename__ = "model_bundles"

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    model_version: Mapped[str] = mapped_column(sa.String(VERSION_LENGTH), unique=True)
    channel: Mapped[str] = mapped_column(sa.String(NAME_LENGTH), index=True)
    kind: Mapped[str] = mapped_column(sa.String(64))
    run_id: Mapped[str | None] = mapped_column(sa.String(RUN_ID_LENGTH), nullable=True, index=True)
    parent_version: Mapped[str | None] = mapped_column(sa.String(VERSION_LENGTH), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    added_at: Mapped[datetime] = mapped_column(UTCDateTime)
    sha256: Mapped[str] = mapped_column(sa.String(64))
    size_bytes: Mapped[int] = mapped_column(sa.BigInteger)
    file_name: Mapped[str] = mapped_column(sa.String(VERSION_LENGTH + 32))
    key_id: Mapped[str] = mapped_column(sa.String(16))
    metrics: Mapped[dict[str, float]] = mapped_column(MetricsJSON)
    privacy: Mapped[dict[str, Any] | None] = mapped_column(sa.JSON, nullable=True)
    manifest: Mapped[dict[str, Any]] = mapped_column(sa.JSON)


class ModelChannelRow(Base):
    """The promoted version of one channel (what agents on that channel should run)."""

    __tablename__ = "model_channels"

    channel: Mapped[str] = mapped_column(sa.String(NAME_LENGTH), primary_key=True)
    model_version: Mapped[str] = mapped_column(
        sa.String(VERSION_LENGTH), sa.ForeignKey("model_bundles.model_version", ondelete="CASCADE")
    )
    promoted_at: Mapped[datetime] = mapped_column(UTCDateTime)


class ModelPromotionRow(Base):
    """Append-only history of promotions (for audits and rollbacks)."""

    __tablename__ = "model_promotions"

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    channel: Mapped[str] = mapped_column(sa.String(NAME_LENGTH), index=True)
    model_version: Mapped[str] = mapped_column(
        sa.String(VERSION_LENGTH), sa.ForeignKey("model_bundles.model_version", ondelete="CASCADE")
    )
    previous_version: Mapped[str | None] = mapped_column(sa.String(VERSION_LENGTH), nullable=True)
    promoted_at: Mapped[datetime] = mapped_column(UTCDateTime)
