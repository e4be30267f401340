"""The run store: everything the coordinator records about federated runs.

A :class:`RunStore` keeps runs, completed rounds, per-round checkpoints of the
global model, metrics that institutions chose to disclose and baseline results in
one relational database through SQLAlchemy: a SQLite file by default (nothing to
install, survives a coordinator restart) and PostgreSQL in production.

Guarantees the rest of consortium builds on:

* A round and its checkpoint are written in **one transaction** by
  :meth:`RunStore.record_round`: a coordinator killed mid-write leaves either both
  or neither, so resuming from :meth:`RunStore.last_completed_round` and
  :meth:`RunStore.load_checkpoint` never finds a round without its model.
* A round is recorded once; recording it again raises :class:`StoreError`.
* Arrays come back with their exact dtype and shape; metrics keep NaN and
  infinities; timestamps are timezone-aware UTC.
* Every database failure surfaces as :class:`StoreError` naming the store's URL
  with its password masked.  Connection failures (server unreachable, SQLite file
  locked) are retried ``retries`` times with exponential backoff first.

New concerns add tables by deriving from :class:`consortium.registry.store_schema.Base`
in their own module and reach the database through :attr:`RunStore.engine` or
:meth:`RunStore.run_transaction`, which applies the same retry and error rules.
"""

from __future__ import annotations

import logging
import math
import numbers
import re
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self, TypeVar, get_args

import numpy as np
import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.orm import Session, sessionmaker

