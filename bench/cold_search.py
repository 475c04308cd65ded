"""Cold `recsys search TEXT -k 3`: wall time of the real command, and where a cold process spends it.

Each run is a fresh Python process. Phases (one instrumented process per run): importing the CLI,
making sure the database is there (start/attach, schema check), loading the query encoder,
encoding the query, the SQL search; the same phases with sentence-transformers (torch) encoding
the query, as the command did before the light encoder, in the same run. CPU seconds (user + system)
are given next to wall seconds: on a loaded machine wall time mostly measures the other processes.
Prints JSON with the machine and load averages.

    RECSYS_HOME=... python bench/cold_search.py --runs 5 [--query lantern]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECSYS = ROOT / ".venv" / "bin" / "recsys"

PHASES = r"""
import json, sys, time
t0 = time.perf_counter()
from recsys.cli import cli  # every command module, as `recsys` imports them
from recsys.cli.common import ensure_database
from recsys.catalog import retrieval
from recsys.catalog.embedding import _light_encoder, encode_queries, load_model
t1 = time.perf_counter()
settings = ensure_database()
t2 = time.perf_counter()
torch_path = sys.argv[2] == "torch"
light = None if torch_path else _light_encoder(settings)
if torch_path:
    load_model(settings.embedding_model)
t3 = time.perf_counter()
encode_queries([sys.argv[1]], settings, light=not torch_path)
t4 = time.perf_counter()
hits = retrieval.search(sys.argv[1], 3, settings)
t5 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "database_s": t2 - t1, "encoder_load_s": t3 - t2, "encode_s": t4 - t3,
                  "search_s": t5 - t4, "light_encoder": light is not None, "top": hits[0].stock_code}))
"""


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown")
    return {"cpu": cpu, "cores": os.cpu_count()}


def timed(argv: list[str]) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + system) of one command."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def run_phases(query: str, encoder: str) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run([sys.executable, "-c", PHASES, query, encoder], check=True, capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    phases = json.loads(out.stdout.strip().splitlines()[-1])
    phases["cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return phases


def medians(runs: list[dict]) -> dict:
    keys = ("import_s", "database_s", "encoder_load_s", "encode_s", "search_s", "cpu_s")
    return {key: round(statistics.median(run[key] for run in runs), 3) for key in keys}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--query", default="lantern")
    args = parser.parse_args()
    load_before = os.getloadavg()
    walls, cpus, phases, torch_phases = [], [], [], []
    for _ in range(args.runs):
        wall, cpu = timed([str(RECSYS), "search", args.query, "-k", "3"])
        walls.append(wall)
        cpus.append(cpu)
        phases.append(run_phases(args.query, "light"))
        torch_phases.append(run_phases(args.query, "torch"))
    print(json.dumps({
        "command": f"recsys search {args.query} -k 3",
        "runs": args.runs,
        "wall_s": [round(w, 2) for w in walls],
        "wall_median_s": round(statistics.median(walls), 2),
        "cpu_s": [round(c, 2) for c in cpus],
        "cpu_median_s": round(statistics.median(cpus), 2),
        "phases_median_s": medians(phases),
        "phases_median_s_with_torch_encoder": medians(torch_phases),
        "light_encoder": all(p["light_encoder"] for p in phases),
        "machine": machine(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }, indent=2))


if __name__ == "__main__":
    main()
