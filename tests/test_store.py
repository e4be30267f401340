"""Tests of the run store on SQLite and PostgreSQL (fixtures in conftest.py)."""

from __future__ import annotations

import logging
import math
import threading
import uuid
from datetime import UTC, datetime, timedelta, timezone

import numpy as np
import psycopg
import pytest
import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from sqlalchemy.engine import make_url

from consortium.errors import ConfigError, DataError, StoreError
from consortium.registry import (
    BaselineRecord,
    InstitutionMetricRecord,
    RoundRecord,
    RunStore,
    mask_url,
)
from consortium.registry.arrays_codec import decode_arrays, encode_arrays
from consortium.registry.store_schema import decode_metric_value, encode_metric_value

T0 = datetime(2025, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
BANKS = ("bank_a", "bank_b", "bank_c")


def make_round(number: int, **overrides: object) -> RoundRecord:
    values: dict[str, object] = {
        "round": number,
        "started_at": T0 + timedelta(minutes=number),
        "finished_at": T0 + timedelta(minutes=number, seconds=42.5),
        "participants": ("bank_a", "bank_b"),
        "dropped": ("bank_c",),
        "train_metrics": {"loss": 0.5 / (number + 1), "accuracy": 0.9},
        "global_metrics": {"auprc": 0.61 + number / 100},
    }
    values.update(overrides)
    return RoundRecord(**values)  # type: ignore[arg-type]


def model_arrays(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [
        rng.standard_normal((4, 3)).astype(np.float32),
        rng.standard_normal(3).astype(np.float32),
    ]


def new_run(store: RunStore, **overrides: object) -> str:
    values: dict[str, object] = {
        "name": "fraud-mlp",
        "config": {"rounds": 3, "lr": 0.01, "model": {"hidden": [16, 8]}},
        "institutions": BANKS,
    }
    values.update(overrides)
    return store.create_run(**values)  # type: ignore[arg-type]


def row_counts(store: RunStore) -> dict[str, int]:
    with store.engine.connect() as connection:
        return {
            table: connection.execute(sa.text(f"SELECT COUNT(*) FROM {table}")).scalar_one()
            for table in ("rounds", "checkpoints")
        }


# ----------------------------------------------------------------------------- runs


def test_create_and_get_run_round_trips_config_and_institutions(run_store):
    config = {"rounds": 3, "lr": 0.01, "model": {"hidden": (16, 8)}, "dp": None, "secagg": True}
    before = datetime.now(UTC)
    run_id = run_store.create_run(name="fraud-mlp", config=config, institutions=list(BANKS))
    run = run_store.get_run(run_id)

    assert len(run_id) == 32 and int(run_id, 16) >= 0  # uuid4 hex
    assert run.run_id == run_id
    assert run.name == "fraud-mlp"
    assert run.status == "running"
    assert run.config == {"rounds": 3, "lr": 0.01, "model": {"hidden": [16, 8]}, "dp": None,
                          "secagg": True}
    assert run.institutions == BANKS
    assert run.finished_at is None and run.message is None
    assert run.created_at.tzinfo is not None and run.created_at.utcoffset() == timedelta(0)
    assert before - timedelta(seconds=1) <= run.created_at <= datetime.now(UTC)


def test_create_run_with_chosen_id_and_refuses_taken_id(run_store):
    assert new_run(run_store, run_id="nightly-42") == "nightly-42"
    with pytest.raises(StoreError, match="'nightly-42' already exists"):
        new_run(run_store, run_id="nightly-42", name="other")
    assert run_store.get_run("nightly-42").name == "fraud-mlp"


def test_list_runs_is_newest_first_and_limited(run_store):
    assert run_store.list_runs() == []
    ids = [new_run(run_store, name=f"run-{i}") for i in range(4)]
    listed = run_store.list_runs()
    assert [r.run_id for r in listed] == ids[::-1]
    assert [r.run_id for r in run_store.list_runs(limit=2)] == ids[:1:-1]
    with pytest.raises(ConfigError, match="'limit' parameter of RunStore.list_runs"):
        run_store.list_runs(limit=0)


def test_finish_run_sets_status_message_and_end_time(run_store):
    run_id = new_run(run_store)
    run_store.finish_run(run_id, status="failed", message="bank_b timed out")
    run = run_store.get_run(run_id)
    assert (run.status, run.message) == ("failed", "bank_b timed out")
    assert run.finished_at is not None and run.finished_at >= run.created_at

    run_store.finish_run(run_id, status="completed")  # a resumed run may complete later
    run = run_store.get_run(run_id)
    assert (run.status, run.message) == ("completed", None)

    with pytest.raises(ConfigError, match="'status' parameter .* Got 'done' instead"):
        run_store.finish_run(run_id, status="done")  # type: ignore[arg-type]


def test_unknown_run_id_error_lists_known_ids(run_store):
    with pytest.raises(StoreError, match="Unknown run id 'nope'.*no runs yet"):
        run_store.get_run("nope")
    ids = [new_run(run_store) for _ in range(7)]
    with pytest.raises(StoreError) as caught:
        run_store.get_run("nope")
    message = str(caught.value)
    assert "Unknown run id 'nope'" in message and run_store.url_masked in message
    assert all(run_id in message for run_id in ids[-5:])  # the five newest
    assert ids[0] not in message and "..." in message
    for call in (
        lambda: run_store.rounds("nope"),
        lambda: run_store.last_completed_round("nope"),
        lambda: run_store.load_checkpoint("nope"),
        lambda: run_store.record_round("nope", make_round(1)),
        lambda: run_store.finish_run("nope", status="aborted"),
        lambda: run_store.baselines("nope"),
    ):
        with pytest.raises(StoreError, match="Unknown run id 'nope'"):
            call()


def test_create_run_rejects_bad_input_naming_the_field(run_store):
    with pytest.raises(ConfigError, match=r"'config\['lr'\]' parameter .*NaN"):
        new_run(run_store, config={"lr": float("nan")})
    with pytest.raises(ConfigError, match=r"config\['model'\]\['layers'\].*set"):
        new_run(run_store, config={"model": {"layers": {1, 2}}})
    with pytest.raises(ConfigError, match="'institutions' parameter .*distinct"):
        new_run(run_store, institutions=["bank_a", "bank_a"])
    with pytest.raises(ConfigError, match="'institutions' parameter"):
        new_run(run_store, institutions="bank_a")
    with pytest.raises(ConfigError, match="'name' parameter"):
        new_run(run_store, name="")
    assert run_store.list_runs() == []


# --------------------------------------------------------------------------- rounds


def test_rounds_round_trip_in_order(run_store):
    run_id = new_run(run_store)
    assert run_store.rounds(run_id) == [] and run_store.last_completed_round(run_id) == 0
    for number in (1, 3, 2):
        run_store.record_round(run_id, make_round(number))
    stored = run_store.rounds(run_id)
    assert stored == [make_round(1), make_round(2), make_round(3)]
    assert stored[0].duration_s == pytest.approx(42.5)
    assert stored[0].started_at.tzinfo is not None
    assert run_store.last_completed_round(run_id) == 3


def test_round_timestamps_come_back_as_the_same_instant_in_utc(run_store):
    run_id = new_run(run_store)
    plus_two = timezone(timedelta(hours=2))
    record = make_round(
        1, started_at=datetime(2025, 3, 1, 14, 0, tzinfo=plus_two),
        finished_at=datetime(2025, 3, 1, 14, 1, 30, 5, tzinfo=plus_two),
    )
    run_store.record_round(run_id, record)
    (stored,) = run_store.rounds(run_id)
    assert stored.started_at == record.started_at
    assert stored.finished_at == record.finished_at
    assert stored.started_at.utcoffset() == timedelta(0)
    assert stored.started_at.hour == 12


def test_duplicate_round_is_refused_and_keeps_first_checkpoint(run_store):
    run_id = new_run(run_store)
    first, second = model_arrays(0), model_arrays(1)
    run_store.record_round(run_id, make_round(1), checkpoint=first)
    with pytest.raises(StoreError, match="Round 1 of run .* already recorded"):
        run_store.record_round(
            run_id, make_round(1, global_metrics={"auprc": 0.99}), checkpoint=second
        )
    assert run_store.rounds(run_id) == [make_round(1)]
    loaded = run_store.load_checkpoint(run_id)
    assert all(np.array_equal(a, b) for a, b in zip(loaded.arrays, first, strict=True))


def test_round_and_checkpoint_are_written_atomically(run_store):
    """A failure after the round row was sent must roll the round back too."""
    run_id = new_run(run_store)
    run_store.record_round(run_id, make_round(1), checkpoint=model_arrays(1))
    statements: list[str] = []

    def capture(conn, cursor, statement, parameters, context, executemany):
        statements.append(" ".join(statement.split()).upper())

    sa.event.listen(run_store.engine, "before_cursor_execute", capture)
    bad = model_arrays(2) + [np.array([{"not": "an array of numbers"}], dtype=object)]
    try:
        with pytest.raises(DataError, match="array 2 has dtype object.*Nothing was recorded"):
            run_store.record_round(run_id, make_round(2), checkpoint=bad)
    finally:
        sa.event.remove(run_store.engine, "before_cursor_execute", capture)

    # The failure really happened mid-transaction: the round INSERT had reached the database.
    assert any(s.startswith("INSERT INTO ROUNDS") for s in statements)
    assert run_store.last_completed_round(run_id) == 1
    assert [r.round for r in run_store.rounds(run_id)] == [1]
    assert run_store.load_checkpoint(run_id).round == 1
    with pytest.raises(StoreError, match=r"no checkpoint for round 2; checkpointed rounds: \[1\]"):
        run_store.load_checkpoint(run_id, round=2)
    assert row_counts(run_store) == {"rounds": 1, "checkpoints": 1}

    # The failed round can be recorded properly afterwards.
    run_store.record_round(run_id, make_round(2), checkpoint=model_arrays(2))
    assert run_store.last_completed_round(run_id) == 2


def test_record_round_rejects_bad_arguments(run_store):
    run_id = new_run(run_store)
    with pytest.raises(ConfigError, match="'checkpoint' parameter .*list of numpy arrays"):
        run_store.record_round(run_id, make_round(1), checkpoint=np.zeros(3))
    with pytest.raises(ConfigError, match="'checkpoint_extra' parameter"):
        run_store.record_round(run_id, make_round(1), checkpoint_extra={"seed": 1})
    with pytest.raises(ConfigError, match=r"checkpoint_extra\['best'\].*NaN"):
        run_store.record_round(
            run_id, make_round(1), checkpoint=model_arrays(0),
            checkpoint_extra={"best": float("nan")},
        )
    with pytest.raises(ConfigError, match="'round_record' parameter"):
        run_store.record_round(run_id, {"round": 1})  # type: ignore[arg-type]
    assert row_counts(run_store) == {"rounds": 0, "checkpoints": 0}


# ---------------------------------------------------------------------- checkpoints


def test_load_checkpoint_latest_or_by_round(run_store):
    run_id = new_run(run_store)
    with pytest.raises(StoreError, match="has no checkpoint for any round; it has none"):
        run_store.load_checkpoint(run_id)
    run_store.record_round(run_id, make_round(1), checkpoint=model_arrays(1),
                           checkpoint_extra={"optimizer": {"m": [0.1, 0.2]}, "seed": 7})
    run_store.record_round(run_id, make_round(2))  # a round without checkpoint
    run_store.record_round(run_id, make_round(3), checkpoint=model_arrays(3))

    latest = run_store.load_checkpoint(run_id)
    assert (latest.run_id, latest.round, latest.extra) == (run_id, 3, {})
    assert all(np.array_equal(a, b) for a, b in zip(latest.arrays, model_arrays(3), strict=True))
    first = run_store.load_checkpoint(run_id, round=1)
    assert first.round == 1 and first.extra == {"optimizer": {"m": [0.1, 0.2]}, "seed": 7}
    assert all(np.array_equal(a, b) for a, b in zip(first.arrays, model_arrays(1), strict=True))
    with pytest.raises(StoreError, match=r"no checkpoint for round 2; checkpointed rounds: \[1, 3"):
        run_store.load_checkpoint(run_id, round=2)


def test_checkpoint_keeps_dtype_shape_and_values_exactly(run_store):
    run_id = new_run(run_store)
    arrays = [
        np.arange(12, dtype=np.float32).reshape(3, 4) / 7,
        np.array([1e-300, -0.0, np.nan, np.inf], dtype=np.float64),
        np.arange(-3, 3, dtype=np.int64),
        np.array([[True, False]]),
        np.arange(256, dtype=np.uint8).reshape(2, 8, 16),
        np.array(3.5, dtype=np.float16),  # 0-d
        np.zeros((0, 5), dtype=np.float32),  # empty
        np.asfortranarray(np.arange(6, dtype=np.int32).reshape(2, 3)),
        np.arange(4, dtype=">f8"),  # big-endian
    ]
    run_store.record_round(run_id, make_round(1), checkpoint=arrays)
    loaded = run_store.load_checkpoint(run_id).arrays
    assert len(loaded) == len(arrays)
    for original, back in zip(arrays, loaded, strict=True):
        assert back.dtype == original.dtype
        assert back.shape == original.shape
        np.testing.assert_array_equal(back, original)
    assert loaded[0].dtype == np.float32
    assert loaded[7].flags.f_contiguous


# ------------------------------------------------------------ metrics and baselines


def test_nan_and_infinite_metrics_round_trip_everywhere(run_store):
    run_id = new_run(run_store)
    odd = {"loss": float("nan"), "ratio": float("inf"), "log_p": float("-inf"), "auc": 0.75}
    run_store.record_round(run_id, make_round(1, train_metrics=odd, global_metrics=odd))
    run_store.record_institution_metrics(
        run_id, round=1, institution="bank_a", split="test", metrics=odd
    )
    run_store.record_baseline(run_id, kind="centralized", institution=None, metrics=odd)

    def same(got: dict[str, float]) -> bool:
        return got.keys() == odd.keys() and all(
            (math.isnan(v) and math.isnan(got[k])) or got[k] == v for k, v in odd.items()
        )

    (stored,) = run_store.rounds(run_id)
    assert same(stored.train_metrics) and same(stored.global_metrics)
    assert same(run_store.institution_metrics(run_id)[0].metrics)
    assert same(run_store.baselines(run_id)[0].metrics)


def test_institution_metrics_round_trip_ordered_and_unique(run_store):
    run_id = new_run(run_store)
    run_store.record_institution_metrics(
        run_id, round=2, institution="bank_b", split="test", metrics={"auprc": 0.5}
    )
    run_store.record_institution_metrics(
        run_id, round=0, institution="bank_a", split="test", metrics={"auprc": np.float32(0.25)}
    )
    run_store.record_institution_metrics(
        run_id, round=2, institution="bank_a", split="val", metrics={"auprc": 0.75}
    )
    assert run_store.institution_metrics(run_id) == [
        InstitutionMetricRecord(0, "bank_a", "test", {"auprc": 0.25}),
        InstitutionMetricRecord(2, "bank_a", "val", {"auprc": 0.75}),
        InstitutionMetricRecord(2, "bank_b", "test", {"auprc": 0.5}),
    ]
    with pytest.raises(StoreError, match="'bank_b' on split 'test' for round 2 .* already"):
        run_store.record_institution_metrics(
            run_id, round=2, institution="bank_b", split="test", metrics={"auprc": 0.9}
        )
    with pytest.raises(ConfigError, match=r"'metrics\['auprc'\]' parameter .*real number"):
        run_store.record_institution_metrics(
            run_id, round=3, institution="bank_b", split="test", metrics={"auprc": "high"}
        )
    assert len(run_store.institution_metrics(run_id)) == 3


def test_baselines_round_trip_in_recording_order(run_store):
    run_id = new_run(run_store)
    run_store.record_baseline(run_id, kind="local_only", institution="bank_a",
                              metrics={"auprc": 0.4})
    run_store.record_baseline(run_id, kind="local_only", institution="bank_b",
                              metrics={"auprc": 0.3})
    run_store.record_baseline(run_id, kind="centralized", institution=None,
                              metrics={"auprc": 0.7, "roc_auc": 0.95})
    assert run_store.baselines(run_id) == [
        BaselineRecord(kind="local_only", institution="bank_a", metrics={"auprc": 0.4}),
        BaselineRecord(kind="local_only", institution="bank_b", metrics={"auprc": 0.3}),
        BaselineRecord(kind="centralized", institution=None,
                       metrics={"auprc": 0.7, "roc_auc": 0.95}),
    ]
    other = new_run(run_store)
    assert run_store.baselines(other) == []


# ---------------------------------------------------------------- restart survival


def test_second_store_on_same_database_sees_everything_and_resumes(store_url):
    with store_url.open() as first:
        run_id = new_run(first)
        first.record_round(run_id, make_round(1), checkpoint=model_arrays(1))
        first.record_round(run_id, make_round(2), checkpoint=model_arrays(2),
                           checkpoint_extra={"server_lr": 1.0})
        first.record_baseline(run_id, kind="centralized", institution=None,
                              metrics={"auprc": 0.7})
    # The coordinator was "killed": a new process opens the same database.
    with store_url.open() as second:
        assert [r.run_id for r in second.list_runs()] == [run_id]
        assert second.last_completed_round(run_id) == 2
        resumed = second.load_checkpoint(run_id)
        assert resumed.round == 2 and resumed.extra == {"server_lr": 1.0}
        assert all(np.array_equal(a, b)
                   for a, b in zip(resumed.arrays, model_arrays(2), strict=True))
        assert second.rounds(run_id) == [make_round(1), make_round(2)]
        second.record_round(run_id, make_round(3))
        second.finish_run(run_id, status="completed")
    with store_url.open() as third:
        assert third.get_run(run_id).status == "completed"
        assert third.last_completed_round(run_id) == 3


def test_concurrent_writers_from_threads_lose_nothing(run_store):
    run_id = new_run(run_store)
    failures: list[BaseException] = []

    def disclose(institution: str) -> None:
        try:
            for number in range(5):
                run_store.record_institution_metrics(
                    run_id, round=number, institution=institution, split="test",
                    metrics={"auprc": number / 10},
                )
        except BaseException as exc:  # surfaced by the assertion below
            failures.append(exc)

    threads = [threading.Thread(target=disclose, args=(bank,)) for bank in BANKS]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    stored = run_store.institution_metrics(run_id)
    assert sorted((m.round, m.institution) for m in stored) == sorted(
        (number, bank) for number in range(5) for bank in BANKS
    )


def test_closed_store_refuses_use(store_url):
    store = store_url.open()
    store.close()
    store.close()  # idempotent
    with pytest.raises(StoreError, match="is closed"):
        store.list_runs()


# ------------------------------------------------------------- backend specifics


def test_sqlite_uses_wal_and_enforces_foreign_keys(tmp_path):
    with RunStore(f"sqlite:///{tmp_path / 'runs.db'}") as store:
        with store.engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            with pytest.raises(sa.exc.IntegrityError):
                connection.exec_driver_sql(
                    "INSERT INTO baselines (run_id, kind, institution, created_at, metrics) "
                    "VALUES ('ghost', 'centralized', NULL, '2025-01-01 00:00:00', '{}')"
                )


def test_in_memory_sqlite_store_works():
    with RunStore("sqlite://") as store:
        run_id = new_run(store)
        store.record_round(run_id, make_round(1), checkpoint=model_arrays(0))
        assert store.load_checkpoint(run_id).round == 1


@pytest.mark.postgres
def test_postgres_schema_is_created_when_missing_and_isolates_tables(postgres_url):
    fresh = f"consortium_test_{uuid.uuid4().hex}"
    conninfo = make_url(postgres_url).set(drivername="postgresql")
    conninfo_text = conninfo.render_as_string(hide_password=False)
    try:
        with RunStore(postgres_url, schema=fresh) as store:
            run_id = new_run(store)
        with psycopg.connect(conninfo_text, autocommit=True) as connection:
            tables = {
                row[0]
                for row in connection.execute(
                    "SELECT table_name FROM information_schema.tables WHERE table_schema = %s",
                    (fresh,),
                )
            }
        assert {"runs", "rounds", "checkpoints", "institution_metrics", "baselines"} <= tables
        with RunStore(postgres_url, schema=fresh) as reopened:  # existing schema is reused
            assert [r.run_id for r in reopened.list_runs()] == [run_id]
        with RunStore(postgres_url, schema=f"{fresh}_other") as other:
            assert other.list_runs() == []  # a different schema sees none of it
    finally:
        with psycopg.connect(conninfo_text, autocommit=True) as connection:
            connection.execute(f"DROP SCHEMA IF EXISTS {fresh} CASCADE")
            connection.execute(f"DROP SCHEMA IF EXISTS {fresh}_other CASCADE")


def test_schema_option_is_validated(tmp_path):
    with pytest.raises(ConfigError, match="'schema' parameter .*PostgreSQL only"):
        RunStore(f"sqlite:///{tmp_path / 'x.db'}", schema="runs")
    with pytest.raises(ConfigError, match="'schema' parameter .*lower-case identifier"):
        RunStore("postgresql+psycopg://root@127.0.0.1:1/test", schema="Runs; DROP")


# -------------------------------------------------------------------- bad URLs


def test_unreachable_database_error_masks_password_after_retries(caplog):
    url = "postgresql+psycopg://alice:s3cret-pw@127.0.0.1:1/consortium"
    with caplog.at_level(logging.WARNING, logger="consortium.registry.store"):
        with pytest.raises(StoreError) as caught:
            RunStore(url, retries=2, retry_wait=0.01)
    message = str(caught.value)
    assert "postgresql+psycopg://alice:***@127.0.0.1:1/consortium" in message
    assert "after 3 attempts" in message
    assert "s3cret-pw" not in message and "s3cret-pw" not in caplog.text
    assert sum("retry" in r.getMessage() for r in caplog.records) == 2


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("not a url at all", "is not a database URL"),
        ("nosuchdb://bob:hunter2@host/db", "nosuchdb://bob:\\*\\*\\*@host/db"),
        ("postgresql+nosuchdriver://bob:hunter2@host/db", "bob:\\*\\*\\*@host"),
        ("sqlite:////definitely/missing/folder/runs.db", "folder .* does not exist"),
    ],
)
def test_bad_urls_raise_store_error_without_password(url, expected):
    with pytest.raises(StoreError, match=expected) as caught:
        RunStore(url, retries=0)
    assert "hunter2" not in str(caught.value)