from consortium.errors import ConsortiumError, DataError, StoreError, param_error
from consortium.registry.arrays_codec import decode_arrays, encode_arrays
from consortium.registry.store_schema import (
    NAME_LENGTH,
    RUN_ID_LENGTH,
    Base,
    BaselineRow,
    CheckpointRow,
    InstitutionMetricRow,
    RoundRow,
    RunRow,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

RunStatus = Literal["running", "completed", "failed", "aborted"]
FinalStatus = Literal["completed", "failed", "aborted"]
FINAL_STATUSES: tuple[str, ...] = get_args(FinalStatus)

_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_PASSWORD_IN_URL = re.compile(r"(://[^/@:]*:)[^@/]*@")
_KNOWN_IDS_SHOWN = 5
_POSTGRES_CONNECT_TIMEOUT_S = 10


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class RunRecord:
    """One run as stored.

    Attributes
    ----------
    run_id : str
        Unique id (uuid4 hex unless the caller chose one).
    name : str
        Human-readable name.
    status : {"running", "completed", "failed", "aborted"}
        ``"running"`` until :meth:`RunStore.finish_run` is called.
    created_at, finished_at : datetime
        Timezone-aware UTC; ``finished_at`` is None while running.
    config : dict
        The run configuration, as it round-trips through JSON (tuples become lists).
    institutions : tuple of str
        Institutions taking part, in the order given.
    message : str or None
        Free text from :meth:`RunStore.finish_run` (e.g. why a run failed).
    """

    run_id: str
    name: str
    status: str
    created_at: datetime
    finished_at: datetime | None
    config: dict[str, Any]
    institutions: tuple[str, ...]
    message: str | None = None


@dataclass(frozen=True)
class RoundRecord:
    """One completed federated round.

    Constructing it validates the values so that a bad round is refused before it
    reaches the database: ``round`` is an int >= 1, both timestamps are
    timezone-aware with ``finished_at >= started_at``, institution lists hold
    strings (lists are turned into tuples) and metrics map names to real numbers
    (converted to float; NaN and infinities are allowed).

    Attributes
    ----------
    round : int
        1-based round number.
    started_at, finished_at : datetime
        When the round started and completed (timezone-aware).
    participants : tuple of str
        Institutions whose update is in the aggregate.
    dropped : tuple of str
        Institutions that were asked but did not contribute.
    train_metrics : dict of str to float
        Aggregated (weighted mean) training metrics.
    global_metrics : dict of str to float
        Metrics of the new global model on the coordinator's held-out data.
    """

    round: int
    started_at: datetime
    finished_at: datetime
    participants: tuple[str, ...] = ()
    dropped: tuple[str, ...] = ()
    train_metrics: dict[str, float] = field(default_factory=dict)
    global_metrics: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        owner = "RoundRecord"
        _check_int("round", owner, self.round, minimum=1)
        _check_aware("started_at", owner, self.started_at)
        _check_aware("finished_at", owner, self.finished_at)
        if self.finished_at < self.started_at:
            raise param_error(
                "finished_at", owner, f"at or after started_at ({self.started_at.isoformat()})",
                self.finished_at.isoformat(),
            )
        for name in ("participants", "dropped"):
            object.__setattr__(self, name, _names_tuple(name, owner, getattr(self, name)))
        for name in ("train_metrics", "global_metrics"):
            object.__setattr__(self, name, _metrics_dict(name, owner, getattr(self, name)))

    @property
    def duration_s(self) -> float:
        """Wall-clock duration of the round in seconds."""
        return (self.finished_at - self.started_at).total_seconds()


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """The global model after a round, as needed to resume a run.

    Attributes
    ----------
    run_id : str
        The run it belongs to.
    round : int
        The round after which the arrays were taken.
    arrays : list of numpy.ndarray
        Model arrays in model order, exact dtype and shape.
    extra : dict
        JSON data stored alongside (e.g. server optimiser state, RNG seeds).
    """

    run_id: str
    round: int
    arrays: list[np.ndarray]
    extra: dict[str, Any]


@dataclass(frozen=True)
class InstitutionMetricRecord:
    """Evaluation metrics that one institution disclosed for one round and data split."""

    round: int
    institution: str
    split: str
    metrics: dict[str, float]


@dataclass(frozen=True)
class BaselineRecord:
    """A reference result: ``kind`` e.g. ``"local_only"`` (per institution) or ``"centralized"``."""

    kind: str
    institution: str | None
    metrics: dict[str, float]


# --------------------------------------------------------------------- validation


def _check_int(name: str, owner: str, value: object, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise param_error(name, owner, f"an int >= {minimum}", value)
    return int(value)


def _check_text(name: str, owner: str, value: object, *, max_length: int = NAME_LENGTH) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > max_length:
        raise param_error(name, owner, f"a non-empty str of at most {max_length} characters", value)
    return value


def _check_aware(name: str, owner: str, value: object) -> None:
    if not isinstance(value, datetime) or value.tzinfo is None or value.utcoffset() is None:
        raise param_error(
            name, owner, "a timezone-aware datetime (e.g. datetime.now(UTC))", value
        )


def _names_tuple(name: str, owner: str, value: object) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise param_error(name, owner, "a sequence of institution names", value)
    for item in value:
        if not isinstance(item, str) or not item:
            raise param_error(name, owner, "a sequence of non-empty str", value)
    return tuple(value)


def _metrics_dict(name: str, owner: str, value: object) -> dict[str, float]:
    if not isinstance(value, Mapping):
        raise param_error(name, owner, "a mapping of metric name to float", value)
    result: dict[str, float] = {}
    for key, metric in value.items():
        if not isinstance(key, str) or not key:
            raise param_error(name, owner, "a mapping with non-empty str keys", key)
        if isinstance(metric, bool | np.bool_) or not isinstance(metric, numbers.Real):
            raise param_error(f"{name}[{key!r}]", owner, "a real number (NaN allowed)", metric)
        result[key] = float(metric)
    return result


def _json_document(name: str, owner: str, value: object) -> Any:
    """Return ``value`` as it will come back from the JSON column, or explain why it can't.

    Tuples become lists and numpy scalars become Python numbers; anything JSON
    cannot represent faithfully (non-str keys, NaN, sets, objects) is refused with
    the path to the offending element.
    """

    def walk(item: object, path: str) -> Any:
        if isinstance(item, np.generic):
            item = item.item()
        if item is None or isinstance(item, bool | int | str):
            return item
        if isinstance(item, float):
            if not math.isfinite(item):
                raise param_error(path, owner, "JSON data without NaN or infinity", item)
            return item
        if isinstance(item, Mapping):
            out = {}
            for key, sub in item.items():
                if not isinstance(key, str):
                    raise param_error(path, owner, "JSON data with str keys only", key)
                out[key] = walk(sub, f"{path}[{key!r}]")
            return out
        if isinstance(item, list | tuple):
            return [walk(sub, f"{path}[{i}]") for i, sub in enumerate(item)]
        raise param_error(
            path, owner, "JSON data (dict, list, str, int, float, bool, None)",
            f"{type(item).__name__} {item!r}",
        )

    if not isinstance(value, Mapping):
        raise param_error(name, owner, "a mapping (stored as JSON)", value)
    return walk(value, name)


def mask_url(url: str | URL) -> str:
    """Render a database URL with its password replaced by ``***``.

    Works on strings that SQLAlchemy cannot parse too, so that error messages about
    malformed URLs never leak a password.
    """
    if isinstance(url, URL):
        return url.render_as_string(hide_password=True)
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (sa_exc.ArgumentError, ValueError, TypeError):
        return _PASSWORD_IN_URL.sub(r"\1***@", str(url))


# --------------------------------------------------------------------- the store


class RunStore:
    """Durable record of federated runs on SQLite or PostgreSQL.

    Parameters
    ----------
    url : str
        SQLAlchemy database URL: ``"sqlite:///path/to/runs.db"`` (file),
        ``"sqlite://"`` (in memory, for tests) or
        ``"postgresql+psycopg://user@host:5432/db"``.  Missing tables are created.
    echo : bool, default False
        Log every SQL statement (SQLAlchemy's ``echo``).
    schema : str or None, default None
        PostgreSQL only: keep all tables in this schema (lower-case identifier),
        created if missing, by setting the connections' ``search_path``.  Lets
        several stores (e.g. parallel test runs) share one database.
    retries : int, default 3
        How many times an operation is retried after a connection failure (server
        unreachable or restarting, SQLite database locked) before
        :class:`StoreError` is raised.  0 disables retrying.  A write whose commit
        was lost in transit may be retried and then refused as a duplicate, which
        is detectable, never silently doubled.
    retry_wait : float, default 0.25
        Seconds before the first retry; doubled before each further retry.

    Raises
    ------
    StoreError
        If the URL is malformed, its driver is missing or the database cannot be
        reached; the message names the URL with the password masked.
    ConfigError
        If an option has an invalid value.

    Notes
    -----
    SQLite connections run in WAL mode (readers do not block the writer) with
    foreign keys enforced.  The store is safe to use from several threads; each
    method runs in its own short transaction.  In-memory SQLite (``"sqlite://"``)
    gives each thread its own empty database: use it for single-threaded tests.
    """

    def __init__(
        self,
        url: str,
        *,
        echo: bool = False,
        schema: str | None = None,
        retries: int = 3,
        retry_wait: float = 0.25,
    ) -> None:
        owner = "RunStore"
        if not isinstance(url, str) or not url.strip():
            raise param_error("url", owner, "a database URL such as 'sqlite:///runs.db'", url)
        self._retries: int = _check_int("retries", owner, retries, minimum=0)
        if (
            isinstance(retry_wait, bool)
            or not isinstance(retry_wait, numbers.Real)
            or not math.isfinite(retry_wait)
            or retry_wait < 0
        ):
            raise param_error("retry_wait", owner, "a finite number of seconds >= 0", retry_wait)
        self._retry_wait: float = float(retry_wait)
        self._closed: bool = False

        self._url_masked: str = mask_url(url)
        try:
            parsed = make_url(url)
        except (sa_exc.ArgumentError, ValueError) as exc:
            raise StoreError(
                f"Cannot open the run store: {self._url_masked!r} is not a database URL "
                f"(expected e.g. 'sqlite:///runs.db' or "
                f"'postgresql+psycopg://user@host:5432/db')."
            ) from exc
        self._url_masked = mask_url(parsed)
        self._password: str | None = parsed.password
        backend = parsed.get_backend_name()

        if schema is not None:
            if backend != "postgresql":
                raise param_error(
                    "schema", owner, f"None for a {backend} URL (schemas are PostgreSQL only)",
                    schema,
                )
            if not isinstance(schema, str) or not _SCHEMA_NAME.match(schema):
                raise param_error(
                    "schema", owner, "a lower-case identifier like 'consortium_runs'", schema
                )
        self._schema: str | None = schema

        if backend == "sqlite":
            _check_sqlite_directory(parsed, self._url_masked)
        self._engine: Engine = self._create_engine(parsed, backend=backend, echo=echo)
        self._sessions: sessionmaker[Session] = sessionmaker(self._engine, expire_on_commit=False)
        try:
            self._with_retries("open the run store", self._create_tables)
        except BaseException:
            self._engine.dispose()
            raise
        logger.info("Opened run store at %s", self._url_masked)

    # ------------------------------------------------------------------ plumbing

    def _create_engine(self, parsed: URL, *, backend: str, echo: bool) -> Engine:
        connect_args: dict[str, Any] = {}
        options: dict[str, Any] = {"echo": echo}
        if backend == "postgresql":
            connect_args["connect_timeout"] = _POSTGRES_CONNECT_TIMEOUT_S
            if self._schema is not None:
                connect_args["options"] = f"-c search_path={self._schema}"
            options["pool_pre_ping"] = True
        try:
            engine = sa.create_engine(parsed, connect_args=connect_args, **options)
        except (sa_exc.NoSuchModuleError, sa_exc.ArgumentError, ImportError) as exc:
            raise StoreError(
                f"Cannot open the run store at {self._url_masked}: {self._scrub(str(exc))}"
            ) from exc
        if backend == "sqlite":
            sa.event.listen(engine, "connect", _configure_sqlite_connection)
        return engine

    def _create_tables(self) -> None:
        if self._schema is not None:
            with self._engine.begin() as connection:
                exists = connection.execute(
                    sa.text("SELECT 1 FROM pg_namespace WHERE nspname = :name"),
                    {"name": self._schema},
                ).first()
                if exists is None:
                    connection.execute(sa.text(f"CREATE SCHEMA IF NOT EXISTS {self._schema}"))
        Base.metadata.create_all(self._engine)

    def _scrub(self, text: str) -> str:
        if self._password:
            text = text.replace(self._password, "***")
        return text

    def _with_retries(self, action: str, work: Callable[[], T]) -> T:
        """Run ``work``, retrying connection failures; map database errors to StoreError."""
        if self._closed:
            raise StoreError(f"Cannot {action}: the run store at {self._url_masked} is closed.")
        attempt = 0
        while True:
            try:
                return work()
            except ConsortiumError:
                raise
            except sa_exc.SQLAlchemyError as exc:
                reason = self._scrub(_reason(exc))
                if _is_transient(exc) and attempt < self._retries:
                    wait = self._retry_wait * 2**attempt
                    attempt += 1
                    logger.warning(
                        "Run store at %s: could not %s (%s); retry %d of %d in %.2f s",
                        self._url_masked, action, reason, attempt, self._retries, wait,
                    )
                    time.sleep(wait)
                    continue
                tries = f" after {attempt + 1} attempts" if attempt else ""
                raise StoreError(
                    f"Run store at {self._url_masked}: could not {action}{tries}: {reason}"
                ) from exc

    def run_transaction(self, work: Callable[[Session], T], *, action: str) -> T:
        """Run ``work(session)`` in one transaction, committed if it returns.

        This is the door for modules that add their own tables to the store.  Any
        exception rolls the whole transaction back; connection failures are
        retried (``work`` must therefore be safe to run again from scratch) and
        database errors become :class:`StoreError` mentioning ``action``.

        Parameters
        ----------
        work : callable
            Receives an ORM :class:`~sqlalchemy.orm.Session` inside a transaction.
        action : str
            What the work does, for error messages (e.g. ``"record a privacy spend"``).
        """

        def attempt() -> T:
            with self._sessions.begin() as session:
                return work(session)

        return self._with_retries(action, attempt)

    def create_missing_tables(self) -> None:
        """Create tables registered on :class:`Base` after this store was opened."""
        self._with_retries("create missing tables", self._create_tables)

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine (for modules that add tables; prefer :meth:`run_transaction`)."""
        return self._engine

    @property
    def url_masked(self) -> str:
        """The database URL with the password replaced by ``***``."""
        return self._url_masked

    @property
    def schema(self) -> str | None:
        """The PostgreSQL schema holding the tables, or None for the default."""
        return self._schema

    def close(self) -> None:
        """Release all database connections; the store cannot be used afterwards."""
        if not self._closed:
            self._closed = True
            self._engine.dispose()
            logger.info("Closed run store at %s", self._url_masked)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"RunStore({self._url_masked!r}, schema={self._schema!r}, {state})"

    # --------------------------------------------------------------------- runs

    def _require_run(self, session: Session, run_id: str) -> RunRow:
        row = session.scalars(sa.select(RunRow).where(RunRow.run_id == run_id)).first()
        if row is None:
            known = session.scalars(
                sa.select(RunRow.run_id)
                .order_by(RunRow.created_at.desc(), RunRow.id.desc())
                .limit(_KNOWN_IDS_SHOWN + 1)
            ).all()
            if not known:
                hint = "the store holds no runs yet"
            else:
                shown = ", ".join(repr(k) for k in known[:_KNOWN_IDS_SHOWN])
                more = ", ..." if len(known) > _KNOWN_IDS_SHOWN else ""
                hint = f"known run ids (newest first): {shown}{more}"
            raise StoreError(
                f"Unknown run id {run_id!r} in the run store at {self._url_masked}; {hint}."
            )
        return row

    def create_run(
        self,
        *,
        name: str,
        config: Mapping[str, Any],
        institutions: Sequence[str],
        run_id: str | None = None,
    ) -> str:
        """Record a new run with status ``"running"``.

        Parameters
        ----------
        name : str
            Human-readable name (at most 200 characters).
        config : mapping
            The run configuration; stored as JSON, so it must be JSON data (no NaN).
        institutions : sequence of str
            Distinct names of the institutions taking part.
        run_id : str, optional
            Id to use (e.g. from a CLI flag); a uuid4 hex is generated if omitted.

        Returns
        -------
        str
            The run id.

        Raises
        ------
        ConfigError
            If an argument is invalid (the message names the field).
        StoreError
            If ``run_id`` is already taken or the database fails.
        """
        owner = "RunStore.create_run"
        name = _check_text("name", owner, name)
        document = _json_document("config", owner, config)
        members = _names_tuple("institutions", owner, institutions)
        duplicates = sorted({m for m in members if members.count(m) > 1})
        if duplicates:
            raise param_error("institutions", owner, "distinct names", f"duplicates {duplicates}")
        if run_id is None:
            run_id = uuid.uuid4().hex
        run_id = _check_text("run_id", owner, run_id, max_length=RUN_ID_LENGTH)

        def work(session: Session) -> None:
            taken = session.scalar(sa.select(RunRow.id).where(RunRow.run_id == run_id))
            if taken is not None:
                raise StoreError(f"A run with id {run_id!r} already exists in {self._url_masked}.")
            session.add(
                RunRow(
                    run_id=run_id,
                    name=name,
                    status="running",
                    created_at=_now(),
                    finished_at=None,
                    config=document,
                    institutions=list(members),
                    message=None,
                )
            )
            _flush_or_raise(
                session, f"A run with id {run_id!r} already exists in {self._url_masked}."
            )

        self.run_transaction(work, action=f"create run {run_id!r}")
        logger.info("Created run %s (%s) with %d institutions", run_id, name, len(members))
        return run_id

    def get_run(self, run_id: str) -> RunRecord:
        """Return the run ``run_id``; unknown ids raise :class:`StoreError` listing known ones."""
        return self.run_transaction(
            lambda session: _run_record(self._require_run(session, run_id)),
            action=f"read run {run_id!r}",
        )

    def list_runs(self, *, limit: int = 100) -> list[RunRecord]:
        """Return up to ``limit`` runs, newest first."""
        limit = _check_int("limit", "RunStore.list_runs", limit, minimum=1)

        def work(session: Session) -> list[RunRecord]:
            rows = session.scalars(
                sa.select(RunRow).order_by(RunRow.created_at.desc(), RunRow.id.desc()).limit(limit)
            ).all()
            return [_run_record(row) for row in rows]

        return self.run_transaction(work, action="list runs")

    def finish_run(
        self, run_id: str, *, status: FinalStatus, message: str | None = None
    ) -> None:
        """Mark a run as ended with ``status`` and an optional ``message``.

        Calling it again overwrites status, message and end time: a coordinator that
        resumes a failed run may later finish it as completed.
        """
        owner = "RunStore.finish_run"
        if status not in FINAL_STATUSES:
            raise param_error("status", owner, f"one of {list(FINAL_STATUSES)}", status)
        if message is not None and not isinstance(message, str):
            raise param_error("message", owner, "a str or None", message)

        def work(session: Session) -> None:
            row = self._require_run(session, run_id)
            row.status = status
            row.finished_at = _now()
            row.message = message

        self.run_transaction(work, action=f"finish run {run_id!r}")
        logger.info("Run %s finished: %s%s", run_id, status, f" ({message})" if message else "")

    # ------------------------------------------------------------------- rounds

    def record_round(
        self,
        run_id: str,
        round_record: RoundRecord,
        *,
        checkpoint: Sequence[np.ndarray] | None = None,
        checkpoint_extra: Mapping[str, Any] | None = None,
        also: Callable[[Session], object] | None = None,
    ) -> None:
        """Record a completed round and, optionally, the global model after it.

        The round row and its checkpoint are written in one transaction: if
        anything fails in between (an array that cannot be serialised, a lost
        connection, a crash) neither is stored.

        Parameters
        ----------
        run_id : str
            The run.
        round_record : RoundRecord
            The round; its number must not be recorded yet for this run.
        checkpoint : sequence of numpy.ndarray, optional
            The global model's arrays after the round (exact dtype and shape kept).
        checkpoint_extra : mapping, optional
            JSON data stored with the checkpoint (needs ``checkpoint``).
        also : callable, optional
            More work in the same transaction (e.g. the round's privacy-ledger
            charges), so that the round and what belongs to it commit together.

        Raises
        ------
        StoreError
            Unknown run, round already recorded, or database failure.
        DataError
            A checkpoint array cannot be stored without pickle (nothing is written).
        ConfigError
            An argument has the wrong type.
        """
        owner = "RunStore.record_round"
        if not isinstance(round_record, RoundRecord):
            raise param_error("round_record", owner, "a RoundRecord", type(round_record).__name__)
        if checkpoint is not None and (
            isinstance(checkpoint, np.ndarray) or not isinstance(checkpoint, Sequence)
        ):
            raise param_error(
                "checkpoint", owner, "a list of numpy arrays (one per model tensor)",
                type(checkpoint).__name__,
            )
        if checkpoint_extra is not None and checkpoint is None:
            raise param_error(
                "checkpoint_extra", owner, "None when no checkpoint is given", checkpoint_extra
            )
        extra = _json_document("checkpoint_extra", owner, checkpoint_extra or {})
        number = round_record.round
        duplicate = (
            f"Round {number} of run {run_id!r} is already recorded; a round is recorded once."
        )

        def work(session: Session) -> None:
            self._require_run(session, run_id)
            exists = session.get(RoundRow, (run_id, number))
            if exists is not None:
                raise StoreError(duplicate)
            session.add(
                RoundRow(
                    run_id=run_id,
                    round=number,
                    started_at=round_record.started_at,
                    finished_at=round_record.finished_at,
                    duration_s=round_record.duration_s,
                    participants=list(round_record.participants),
                    dropped=list(round_record.dropped),
                    train_metrics=round_record.train_metrics,
                    global_metrics=round_record.global_metrics,
                )
            )
            _flush_or_raise(session, duplicate)
            if also is not None:
                also(session)
            if checkpoint is None:
                return
            # Serialised inside the transaction on purpose: a failure here rolls the
            # round row back too, so a round never exists without its checkpoint.
            try:
                blob = encode_arrays(checkpoint)
            except DataError as exc:
                raise DataError(
                    f"Cannot checkpoint round {number} of run {run_id!r}: {exc} "
                    f"Nothing was recorded for this round."
                ) from exc
            session.add(
                CheckpointRow(
                    run_id=run_id,
                    round=number,
                    created_at=_now(),
                    n_arrays=len(checkpoint),
                    n_bytes=len(blob),
                    arrays_npz=blob,
                    extra=extra,
                )
            )
            _flush_or_raise(session, duplicate)

        self.run_transaction(work, action=f"record round {number} of run {run_id!r}")
        logger.debug(
            "Recorded round %d of run %s%s", number, run_id,
            " with checkpoint" if checkpoint is not None else "",
        )

    def rounds(self, run_id: str) -> list[RoundRecord]:
        """Return the recorded rounds of a run, ordered by round number."""

        def work(session: Session) -> list[RoundRecord]:
            self._require_run(session, run_id)
            rows = session.scalars(
                sa.select(RoundRow).where(RoundRow.run_id == run_id).order_by(RoundRow.round)
            ).all()
            return [
                RoundRecord(
                    round=row.round,
                    started_at=row.started_at,
                    finished_at=row.finished_at,
                    participants=tuple(row.participants),
                    dropped=tuple(row.dropped),
                    train_metrics=dict(row.train_metrics),
                    global_metrics=dict(row.global_metrics),
                )
                for row in rows
            ]

        return self.run_transaction(work, action=f"read the rounds of run {run_id!r}")

    def last_completed_round(self, run_id: str) -> int:
        """Highest recorded round of a run, 0 if none: resume with the round after it."""

        def work(session: Session) -> int:
            self._require_run(session, run_id)
            latest = session.scalar(
                sa.select(sa.func.max(RoundRow.round)).where(RoundRow.run_id == run_id)
            )
            return int(latest or 0)

        return self.run_transaction(work, action=f"read the last round of run {run_id!r}")

    def load_checkpoint(self, run_id: str, *, round: int | None = None) -> Checkpoint:
        """Load the checkpoint of ``round``, or the latest one if ``round`` is None.

        Raises
        ------
        StoreError
            Unknown run, no such checkpoint (the message lists the checkpointed
            rounds) or a corrupt blob.
        """
        if round is not None:
            _check_int("round", "RunStore.load_checkpoint", round, minimum=1)

        def work(session: Session) -> Checkpoint:
            self._require_run(session, run_id)
            query = sa.select(CheckpointRow).where(CheckpointRow.run_id == run_id)
            if round is None:
                query = query.order_by(CheckpointRow.round.desc()).limit(1)
            else:
                query = query.where(CheckpointRow.round == round)
            row = session.scalars(query).first()
            if row is None:
                available = session.scalars(
                    sa.select(CheckpointRow.round)
                    .where(CheckpointRow.run_id == run_id)
                    .order_by(CheckpointRow.round)
                ).all()
                wanted = "any round" if round is None else f"round {round}"
                have = (
                    f"checkpointed rounds: {list(available)}" if available else "it has none"
                )
                raise StoreError(f"Run {run_id!r} has no checkpoint for {wanted}; {have}.")
            try:
                arrays = decode_arrays(row.arrays_npz)
            except DataError as exc:
                raise StoreError(
                    f"The checkpoint of round {row.round} of run {run_id!r} is corrupt: {exc}"
                ) from exc
            if len(arrays) != row.n_arrays:
                raise StoreError(
                    f"The checkpoint of round {row.round} of run {run_id!r} must hold "
                    f"{row.n_arrays} arrays. Got {len(arrays)} instead."
                )
            return Checkpoint(run_id=run_id, round=row.round, arrays=arrays, extra=dict(row.extra))

        return self.run_transaction(work, action=f"load a checkpoint of run {run_id!r}")

    # ------------------------------------------------------- metrics and baselines

    def record_institution_metrics(
        self,
        run_id: str,
        *,
        round: int,
        institution: str,
        split: str,
        metrics: Mapping[str, float],
    ) -> None:
        """Record evaluation metrics an institution disclosed for ``round`` on ``split``.

        ``round`` may be 0 (the initial model).  The same (round, institution,
        split) is recorded once; a second call raises :class:`StoreError`.
        """
        owner = "RunStore.record_institution_metrics"
        number = _check_int("round", owner, round, minimum=0)
        institution = _check_text("institution", owner, institution)
        split = _check_text("split", owner, split)
        values = _metrics_dict("metrics", owner, metrics)
        duplicate = (
            f"Metrics of institution {institution!r} on split {split!r} for round {number} "
            f"of run {run_id!r} are already recorded."
        )

        def work(session: Session) -> None:
            self._require_run(session, run_id)
            exists = session.scalar(
                sa.select(InstitutionMetricRow.id).where(
                    InstitutionMetricRow.run_id == run_id,
                    InstitutionMetricRow.round == number,
                    InstitutionMetricRow.institution == institution,
                    InstitutionMetricRow.split == split,
                )
            )
            if exists is not None:
                raise StoreError(duplicate)
            session.add(
                InstitutionMetricRow(
                    run_id=run_id, round=number, institution=institution, split=split,
                    metrics=values,
                )
            )
            _flush_or_raise(session, duplicate)

        self.run_transaction(work, action=f"record institution metrics of run {run_id!r}")

    def institution_metrics(self, run_id: str) -> list[InstitutionMetricRecord]:
        """All disclosed institution metrics of a run, ordered by round, institution, split."""

        def work(session: Session) -> list[InstitutionMetricRecord]:
            self._require_run(session, run_id)
            rows = session.scalars(
                sa.select(InstitutionMetricRow)
                .where(InstitutionMetricRow.run_id == run_id)
                .order_by(
                    InstitutionMetricRow.round,
                    InstitutionMetricRow.institution,
                    InstitutionMetricRow.split,
                )
            ).all()
            return [
                InstitutionMetricRecord(
                    round=row.round, institution=row.institution, split=row.split,
                    metrics=dict(row.metrics),
                )
                for row in rows
            ]

        return self.run_transaction(work, action=f"read institution metrics of run {run_id!r}")

    def record_baseline(
        self,
        run_id: str,
        *,
        kind: str,
        institution: str | None,
        metrics: Mapping[str, float],
    ) -> None:
        """Record a baseline result, e.g. ``kind="local_only"`` per institution or
        ``kind="centralized"`` with ``institution=None``."""
        owner = "RunStore.record_baseline"
        kind = _check_text("kind", owner, kind)
        if institution is not None:
            institution = _check_text("institution", owner, institution)
        values = _metrics_dict("metrics", owner, metrics)

        def work(session: Session) -> None:
            self._require_run(session, run_id)
            session.add(
                BaselineRow(
                    run_id=run_id, kind=kind, institution=institution, created_at=_now(),
                    metrics=values,
                )
            )

        self.run_transaction(work, action=f"record a {kind} baseline of run {run_id!r}")

    def baselines(self, run_id: str) -> list[BaselineRecord]:
        """All baselines of a run in the order they were recorded."""

        def work(session: Session) -> list[BaselineRecord]:
            self._require_run(session, run_id)
            rows = session.scalars(
                sa.select(BaselineRow).where(BaselineRow.run_id == run_id).order_by(BaselineRow.id)
            ).all()
            return [
                BaselineRecord(
                    kind=row.kind, institution=row.institution, metrics=dict(row.metrics)
                )
                for row in rows
            ]

        return self.run_transaction(work, action=f"read baselines of run {run_id!r}")


# --------------------------------------------------------------------- helpers


def _now() -> datetime:
    return datetime.now(UTC)


def _run_record(row: RunRow) -> RunRecord:
    return RunRecord(
        run_id=row.run_id,
        name=row.name,
        status=row.status,
        created_at=row.created_at,
        finished_at=row.finished_at,
        config=dict(row.config),
        institutions=tuple(row.institutions),
        message=row.message,
    )


def _flush_or_raise(session: Session, duplicate_message: str) -> None:
    """Flush pending rows; a uniqueness violation (a concurrent writer won) becomes StoreError."""
    try:
        session.flush()
    except sa_exc.IntegrityError as exc:
        raise StoreError(f"{duplicate_message} ({_reason(exc)})") from exc


def _reason(exc: sa_exc.SQLAlchemyError) -> str:
    """The driver's own message, without SQLAlchemy's statement and parameter dump."""
    original = getattr(exc, "orig", None)
    text = str(original if original is not None else exc).strip()
    return " ".join(text.split())


def _is_transient(exc: sa_exc.SQLAlchemyError) -> bool:
    """Whether retrying may help: lost/refused connections and SQLite lock contention."""
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return True
    if not isinstance(exc, sa_exc.OperationalError):
        return False
    if "sqlite" in type(exc.orig).__module__:
        message = str(exc.orig).lower()
        return "locked" in message or "busy" in message
    return True


def _check_sqlite_directory(parsed: URL, masked: str) -> None:
    database = parsed.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    folder = Path(database).expanduser().resolve().parent
    if not folder.is_dir():
        raise StoreError(
            f"Cannot open the run store at {masked}: folder {str(folder)!r} does not exist."
        )


def _configure_sqlite_connection(dbapi_connection: Any, _record: Any) -> None:
    """Per-connection SQLite settings: enforce foreign keys, WAL journal."""
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA journal_mode=WAL")
    finally:
        cursor.close()
