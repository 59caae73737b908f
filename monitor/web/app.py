"""`stage-a serve`: a read-only web app over the results store (Starlette + Jinja2, no build step).

Every page is rendered on the server from the same RunReport that `stage-a status` prints; the only
script is a few lines that refresh a running run's numbers from /api/runs/{id}.
"""

from __future__ import annotations

import base64
import binascii
import secrets
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from monitor.diff import RunDiff, diff_runs, highlight
from monitor.report import QueueProbe, RunReport, build_report, human_duration, list_runs, require_run
from monitor.summary import parse_summary
from monitor.text import fmt_ms, fmt_rate, fmt_time, model_label
from monitor.web.metrics import metrics_registry, render
from monitor.web.thumbs import DB_INT_MAX, NotFound, Thumbnails
from stage_a.errors import UserError
from stage_a.runstats import RunStats, run_stats
from stage_a.settings import Settings
from stage_a.store.queries import ImageFilter

if TYPE_CHECKING:
    from stage_a.store import ResultStore

HERE = Path(__file__).parent
PAGE_GROUPS = 20
MAX_PAGE_GROUPS = 200
DIFF_PAGE = 50
MAX_SEARCH = 1000
"""Characters of search text (SQLite refuses LIKE patterns over 50,000 bytes)."""
DIFF_CACHE_S = 30.0
STATS_CACHED = 8
"""End-of-run reports kept in memory (by run and its counters)."""
OTHER_RUNS = 20


class BasicAuth(BaseHTTPMiddleware):
    """HTTP basic auth on every path but /healthz (the credentials come from STAGE_A_SERVE_BASIC_AUTH)."""

    def __init__(self, app: Any, credentials: str) -> None:
        super().__init__(app)
        user, _, password = credentials.partition(":")
        self.user, self.password = user.encode(), password.encode()

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        if request.url.path == "/healthz" or self._ok(request.headers.get("authorization", "")):
            return await call_next(request)
        return PlainTextResponse("authentication required\n", status_code=401,
                                 headers={"WWW-Authenticate": 'Basic realm="stage-a"'})

    def _ok(self, header: str) -> bool:
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:  # bytes throughout: compare_digest refuses non-ASCII str (headers arrive as latin-1)
            user, _, password = base64.b64decode(value.encode("latin-1"), validate=True).partition(b":")
        except binascii.Error:
            return False
        return secrets.compare_digest(user, self.user) & secrets.compare_digest(password, self.password)


def _int_param(request: Request, name: str, default: int | None = None, lo: int = 0,
               hi: int | None = None) -> int | None:
    raw = request.query_params.get(name, "")
    if raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        return default
    value = max(lo, value)
    return min(hi, value) if hi is not None else value


