"""Cold start of the `recsys` command line: import time and which heavy libraries each command pays for. Prints JSON.

    python bench/cold_start.py [--repeats 5] [--run]

- `python -X importtime -c "import recsys.cli"`: the import cost every command pays, with the modules
  that take most of it; against the interpreter alone and `import click` (the CLI's own ceiling).
- For each command, `recsys CMD --help` in a fresh interpreter: wall time (median of --repeats) and
  which of the heavy libraries (torch, transformers, sentence-transformers, pandas, numpy, celery,
  flask, sqlalchemy, psycopg, alembic) it imported. Goal (issue 16): none a command does not need.
- With --run, the read commands run for real against the configured database (RECSYS_HOME /
  DATABASE_URL), reporting the same; `search` needs the embedding model, the others need no torch.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine

HEAVY = ("torch", "transformers", "sentence_transformers", "pandas", "numpy", "celery", "flask", "sqlalchemy",
         "psycopg", "alembic", "scipy", "sklearn", "lightgbm", "matplotlib")
HELP_COMMANDS = ("", "stats", "search", "history", "ingest", "embed", "eval", "submit", "jobs", "worker", "serve",
                 "services", "db")
RUN_COMMANDS = (
    ("stats", "--json"),
    ("history", "15781", "-n", "3", "--json"),
    ("jobs", "list", "--json"),
    ("search", "lantern", "-k", "3", "--json"),
)

RUNNER = """
import atexit, json, sys
def _report():
    loaded = sorted({name.split('.')[0] for name in sys.modules} & set(HEAVY))
    with open(OUT, 'w') as handle:
        json.dump(loaded, handle)
atexit.register(_report)
sys.argv = ['recsys', *ARGS]
from recsys.cli import main
main()
"""


def import_profile() -> dict:
    """Microseconds per module from -X importtime for `import recsys.cli`: the total and the largest."""
    stderr = subprocess.run([sys.executable, "-X", "importtime", "-c", "import recsys.cli"],
                            capture_output=True, text=True, check=True).stderr
    rows = []
    for line in stderr.splitlines():
        match = re.match(r"import time:\s+(\d+) \|\s+(\d+) \| (\s*)(\S+)", line)
        if match:
            rows.append((match.group(4), int(match.group(1)), int(match.group(2)), len(match.group(3)) // 2))
    total = next(cumulative for name, _, cumulative, _ in rows if name == "recsys.cli")
    top_level = sorted(((name, cumulative) for name, _, cumulative, depth in rows if depth <= 1),
                       key=lambda row: -row[1])
    return {"recsys_cli_ms": round(total / 1000, 1),
            "largest_imports_ms": {name: round(us / 1000, 1) for name, us in top_level[:10]}}


def wall(argv: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run(argv, capture_output=True, check=False)
        times.append(time.perf_counter() - started)
    return round(statistics.median(times) * 1000, 1)


def command(args: list[str], repeats: int) -> dict:
    """Median wall time of the command in a fresh interpreter, and the heavy libraries it imported."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "modules.json"
        code = RUNNER.replace("HEAVY", repr(HEAVY)).replace("OUT", repr(str(out))).replace("ARGS", repr(args))
        argv = [sys.executable, "-c", code]
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
        loaded = json.loads(out.read_text()) if out.exists() else None
        return {"exit_code": result.returncode, "wall_ms_median": wall(argv, repeats), "heavy_imports": loaded}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--run", action="store_true", help="also run the read commands against the database")
    args = parser.parse_args()

    report: dict = {"machine": machine()}
    report["baseline_ms"] = {
        "python": wall([sys.executable, "-c", "pass"], args.repeats),
        "python_import_click": wall([sys.executable, "-c", "import click"], args.repeats),
        "python_import_recsys_cli": wall([sys.executable, "-c", "import recsys.cli"], args.repeats),
    }
    report["importtime"] = import_profile()
    report["help"] = {f"recsys {name} --help".replace("  ", " "): command([*filter(None, [name]), "--help"],
                                                                        args.repeats)
                      for name in HELP_COMMANDS}
    if args.run:
        report["run"] = {"recsys " + " ".join(argv): command(list(argv), args.repeats) for argv in RUN_COMMANDS}
    report["machine"]["load_average_end"] = machine()["load_average"]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
