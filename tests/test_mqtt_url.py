"""One MQTT broker-URL parser: what it accepts, what it refuses, and that every component uses it."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from consortium.continual.trigger import RetrainTrigger
from consortium.dashboard.ingest import AlertIngestor
from consortium.edge import publisher
from consortium.edge.messages import ModelAnnouncement
from consortium.edge.publisher import MqttPublisher
from consortium.errors import ConfigError
from consortium.mqtt_url import BrokerAddress, parse_broker_url
from consortium.registry import RunStore
from consortium.registry.announce import announce_bundle

BAD_URLS = (
    "http://127.0.0.1:1883",  # another scheme
    "127.0.0.1:1883",  # no scheme
    "mqtt://",  # no host
    "mqtt://host:99999",  # port out of range
    "mqtt://host:0",  # port 0
    "mqtt://host:abc",  # port not a number
    "mqtt://host:1883/topic",  # a path: brokers have none
    "mqtt://host:1883?x=1",  # a query
)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mqtt://127.0.0.1:1883", BrokerAddress("127.0.0.1", 1883, False)),
        ("mqtt://127.0.0.1", BrokerAddress("127.0.0.1", 1883, False)),
        ("mqtts://broker.example", BrokerAddress("broker.example", 8883, True)),
        ("mqtts://broker.example:8884/", BrokerAddress("broker.example", 8884, True)),
        ("MQTT://Host:1", BrokerAddress("host", 1, False)),
        ("mqtt://[::1]:1884", BrokerAddress("::1", 1884, False)),
    ],
)
def test_accepted_urls_and_default_ports(url: str, expected: BrokerAddress) -> None:
    assert parse_broker_url(url) == expected


@pytest.mark.parametrize("url", [*BAD_URLS, 1883, None])
def test_refused_urls_name_the_owner_and_quote_the_url(url: object) -> None:
    expected = rf"'broker_url' parameter of Widget .*mqtt://HOST:PORT.*Got {re.escape(repr(url))}"
    with pytest.raises(ConfigError, match=expected):
        parse_broker_url(url, owner="Widget")  # type: ignore[arg-type]


def test_edge_publisher_keeps_exporting_the_one_parser() -> None:
    assert publisher.parse_broker_url is parse_broker_url
    assert publisher.BrokerAddress is BrokerAddress


def _components(run_store: RunStore, tmp_path: Path) -> dict[str, Callable[[str], object]]:
    announcement = ModelAnnouncement(channel="x", model_version="m-1", url="http://h/x", sha256="0" * 64, ts=0.0)
    return {
        "MqttPublisher": lambda url: MqttPublisher(url, institution="bank-a", agent="a1",
                                                   outbox_path=tmp_path / "outbox.db"),
        "AlertIngestor": lambda url: AlertIngestor(run_store, url),
        "RetrainTrigger": lambda url: RetrainTrigger(url, on_trigger=lambda decision: None),
        "announce_bundle": lambda url: announce_bundle(url, announcement, timeout=1),
    }


@pytest.mark.parametrize("url", BAD_URLS)
def test_every_component_refuses_the_same_urls_before_connecting(
    url: str, run_store: RunStore, tmp_path: Path
) -> None:
    for owner, build in _components(run_store, tmp_path).items():
        with pytest.raises(ConfigError, match=rf"of {owner} must be a broker URL .* Got {re.escape(repr(url))}"):
            build(url)
    assert not (tmp_path / "outbox.db").exists()