def test_mask_url_hides_passwords_even_in_unparsable_urls():
    assert mask_url("postgresql+psycopg://u:pw@h:5432/d") == "postgresql+psycopg://u:***@h:5432/d"
    assert mask_url("sqlite:///runs.db") == "sqlite:///runs.db"
    assert "pw" not in mask_url("://u:pw@h/d")


def test_store_options_are_validated():
    with pytest.raises(ConfigError, match="'retries' parameter of RunStore"):
        RunStore("sqlite://", retries=-1)
    with pytest.raises(ConfigError, match="'retry_wait' parameter of RunStore"):
        RunStore("sqlite://", retry_wait=float("nan"))
    with pytest.raises(ConfigError, match="'url' parameter of RunStore"):
        RunStore("")


# ------------------------------------------------------------------- records


def test_round_record_validates_and_normalises():
    record = make_round(1, participants=["bank_a"], train_metrics={"loss": np.float32(0.5)})
    assert record.participants == ("bank_a",)
    assert type(record.train_metrics["loss"]) is float
    with pytest.raises(ConfigError, match="'started_at' parameter of RoundRecord .*timezone"):
        make_round(1, started_at=datetime(2025, 1, 1))
    with pytest.raises(ConfigError, match="'finished_at' parameter .*at or after"):
        make_round(1, finished_at=T0 - timedelta(days=1))
    with pytest.raises(ConfigError, match="'round' parameter of RoundRecord must be an int >= 1"):
        make_round(0)
    with pytest.raises(ConfigError, match=r"'global_metrics\['ok'\]' parameter"):
        make_round(1, global_metrics={"ok": True})


