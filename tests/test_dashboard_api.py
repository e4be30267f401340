"""The dashboard's JSON API: contents, access control (401/403), no secret leaks, and schemathesis over OpenAPI."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from consortium.dashboard.app import DashboardContext, create_app
from consortium.dashboard.auth import Authenticator, load_users_file, token_digest
from consortium.dashboard.hub import EventHub
from consortium.dashboard.schema import AgentRow, AlertRow, ensure_tables
from consortium.errors import ConfigError
from consortium.registry import RoundRecord, RunStore

OPERATOR = "operator-token-0123456789"
BANK_A = "bank-a-token-0123456789"
BANK_B_DIGEST_OF = "bank-b-token-0123456789"


def _seed(store: RunStore) -> str:
    ensure_tables(store)
    run_id = store.create_run(name="demo", config={"rounds": 3}, institutions=["bank-a", "bank-b"])
    t = datetime.now(UTC)
    for r in (1, 2, 3):
        store.record_round(run_id, RoundRecord(
            round=r, started_at=t, finished_at=t + timedelta(seconds=2), participants=("bank-a", "bank-b"),
            dropped=("bank-c",) if r == 2 else (),
            global_metrics={"auprc": 0.5 + r / 10, "roc-auc": float("nan"), "recall-at-1pct-fpr": 0.4},
        ))
        for inst in ("bank-a", "bank-b"):
            store.record_institution_metrics(run_id, round=r, institution=inst, split="test",
                                             metrics={"auprc": 0.4 + r / 10})
    store.record_baseline(run_id, kind="centralized", institution=None, metrics={"auprc": 0.9})
    store.record_baseline(run_id, kind="local_only", institution="bank-a", metrics={"auprc": 0.5})
    store.record_baseline(run_id, kind="local_only", institution="bank-b", metrics={"auprc": 0.6})

    def add(session: object) -> None:
        for i, inst in enumerate(["bank-a", "bank-b", "bank-a"]):
            session.add(AlertRow(msg_id=f"{inst}/ag/{i}", institution=inst, agent="ag",  # type: ignore[attr-defined]
                                 transaction_id=f"tx-{i}", score=0.9, threshold=0.5, model_version="v1", ts=1.0,
                                 received_at=1.0))
            session.merge(AgentRow(institution=inst, agent="ag", app="fraud", state="online",  # type: ignore[attr-defined]
                                   state_ts=1.0, model_version="v1", last_seen=1.0, telemetry_ts=0.0, telemetry={}))

    store.run_transaction(add, action="seed alerts")
    return run_id


@pytest.fixture
def users_file(tmp_path: Path) -> Path:
    path = tmp_path / "users.json"
    path.write_text(json.dumps({"users": [
        {"name": "bank-a-ops", "institution": "bank-a", "token": BANK_A},
        {"name": "bank-b-ops", "institution": "bank-b", "token_sha256": token_digest(BANK_B_DIGEST_OF)},
    ]}))
    return path


@pytest.fixture
def app_and_run(run_store: RunStore, users_file: Path) -> Iterator[tuple[FastAPI, str]]:
    run_id = _seed(run_store)
    auth = Authenticator.from_options(token=OPERATOR, users_file=users_file)
    yield create_app(DashboardContext(store=run_store, hub=EventHub(), auth=auth)), run_id


def _h(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_federation_endpoints(app_and_run: tuple[FastAPI, str]) -> None:
    app, run_id = app_and_run
    client = TestClient(app)
    runs = client.get("/api/runs", headers=_h(OPERATOR)).json()
    assert [(r["run_id"], r["rounds_completed"]) for r in runs] == [(run_id, 3)]
    body = client.get(f"/api/runs/{run_id}/rounds", headers=_h(OPERATOR)).json()
    assert [r["round"] for r in body["rounds"]] == [1, 2, 3]
    assert body["rounds"][1]["dropped"] == ["bank-c"]
    assert body["rounds"][0]["global_metrics"]["roc-auc"] is None  # NaN travels as null
    assert set(body["rounds"][0]["institution_metrics"]) == {"bank-a", "bank-b"}
    assert {(b["kind"], b["institution"]) for b in body["baselines"]} == {
        ("centralized", None), ("local_only", "bank-a"), ("local_only", "bank-b")}
    assert client.get("/api/runs/nope/rounds", headers=_h(OPERATOR)).status_code == 404


def test_unauthenticated_requests_are_refused(app_and_run: tuple[FastAPI, str]) -> None:
    app, run_id = app_and_run
    client = TestClient(app)
    for path in ("/api/me", "/api/runs", f"/api/runs/{run_id}/rounds", "/api/privacy", "/api/models", "/api/fleet",
                 "/api/alerts", "/api/events", "/api/traffic", "/api/stream", "/api/openapi.json",
                 "/static/dashboard.js"):
        for headers in ({}, _h("wrong-token-0123456789")):
            r = client.get(path, headers=headers)
            assert r.status_code == 401, (path, r.status_code)
    page = client.get("/")
    assert page.status_code == 401 and 'name="token"' in page.text  # the login form, nothing else


def test_institution_tokens_see_only_their_institution(app_and_run: tuple[FastAPI, str]) -> None:
    app, run_id = app_and_run
    client = TestClient(app)
    alerts = client.get("/api/alerts", headers=_h(BANK_A)).json()
    assert {a["institution"] for a in alerts} == {"bank-a"} and len(alerts) == 2
    assert {a["institution"] for a in client.get("/api/fleet", headers=_h(BANK_A)).json()} == {"bank-a"}
    assert {a["institution"] for a in client.get("/api/alerts", headers=_h(BANK_B_DIGEST_OF)).json()} == {"bank-b"}
    for path in ("/api/alerts", "/api/fleet", "/api/events", "/api/traffic", "/api/privacy"):
        r = client.get(path, params={"institution": "bank-b"}, headers=_h(BANK_A))
        assert r.status_code == 403, path
        assert client.get(path, params={"institution": "bank-a"}, headers=_h(BANK_A)).status_code == 200
    body = client.get(f"/api/runs/{run_id}/rounds", headers=_h(BANK_A)).json()
    assert all(set(r["institution_metrics"]) == {"bank-a"} for r in body["rounds"])
    assert {b["institution"] for b in body["baselines"]} == {None, "bank-a"}
    operator = client.get("/api/alerts", headers=_h(OPERATOR)).json()
    assert {a["institution"] for a in operator} == {"bank-a", "bank-b"}
    assert client.get("/api/me", headers=_h(BANK_A)).json() == {"user": "bank-a-ops", "institution": "bank-a",
                                                                 "auth": True}


def test_browser_login_sets_a_session_cookie_and_no_secret_leaks(
    app_and_run: tuple[FastAPI, str], caplog: pytest.LogCaptureFixture
) -> None:
    app, _ = app_and_run
    caplog.set_level(logging.DEBUG)
    client = TestClient(app)
    refused = client.post("/login", data={"token": "not-a-valid-token-xx"})
    assert refused.status_code == 401 and "not-a-valid-token-xx" not in refused.text
    r = client.post("/login", data={"token": BANK_A}, follow_redirects=False)
    assert r.status_code == 303
    cookie = r.cookies.get("consortium_session")
    assert cookie and BANK_A not in cookie and "httponly" in r.headers["set-cookie"].lower()
    page = client.get("/")
    assert page.status_code == 200 and 'id="alert-table"' in page.text
    assert client.get("/api/me").json()["institution"] == "bank-a"
    assert client.get("/static/dashboard.js").status_code == 200
    for text in (page.text, client.get("/static/dashboard.js").text, caplog.text):
        for secret in (BANK_A, OPERATOR, BANK_B_DIGEST_OF):
            assert secret not in text
    client.post("/logout")
    assert client.get("/api/me").status_code == 401


def test_users_file_errors_name_the_entry_and_field(tmp_path: Path) -> None:
    path = tmp_path / "users.json"
    cases = {
        '{"users": []}': "at least one user",
        '{"users": [{"name": "a"}]}': "exactly one of 'token' and 'token_sha256'",
        '{"users": [{"name": "a", "token": "short"}]}': r"users\[0\]: field 'token'",
        '{"users": [{"name": "a", "token_sha256": "xyz"}]}': "64 lower-case hex",
        '{"users": [{"name": "a", "token": "0123456789abcdef", "institution": "a/b"}]}': "institution",
        '{"users": [{"name": "a", "token": "0123456789abcdef", "role": "admin"}]}': "unknown field",
        "{oops": "not readable JSON",
    }
    for text, message in cases.items():
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_users_file(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_users_file(tmp_path / "missing.json")
    with pytest.raises(ConfigError, match="at least 16"):
        Authenticator.from_options(token="short")


@pytest.fixture
def api_schema(tmp_path: Path, users_file: Path) -> Iterator[object]:
    """The app's OpenAPI schema (SQLite store; both backends run the same queries in the tests above)."""
    with RunStore(f"sqlite:///{tmp_path / 'api.db'}") as store:
        _seed(store)
        app = create_app(DashboardContext(store=store, hub=EventHub(),
                                          auth=Authenticator.from_options(token=OPERATOR, users_file=users_file)))
        document = TestClient(app).get("/api/openapi.json", headers=_h(OPERATOR)).json()
        del document["paths"]["/api/stream"]  # endless by design; covered by the browser test
        schema = schemathesis.openapi.from_dict(document)
        schema.app = app
        yield schema


