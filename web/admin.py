"""Admin pages (server-rendered): dashboard, products, customers with a recommend form, jobs, evaluation.

Everything here needs a logged-in admin; forms carry a CSRF token (web/csrf.py).
"""

from __future__ import annotations

import logging
import math
import re
import uuid
from datetime import UTC
from pathlib import Path
from urllib.parse import urlsplit

from flask import (
    Blueprint,
    abort,
    current_app,
    flash,
    jsonify,
    redirect,
    render_template,
    request,
    send_file,
    session,
    url_for,
)
from markupsafe import Markup, escape

from recsys import jobs
from recsys.catalog import history as customer_histories
from recsys.catalog import listing, retrieval
from recsys.evaluation.report import eval_root, latest_report
from recsys.platform import auth
from recsys.platform.bodies import MAX_BIGINT
from recsys.platform.models import JOB_STATUSES
from recsys.rankers import RANKER_NAMES
from recsys.recommend.request import MAX_K, RequestError
from web import health, verdict
from web.charts import Series, line_chart
from web.csrf import rotate_csrf_token
from web.errors import ApiError
from web.params import int_arg, str_arg

log = logging.getLogger(__name__)

bp = Blueprint("admin", __name__, url_prefix="/admin")

PER_PAGE = 25
MAX_PAGE = 100_000
SEARCH_PAGES = 5
FINISHED = {"succeeded", "failed", "cancelled"}


def settings():
    return current_app.config["RECSYS_SETTINGS"]


class Page:
    """One page of a long list, and what the pager needs to link to the others."""

    def __init__(self, items: list, page: int, per_page: int, total: int):
        self.items, self.page, self.per_page, self.total = items, page, per_page, total
        self.pages = max(1, math.ceil(total / per_page))
        self.has_prev, self.has_next = page > 1, page < self.pages
        self.first = (page - 1) * per_page + 1 if total else 0
        self.last = min(page * per_page, total)


def page_arg() -> int:
    return int_arg("page", 1, 1, MAX_PAGE)


def _safe_next(target: str | None) -> str:
    """Only same-site admin paths, so the login form cannot be used to redirect elsewhere."""
    if target:
        parts = urlsplit(target)
        if not parts.scheme and not parts.netloc and parts.path.startswith("/admin") and "\\" not in target:
            return target
    return url_for("admin.dashboard")


@bp.before_request
def require_login():
    if request.endpoint == "admin.login" or session.get("admin_user"):
        return None
    if request.path.endswith(".json"):
        raise ApiError(401, "unauthorized", "log in to the admin pages first")
    return redirect(url_for("admin.login", next=request.full_path.rstrip("?")))


@bp.after_request
def no_framing(response):
    response.headers.setdefault("X-Frame-Options", "DENY")
    response.headers.setdefault("Cache-Control", "no-store")
    return response


@bp.route("/login", methods=["GET", "POST"])
def login():
    error, status = None, 200
    address = request.remote_addr or "unknown"
    if request.method == "POST":
        name = request.form.get("username", "").strip()
        password = request.form.get("password", "")
        locked = auth.login_lockout_seconds(address, settings())
        if locked:
            error, status = f"Too many failed logins from your address; try again in {math.ceil(locked / 60)} min.", 429
        elif auth.authenticate_admin(name, password, settings()):
            auth.clear_login_failures(address, settings())
            target = _safe_next(request.form.get("next"))
            session.clear()
            session.permanent = True
            session["admin_user"] = name
            rotate_csrf_token()
            return redirect(target)
        else:
            auth.record_login_failure(address, settings())
            log.info("failed admin login for %r from %s", name[:64], address)
            error, status = "Wrong user name or password.", 401
    return render_template("login.html", error=error, next=request.values.get("next", "")), status


@bp.post("/logout")
def logout():
    session.clear()
    return redirect(url_for("admin.login"))


@bp.get("/")
def dashboard():
    catalog = retrieval.stats(settings())
    catalog["coverage"] = catalog["embedded_products"] / catalog["products"] if catalog["products"] else 0.0
    figures = {"available": True}
    figures["counts"] = jobs.job_counts(settings())
    figures["throughput"] = jobs.job_throughput(settings(), window_seconds=3600)
    figures["cache"] = cache = dict(jobs.cache_stats(settings()))
    if "hit_rate" not in cache:
        # Every miss becomes a job, so hits / (hits + jobs) is the share answered from the cache.
        lookups = cache.get("hits", 0) + sum(figures["counts"].values())
        cache["hit_rate"] = cache.get("hits", 0) / lookups if lookups else None
    figures["workers"] = health.check_workers(settings())
    return render_template("dashboard.html", catalog=catalog, jobs=figures, statuses=JOB_STATUSES,
                           charts=_dashboard_charts(), chart_hours=CHART_HOURS,
                           chart_bucket_minutes=CHART_BUCKET_MINUTES)


CHART_HOURS = 6
CHART_BUCKET_MINUTES = 10


