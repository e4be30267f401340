"""Tell edge agents about a new model: one retained QoS-1 message on ``consortium/models/<channel>``.

The coordinator is not an edge agent (no outbox, no agent status), so this is a
plain paho-mqtt publish that waits for the broker's acknowledgement.  Retained,
so an agent that connects later still learns the channel's current model.
"""

from __future__ import annotations

import logging
import ssl
import threading
from pathlib import Path

import paho.mqtt.client as mqtt

from consortium.edge.messages import ModelAnnouncement, models_topic
from consortium.errors import ConsortiumError, param_error
from consortium.mqtt_url import parse_broker_url

logger = logging.getLogger(__name__)

__all__ = ["AnnounceError", "announce_bundle"]


class AnnounceError(ConsortiumError):
    """The announcement could not be delivered to the broker."""


def announce_bundle(
    broker_url: str,
    announcement: ModelAnnouncement,
    *,
    tls_ca: Path | str | None = None,
    username: str | None = None,
    password: str | None = None,
    timeout: float = 10.0,
) -> None:
    """Publish ``announcement`` retained at QoS 1 on ``models_topic(announcement.channel)``.

    Parameters
    ----------
    broker_url : str
        ``mqtt://host:port`` or ``mqtts://host:port``.
    announcement : ModelAnnouncement
        Channel, version, download URL and archive SHA-256 of the bundle.
    tls_ca : Path or str, optional
        CA certificate for ``mqtts`` (system CAs otherwise).
    username, password : str, optional
        Broker credentials (never logged).
    timeout : float, default 10
        Seconds to wait for the connection and the broker's PUBACK.

    Raises
    ------
    AnnounceError
        If the broker cannot be reached or does not acknowledge in time.
    """
    if not isinstance(announcement, ModelAnnouncement):
        raise param_error("announcement", "announce_bundle", "a ModelAnnouncement", type(announcement).__name__)
    address = parse_broker_url(broker_url, owner="announce_bundle")
    topic = models_topic(announcement.channel)
    payload = announcement.to_json()
    connected = threading.Event()
    failure: list[str] = []

    def on_connect(_c: mqtt.Client, _u: object, _f: object, reason: mqtt.ReasonCode, _p: object = None) -> None:
        if reason.is_failure:
            failure.append(str(reason))
        connected.set()

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.on_connect = on_connect
    if username is not None:
        client.username_pw_set(username, password)
    if address.tls:
        client.tls_set(ca_certs=str(tls_ca) if tls_ca else None, cert_reqs=ssl.CERT_REQUIRED)
    where = f"{address.host}:{address.port}"
    try:
        client.connect(address.host, address.port, keepalive=30)
    except (OSError, ValueError) as exc:
        raise AnnounceError(
            f"Cannot announce model {announcement.model_version}: broker {where} unreachable ({exc})."
        ) from None
    client.loop_start()
    try:
        if not connected.wait(timeout) or failure:
            reason = failure[0] if failure else f"no answer within {timeout:g} s"
            raise AnnounceError(
                f"Cannot announce model {announcement.model_version}: broker {where} refused ({reason})."
            )
        info = client.publish(topic, payload, qos=1, retain=True)
        info.wait_for_publish(timeout)
        if not info.is_published():
            raise AnnounceError(
                f"Cannot announce model {announcement.model_version}: broker {where} did not acknowledge "
                f"within {timeout:g} s."
            )
    finally:
        client.disconnect()
        client.loop_stop()
    logger.info("Announced model %s on %s via %s", announcement.model_version, topic, where)
