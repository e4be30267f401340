"""``consortium registry``: signing keys, signed model bundles and the model registry from the command line.

Subcommands::

    consortium registry keygen PATH                      Ed25519 bundle-signing key (0600) + PATH.pub
    consortium registry publish --bundle-key KEY         a finished run's model -> signed bundle, registered
    consortium registry add BUNDLE [--promote]           file a bundle made elsewhere (GBDT, detector)
    consortium registry list | show VERSION              what the registry holds
    consortium registry promote VERSION [--broker ...]   make it the channel's model (and announce it)
    consortium registry export VERSION OUT               copy the bundle file out
    consortium registry verify VERSION|--file BUNDLE     check hashes and signature
    consortium registry serve [--port 8600]              the coordinator's bundle download API

``publish_options``/``publish_after_run`` give ``consortium simulate`` and
``consortium coordinator`` the same ``--bundle-key/--registry/...`` options.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from consortium.errors import ConsortiumError

logger = logging.getLogger(__name__)

DEFAULT_STORE = "sqlite:///consortium.db"
DEFAULT_REGISTRY_DIR = "model-registry"
DEFAULT_PORT = 8600


def _friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ConsortiumError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)

    return wrapper


def _store_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--store", "store_url", default=DEFAULT_STORE, show_default=True,
                        help="Run store URL (SQLite file or PostgreSQL).")(fn)


def _registry_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--registry", "registry_dir", type=click.Path(file_okay=False), default=DEFAULT_REGISTRY_DIR,
                        show_default=True, help="Directory holding the bundle files.")(fn)


def _public_key_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--public-key", "public_key_path", type=click.Path(dir_okay=False), default=None,
                        help="Coordinator's public key (PEM); bundles not signed by it are refused.")(fn)


def _open_registry(store_url: str, registry_dir: str, public_key_path: str | None = None) -> Any:
    from consortium.registry.registry import ModelRegistry  # noqa: PLC0415
    from consortium.registry.signing import load_public_key  # noqa: PLC0415
    from consortium.registry.store import RunStore  # noqa: PLC0415

    key = load_public_key(public_key_path) if public_key_path else None
    return ModelRegistry(RunStore(store_url), Path(registry_dir), public_key=key)


def _announce_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed([
        click.option("--broker", "broker_url", default=None,
                     help="Announce on this MQTT broker (mqtt://HOST:PORT or mqtts://...), retained."),
        click.option("--registry-url", "registry_url", default=None,
                     help=f"Base URL agents download from, e.g. http://coordinator:{DEFAULT_PORT} "
                          "(where 'consortium registry serve' listens)."),
        click.option("--broker-ca", type=click.Path(exists=True, dir_okay=False), default=None,
                     help="CA certificate for an mqtts:// broker."),
        click.option("--broker-username", default=None, envvar="CONSORTIUM_BROKER_USERNAME"),
        click.option("--broker-password", default=None, envvar="CONSORTIUM_BROKER_PASSWORD",
                     help="Broker password (better: the CONSORTIUM_BROKER_PASSWORD environment variable)."),
    ]):
        fn = option(fn)
    return fn


def _announce_kwargs(broker_ca: str | None, broker_username: str | None, broker_password: str | None) -> dict[str, Any]:
    return {"tls_ca": broker_ca, "username": broker_username, "password": broker_password}


def _check_announce(broker_url: str | None, registry_url: str | None) -> None:
    if (broker_url is None) != (registry_url is None):
        raise click.UsageError("--broker and --registry-url go together: agents need both the news and the URL.")


def _entry_line(entry: Any) -> str:
    auprc = entry.metrics.get("auprc")
    eps = entry.privacy.get("epsilon") if entry.privacy else None
    return (
        f"{'*' if entry.promoted else ' '} {entry.model_version:<40} {entry.channel:<10} {entry.kind:<11} "
        f"{entry.created_at:%Y-%m-%d %H:%M}  AUPRC {'-' if auprc is None else f'{auprc:.4f}'}  "
        f"eps {'-' if eps is None else f'{eps:.2f}'}  run {entry.run_id or '-'}"
    )


@click.group("registry")
def registry() -> None:
    """Signed model bundles and the model registry."""


@registry.command("keygen")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--overwrite", is_flag=True, help="Replace an existing key (every agent must then get the new .pub).")
@_friendly
def keygen(path: str, overwrite: bool) -> None:
    """Create the coordinator's Ed25519 bundle-signing key (mode 0600) and PATH.pub."""
    from consortium.registry.signing import (  # noqa: PLC0415
        generate_signing_key,
        key_fingerprint,
        load_private_key,
        public_key_path,
    )

    key_path = generate_signing_key(Path(path), overwrite=overwrite)
    fingerprint = key_fingerprint(load_private_key(key_path))
    click.echo(f"Signing key {key_path} (0600), fingerprint {fingerprint}")
    click.echo(f"Give agents the public key: {public_key_path(key_path)}")


