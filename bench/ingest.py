"""Ingest, re-ingest, append and embedding throughput, each against its ceiling measured in the same run. Prints JSON.

    python bench/ingest.py [--path data/online_retail.csv.gz] [--repeats 3] [--skip-append] [--skip-embed]

Baselines, measured in this process and interleaved with the system's runs (the cores are shared, so
only the ratios carry from one run or machine to another):

- pandas reading the same file and applying the notebook's cleaning (nulls, duplicates, cancelled
  invoices). Goals: `ingest_file` into a fresh database with all its indexes ≤ 4× it; ingesting the
  unchanged file again ≤ 1× it. The full co-purchase computation after a first load is reported apart.
- sentence-transformers' own batched `encode` of the same descriptions (same model, batch size and
  normalization). Goal: `embed_products`, the database write included, ≥ 80% of its rate.

Append: the file without its last day is loaded, then that day alone; the co-purchase counts must be
updated for the day's invoices only. Its time is reported next to a full recomputation on the same
data, and the two results are compared row for row.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import pandas as pd
from common import load_average, machine, ratio
from sqlalchemy import create_engine, text

from recsys.catalog.embedding import embed_products, load_model
from recsys.catalog.ingest import ingest_file
from recsys.config import Settings
from recsys.platform import embedded, migrations
from recsys.platform.db import database_url, dispose_engines, get_engine

warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")

BENCH_DB = "recsys_bench_ingest"
APPEND_DB = "recsys_bench_ingest_append"


def recreate(settings: Settings, name: str) -> Settings:
    dispose_engines()
    admin = create_engine(database_url(settings.with_(db_name="postgres")), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    scratch = settings.with_(db_name=name)
    migrations.upgrade(scratch)
    return scratch


def drop(settings: Settings, name: str) -> None:
    dispose_engines()
    admin = create_engine(database_url(settings.with_(db_name="postgres")), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def pandas_read_and_clean(path: str) -> float:
    """Seconds for pandas to read the file and apply the notebook's three cleaning steps."""
    started = time.perf_counter()
    frame = pd.read_csv(path, encoding="utf-8")
    frame = frame.dropna().drop_duplicates()
    frame = frame[~frame["InvoiceNo"].astype(str).str.startswith("C")]
    assert len(frame) > 0
    return time.perf_counter() - started


def sentence_transformers_encode(settings: Settings, descriptions: list[str]) -> float:
    """Seconds for the model's own batched encode of these texts (what embed_products has to beat)."""
    model = load_model(settings.embedding_model)
    started = time.perf_counter()
    model.encode(descriptions, batch_size=settings.embedding_batch_size, normalize_embeddings=True,
                 convert_to_numpy=True, show_progress_bar=False)
    return time.perf_counter() - started


def descriptions_to_embed(settings: Settings) -> list[str]:
    with get_engine(settings).begin() as conn:
        conn.execute(text("UPDATE products SET embedding = NULL, embedding_model = NULL, embedded_at = NULL"))
        return conn.execute(text("SELECT description FROM products ORDER BY stock_code")).scalars().all()


def copurchase_rows(settings: Settings) -> set[tuple[str, str, int]]:
    with get_engine(settings).connect() as conn:
        rows = conn.execute(text("SELECT stock_code, other_stock_code, invoices FROM copurchase")).all()
    return {tuple(row) for row in rows}


def full_copurchase_refresh(settings: Settings) -> float:
    """Seconds to recompute every co-purchase pair from all purchases."""
    from recsys.catalog.copurchase import rebuild_copurchase

    started = time.perf_counter()
    with get_engine(settings).begin() as conn:
        rebuild_copurchase(conn)
    return time.perf_counter() - started


def split_last_day(path: str, folder: Path) -> tuple[Path, Path, int]:
    """The file without its last invoice day, and that day alone (same columns, as CSV)."""
    raw = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    day = pd.to_datetime(raw["InvoiceDate"], format="mixed").dt.normalize()
    last = day == day.max()
    earlier, latest = folder / "without_last_day.csv", folder / "last_day.csv"
    raw[~last].to_csv(earlier, index=False)
    raw[last].to_csv(latest, index=False)
    return earlier, latest, int(last.sum())


def embed_figures(embedded_report, samples: dict[str, list[float]]) -> dict:
    st_rate = embedded_report.embedded / statistics.median(samples["sentence_transformers"])
    embed_rate = embedded_report.embedded / statistics.median(samples["embed"])
    return {
        "model": embedded_report.model,
        "products": embedded_report.embedded,
        "baseline": "SentenceTransformer.encode of the same descriptions, same batch size, normalized",
        "baseline_seconds_all": [round(s, 3) for s in samples["sentence_transformers"]],
        "baseline_products_per_second": round(st_rate, 1),
        "seconds_all": [round(s, 3) for s in samples["embed"]],
        "products_per_second": round(embed_rate, 1),
        "share_of_baseline": ratio(embed_rate, st_rate),
        "goal_share_of_baseline": 0.8,
    }


