"""Admin page for discover: a need box, the grouped result, and a "purchased" button per product.

A blueprint of its own under /admin/discover, behind the same login and CSRF protection as the other
admin pages. Views only parse the form and call the core (`recsys.jobs`, `recsys.feedback`).
"""

from __future__ import annotations

import uuid

from flask import Blueprint, abort, current_app, flash, redirect, render_template, request, url_for

from recsys import feedback, jobs
from recsys.discover.request import MAX_NEED_CHARS
from recsys.recommend.request import RequestError
from web.admin import FINISHED, no_framing, require_login

bp = Blueprint("admin_discover", __name__, url_prefix="/admin/discover")
bp.before_request(require_login)
bp.after_request(no_framing)


def settings():
    return current_app.config["RECSYS_SETTINGS"]


def _job(job_id: str | None) -> dict | None:
    try:
        parsed = uuid.UUID(job_id or "")
    except ValueError:
        return None
    found = jobs.get_job(parsed, settings())
    return found if found is not None and found["kind"] == "discover" else None


def _page(job: dict | None, form: dict | None = None, status: int = 200):
    asked = (job or {}).get("request") or {}
    form = form or {"need": asked.get("need", ""), "customer_id": asked.get("customer_id") or "",
                    "exclude_purchased": asked.get("exclude_purchased", False)}
    result = job.get("result") if job and job["status"] == "succeeded" else None
    return render_template("discover.html", job=job, result=result, form=form, finished=FINISHED,
                           max_need=MAX_NEED_CHARS), status


@bp.get("/")
def page():
    job_id = request.args.get("job")
    job = _job(job_id)
    if job_id and job is None:
        abort(404, f"No discover job {job_id[:40]!r}.")
    return _page(job)


@bp.post("/")
def submit():
    form = {"need": request.form.get("need", ""), "customer_id": request.form.get("customer_id", "").strip(),
            "exclude_purchased": request.form.get("exclude_purchased") == "on"}
    payload = {"need": form["need"], "exclude_purchased": form["exclude_purchased"]}
    if form["customer_id"]:
        try:
            payload["customer_id"] = int(form["customer_id"])
        except ValueError:
            flash("Customer must be a whole number (or empty).", "error")
            return _page(None, form, 400)
    try:
        outcome = jobs.submit_discover(payload, settings())
    except RequestError as exc:
        flash(str(exc), "error")
        return _page(None, form, 400)
    if outcome.cached:
        flash("Answered from the result cache.", "info")
    return redirect(url_for("admin_discover.page", job=str(outcome.job_id)))


@bp.post("/<job_id>/purchased")
def purchased(job_id: str):
    job = _job(job_id)
    if job is None:
        abort(404, f"No discover job {job_id[:40]!r}.")
    stock_code = request.form.get("stock_code", "")
    try:
        event = feedback.FeedbackEvent.from_dict({"event": "purchased", "stock_code": stock_code,
                                                  "job_id": job["id"]})
        answer = feedback.record(event, settings())
    except RequestError as exc:
        flash(str(exc), "error")
        return _page(job, status=getattr(exc, "status", 400))
    replacement = answer.get("replacement")
    if replacement and replacement.get("by"):
        flash(f"Recorded the purchase of {stock_code}; its place in “{replacement['idea']['description']}” "
              f"now shows {replacement['by']['stock_code']} {replacement['by']['description']}.", "info")
    else:
        flash(f"Recorded the purchase of {stock_code}; its group had no extra product left to show.", "info")
    return redirect(url_for("admin_discover.page", job=job["id"]))