def publish_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The options with which ``simulate`` and ``coordinator`` publish their model after the run."""
    fn = _announce_options(fn)
    for option in reversed([
        click.option("--bundle-key", type=click.Path(dir_okay=False), default=None,
                     help="Coordinator's signing key: after the run, export the model as a signed bundle "
                          "and register it."),
        click.option("--registry", "registry_dir", type=click.Path(file_okay=False), default=DEFAULT_REGISTRY_DIR,
                     show_default=True, help="Registry blob directory (with --bundle-key)."),
        click.option("--channel", default="default", show_default=True, help="Registry / MQTT model channel."),
    ]):
        fn = option(fn)
    return fn


def publish_after_run(
    store: Any,
    *,
    run_id: str | None,
    bundle_key: str | None,
    registry_dir: str,
    channel: str,
    broker_url: str | None,
    registry_url: str | None,
    broker_ca: str | None = None,
    broker_username: str | None = None,
    broker_password: str | None = None,
    promote: bool = True,
) -> Any:
    """Publish the run's model when ``bundle_key`` is given (the body of ``--bundle-key``); returns it or None."""
    if bundle_key is None:
        if broker_url is not None:
            raise click.UsageError("--broker announces a published bundle: give --bundle-key too.")
        return None
    _check_announce(broker_url, registry_url)
    from consortium.registry.publish import publish_run_model  # noqa: PLC0415
    from consortium.registry.registry import ModelRegistry  # noqa: PLC0415
    from consortium.registry.signing import load_private_key  # noqa: PLC0415

    private_key = load_private_key(bundle_key)  # checked first: a bad key must not cost a registry
    model_registry = ModelRegistry(store, Path(registry_dir), public_key=private_key.public_key())
    published = publish_run_model(
        store, registry=model_registry, private_key=private_key, run_id=run_id, channel=channel, promote=promote,
        broker_url=broker_url, base_url=registry_url,
        announce_options=_announce_kwargs(broker_ca, broker_username, broker_password),
    )
    entry = published.entry
    click.echo(
        f"Model {entry.model_version} (round {published.round}) signed and registered in {registry_dir} "
        f"on channel {entry.channel}{' (promoted)' if entry.promoted else ''}"
        f"{'; announced on ' + str(broker_url) if published.announced else ''}"
    )
    return published


@registry.command("publish")
@click.option("--run-id", default=None, help="Run to publish (default: the newest completed run).")
@click.option("--round", "round_", type=click.IntRange(1), default=None,
              help="Round whose model to publish (default: the round the coordinator kept).")
@click.option("--bundle-key", type=click.Path(dir_okay=False), required=True, help="Signing key (0600 PEM).")
@click.option("--channel", default="default", show_default=True)
@click.option("--no-promote", is_flag=True, help="Register without promoting.")
@_store_option
@_registry_option
@_announce_options
@_friendly
def publish(run_id: str | None, round_: int | None, bundle_key: str, channel: str, no_promote: bool, store_url: str,
            registry_dir: str, broker_url: str | None, registry_url: str | None, broker_ca: str | None,
            broker_username: str | None, broker_password: str | None) -> None:
    """Export a finished run's global model as a signed bundle and register it."""
    _check_announce(broker_url, registry_url)
    from consortium.registry.publish import publish_run_model  # noqa: PLC0415
    from consortium.registry.signing import load_private_key  # noqa: PLC0415

    private_key = load_private_key(bundle_key)
    reg = _open_registry(store_url, registry_dir)
    published = publish_run_model(
        reg.store, registry=reg, private_key=private_key, run_id=run_id, round=round_, channel=channel,
        promote=not no_promote, broker_url=broker_url, base_url=registry_url,
        announce_options=_announce_kwargs(broker_ca, broker_username, broker_password),
    )
    click.echo(_entry_line(published.entry))


@registry.command("add")
@click.argument("bundle", type=click.Path(exists=True, dir_okay=False))
@click.option("--channel", default="default", show_default=True)
@click.option("--promote", is_flag=True, help="Also make it the channel's promoted model.")
@_store_option
@_registry_option
@_public_key_option
@_friendly
def add(bundle: str, channel: str, promote: bool, store_url: str, registry_dir: str,
        public_key_path: str | None) -> None:
    """File a bundle made elsewhere (e.g. a GBDT or detector exporter)."""
    entry = _open_registry(store_url, registry_dir, public_key_path).add(Path(bundle), channel=channel,
                                                                          promote=promote)
    click.echo(_entry_line(entry))