def _dashboard_charts() -> list[Markup]:
    """Jobs per minute, latency and cache hit rate over the last hours, as SVG (times in UTC)."""
    timeline = jobs.job_timeline(settings(), hours=CHART_HOURS, bucket_minutes=CHART_BUCKET_MINUTES)
    times = [bucket["start"].astimezone(UTC) for bucket in timeline]
    any_jobs = any(bucket["finished"] for bucket in timeline)
    nothing = f"no finished jobs in the last {CHART_HOURS} hours"
    return [
        line_chart(times, [Series("jobs/min", [b["jobs_per_minute"] if any_jobs else None for b in timeline])],
                   title="Jobs finished per minute", empty_text=nothing, chart_id="chart-jobs"),
        line_chart(times, [Series("p50", [b["p50_ms"] for b in timeline]),
                           Series("p95", [b["p95_ms"] for b in timeline], "s2")],
                   title="Latency, submit to finished", unit="ms", empty_text=nothing, chart_id="chart-latency"),
        line_chart(times, [Series("hit rate", [None if b["cache_hit_rate"] is None else 100 * b["cache_hit_rate"]
                                               for b in timeline])],
                   title="Result cache hit rate", unit="%", y_max=100,
                   empty_text=f"no requests in the last {CHART_HOURS} hours", chart_id="chart-cache"),
    ]


@bp.get("/products")
def products():
    query = str_arg("q")
    mode = "hybrid" if request.args.get("mode") == "hybrid" else "vector"
    page = page_arg()
    if query:
        page = min(page, SEARCH_PAGES)
        try:
            hits = retrieval.search(query, page * PER_PAGE, settings(), hybrid=mode == "hybrid")
        except ValueError as exc:
            raise ApiError(400, "invalid_request", str(exc)) from None
        items = [h.as_dict() for h in hits[(page - 1) * PER_PAGE:]]
        total = len(hits) if len(hits) < page * PER_PAGE else min(SEARCH_PAGES, page + 1) * PER_PAGE
    else:
        items, total = listing.list_products(PER_PAGE, (page - 1) * PER_PAGE, settings())
    return render_template("products.html", query=query or "", mode=mode, listing=Page(items, page, PER_PAGE, total))


@bp.get("/products/<stock_code>")
def product(stock_code: str):
    item = retrieval.product(stock_code, settings()) if "\x00" not in stock_code else None
    if item is None:
        abort(404, f"No product with stock code {stock_code[:64]!r}.")
    similar = retrieval.similar(stock_code, 12, settings()) if item["embedded"] else []
    together = listing.bought_together(stock_code, 12, settings())
    sales = listing.monthly_sales(stock_code, settings())
    return render_template("product.html", product=item, similar=similar, together=together, sales=sales)


@bp.get("/customers")
def customers():
    wanted = str_arg("id", max_length=20)
    if wanted:
        if not wanted.isdigit() or not 0 < int(wanted) <= MAX_BIGINT:
            flash("A customer id is a positive whole number.", "error")
        else:
            return redirect(url_for("admin.customer", customer_id=int(wanted)))
    page = page_arg()
    items, total = listing.list_customers(PER_PAGE, (page - 1) * PER_PAGE, settings())
    return render_template("customers.html", listing=Page(items, page, PER_PAGE, total))


def _job_or_none(job_id: str | None) -> dict | None:
    if not job_id:
        return None
    try:
        parsed = uuid.UUID(job_id)
    except ValueError:
        return None
    return jobs.get_job(parsed, settings())


def _customer_page(customer_id: int, job: dict | None = None, result: dict | None = None, form: dict | None = None):
    if customer_id > MAX_BIGINT:
        abort(404, "No such customer.")
    page = page_arg()
    info = listing.customer(customer_id, settings())
    history, total = customer_histories.history_page(customer_id, PER_PAGE, (page - 1) * PER_PAGE, settings())
    if result is None and job is not None and job.get("status") == "succeeded":
        result = job.get("result")
    if form is None and job is not None:
        asked = job.get("request") or {}
        form = {key: asked.get(key) for key in ("query", "k", "ranker", "explain", "exclude_purchased")}
    return render_template(
        "customer.html", customer_id=customer_id, customer=info, history=Page(history, page, PER_PAGE, total),
        job=job, result=result, rankers=RANKER_NAMES, default_ranker=settings().ranker, max_k=MAX_K,
        form=form or {"query": "", "k": 5, "ranker": settings().ranker, "explain": True},
        finished=FINISHED,
    )


@bp.get("/customers/<int:customer_id>")
def customer(customer_id: int):
    return _customer_page(customer_id, job=_job_or_none(request.args.get("job")))


