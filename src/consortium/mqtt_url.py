"""MQTT broker URLs: the one parser of ``mqtt://HOST[:PORT]`` and ``mqtts://HOST[:PORT]``.

Edge agents, the dashboard's ingestor, the retraining trigger and the registry's
model announcements all take a broker URL.  They parse it here so that every
component accepts exactly the same URLs (default ports 1883 and 8883, ``mqtts``
meaning TLS) and refuses the same ones with the same message, which names the
component (``owner``) and quotes the bad URL.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from consortium.errors import param_error

__all__ = ["DEFAULT_PORTS", "BrokerAddress", "parse_broker_url"]

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
"""Port used when the URL gives none, by scheme (the IANA MQTT ports)."""

_EXPECTED = "a broker URL of the form mqtt://HOST:PORT or mqtts://HOST:PORT (port 1-65535, no path)"


@dataclass(frozen=True)
class BrokerAddress:
    """Where an MQTT broker listens.

    Attributes
    ----------
    host : str
        Host name or IP address (IPv6 without brackets).
    port : int
        TCP port, 1-65535.
    tls : bool
        True for ``mqtts://`` (connect with TLS).
    """

    host: str
    port: int
    tls: bool


def parse_broker_url(url: str, *, owner: str = "the MQTT client") -> BrokerAddress:
    """Parse ``mqtt://HOST[:PORT]`` or ``mqtts://HOST[:PORT]``.

    Parameters
    ----------
    url : str
        The broker URL; a trailing ``/`` is allowed, any other path is not (an
        MQTT broker has no paths, so one is a sign of a wrong URL).
    owner : str
        The component the URL configures, named in the error message.

    Returns
    -------
    BrokerAddress
        Host, port (default 1883 for ``mqtt``, 8883 for ``mqtts``) and TLS flag.

    Raises
    ------
    ConfigError
        If ``url`` is not a str, has another scheme, no host, a path, or a port
        that is not a number in 1-65535; the message quotes ``url``.
    """
    if not isinstance(url, str):
        raise param_error("broker_url", owner, _EXPECTED, url)
    try:
        parts = urlsplit(url)
        port = parts.port  # ValueError when not numeric or out of 0-65535
    except ValueError:
        raise param_error("broker_url", owner, _EXPECTED, url) from None
    if (
        parts.scheme not in DEFAULT_PORTS
        or not parts.hostname
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
        or port == 0
    ):
        raise param_error("broker_url", owner, _EXPECTED, url)
    return BrokerAddress(parts.hostname, DEFAULT_PORTS[parts.scheme] if port is None else port,
                         parts.scheme == "mqtts")