@registry.command("list")
@click.option("--channel", default=None, help="Only this channel.")
@click.option("--json", "as_json", is_flag=True, help="JSON output.")
@_store_option
@_registry_option
@_friendly
def list_models(channel: str | None, as_json: bool, store_url: str, registry_dir: str) -> None:
    """List registered models, oldest first (* = promoted on its channel)."""
    entries = _open_registry(store_url, registry_dir).list(channel=channel)
    if as_json:
        click.echo(json.dumps([e.to_json() for e in entries], indent=2))
        return
    if not entries:
        click.echo("The registry is empty.")
    for entry in entries:
        click.echo(_entry_line(entry))


@registry.command("show")
@click.argument("version")
@_store_option
@_registry_option
@_friendly
def show(version: str, store_url: str, registry_dir: str) -> None:
    """Show one model's registry record and manifest (JSON)."""
    entry = _open_registry(store_url, registry_dir).get(version)
    click.echo(json.dumps(entry.to_json(), indent=2))


@registry.command("promote")
@click.argument("version")
@click.option("--channel", default="default", show_default=True)
@_store_option
@_registry_option
@_announce_options
@_friendly
def promote(version: str, channel: str, store_url: str, registry_dir: str, broker_url: str | None,
            registry_url: str | None, broker_ca: str | None, broker_username: str | None,
            broker_password: str | None) -> None:
    """Make VERSION the channel's model (promote an earlier one to roll back); optionally announce it."""
    _check_announce(broker_url, registry_url)
    reg = _open_registry(store_url, registry_dir)
    entry = reg.promote(version, channel=channel)
    click.echo(_entry_line(entry))
    if broker_url is not None and registry_url is not None:
        from consortium.edge.messages import ModelAnnouncement  # noqa: PLC0415
        from consortium.registry.announce import announce_bundle  # noqa: PLC0415
        from consortium.registry.publish import bundle_url  # noqa: PLC0415

        announce_bundle(
            broker_url,
            ModelAnnouncement(channel=channel, model_version=version, url=bundle_url(registry_url, version),
                              sha256=entry.sha256, ts=time.time()),
            **_announce_kwargs(broker_ca, broker_username, broker_password),
        )
        click.echo(f"Announced on {broker_url}")


@registry.command("export")
@click.argument("version")
@click.argument("out", type=click.Path())
@_store_option
@_registry_option
@_friendly
def export(version: str, out: str, store_url: str, registry_dir: str) -> None:
    """Copy VERSION's bundle to OUT (a file, or a directory for VERSION.bundle)."""
    path = _open_registry(store_url, registry_dir).export(version, Path(out))
    click.echo(str(path))


@registry.command("verify")
@click.argument("version", required=False)
@click.option("--file", "bundle_file", type=click.Path(dir_okay=False), default=None,
              help="Verify this bundle file instead of a registered version.")
@click.option("--public-key", "public_key_path", type=click.Path(dir_okay=False), required=True,
              help="Coordinator's public key (PEM).")
@_store_option
@_registry_option
@_friendly
def verify(version: str | None, bundle_file: str | None, public_key_path: str, store_url: str,
           registry_dir: str) -> None:
    """Check a bundle's archive, hashes and signature; exit status 2 names what failed."""
    from consortium.registry.bundle import read_bundle  # noqa: PLC0415
    from consortium.registry.signing import load_public_key  # noqa: PLC0415

    if (version is None) == (bundle_file is None):
        raise click.UsageError("Give either VERSION (a registered model) or --file BUNDLE.")
    key = load_public_key(public_key_path)
    if bundle_file is not None:
        bundle = read_bundle(Path(bundle_file), public_key=key)
    else:
        assert version is not None
        bundle = _open_registry(store_url, registry_dir).verify(version, public_key=key)
    manifest = bundle.manifest
    click.echo(f"OK {manifest.model_version}: signed by key {bundle.key_id}, archive sha256 {bundle.sha256}, "
               f"{len(manifest.features)} features, kind {manifest.kind}")


@registry.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=DEFAULT_PORT, show_default=True)
@_store_option
@_registry_option
@_friendly
def serve(host: str, port: int, store_url: str, registry_dir: str) -> None:
    """Serve the registry's download API (GET /api/models, /api/models/VERSION[/bundle])."""
    import uvicorn  # noqa: PLC0415

    from consortium.registry.http import create_registry_app  # noqa: PLC0415

    app = create_registry_app(_open_registry(store_url, registry_dir))
    click.echo(f"Model registry on http://{host}:{port}/api/models")
    uvicorn.run(app, host=host, port=port, log_level="warning")
