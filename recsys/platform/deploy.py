"""Checks of the production shape: docker-compose.yml, the Dockerfile and an environment file.

No Docker engine is needed: the files are read and compared with what the code expects (the
services and their pins, healthchecks and start order, and every environment variable against
the settings `Settings.from_env` reads). `recsys deploy check` runs them; each problem is one line.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from recsys.config import setting_env_vars

log = logging.getLogger(__name__)

# variables recsys services may carry that are not recsys settings: read by libraries they use
THIRD_PARTY_ENV = {
    "HF_TOKEN": "Hugging Face token for gated models (huggingface_hub)",
    "HF_HOME": "Hugging Face download cache (huggingface_hub)",
}
# settings that go into the result cache key, computed where a job is submitted (web) and answered
# by a worker: every recsys service must see the same value
CACHE_KEY_SETTINGS = ("RECSYS_LLM_MODEL", "RECSYS_EMBEDDING_MODEL", "RECSYS_EMBEDDING_TYPE",
                      "RECSYS_MAX_CANDIDATES", "RECSYS_RETRIEVE_K", "RECSYS_VERBALIZER_PERMUTATIONS")
RECSYS_SERVICES = ("migrate", "web", "beat", "worker", "worker-cpu")
LONG_RUNNING_WITHOUT_PING = {"migrate": "a one-shot job", "beat": "celery beat answers no ping"}
REQUIRED_ENV = ("DATABASE_URL", "CELERY_BROKER_URL", "RECSYS_SECRET_KEY")
PINNED_IMAGES = {
    "postgres": r"pgvector/pgvector:\d+\.\d+\.\d+-pg18(-[a-z]+)?",
    "redis": r"redis:7\.\d+\.\d+(-[a-z0-9.]+)?",
    "flower": r"mher/flower:\d+\.\d+\.\d+",
}
GPU_MODEL_DEFAULT = "google/gemma-2b-it"
_DIGEST = r"(@sha256:[0-9a-f]{64})?"


@dataclass(frozen=True)
class Problem:
    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


def _command(service: dict) -> list[str]:
    command = service.get("command") or []
    return command.split() if isinstance(command, str) else [str(c) for c in command]


def _environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def _default(value: str) -> str:
    """The value a `${VAR:-default}` reference takes when VAR is unset (the literal otherwise)."""
    match = re.fullmatch(r"\$\{[A-Za-z_][A-Za-z0-9_]*(:?-)([^}]*)\}", value)
    return match.group(2) if match else value


def _depends(service: dict) -> dict[str, str]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {name: "service_started" for name in deps}
    return {name: (cond or {}).get("condition", "service_started") for name, cond in deps.items()}


def check_compose(compose: dict) -> list[Problem]:
    """Problems in a parsed docker-compose file (an empty list when it has the expected shape)."""
    problems: list[Problem] = []
    known = set(setting_env_vars().values())
    services = compose.get("services") or {}

    def problem(where: str, message: str) -> None:
        problems.append(Problem(where, message))

    for name in ("postgres", "redis", *RECSYS_SERVICES):
        if name not in services:
            problem("services", f"service {name!r} is missing")
    for name, pattern in PINNED_IMAGES.items():
        if name in services and not re.fullmatch(pattern + _DIGEST, str(services[name].get("image", ""))):
            problem(name, f"image {services[name].get('image')!r} is not pinned to an exact version "
                          f"(expected {pattern})")
    for name, service in services.items():
        if name in LONG_RUNNING_WITHOUT_PING:
            continue
        test = (service.get("healthcheck") or {}).get("test")
        if not test or (service.get("healthcheck") or {}).get("disable"):
            problem(name, "no healthcheck")
    if "postgres" in services and "pg_isready" not in str(services["postgres"].get("healthcheck", {}).get("test")):
        problem("postgres", "the healthcheck does not run pg_isready")
    if "redis" in services and "ping" not in str(services["redis"].get("healthcheck", {}).get("test")):
        problem("redis", "the healthcheck does not ping")

    if "migrate" in services:
        migrate = services["migrate"]
        if _command(migrate)[-2:] != ["db", "upgrade"]:
            problem("migrate", "the command is not `recsys db upgrade`")
        if str(migrate.get("restart", "no")) != "no":
            problem("migrate", "a one-shot service must not restart")
        if _depends(migrate).get("postgres") != "service_healthy":
            problem("migrate", "depends_on postgres must wait for service_healthy")
    for name in ("web", "beat", "worker", "worker-cpu"):
        if name not in services:
            continue
        deps = _depends(services[name])
        for dep, condition in (("postgres", "service_healthy"), ("redis", "service_healthy"),
                               ("migrate", "service_completed_successfully")):
            if deps.get(dep) != condition:
                problem(name, f"depends_on {dep} must wait for {condition}")

    if "web" in services and _command(services["web"])[:2] != ["recsys", "serve"] or \
            "--debug" in _command(services.get("web", {})):
        problem("web", "the command is not `recsys serve` (gunicorn)")
    beats = [name for name, s in services.items() if "--beat-only" in _command(s)]
    if beats != ["beat"]:
        problem("beat", f"exactly one service, beat, must run `recsys worker --beat-only` (found {beats or 'none'})")
    for name in ("worker", "worker-cpu"):
        if name in services:
            command = _command(services[name])
            if "--no-beat" not in command:
                problem(name, "a worker must run with --no-beat (the sweeper runs once, in beat)")
            if command[command.index("--concurrency") + 1 if "--concurrency" in command else 0] != "1":
                problem(name, "one process per worker: --concurrency 1")

    if "worker" in services:
        worker = services["worker"]
        env = _environment(worker)
        devices = (((worker.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices") or []
        if not any(d.get("driver") == "nvidia" and "gpu" in (d.get("capabilities") or []) for d in devices):
            problem("worker", "no NVIDIA GPU device reservation")
        if any(d.get("count") not in (None, 1) for d in devices):
            problem("worker", "one GPU per worker process (device_ids or count: 1)")
        if env.get("RECSYS_DEVICE") != "cuda":
            problem("worker", "RECSYS_DEVICE must be cuda")
        if _default(env.get("RECSYS_LLM_MODEL", "")) != GPU_MODEL_DEFAULT:
            problem("worker", f"RECSYS_LLM_MODEL must default to {GPU_MODEL_DEFAULT}")
        if not re.fullmatch(r"\$\{HF_TOKEN(:?-[^}]*)?\}", env.get("HF_TOKEN", "")):
            problem("worker", "HF_TOKEN must come from the environment (${HF_TOKEN:-})")
        if (worker.get("build") or {}).get("args", {}).get("TORCH") != "cuda":
            problem("worker", "the GPU worker's image must be built with TORCH=cuda")
        if "gpu" not in (worker.get("profiles") or []):
            problem("worker", "the GPU worker belongs to the `gpu` profile")
    if "worker-cpu" in services:
        cpu = services["worker-cpu"]
        if _environment(cpu).get("RECSYS_DEVICE") != "cpu":
            problem("worker-cpu", "RECSYS_DEVICE must be cpu")
        if "cpu" not in (cpu.get("profiles") or []):
            problem("worker-cpu", "the CPU worker belongs to the `cpu` profile")
    for name in ("worker", "worker-cpu"):
        if name in services:
            cache = _environment(services[name]).get("RECSYS_MODEL_CACHE")
            mounts = [str(v).split(":")[1] for v in services[name].get("volumes") or [] if ":" in str(v)]
            if not cache or cache not in mounts:
                problem(name, "RECSYS_MODEL_CACHE must be a mounted volume (the model cache)")

    values: dict[str, dict[str, str | None]] = {}
    for name in RECSYS_SERVICES:
        if name not in services:
            continue
        env = _environment(services[name])
        for var in env:
            if var not in known and var not in THIRD_PARTY_ENV:
                problem(name, f"environment variable {var} is not a recsys setting")
        for var in REQUIRED_ENV:
            if var not in env:
                problem(name, f"environment variable {var} is not set")
        if "@postgres:" not in env.get("DATABASE_URL", "@postgres:"):
            problem(name, "DATABASE_URL does not point at the postgres service")
        if "//redis:" not in env.get("CELERY_BROKER_URL", "//redis:"):
            problem(name, "CELERY_BROKER_URL does not point at the redis service")
        for var in CACHE_KEY_SETTINGS:
            values.setdefault(var, {})[name] = env.get(var)
    for var, by_service in values.items():
        if len(set(by_service.values())) > 1:
            problem("environment", f"{var} differs between services ({by_service}); it is part of the result "
                                   "cache key, so web and workers must agree")
    declared = set(compose.get("volumes") or {})
    for name, service in services.items():
        for volume in service.get("volumes") or []:
            source = str(volume).split(":")[0]
            if not source.startswith((".", "/")) and source not in declared:
                problem(name, f"volume {source!r} is not declared")
    return problems


def env_file_names(text: str) -> list[str]:
    """Variable names in an env file, including commented-out examples (`# NAME=value`)."""
    return re.findall(r"^\s*#?\s*([A-Z][A-Z0-9_]*)=", text, flags=re.MULTILINE)


def compose_variables(compose_text: str) -> dict[str, bool]:
    """Variables the compose file interpolates, and whether each is required (`${NAME:?message}`)."""
    found: dict[str, bool] = {}
    for name, operator in re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:?[?-])?", compose_text):
        found[name] = found.get(name, False) or operator.endswith("?")
    return found


def check_env_example(text: str) -> list[Problem]:
    """`.env.example` lists every recsys setting and nothing else."""
    known = set(setting_env_vars().values())
    names = env_file_names(text)
    problems = [Problem(".env.example", f"{name} is not a recsys setting") for name in names if name not in known]
    problems += [Problem(".env.example", f"setting {var} is missing") for var in sorted(known - set(names))]
    return problems


def check_env_file(text: str, compose_text: str) -> list[Problem]:
    """A `.env` beside the compose file: every name is a recsys setting or a variable the compose file
    reads, and every variable the compose file requires is set (and not empty)."""
    known = set(setting_env_vars().values())
    wanted = compose_variables(compose_text)
    values = dict(re.findall(r"^\s*([A-Z][A-Z0-9_]*)=(.*)$", text, flags=re.MULTILINE))
    problems = [Problem(".env", f"{name} is neither a recsys setting nor read by the compose file")
                for name in values if name not in known and name not in wanted]
    problems += [Problem(".env", f"{name} is not set; the compose file requires it")
                 for name, required in sorted(wanted.items()) if required and not values.get(name, "").strip()]
    return problems


def _stages(text: str) -> tuple[dict[str, str], list[tuple[str, list[str]]]]:
    """Global ARG defaults and the stages as (FROM image, instruction lines)."""
    lines = re.sub(r"\\\n", " ", text).splitlines()
    args: dict[str, str] = {}
    stages: list[tuple[str, list[str]]] = []
    for raw in lines:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        word = word.upper()
        if word == "FROM":
            image = rest.split()[0]
            image = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), image)
            stages.append((image, []))
        elif word == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name.strip()] = default.strip().strip('"')
        elif stages:
            stages[-1][1].append(line)
    return args, stages


def check_dockerfile(text: str) -> list[Problem]:
    """Multi-stage, slim and pinned base, a non-root final user, torch chosen by build argument."""
    problems: list[Problem] = []
    _, stages = _stages(text)
    if len(stages) < 2:
        problems.append(Problem("Dockerfile", "not multi-stage (one FROM)"))
    for image, _ in stages:
        if "slim" not in image:
            problems.append(Problem("Dockerfile", f"base image {image} is not a slim image"))
        if not re.search(r":\d+\.\d+\.\d+[^@]*" + _DIGEST + "$", image) and "@sha256:" not in image:
            problems.append(Problem("Dockerfile", f"base image {image} is not pinned to an exact version or digest"))
    if stages:
        users = [line.split()[1] for line in stages[-1][1] if line.upper().startswith("USER ")]
        if not users or users[-1].split(":")[0] in ("root", "0"):
            problems.append(Problem("Dockerfile", "the final stage runs as root (no USER)"))
    body = "\n".join(line for _, lines in stages for line in lines)
    if not re.search(r"^ARG TORCH(=|\s|$)", body, flags=re.MULTILINE):
        problems.append(Problem("Dockerfile", "no TORCH build argument"))
    for variant in ("cpu", "cuda"):
        if not re.search(rf"\b{variant}\)", body):
            problems.append(Problem("Dockerfile", f"TORCH={variant} is not handled"))
    return problems


def check_files(compose_path: Path, env_path: Path | None = None, dockerfile: Path | None = None) -> list[Problem]:
    """Read and check the files; a file that is missing or unreadable is one problem. An env file named
    `*.example` must list every setting; any other is the `.env` the compose file reads."""
    import yaml

    def read(path: Path) -> str | Problem:
        try:
            return path.read_text()
        except OSError as exc:
            return Problem(str(path), f"cannot be read: {exc.strerror or exc}")

    log.info("checking %s", ", ".join(str(p) for p in (compose_path, env_path, dockerfile) if p is not None))
    compose_text = read(compose_path)
    if isinstance(compose_text, Problem):
        return [compose_text]
    try:
        compose = yaml.safe_load(compose_text)
    except yaml.YAMLError as exc:
        return [Problem(str(compose_path), f"is not valid YAML: {str(exc).splitlines()[0]}")]
    problems = check_compose(compose if isinstance(compose, dict) else {})
    if env_path is not None:
        env_text = read(env_path)
        if isinstance(env_text, Problem):
            problems.append(env_text)
        elif env_path.name.endswith(".example"):
            problems += check_env_example(env_text)
        else:
            problems += check_env_file(env_text, compose_text)
    if dockerfile is not None:
        docker_text = read(dockerfile)
        problems += [docker_text] if isinstance(docker_text, Problem) else check_dockerfile(docker_text)
    return problems
