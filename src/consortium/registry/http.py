"""HTTP access to the model registry: a FastAPI router and a small app for the coordinator.

Endpoints (mounted by the dashboard app as well as by ``consortium registry serve``):

``GET /api/models[?channel=NAME]``
    ``{"models": [entry, ...]}``, oldest first; each entry says whether it is its
    channel's promoted version.
``GET /api/models/{version}``
    One entry with its manifest.
``GET /api/models/{version}/bundle``
    The signed bundle archive (``application/zip``), with its SHA-256 in the
    ``X-Bundle-SHA256`` header and as a strong ``ETag``.  Agents verify the
    signature themselves: the transport needs no trust.
``GET /api/channels/{channel}``
    The promoted entry of a channel (404 when nothing is promoted).

Unknown versions are 404 and a stored bundle that no longer matches its recorded
hash is 409 (never served); the error body names the problem.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, FastAPI, HTTPException, Query, Response

from consortium.errors import ConfigError
from consortium.registry.bundle import BundleError
from consortium.registry.registry import ModelRegistry, RegistryError

logger = logging.getLogger(__name__)

__all__ = ["BUNDLE_MEDIA_TYPE", "create_registry_app", "create_registry_router"]

BUNDLE_MEDIA_TYPE = "application/zip"


def _not_found(exc: Exception) -> HTTPException:
    return HTTPException(status_code=404, detail=str(exc))


def create_registry_router(registry: ModelRegistry) -> APIRouter:
    """The registry's read-only API as an :class:`~fastapi.APIRouter` (see the module docstring)."""
    if not isinstance(registry, ModelRegistry):
        raise TypeError(f"create_registry_router needs a ModelRegistry. Got {type(registry).__name__} instead.")
    router = APIRouter(tags=["models"])

    @router.get("/api/models")
    def list_models(channel: str | None = Query(default=None)) -> dict[str, Any]:
        try:
            entries = registry.list(channel=channel)
        except ConfigError as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from None
        return {"models": [entry.to_json() for entry in entries]}

    @router.get("/api/models/{version}")
    def show_model(version: str) -> dict[str, Any]:
        try:
            return registry.get(version).to_json()
        except RegistryError as exc:
            raise _not_found(exc) from None

    @router.get("/api/models/{version}/bundle")
    def download_bundle(version: str) -> Response:
        try:
            entry = registry.get(version)
            data = registry.bundle_bytes(version)
        except RegistryError as exc:
            raise _not_found(exc) from None
        except BundleError as exc:
            logger.error("Refusing to serve model %s: %s", version, exc)
            raise HTTPException(status_code=409, detail=str(exc)) from None
        return Response(
            content=data,
            media_type=BUNDLE_MEDIA_TYPE,
            headers={
                "X-Bundle-SHA256": entry.sha256,
                "ETag": f'"{entry.sha256}"',
                "Content-Disposition": f'attachment; filename="{version}.bundle"',
            },
        )

    @router.get("/api/channels/{channel}")
    def promoted_model(channel: str) -> dict[str, Any]:
        try:
            entry = registry.promoted(channel)
        except ConfigError as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from None
        if entry is None:
            raise HTTPException(status_code=404, detail=f"No model is promoted on channel {channel!r}.")
        return entry.to_json()

    return router


def create_registry_app(registry: ModelRegistry) -> FastAPI:
    """A FastAPI app serving only the registry router (what ``consortium registry serve`` runs)."""
    app = FastAPI(title="consortium model registry", docs_url=None, redoc_url=None)
    app.include_router(create_registry_router(registry))
    return app