@bp.post("/customers/<int:customer_id>/recommend")
def recommend(customer_id: int):
    if customer_id > MAX_BIGINT:
        abort(404, "No such customer.")
    form = {
        "query": request.form.get("query", "").strip(),
        "k": request.form.get("k", "5"),
        "ranker": request.form.get("ranker") or None,
        "explain": request.form.get("explain") == "on",
        "exclude_purchased": request.form.get("exclude_purchased") == "on",
    }
    try:
        k = int(form["k"])
    except ValueError:
        flash("k must be a whole number.", "error")
        return _customer_page(customer_id, form=form), 400
    payload = {"customer_id": customer_id, "query": form["query"] or None, "k": k, "ranker": form["ranker"],
               "explain": form["explain"], "exclude_purchased": form["exclude_purchased"]}
    try:
        outcome = jobs.submit_recommendation(payload, settings())
    except RequestError as exc:
        flash(str(exc), "error")
        return _customer_page(customer_id, form=form), 400
    if outcome.job_id is not None:
        if outcome.cached:
            flash("Answered from the result cache.", "info")
        return redirect(url_for("admin.customer", customer_id=customer_id, job=str(outcome.job_id)))
    flash("Answered from the result cache.", "info")
    return _customer_page(customer_id, result=outcome.result, form=form)


@bp.get("/jobs")
def jobs_list():
    status = request.args.get("status") or None
    if status is not None and status not in JOB_STATUSES:
        raise ApiError(400, "invalid_request", f"status must be one of {', '.join(JOB_STATUSES)}")
    page = page_arg()
    items = jobs.list_jobs(settings(), status=status, limit=PER_PAGE, offset=(page - 1) * PER_PAGE)
    total = jobs.count_jobs(settings(), status)
    return render_template("jobs.html", listing=Page(items, page, PER_PAGE, total), status=status,
                           statuses=JOB_STATUSES)


def _job_or_404(job_id: str) -> dict:
    job = _job_or_none(job_id)
    if job is None:
        abort(404, f"No job {job_id[:40]!r}.")
    return job


@bp.get("/jobs/<job_id>")
def job(job_id: str):
    return render_template("job.html", job=_job_or_404(job_id), finished=FINISHED)


@bp.get("/jobs/<job_id>.json")
def job_json(job_id: str):
    job = _job_or_none(job_id)
    if job is None:
        raise ApiError(404, "not_found", f"no job {job_id[:40]!r}")
    return jsonify({key: (str(value) if key == "id" else value) for key, value in job.items()})


@bp.post("/jobs/<job_id>/cancel")
def cancel(job_id: str):
    job = _job_or_404(job_id)
    if jobs.cancel_job(uuid.UUID(str(job["id"])), settings()):
        flash("Job cancelled.", "info")
    else:
        flash("The job had already finished; nothing to cancel.", "error")
    return redirect(url_for("admin.job", job_id=job_id))


def _inline_markdown(line: str) -> Markup:
    """**bold** and `code` in an escaped line: all the inline markup the evaluation report uses."""
    html = str(escape(line))
    html = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", html)
    html = re.sub(r"`(.+?)`", r"<code>\1</code>", html)
    html = re.sub(r"(?<![*\w])\*(?!\s)(.+?)(?<!\s)\*(?!\w)", r"<i>\1</i>", html)
    return Markup(html)


def _markdown_blocks(markdown: str) -> list[dict]:
    """Paragraphs and pipe tables of the evaluation report's markdown, ready for the template."""
    blocks: list[dict] = []
    for line in (markdown or "").splitlines():
        stripped = line.strip()
        if stripped.startswith("|"):
            cells = [_inline_markdown(cell.strip()) for cell in stripped.strip("|").split("|")]
            if all(set(str(cell)) <= set(":- ") for cell in cells):
                continue
            if blocks and blocks[-1]["kind"] == "table":
                blocks[-1]["rows"].append(cells)
            else:
                blocks.append({"kind": "table", "header": cells, "rows": []})
        elif stripped:
            blocks.append({"kind": "p", "html": _inline_markdown(stripped.lstrip("# "))})
    return blocks


def _report() -> tuple[dict | None, str | None]:
    try:
        return latest_report(eval_root(settings())), None
    except Exception as exc:
        log.exception("could not load the evaluation report")
        return None, str(exc).splitlines()[0] if str(exc) else type(exc).__name__


@bp.get("/evaluation")
def evaluation():
    report, error = _report()
    blocks: list[dict] = []
    if report:
        if report.get("rows"):
            header = list(report["rows"][0].keys())
            blocks = [{"kind": "table", "header": header,
                       "rows": [[row.get(column) for column in header] for row in report["rows"]]}]
        else:
            blocks = _markdown_blocks(report.get("metrics_table_markdown") or report.get("table_markdown") or "")
    plot = report.get("plot_path") if report else None
    has_plot = bool(plot) and Path(plot).suffix.lower() == ".png" and Path(plot).is_file()
    return render_template("evaluation.html", report=report, error=error, blocks=blocks, has_plot=has_plot,
                           verdict=verdict.evaluation_verdict(report.get("metrics")) if report else [])


@bp.get("/evaluation/plot.png")
def evaluation_plot():
    report, _error = _report()
    plot = Path(report["plot_path"]) if report and report.get("plot_path") else None
    if plot is None or plot.suffix.lower() != ".png" or not plot.is_file():
        abort(404, "No evaluation plot yet.")
    return send_file(plot, mimetype="image/png", max_age=0)