def median(values: list[float]) -> float:
    return round(statistics.median(values), 3)


class StageClock:
    """ingest_file's progress callback: the seconds from one stage's end to the next one's."""

    def __init__(self) -> None:
        self.last = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def __call__(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = now - self.last
        self.last = now


def append_scenario(settings: Settings, path: str) -> dict:
    """Load all but the last day, then the last day: the incremental co-purchase update vs a full one."""
    with tempfile.TemporaryDirectory(prefix="recsys-bench-ingest-") as folder:
        earlier, latest, day_rows = split_last_day(path, Path(folder))
        scratch = recreate(settings, APPEND_DB)
        ingest_file(earlier, scratch)
        load = load_average()
        appended = ingest_file(latest, scratch)
        incremental = copurchase_rows(scratch)
        full_seconds = full_copurchase_refresh(scratch)
        full = copurchase_rows(scratch)
    drop(settings, APPEND_DB)
    return {
        "rows_in_day": day_rows,
        "purchases_new": appended.rows_new,
        "ingest_seconds": round(appended.seconds, 3),
        "copurchase_update_seconds": round(appended.copurchase_refresh_seconds, 3),
        "copurchase_full_refresh_seconds": round(full_seconds, 3),
        "update_vs_full": ratio(appended.copurchase_refresh_seconds, full_seconds),
        "copurchase_pairs": len(full),
        "incremental_equals_full": incremental == full,
        "load_average": load,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", default="data/online_retail.csv.gz")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-append", action="store_true")
    parser.add_argument("--skip-embed", action="store_true", help="no embedding comparison (minutes on a CPU)")
    args = parser.parse_args()

    settings = Settings.from_env()
    if settings.uses_embedded_db:
        embedded.start_postgres(settings)
    if not args.skip_embed:
        load_model(settings.embedding_model)
    started_machine = machine()
    samples: dict[str, list[float]] = {name: [] for name in (
        "pandas", "ingest", "copurchase_full", "reingest", "sentence_transformers", "embed")}
    loads = []
    stages: list[dict[str, float]] = []
    report = embedded_report = None
    for repeat in range(args.repeats):
        loads.append(load_average())
        samples["pandas"].append(pandas_read_and_clean(args.path))
        scratch = recreate(settings, BENCH_DB)
        clock = StageClock()
        report = ingest_file(args.path, scratch, progress=clock)
        stages.append(clock.seconds)
        samples["ingest"].append(report.seconds)
        samples["copurchase_full"].append(report.copurchase_refresh_seconds)
        samples["reingest"].append(ingest_file(args.path, scratch).seconds)
        samples["pandas"].append(pandas_read_and_clean(args.path))
        if args.skip_embed:
            continue
        descriptions = descriptions_to_embed(scratch)
        if repeat % 2:
            samples["sentence_transformers"].append(sentence_transformers_encode(scratch, descriptions))
        started = time.perf_counter()
        embedded_report = embed_products(scratch)
        samples["embed"].append(time.perf_counter() - started)
        if not repeat % 2:
            samples["sentence_transformers"].append(sentence_transformers_encode(scratch, descriptions))
    with get_engine(scratch).connect() as conn:
        purchases = conn.execute(text("SELECT count(*) FROM purchases")).scalar_one()
    append = None if args.skip_append else append_scenario(settings, args.path)
    drop(settings, BENCH_DB)

    pandas_s, ingest_s, reingest_s = median(samples["pandas"]), median(samples["ingest"]), median(samples["reingest"])
    embed = None if args.skip_embed else embed_figures(embedded_report, samples)
    print(json.dumps({
        "machine": started_machine | {"load_average_each_repeat": loads, "load_average_end": load_average()},
        "file": args.path,
        "rows_read": report.rows_read,
        "purchases": purchases,
        "customers": report.customers_total,
        "repeats": args.repeats,
        "ingest": {
            "baseline": "pandas read_csv + dropna + drop_duplicates + drop C invoices, same file, same process",
            "baseline_seconds_median": pandas_s,
            "baseline_seconds_all": [round(s, 3) for s in samples["pandas"]],
            "seconds_median": ingest_s,
            "seconds_all": [round(s, 3) for s in samples["ingest"]],
            "rows_per_second": round(report.rows_read / ingest_s),
            "times_baseline": ratio(ingest_s, pandas_s, 2),
            "goal_times_baseline": 4.0,
            "stage_seconds_median": {stage: median([run[stage] for run in stages]) for stage in stages[0]},
        },
        "reingest_unchanged": {
            "seconds_median": reingest_s,
            "seconds_all": [round(s, 3) for s in samples["reingest"]],
            "times_baseline": ratio(reingest_s, pandas_s, 2),
            "goal_times_baseline": 1.0,
        },
        "copurchase_full_refresh_seconds_median": median(samples["copurchase_full"]),
        "append_last_day": append,
        "embed": embed,
    }, indent=2))


if __name__ == "__main__":
    main()