schema = schemathesis.pytest.from_fixture("api_schema")


@pytest.mark.filterwarnings("ignore")
@schema.parametrize()
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_never_answers_5xx(case: schemathesis.Case) -> None:
    for token in (OPERATOR, BANK_A):
        case.call_and_validate(headers=_h(token), checks=[not_a_server_error, response_schema_conformance])


def test_privacy_and_models_panels_read_the_ledger_and_registry(run_store: RunStore, users_file: Path,
                                                                 tmp_path: Path) -> None:
    from consortium.dashboard.sources import OptionalSources  # noqa: PLC0415
    from consortium.edge.testing import feature_names, mlp_onnx, mlp_weights, signed_bundle  # noqa: PLC0415
    from consortium.privacy.ledger import PrivacyLedger  # noqa: PLC0415
    from consortium.privacy.mechanisms import DpSgdMechanism  # noqa: PLC0415
    from consortium.registry.registry import ModelRegistry  # noqa: PLC0415
    from consortium.registry.signing import generate_signing_key, load_private_key  # noqa: PLC0415

    run_id = _seed(run_store)
    mech = DpSgdMechanism(noise_multiplier=1.2, clip_norm=1.0, sampling_rate=0.05, steps_per_round=20)
    ledger = PrivacyLedger(run_store)
    for rnd in (1, 2, 3):
        for inst in ("bank-a", "bank-b"):
            ledger.charge(run_id=run_id, institution=inst, data_id="d", round=rnd, mechanism="dpsgd",
                          event=mech.round_event(), delta=1e-5, budget_epsilon=8.0, params=mech.params())
    key = load_private_key(generate_signing_key(tmp_path / "k.key"))
    bundle = tmp_path / "v1.bundle"
    bundle.write_bytes(signed_bundle(mlp_onnx(mlp_weights(4, (4,))), version="v1", private_key=key,
                                     names=feature_names(4)))
    registry = ModelRegistry(run_store, tmp_path / "blobs")
    registry.add(bundle)
    registry.promote("v1")
    sources = OptionalSources(tmp_path / "blobs", run_store)
    auth = Authenticator.from_options(token=OPERATOR, users_file=users_file)
    client = TestClient(create_app(DashboardContext(store=run_store, hub=EventHub(), auth=auth, sources=sources)))

    body = client.get("/api/privacy", params={"run_id": run_id}, headers=_h(OPERATOR)).json()
    assert body["available"] is True and len(body["charges"]) == 6
    eps = [c["epsilon"] for c in body["charges"] if c["institution"] == "bank-a"]
    assert eps == sorted(eps) and eps[0] > 0 and body["charges"][0]["budget_epsilon"] == 8.0
    own = client.get("/api/privacy", headers=_h(BANK_A)).json()["charges"]
    assert {c["institution"] for c in own} == {"bank-a"}

    models = client.get("/api/models", headers=_h(OPERATOR)).json()["models"]
    assert [(m["model_version"], m["promoted"]) for m in models] == [("v1", True)]
    assert client.get("/api/models").status_code == 401