# --------------------------------------------------------------------- codecs


array_strategy = hnp.arrays(
    dtype=st.one_of(
        hnp.floating_dtypes(), hnp.integer_dtypes(), hnp.boolean_dtypes(),
        hnp.complex_number_dtypes(), hnp.unicode_string_dtypes(), hnp.byte_string_dtypes(),
    ),
    shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(array_strategy, max_size=12))
def test_arrays_codec_round_trips_any_plain_array(arrays):
    back = decode_arrays(encode_arrays(arrays))
    assert len(back) == len(arrays)
    for original, restored in zip(arrays, back, strict=True):
        assert restored.dtype == original.dtype and restored.shape == original.shape
        np.testing.assert_array_equal(restored, original)


def test_arrays_codec_refuses_pickle_and_garbage():
    with pytest.raises(DataError, match="array 1 must be a numpy.ndarray. Got list"):
        encode_arrays([np.zeros(2), [1, 2]])
    with pytest.raises(DataError, match="sequence .* Got ndarray"):
        encode_arrays(np.zeros(3))
    with pytest.raises(DataError, match="not a readable .npz"):
        decode_arrays(b"definitely not a zip archive")


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_metric_value_encoding_round_trips_every_float(value):
    encoded = encode_metric_value(value)
    assert isinstance(encoded, float) or encoded in {"NaN", "Infinity", "-Infinity"}
    back = decode_metric_value(encoded)
    assert (math.isnan(value) and math.isnan(back)) or back == value
