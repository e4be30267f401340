"""Assemble a :class:`~.agent.VisionAgent` from a bundle (or the fallback), lines and a publisher."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from consortium.edge.publisher import MqttPublisher
from consortium.edge.vision.agent import VisionAgent
from consortium.edge.vision.counting import CountingLine, CountingZone, TrafficCounter
from consortium.edge.vision.fallback import FALLBACK_CLASSES, CentroidTracker, MotionDetector
from consortium.errors import ConfigError

logger = logging.getLogger(__name__)


def open_publisher(broker_url: str, *, institution: str, agent: str, outbox: Path,
                   synchronous: str = "NORMAL") -> MqttPublisher:
    """The edge agent's store-and-forward publisher, started, for ``app="vision"``.

    The outbox defaults to SQLite ``synchronous=NORMAL`` (WAL): it survives a
    process kill but may lose the last commits on power loss.  Counts are
    periodic aggregates, and an fsync per message costs ~15 ms of frame → count
    latency on this machine (see ``benchmarks/results/vision.md``); pass
    ``"FULL"`` for power-loss durability.
    """
    return MqttPublisher(broker_url, institution=institution, agent=agent, outbox_path=outbox, app="vision",
                         synchronous=synchronous).start()


def build_agent(
    *,
    lines: Sequence[str | CountingLine | CountingZone],
    zones: Sequence[str] = (),
    bundle_path: str | Path | None,
    public_key: str | Path | bytes | None,
    publisher: MqttPublisher | None,
    institution: str,
    agent: str,
    interval_s: float = 5.0,
    threads: int = 1,
    fps: float = 25.0,
    debug_video: Path | None = None,
) -> VisionAgent:
    """A detector agent when a bundle is given, else the labelled background-subtraction fallback."""
    parsed: list[CountingLine | CountingZone] = [
        line if not isinstance(line, str) else CountingLine.parse(line) for line in lines
    ]
    parsed += [CountingZone.parse(zone) for zone in zones]
    if not parsed:
        raise ConfigError("Give at least one counting line (--line name:x1,y1,x2,y2) or zone (--zone name:x1,y1,...).")
    if bundle_path is not None:
        from consortium.edge.vision.model import load_detector

        if public_key is None:
            raise ConfigError("A detector bundle needs --public-key (the key that signed it) to be verified.")
        detector, version = load_detector(bundle_path, public_key=public_key, threads=threads)
        counter = TrafficCounter(parsed, detector.class_names, frame_rate=fps)
        mode = "detector"
        if publisher is not None:
            publisher.set_model_version(version)
        return VisionAgent(detector=detector, counter=counter, publisher=publisher, institution=institution,
                           agent=agent, model_version=version, mode=mode, interval_s=interval_s,
                           debug_video=debug_video)
    logger.warning("no detector bundle: counting moving blobs (background subtraction), labelled 'fallback'")
    counter = TrafficCounter(parsed, FALLBACK_CLASSES, frame_rate=fps,
                             tracker=CentroidTracker(max_missing=max(1, int(fps))))
    return VisionAgent(detector=MotionDetector(), counter=counter, publisher=publisher, institution=institution,
                       agent=agent, model_version="none", mode="fallback", interval_s=interval_s,
                       debug_video=debug_video)
