"""The persistent privacy ledger: every privacy charge, per institution and data set.

Check, commit, persist: a charge is validated and its cumulative ε computed by
recomposing *every* stored event of the same institution and data fingerprint
(so repeated and resumed runs continue from the ledger, never from zero), refused
if it would exceed the budget, and appended in one transaction.  Callers that
record a round pass that round's ``session`` so the round and its charges commit
together: a crash loses neither or both, and a retried round cannot be charged
twice (``(run_id, institution, data_id, round, mechanism)`` is unique).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import sqlalchemy as sa
from dp_accounting import dp_event as dpe
from sqlalchemy.orm import Mapped, Session, mapped_column

from consortium.errors import ConsortiumError, StoreError, param_error
from consortium.privacy.accounting import (
    PrivacyEstimate,
    check_delta,
    check_positive,
    compose,
    estimate,
    event_from_dict,
    event_to_dict,
)
from consortium.registry.store import RunStore
from consortium.registry.store_schema import NAME_LENGTH, RUN_ID_LENGTH, Base, UTCDateTime

__all__ = ["LedgerCharge", "PrivacyBudgetError", "PrivacyLedger", "PrivacyLedgerRow"]

T = TypeVar("T")
logger = logging.getLogger(__name__)


class PrivacyBudgetError(ConsortiumError):
    """The next charge would take an institution past its ε budget (nothing was charged)."""


class PrivacyLedgerRow(Base):
    """One privacy charge (table ``privacy_ledger``)."""

    __tablename__ = "privacy_ledger"
    __table_args__ = (sa.UniqueConstraint("run_id", "institution", "data_id", "round", "mechanism"),)

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    # Not a foreign key on purpose: deleting a run must not give its privacy budget back.
    run_id: Mapped[str] = mapped_column(sa.String(RUN_ID_LENGTH), index=True)
    institution: Mapped[str] = mapped_column(sa.String(NAME_LENGTH), index=True)
    data_id: Mapped[str] = mapped_column(sa.String(NAME_LENGTH))
    round: Mapped[int] = mapped_column(sa.Integer)
    mechanism: Mapped[str] = mapped_column(sa.String(64))
    event: Mapped[str] = mapped_column(sa.Text)
    epsilon: Mapped[float] = mapped_column(sa.Float)
    epsilon_rdp: Mapped[float] = mapped_column(sa.Float)
    delta: Mapped[float] = mapped_column(sa.Float)
    budget_epsilon: Mapped[float | None] = mapped_column(sa.Float, nullable=True)
    params: Mapped[str] = mapped_column(sa.Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


@dataclass(frozen=True)
class LedgerCharge:
    """A stored charge; ``epsilon`` is cumulative for (institution, data_id) after it (PLD)."""

    run_id: str
    institution: str
    data_id: str
    round: int
    mechanism: str
    epsilon: float
    epsilon_rdp: float
    delta: float
    budget_epsilon: float | None
    params: dict[str, Any]
    created_at: datetime
    event: dict[str, Any] = field(default_factory=dict)


def _charge(row: PrivacyLedgerRow) -> LedgerCharge:
    return LedgerCharge(
        run_id=row.run_id,
        institution=row.institution,
        data_id=row.data_id,
        round=row.round,
        mechanism=row.mechanism,
        epsilon=row.epsilon,
        epsilon_rdp=row.epsilon_rdp,
        delta=row.delta,
        budget_epsilon=row.budget_epsilon,
        params=json.loads(row.params),
        created_at=row.created_at,
        event=json.loads(row.event),
    )


def _grouped(events: Sequence[Mapping[str, Any]]) -> dpe.DpEvent:
    """Compose stored events, identical ones as one self-composition (much faster PLD)."""
    counts = Counter(json.dumps(e, sort_keys=True) for e in events)
    parts: list[dpe.DpEvent] = []
    for text, count in counts.items():
        ev = event_from_dict(json.loads(text))
        parts.append(ev if count == 1 else dpe.SelfComposedDpEvent(ev, count))
    return compose(parts)


_ESTIMATE_CACHE_SIZE = 256
"""Distinct event histories a ledger object remembers the ε of."""


class PrivacyLedger:
    """Read and append privacy charges in a :class:`RunStore`.

    Parameters
    ----------
    store : RunStore
        Open run store (SQLite or PostgreSQL); the ``privacy_ledger`` table is
        created if missing.
    """

    def __init__(self, store: RunStore) -> None:
        if not isinstance(store, RunStore):
            raise param_error("store", "PrivacyLedger", "a RunStore", type(store).__name__)
        self.store = store
        store.create_missing_tables()
        self._estimates: dict[tuple[tuple[tuple[str, int], ...], float], PrivacyEstimate] = {}

    def _estimate(self, events: Sequence[Mapping[str, Any]], delta: float) -> PrivacyEstimate:
        """ε of the composed events, remembered per ledger object (a pure function of the event multiset).

        The institutions of one run share their histories, so each round's PLD
        (about a second for Poisson-sampled Gaussians) is computed once, not once per institution.
        """
        key = (tuple(Counter(json.dumps(e, sort_keys=True) for e in events).items()), float(delta))
        hit = self._estimates.get(key)
        if hit is None:
            hit = estimate(_grouped(events), delta)
            if len(self._estimates) >= _ESTIMATE_CACHE_SIZE:
                self._estimates.clear()
            self._estimates[key] = hit
        return hit

    # -- reading ---------------------------------------------------------------

    def _in(self, session: Session | None, work: Callable[[Session], T], action: str) -> T:
        if session is not None:
            return work(session)
        return self.store.run_transaction(work, action=action)

    def events(self, *, institution: str, data_id: str, session: Session | None = None) -> list[dict[str, Any]]:
        """Every stored event of ``institution`` on ``data_id``, oldest first."""

        def work(s: Session) -> list[dict[str, Any]]:
            rows = s.scalars(
                sa.select(PrivacyLedgerRow.event)
                .where(PrivacyLedgerRow.institution == institution, PrivacyLedgerRow.data_id == data_id)
                .order_by(PrivacyLedgerRow.id)
            ).all()
            return [json.loads(r) for r in rows]

        return self._in(session, work, "read the privacy ledger")

    def spent(self, *, institution: str, data_id: str, delta: float, session: Session | None = None) -> PrivacyEstimate:
        """ε spent so far by ``institution`` on ``data_id`` (recomposed from the ledger)."""
        return self._estimate(self.events(institution=institution, data_id=data_id, session=session), delta)

    def charges(self, *, institution: str | None = None, run_id: str | None = None) -> list[LedgerCharge]:
        """Stored charges, oldest first, optionally for one institution and/or run."""

        def work(s: Session) -> list[LedgerCharge]:
            query = sa.select(PrivacyLedgerRow).order_by(PrivacyLedgerRow.id)
            if institution is not None:
                query = query.where(PrivacyLedgerRow.institution == institution)
            if run_id is not None:
                query = query.where(PrivacyLedgerRow.run_id == run_id)
            return [_charge(r) for r in s.scalars(query).all()]

        return self.store.run_transaction(work, action="read the privacy ledger")

    # -- checking and charging -----------------------------------------------

    def check_budget(
        self,
        *,
        institution: str,
        data_id: str,
        event: dpe.DpEvent,
        delta: float,
        budget_epsilon: float | None,
        session: Session | None = None,
    ) -> PrivacyEstimate:
        """ε after ``event`` would be charged; raise if that exceeds ``budget_epsilon``.

        Raises
        ------
        PrivacyBudgetError
            Naming the institution, the ε spent, the ε remaining and what the next
            charge would cost.
        """
        owner = "PrivacyLedger.check_budget"
        check_delta(delta, owner)
        prior = self.events(institution=institution, data_id=data_id, session=session)
        after = self._estimate([*prior, event_to_dict(event)], delta)
        if budget_epsilon is not None:
            budget = check_positive("budget_epsilon", budget_epsilon, owner)
            if after.epsilon > budget * (1 + 1e-9):
                spent = self._estimate(prior, delta).epsilon
                raise PrivacyBudgetError(
                    f"Privacy budget of institution '{institution}' (data {data_id}) would be exceeded: "
                    f"spent ε = {spent:.4g} of budget ε = {budget:.4g} (δ = {delta:.3g}), remaining "
                    f"ε = {max(budget - spent, 0.0):.4g}, but the next charge would bring it to "
                    f"ε = {after.epsilon:.4g}. Stopped before this round; nothing was charged. Raise the "
                    "budget only if the institution agrees to a weaker guarantee, or use new data."
                )
        return after

    def check_budgets(
        self,
        data_ids: Mapping[str, str],
        *,
        event: dpe.DpEvent,
        delta: float,
        budget_epsilon: float | None,
    ) -> None:
        """:meth:`check_budget` for every ``institution -> data fingerprint`` (nothing to check without a budget).

        Raises
        ------
        PrivacyBudgetError
            For the first institution whose budget ``event`` would exceed.
        """
        if budget_epsilon is None:
            return
        for institution, data_id in data_ids.items():
            self.check_budget(
                institution=institution, data_id=data_id, event=event, delta=delta, budget_epsilon=budget_epsilon
            )

    def charge_each(
        self,
        data_ids: Mapping[str, str],
        *,
        run_id: str,
        round: int,  # noqa: A002 - the round number, as in the run store
        mechanism: str,
        event: dpe.DpEvent,
        delta: float,
        budget_epsilon: float | None,
        params: Mapping[str, Any] | None,
        session: Session,
        enforce_budget: bool = True,
    ) -> None:
        """One :meth:`charge` of ``event`` per ``institution -> data fingerprint``, in the caller's ``session``."""
        for institution, data_id in data_ids.items():
            self.charge(
                run_id=run_id, institution=institution, data_id=data_id, round=round, mechanism=mechanism,
                event=event, delta=delta, budget_epsilon=budget_epsilon, params=params, session=session,
                enforce_budget=enforce_budget,
            )

    def charge(
        self,
        *,
        run_id: str,
        institution: str,
        data_id: str,
        round: int,  # noqa: A002 - the round number, as in the run store
        mechanism: str,
        event: dpe.DpEvent,
        delta: float,
        budget_epsilon: float | None = None,
        params: Mapping[str, Any] | None = None,
        session: Session | None = None,
        enforce_budget: bool = True,
    ) -> LedgerCharge:
        """Validate, check the budget, and append one charge (in ``session`` if given).

        ``enforce_budget=False`` records a release that has *already happened*
        (e.g. a round whose dropouts left less noise than planned) even if it
        crosses the budget: the ledger must never under-count what was released.
        The crossing is logged, and the next round's budget check then stops the run.

        Raises
        ------
        PrivacyBudgetError
            The charge would exceed ``budget_epsilon`` (and ``enforce_budget``); nothing is written.
        StoreError
            This (run, institution, data, round, mechanism) is already charged.
        """
        owner = "PrivacyLedger.charge"
        for name, value in (
            ("run_id", run_id),
            ("institution", institution),
            ("data_id", data_id),
            ("mechanism", mechanism),
        ):
            if not isinstance(value, str) or not value:
                raise param_error(name, owner, "a non-empty string", value)
        if isinstance(round, bool) or not isinstance(round, int) or round < 0:
            raise param_error("round", owner, "an int >= 0", round)
        if not isinstance(event, dpe.DpEvent):
            raise param_error("event", owner, "a dp_accounting DpEvent", type(event).__name__)
        event_json = json.dumps(event_to_dict(event), sort_keys=True)
        params_json = json.dumps(dict(params or {}), sort_keys=True, default=float)

        def work(s: Session) -> LedgerCharge:
            exists = s.scalar(
                sa.select(PrivacyLedgerRow.id).where(
                    PrivacyLedgerRow.run_id == run_id,
                    PrivacyLedgerRow.institution == institution,
                    PrivacyLedgerRow.data_id == data_id,
                    PrivacyLedgerRow.round == round,
                    PrivacyLedgerRow.mechanism == mechanism,
                )
            )
            if exists is not None:
                raise StoreError(
                    f"Round {round} of run {run_id!r} is already charged to '{institution}' for {mechanism}; "
                    "a round is charged once."
                )
            after = self.check_budget(
                institution=institution,
                data_id=data_id,
                event=event,
                delta=delta,
                budget_epsilon=budget_epsilon if enforce_budget else None,
                session=s,
            )
            if not enforce_budget and budget_epsilon is not None and after.epsilon > budget_epsilon * (1 + 1e-9):
                logger.warning(
                    "Round %d of run %s took institution '%s' to ε = %.4g, past its budget ε = %.4g (the release "
                    "had already happened, so it is recorded); no further round will be started.",
                    round, run_id, institution, after.epsilon, budget_epsilon,
                )
            row = PrivacyLedgerRow(
                run_id=run_id,
                institution=institution,
                data_id=data_id,
                round=round,
                mechanism=mechanism,
                event=event_json,
                epsilon=after.epsilon,
                epsilon_rdp=after.epsilon_rdp,
                delta=float(delta),
                budget_epsilon=None if budget_epsilon is None else float(budget_epsilon),
                params=params_json,
                created_at=datetime.now(UTC),
            )
            s.add(row)
            s.flush()
            return _charge(row)

        return self._in(session, work, f"charge round {round} of run {run_id!r} to {institution!r}")
