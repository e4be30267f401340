"""The dashboard's FastAPI application: one page, a JSON API and a live event stream.

Routes (all need a token when authentication is on; see :mod:`consortium.dashboard.auth`):

========================  ===============================================================
``GET /``                 the page (login form with status 401 when not authenticated)
``POST /login``           form login: sets an HttpOnly session cookie, never echoes the token
``GET /api/me``           who is asking
``GET /api/runs``         federated runs, newest first
``GET /api/runs/{id}/rounds``  rounds, participants, metrics and baselines of one run
``GET /api/privacy``      privacy-ledger charges (ε spent vs budget per institution)
``GET /api/models``       model registry versions (when the registry is installed)
``GET /api/fleet``        every edge agent seen over MQTT
``GET /api/alerts``       stored alerts, newest first (``?institution=``, ``?after_id=``)
``GET /api/events``       model / drift events of the agents
``GET /api/traffic``      vehicle counts of vision agents over time
``GET /api/stream``       Server-Sent Events: alerts, fleet, events, traffic, store changes
``GET /api/openapi.json`` this API's OpenAPI schema
========================  ===============================================================
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from importlib import resources
from typing import Annotated, Any
from urllib.parse import parse_qs

import sqlalchemy as sa
from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from consortium.dashboard import api_models as am
from consortium.dashboard import views
from consortium.dashboard.auth import ANONYMOUS, Authenticator, User
from consortium.dashboard.hub import EventHub, HubEvent
from consortium.dashboard.sources import OptionalSources
from consortium.edge.messages import NAME_PATTERN
from consortium.errors import StoreError
from consortium.registry.store import RunStore
from consortium.registry.store_schema import BaselineRow, InstitutionMetricRow, RoundRow, RunRow

logger = logging.getLogger(__name__)

SESSION_COOKIE = "consortium_session"
STATIC_FILES = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "charts.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
KEEPALIVE_S = 15.0
REPLAY_LIMIT = 5000

_bearer = HTTPBearer(auto_error=False, description="A dashboard token (--auth-token or the users file).")

InstitutionQuery = Annotated[
    str | None, Query(pattern=NAME_PATTERN.pattern, description="Only this institution's items.")
]
LimitQuery = Annotated[int, Query(ge=1, le=5000, description="At most this many items.")]


@dataclass
class DashboardContext:
    """What the app reads from: the run store, the live hub, who may see what, optional sources."""

    store: RunStore
    hub: EventHub
    auth: Authenticator = field(default_factory=Authenticator)
    sources: OptionalSources = field(default_factory=OptionalSources)
    title: str = "consortium dashboard"


def _finite(x: Any) -> float | None:
    return float(x) if isinstance(x, int | float) and math.isfinite(x) else None


def _metrics(m: dict[str, float]) -> dict[str, float | None]:
    return {k: _finite(v) for k, v in m.items()}


def _iso(t: datetime | None) -> str | None:
    return t.isoformat() if t is not None else None


def _context(request: Request) -> DashboardContext:
    ctx: DashboardContext = request.app.state.dashboard
    return ctx


async def current_user(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> User:
    """The caller, from a bearer token or a session cookie; 401 when authentication is on and neither is valid."""
    ctx = _context(request)
    if not ctx.auth.enabled:
        return ANONYMOUS
    user = ctx.auth.check_token(credentials.credentials if credentials else None)
    user = user or ctx.auth.session_user(request.cookies.get(SESSION_COOKIE))
    if user is None:
        raise HTTPException(401, "A valid token is required.", headers={"WWW-Authenticate": "Bearer"})
    return user


UserDep = Annotated[User, Depends(current_user)]


def create_app(ctx: DashboardContext) -> FastAPI:
    """Build the FastAPI application over ``ctx`` (no global state: several apps can coexist)."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        ctx.hub.close()

    app = FastAPI(
        title=ctx.title,
        version="1",
        description="Live view of a consortium: federated runs, privacy budget, models, edge fleet and alerts.",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        lifespan=lifespan,
    )
    app.state.dashboard = ctx

    def scope(user: User, institution: str | None) -> str | None:
        """The institution a query is limited to; 403 when a user asks for someone else's."""
        if institution is not None and not user.may_see(institution):
            raise HTTPException(403, f"User {user.name!r} may only see institution {user.institution!r}.")
        return institution if institution is not None else user.institution

    def read(work: Callable[[Session], Any], action: str) -> Any:
        try:
            return ctx.store.run_transaction(work, action=action)
        except StoreError as exc:
            logger.warning("Dashboard: %s", exc)
            raise HTTPException(503, "The run store is unavailable; try again shortly.") from None

    api = APIRouter(prefix="/api")

    @api.get("/me", response_model=am.Me, summary="Who is asking")
    def me(user: UserDep) -> am.Me:
        return am.Me(user=user.name, institution=user.institution, auth=ctx.auth.enabled)

    # ------------------------------------------------------------------ federation

    def run_summary(session: Session, row: RunRow) -> am.RunSummary:
        done = session.scalar(sa.select(sa.func.count()).select_from(RoundRow).where(RoundRow.run_id == row.run_id))
        return am.RunSummary(
            run_id=row.run_id, name=row.name, status=row.status, created_at=row.created_at.isoformat(),
            finished_at=_iso(row.finished_at), institutions=list(row.institutions), rounds_completed=int(done or 0),
        )

    @api.get("/runs", response_model=list[am.RunSummary], summary="Federated runs, newest first")
    def runs(user: UserDep, limit: Annotated[int, Query(ge=1, le=500)] = 50) -> list[am.RunSummary]:
        def work(session: Session) -> list[am.RunSummary]:
            rows = session.scalars(sa.select(RunRow).order_by(RunRow.created_at.desc(), RunRow.id.desc()).limit(limit))
            return [run_summary(session, r) for r in rows]

        return read(work, "list runs")  # type: ignore[no-any-return]

    @api.get(
        "/runs/{run_id}/rounds", response_model=am.RunRounds, summary="Rounds, metrics and baselines of one run",
        responses={404: {"description": "No such run"}},
    )
    def run_rounds(run_id: str, user: UserDep) -> am.RunRounds:
        def work(session: Session) -> am.RunRounds | None:
            run = session.scalars(sa.select(RunRow).where(RunRow.run_id == run_id)).first()
            if run is None:
                return None
            inst_rows = session.scalars(
                sa.select(InstitutionMetricRow)
                .where(InstitutionMetricRow.run_id == run_id, InstitutionMetricRow.split == "test")
                .order_by(InstitutionMetricRow.round, InstitutionMetricRow.institution)
            ).all()
            per_round: dict[int, dict[str, dict[str, float | None]]] = {}
            for r in inst_rows:
                if user.may_see(r.institution):
                    per_round.setdefault(r.round, {})[r.institution] = _metrics(r.metrics)
            rounds = [
                am.RoundView(
                    round=r.round, started_at=r.started_at.isoformat(), finished_at=r.finished_at.isoformat(),
                    duration_s=r.duration_s, participants=list(r.participants), dropped=list(r.dropped),
                    global_metrics=_metrics(r.global_metrics), institution_metrics=per_round.get(r.round, {}),
                )
                for r in session.scalars(sa.select(RoundRow).where(RoundRow.run_id == run_id).order_by(RoundRow.round))
            ]
            baselines = [
                am.BaselineView(kind=b.kind, institution=b.institution, metrics=_metrics(b.metrics))
                for b in session.scalars(
                    sa.select(BaselineRow).where(BaselineRow.run_id == run_id).order_by(BaselineRow.id)
                )
                if b.institution is None or user.may_see(b.institution)
            ]
            return am.RunRounds(run=run_summary(session, run), rounds=rounds, baselines=baselines)

        result = read(work, f"read run {run_id!r}")
        if result is None:
            raise HTTPException(404, "No run with this id.")
        return result  # type: ignore[no-any-return]

    # ------------------------------------------------------------------ privacy and models

    @api.get("/privacy", response_model=am.PrivacyView, summary="Privacy-ledger charges (ε vs budget)")
    def privacy(
        user: UserDep, run_id: Annotated[str | None, Query(max_length=64)] = None, institution: InstitutionQuery = None
    ) -> am.PrivacyView:
        inst = scope(user, institution)
        try:
            charges = ctx.sources.privacy_charges(ctx.store, run_id=run_id, institution=inst)
        except StoreError as exc:
            logger.warning("Dashboard: %s", exc)
            raise HTTPException(503, "The run store is unavailable; try again shortly.") from None
        return am.PrivacyView(available=ctx.sources.has_privacy, charges=[am.PrivacyCharge(**c) for c in charges])

    registry_router = ctx.sources.registry_router()
    if registry_router is not None:
        app.include_router(registry_router, dependencies=[Depends(current_user)])
    else:

        @api.get("/models", response_model=list[am.ModelView], summary="Model registry versions")
        def models(user: UserDep) -> list[am.ModelView]:
            return []

    # ------------------------------------------------------------------ edge

    @api.get("/fleet", response_model=list[am.Agent], summary="Every edge agent seen over MQTT")
    def fleet(user: UserDep, institution: InstitutionQuery = None) -> list[dict[str, Any]]:
        inst = scope(user, institution)
        return read(lambda s: views.read_fleet(s, institution=inst), "read the fleet")  # type: ignore[no-any-return]

    @api.get("/alerts", response_model=list[am.Alert], summary="Stored alerts, newest first")
    def alerts(
        user: UserDep,
        institution: InstitutionQuery = None,
        after_id: Annotated[int | None, Query(ge=0, le=2**62, description="Only alerts stored after this id, "
                                              "oldest first.")] = None,
        limit: LimitQuery = 200,
    ) -> list[dict[str, Any]]:
        inst = scope(user, institution)
        return read(  # type: ignore[no-any-return]
            lambda s: views.read_alerts(s, institution=inst, after_id=after_id, limit=limit), "read alerts"
        )

    @api.get("/events", response_model=list[am.EventView], summary="Model and drift events, newest first")
    def events(user: UserDep, institution: InstitutionQuery = None, limit: LimitQuery = 200) -> list[dict[str, Any]]:
        inst = scope(user, institution)
        return read(  # type: ignore[no-any-return]
            lambda s: views.read_events(s, institution=inst, limit=limit), "read events"
        )

    @api.get("/traffic", response_model=list[am.TrafficView], summary="Vehicle counts over time, oldest first")
    def traffic(
        user: UserDep,
        institution: InstitutionQuery = None,
        since: Annotated[float | None, Query(ge=0, le=1e11, description="Seconds since the epoch.")] = None,
        limit: Annotated[int, Query(ge=1, le=20000)] = 2000,
    ) -> list[dict[str, Any]]:
        inst = scope(user, institution)
        return read(  # type: ignore[no-any-return]
            lambda s: views.read_traffic(s, institution=inst, since=since, limit=limit), "read traffic counts"
        )

    # ------------------------------------------------------------------ live stream

    @api.get(
        "/stream", summary="Live updates (Server-Sent Events)",
        response_class=StreamingResponse,
        responses={200: {"content": {"text/event-stream": {}}, "description": "events: alerts, fleet, events, "
                         "traffic, store (refetch runs/privacy/models)"}},
    )
    async def stream(
        request: Request, user: UserDep,
        last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", max_length=24)] = None,
    ) -> StreamingResponse:
        sub = ctx.hub.subscribe(institution=user.institution)
        after = int(last_event_id) if last_event_id and last_event_id.isdigit() else None

        async def events_out() -> AsyncIterator[str]:
            sent = after or 0
            try:
                yield "retry: 1000\n\n"
                if after is not None:
                    replay = await run_in_threadpool(
                        ctx.store.run_transaction,
                        lambda s: views.read_alerts(s, institution=user.institution, after_id=after,
                                                    limit=REPLAY_LIMIT),
                        action="replay alerts",
                    )
                    if replay:
                        sent = replay[-1]["id"]
                        yield _sse(HubEvent("alerts", tuple(replay), sent))
                while True:
                    try:
                        first = await asyncio.wait_for(sub.queue.get(), KEEPALIVE_S)
                    except TimeoutError:
                        if await request.is_disconnected():
                            return
                        yield ": keepalive\n\n"
                        continue
                    batch = [first]
                    while not sub.queue.empty() and len(batch) < 100:
                        batch.append(sub.queue.get_nowait())
                    chunks: list[str] = []
                    for event in batch:
                        if event is None:
                            if chunks:
                                yield "".join(chunks)
                            return
                        if event.kind == "alerts":
                            fresh = tuple(a for a in event.items if a["id"] > sent)
                            if not fresh:
                                continue
                            sent = max(a["id"] for a in fresh)
                            event = HubEvent("alerts", fresh, sent)
                        chunks.append(_sse(event))
                    if chunks:
                        yield "".join(chunks)
            finally:
                ctx.hub.unsubscribe(sub)

        return StreamingResponse(
            events_out(), media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @api.get("/openapi.json", include_in_schema=False)
    def openapi(user: UserDep) -> JSONResponse:
        return JSONResponse(app.openapi())

    app.include_router(api)

    # ------------------------------------------------------------------ page

    page_html = _static_text("index.html").replace("{{title}}", ctx.title)
    login_html = _static_text("login.html").replace("{{title}}", ctx.title)

    @app.get("/", include_in_schema=False)
    def page(
        request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
    ) -> Response:
        if ctx.auth.enabled:
            user = ctx.auth.check_token(credentials.credentials if credentials else None)
            if (user or ctx.auth.session_user(request.cookies.get(SESSION_COOKIE))) is None:
                return HTMLResponse(login_html.replace("{{message}}", ""), status_code=401)
        return HTMLResponse(page_html, headers={"Cache-Control": "no-store"})

    @app.post("/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        # A urlencoded form parsed here: no python-multipart dependency for one field.
        body = await request.body()
        token = parse_qs(body[:8192].decode("utf-8", "replace")).get("token", [""])[0]
        user = ctx.auth.check_token(token) if ctx.auth.enabled else ANONYMOUS
        if user is None:
            logger.info("Dashboard: refused a login with an unknown token")
            return HTMLResponse(login_html.replace("{{message}}", "Unknown token."), status_code=401)
        response = RedirectResponse("/", status_code=303)
        if ctx.auth.enabled:
            response.set_cookie(SESSION_COOKIE, ctx.auth.open_session(user), httponly=True, samesite="strict")
            logger.info("Dashboard: user %r logged in", user.name)
        return response

    @app.post("/logout", include_in_schema=False)
    def logout(request: Request) -> Response:
        ctx.auth.close_session(request.cookies.get(SESSION_COOKIE))
        response = RedirectResponse("/", status_code=303)
        response.delete_cookie(SESSION_COOKIE)
        return response

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> Response:
        return Response(status_code=204)

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str, user: UserDep) -> Response:
        if name not in STATIC_FILES:
            raise HTTPException(404, "No such file.")
        return Response(_static_text(name), media_type=STATIC_FILES[name], headers={"Cache-Control": "no-cache"})

    return app


def _static_text(name: str) -> str:
    return resources.files("consortium.dashboard").joinpath("static", name).read_text(encoding="utf-8")


def _sse(event: HubEvent) -> str:
    head = f"event: {event.kind}\n"
    if event.last_id is not None:
        head += f"id: {event.last_id}\n"
    return head + "data: " + json.dumps(list(event.items), separators=(",", ":"), allow_nan=False) + "\n\n"
