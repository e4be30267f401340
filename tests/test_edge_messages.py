"""The MQTT wire contract: round trips, and every malformed payload a clear MessageError."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consortium.edge import messages as m

NAMES = st.from_regex(r"[A-Za-z0-9_.-]{1,20}", fullmatch=True)


def _alert(**over: object) -> m.Alert:
    base = dict(msg_id="bank-a/agent-1/7", institution="bank-a", agent="agent-1", transaction_id="tx-1",
                score=0.93, threshold=0.5, model_version="3", ts=1.0)
    base.update(over)
    return m.Alert(**base)  # type: ignore[arg-type]


def test_alert_round_trip_and_topic() -> None:
    alert = _alert()
    topic = m.agent_topic("bank-a", "agent-1", "alerts")
    parts, parsed = m.parse_message(topic, alert.to_json())
    assert parts == m.TopicParts("bank-a", "agent-1", "alerts")
    assert parsed == alert


def test_defaults_may_be_omitted() -> None:
    raw = {"msg_id": "a/b/1", "institution": "a", "agent": "b", "ts": 1.0, "window_s": 5.0,
           "model_version": "1", "scored": 10, "alerts": 1}
    tel = m.parse_payload("telemetry", json.dumps(raw))
    assert tel.invalid == {} and tel.app == "fraud"


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        (b"{not json", "not valid UTF-8 JSON"),
        (b"\xff\xfe", "not valid UTF-8 JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b"x" * (m.MAX_PAYLOAD_BYTES + 1), "exceeds"),
        (json.dumps({**json.loads(_alert().to_json()), "score": "high"}).encode(), "'score' must be a finite number"),
        (json.dumps({**json.loads(_alert().to_json()), "score": float("nan")}).encode(), "'score'"),
        (json.dumps({k: v for k, v in json.loads(_alert().to_json()).items() if k != "ts"}).encode(),
         "'ts' is missing"),
        (json.dumps({**json.loads(_alert().to_json()), "features": [1, 2]}).encode(), "unexpected field"),
        (json.dumps({**json.loads(_alert().to_json()), "institution": "bank-b"}).encode(), "topic names"),
    ],
)
def test_malformed_payloads_are_refused_with_a_reason(payload: bytes, needle: str) -> None:
    with pytest.raises(m.MessageError, match=needle):
        m.parse_message("consortium/bank-a/agent-1/alerts", payload)


@pytest.mark.parametrize("topic", ["consortium/a/b", "other/a/b/alerts", "consortium/a/b/secrets",
                                   "consortium/a+/b/alerts", "consortium//b/alerts"])
def test_bad_topics_are_refused(topic: str) -> None:
    with pytest.raises(m.MessageError):
        m.parse_topic(topic)


def test_status_state_is_checked() -> None:
    with pytest.raises(m.MessageError, match="one of"):
        m.parse_payload("status", json.dumps({"institution": "a", "agent": "b", "state": "sleepy", "ts": 1.0}))


@settings(max_examples=200, deadline=None)
@given(inst=NAMES, agent=NAMES, seq=st.integers(0, 2**40),
       score=st.floats(allow_nan=False, allow_infinity=False), tx=st.text(max_size=50))
def test_alert_round_trip_property(inst: str, agent: str, seq: int, score: float, tx: str) -> None:
    alert = _alert(msg_id=m.make_msg_id(inst, agent, seq), institution=inst, agent=agent, score=score,
                   transaction_id=tx)
    assert m.parse_message(m.agent_topic(inst, agent, "alerts"), alert.to_json())[1] == alert


@settings(max_examples=300, deadline=None)
@given(payload=st.one_of(st.binary(max_size=300), st.text(max_size=300).map(str.encode),
                         st.dictionaries(st.text(max_size=10), st.one_of(st.none(), st.integers(), st.floats(),
                                                                        st.text(max_size=10)), max_size=10)
                         .map(lambda d: json.dumps(d).encode())))
def test_arbitrary_payloads_never_crash(payload: bytes) -> None:
    for kind in m.PAYLOADS:
        try:
            m.parse_payload(kind, payload)
        except m.MessageError:
            pass
