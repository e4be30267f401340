"""Over-the-air detector updates for the vision agent, on the fraud agent's channels and rules.

The coordinator announces a bundle on the retained ``consortium/models/<channel>``
topic (:class:`~consortium.edge.messages.ModelAnnouncement`) or an operator sends
an ``update``/``rollback`` :class:`~consortium.edge.messages.Command`.  The
updater downloads the bundle, checks the archive hash against the announcement,
verifies signature and hashes (:func:`~consortium.registry.bundle.read_bundle`),
requires ``kind="detector"`` with the same class names as the serving model, and
shadow-runs the candidate on the last frame (it must return finite boxes) before
the swap — one reference assignment between two frames.  Any failure keeps the
serving detector and publishes a ``model_refused`` Event.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import urllib.request
from typing import Any

import numpy as np

from consortium.edge import messages as m
from consortium.edge.vision.agent import VisionAgent
from consortium.edge.vision.detector import YoloDetector
from consortium.errors import ConsortiumError
from consortium.registry.bundle import MAX_BUNDLE_BYTES, read_bundle
from consortium.registry.signing import load_public_key

logger = logging.getLogger(__name__)


class DetectorUpdater:
    """Keeps a :class:`VisionAgent`'s detector current from announcements and commands.

    Parameters
    ----------
    agent : VisionAgent
        The running agent (its publisher receives the Events).
    public_key : path or PEM bytes
        Key that must have signed every bundle.
    channel : str
        Models channel to follow (``consortium/models/<channel>``).
    """

    def __init__(self, agent: VisionAgent, *, public_key: Any, channel: str = "detector") -> None:
        self.agent = agent
        self.public_key = load_public_key(public_key)
        self.channel = m.check_name(channel, what="channel")
        self.previous: tuple[Any, str] | None = None
        self.declined: set[str] = set()
        self._queue: queue.SimpleQueue[tuple[str, bytes]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def start(self) -> DetectorUpdater:
        """Subscribe to announcements and commands and handle them on a control thread."""
        publisher = self.agent.publisher
        if publisher is None or not hasattr(publisher, "subscribe"):
            raise ConsortiumError("Over-the-air updates need the agent to publish through an MqttPublisher.")
        self._thread = threading.Thread(target=self._loop, name="vision-ota", daemon=True)
        self._thread.start()
        publisher.subscribe(m.models_topic(self.channel), lambda _t, p: self._queue.put(("models", p)))
        publisher.subscribe(m.agent_topic(self.agent.institution, self.agent.agent, "commands"),
                            lambda _t, p: self._queue.put(("commands", p)))
        return self

    def stop(self) -> None:
        """Stop the control thread."""
        self._queue.put(("stop", b""))
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while True:
            kind, payload = self._queue.get()
            if kind == "stop":
                return
            if kind == "models" and not payload:
                continue  # a cleared retained announcement: nothing is announced
            try:
                message = m.parse_payload(kind, payload)
                if kind == "models":
                    if message.model_version not in (self.agent.model_version, *self.declined):
                        self.update_from_url(message.url, expected_sha256=message.sha256)
                elif message.command == "rollback":
                    self.rollback()
                elif message.command == "update" and isinstance(message.args.get("url"), str):
                    self.update_from_url(message.args["url"], expected_sha256=message.args.get("sha256"))
                else:
                    self._event("command_refused", command=message.command, error="known: update (args.url), rollback")
            except m.MessageError as exc:
                self._event("message_refused", error=str(exc))
            except Exception as exc:  # keep serving whatever happens
                logger.exception("vision OTA control message failed")
                self._event("control_failed", error=f"{type(exc).__name__}: {exc}")

    def update_from_url(self, url: str, *, expected_sha256: str | None = None) -> bool:
        """Download a bundle and :meth:`offer_bundle` it."""
        try:
            with urllib.request.urlopen(url, timeout=30) as response:  # noqa: S310 - our coordinator's registry
                data = response.read(MAX_BUNDLE_BYTES + 1)
        except Exception as exc:
            return self._refuse(f"download of {url} failed: {exc}", version=None)
        return self.offer_bundle(data, expected_sha256=expected_sha256, source=url)

    def offer_bundle(self, data: bytes, *, expected_sha256: str | None = None, source: str = "") -> bool:
        """Verify, shadow-run and activate a detector bundle; True if it now serves."""
        if expected_sha256 is not None and hashlib.sha256(data).hexdigest() != expected_sha256:
            return self._refuse(f"archive SHA-256 differs from the announced {expected_sha256}", version=None,
                                source=source)
        try:
            bundle = read_bundle(data, public_key=self.public_key)
            manifest = bundle.manifest
            if manifest.kind != "detector":
                raise ConsortiumError(f"bundle holds a {manifest.kind!r} model, not a 'detector'")
            names = manifest.extra.get("class_names")
            serving = getattr(self.agent.detector, "class_names", None)
            if serving is not None and names != serving:
                raise ConsortiumError("the new detector's class names differ from the serving detector's")
            candidate = YoloDetector(bundle.onnx_bytes, list(names or []), conf_threshold=manifest.threshold)
        except ConsortiumError as exc:
            return self._refuse(str(exc), version=None, source=source)
        version = str(manifest.model_version)
        frame = self.agent.last_frame
        if frame is not None:
            try:
                dets = candidate.detect(frame)
                if not np.isfinite(dets.xyxy).all():
                    raise ValueError("non-finite boxes")
            except Exception as exc:
                return self._refuse(f"shadow run failed: {type(exc).__name__}: {exc}", version=version,
                                    source=source)
        self.previous = (self.agent.detector, self.agent.model_version)
        self.agent.swap_detector(candidate, version)
        self._event("model_updated", model_version=version, previous=self.previous[1], source=source)
        return True

    def rollback(self) -> bool:
        """Serve the previous detector again (kept after every update)."""
        if self.previous is None:
            self._event("rollback_refused", error="no previous model", serving=self.agent.model_version)
            return False
        detector, version = self.previous
        self.declined.add(self.agent.model_version)
        current = self.agent.model_version
        self.previous = None
        self.agent.swap_detector(detector, version)
        self._event("rolled_back", model_version=version, from_version=current)
        return True

    def _refuse(self, error: str, *, version: str | None, source: str = "") -> bool:
        if version:
            self.declined.add(version)
        logger.warning("refused a detector bundle%s: %s", f" from {source}" if source else "", error)
        self._event("model_refused", error=error, source=source, serving=self.agent.model_version)
        return False

    def _event(self, event: str, **detail: Any) -> None:
        if self.agent.publisher is not None:
            self.agent.publisher.publish(m.Event(
                msg_id="", institution=self.agent.institution, agent=self.agent.agent, ts=m.now(), event=event,
                detail=detail,
            ))