def create_app(store: ResultStore, settings: Settings) -> Starlette:
    queue = QueueProbe(settings)
    thumbs = Thumbnails(store)
    registry = metrics_registry(store, settings, queue)
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    env = templates.env
    env.filters.update(time=fmt_time, rate=fmt_rate, ms=fmt_ms, duration=human_duration)
    env.globals.update(parse_summary=parse_summary, highlight=highlight, model_label=model_label)
    diff_cache: dict[tuple[int, int], tuple[float, RunDiff]] = {}
    diff_lock = threading.Lock()
    stats_cache: dict[tuple[Any, ...], RunStats] = {}
    stats_lock = threading.Lock()

    def finished_stats(report: RunReport) -> RunStats:
        """The end-of-run report of a finished or cancelled run: its percentiles read every finished row,
        so it is computed once per state of the run's counters (a new result moves them) and kept."""
        key = (report.run_id, report.done, report.failed, report.pending, report.in_flight,
               report.last_result_at, report.cancelled_at)
        with stats_lock:
            stats = stats_cache.get(key)
            if stats is None:
                stats = run_stats(store, report.run_id)
                for old in [k for k in stats_cache if k[0] == report.run_id]:
                    del stats_cache[old]  # an earlier state of this run
                while len(stats_cache) >= STATS_CACHED:
                    del stats_cache[next(iter(stats_cache))]  # the oldest
                stats_cache[key] = stats
            return stats

    def page(request: Request, name: str, status_code: int = 200, **ctx: Any) -> Response:
        return templates.TemplateResponse(request, name, ctx, status_code=status_code)

    def not_found(request: Request, message: str) -> Response:
        return page(request, "error.html", 404, title="not found", message=message)

    def bad_request(request: Request, message: str) -> Response:
        return page(request, "error.html", 400, title="bad request", message=message)

    def index(request: Request) -> Response:
        return page(request, "index.html", title="runs", runs=list_runs(store, 200, settings))

    def run_page(request: Request) -> Response:
        run_id = int(request.path_params["run_id"])
        try:
            report = build_report(store, run_id, settings, queue, writers=False)
        except UserError as exc:
            return not_found(request, str(exc))
        text = (request.query_params.get("q") or "").strip()
        if len(text) > MAX_SEARCH:
            return bad_request(request, f"search text too long: {len(text)} characters (at most {MAX_SEARCH})")
        label = request.query_params.get("label") or None
        flt = ImageFilter(
            label=label if label in ("pass", "fail") else None,
            failed=request.query_params.get("failed") == "1",
            irrelevant=request.query_params.get("irrelevant") == "1",
            text=text or None,
        )
        per = _int_param(request, "per", PAGE_GROUPS, 1, MAX_PAGE_GROUPS) or PAGE_GROUPS
        after = _int_param(request, "after", None, -1, DB_INT_MAX)
        before = _int_param(request, "before", None, 0, DB_INT_MAX)
        groups, more = store.queries.page_groups(run_id, flt, after=after, before=before, limit=per)
        failures = store.queries.failed_images(run_id, 50) if report.failed and not flt.any and after is None \
            and before is None else []
        if before is not None and after is None:
            has_prev, has_next = more, True
        else:
            has_prev, has_next = after is not None and after >= 0, more
        params = {k: v for k, v in (("label", flt.label), ("failed", "1" if flt.failed else None),
                                    ("irrelevant", "1" if flt.irrelevant else None), ("q", flt.text),
                                    ("per", str(per) if per != PAGE_GROUPS else None)) if v}
        stats = finished_stats(report) if report.state in ("finished", "cancelled") else None
        return page(request, "run.html", title=f"run {run_id}", r=report, groups=groups, flt=flt, stats=stats,
                    failures=failures, has_prev=has_prev and bool(groups), has_next=has_next and bool(groups),
                    params=params, per=per, other_runs=[x for x in store.queries.recent_run_ids(OTHER_RUNS + 1) if x != run_id][-OTHER_RUNS:])

    def diff_page(request: Request) -> Response:
        a, b = int(request.path_params["a"]), int(request.path_params["b"])
        try:
            require_run(store, a)
            require_run(store, b)
        except UserError as exc:
            return not_found(request, str(exc))
        with diff_lock:
            cached = diff_cache.get((a, b))
            if cached is None or time.monotonic() - cached[0] > DIFF_CACHE_S:
                cached = (time.monotonic(), diff_runs(store, a, b))
                diff_cache.clear()  # one diff in memory at a time: they can be large
                diff_cache[(a, b)] = cached
        d = cached[1]
        offset = _int_param(request, "offset", 0, 0) or 0
        rows = d.changes[offset: offset + DIFF_PAGE]
        return page(request, "diff.html", title=f"diff {a} / {b}", d=d, rows=rows, offset=offset,
                    page_size=DIFF_PAGE, ra=store.queries.run_row(a), rb=store.queries.run_row(b))

    def diff_form(request: Request) -> Response:
        a = _int_param(request, "a", None, 1)
        b = _int_param(request, "b", None, 1)
        if a is None or b is None:
            return RedirectResponse("/", status_code=303)
        return RedirectResponse(f"/runs/{a}/diff/{b}", status_code=303)

    def thumb(request: Request) -> Response:
        p = request.path_params
        try:
            t = thumbs.get(int(p["run_id"]), int(p["pos"]), int(p["idx"]))
        except (NotFound, OSError):
            return PlainTextResponse("not found\n", status_code=404)
        headers = {"Cache-Control": "private, max-age=3600", "ETag": t.etag}
        if request.headers.get("if-none-match") == t.etag:
            return Response(status_code=304, headers=headers)
        return Response(t.body, media_type=t.media_type, headers=headers)

    def metrics(request: Request) -> Response:
        return Response(render(registry), media_type="text/plain; version=0.0.4; charset=utf-8")

    def api_runs(request: Request) -> Response:
        return JSONResponse([r.to_json() for r in list_runs(store, 200, settings)])

    def api_run(request: Request) -> Response:
        try:
            return JSONResponse(build_report(store, int(request.path_params["run_id"]), settings, queue,
                                             writers=False, reuse_sources=False).to_json())
        except UserError as exc:
            return JSONResponse({"error": str(exc)}, status_code=404)

    def healthz(request: Request) -> Response:
        try:
            store.queries.run_ids()
        except Exception as exc:
            return PlainTextResponse(f"database unreachable: {type(exc).__name__}\n", status_code=503)
        return PlainTextResponse("ok\n")

    routes = [
        Route("/", index),
        Route("/runs/{run_id:int}", run_page),
        Route("/runs/{a:int}/diff/{b:int}", diff_page),
        Route("/diff", diff_form),
        Route("/runs/{run_id:int}/thumb/{pos:int}/{idx:int}", thumb),
        Route("/metrics", metrics),
        Route("/api/runs", api_runs),
        Route("/api/runs/{run_id:int}", api_run),
        Route("/healthz", healthz),
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    middleware = [Middleware(BasicAuth, credentials=settings.serve_basic_auth)] if settings.serve_basic_auth else []
    return Starlette(routes=routes, middleware=middleware)
