"""The production shape, without a Docker engine: docker-compose.yml, the Dockerfile and .env.example
are read and checked against the settings the code reads (recsys.platform.deploy), and the check is
shown to fail when a service, a pin or a setting is taken away. `docker-compose config` (Debian's
package) validates the compose file where it is installed."""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from recsys.cli import cli
from recsys.config import Settings, setting_env_vars
from recsys.platform import deploy

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
ENV_EXAMPLE = ROOT / ".env.example"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def messages(problems) -> list[str]:
    return [str(p) for p in problems]


def test_the_repository_files_pass_every_check():
    assert messages(deploy.check_files(COMPOSE, ENV_EXAMPLE, DOCKERFILE)) == []


def test_each_env_var_name_is_the_one_from_env_reads(monkeypatch):
    """setting_env_vars() is the single list of names; from_env must read every one of them."""
    names = setting_env_vars()
    assert set(names) == {f for f in Settings.__dataclass_fields__}
    for var in names.values():
        monkeypatch.delenv(var, raising=False)
    defaults = Settings.from_env()
    for field, var in names.items():
        value = getattr(defaults, field)
        if isinstance(value, bool):
            raw = "false" if value else "true"
        elif isinstance(value, int):
            raw = str(value + 7)
        elif field == "embedding_type":
            raw = "halfvec"
        elif field == "log_format":
            raw = "json"
        else:
            raw = "/tmp/recsys-env-probe" if field in ("home", "model_cache") else "probe-value"
        with monkeypatch.context() as m:
            m.setenv(var, raw)
            assert getattr(Settings.from_env(), field) != value, f"{var} does not change Settings.{field}"


def test_no_code_reads_an_environment_variable_that_is_not_a_setting():
    """Every RECSYS_* (and DATABASE_URL / CELERY_BROKER_URL) the code reads is a setting, so it is in
    .env.example and the README table by the test above and the compose check."""
    known = set(setting_env_vars().values())
    pattern = re.compile(r"(?:environ\.get|getenv|environ\.setdefault|environ\[|_env|_int|_bool|_choice)"
                         r"""\(?\s*["']([A-Z][A-Z0-9_]+)["']""")
    read = set()
    for package in ("recsys", "web", "worker"):
        for path in (ROOT / package).rglob("*.py"):
            read |= {(name, path.relative_to(ROOT)) for name in pattern.findall(path.read_text())}
    ours = {(name, path) for name, path in read
            if name.startswith("RECSYS_") or name in ("DATABASE_URL", "CELERY_BROKER_URL")}
    assert ours, "the scan found nothing; the pattern is wrong"
    assert sorted((n, str(p)) for n, p in ours if n not in known) == []


def test_env_example_names_every_setting_and_nothing_else():
    assert messages(deploy.check_env_example(ENV_EXAMPLE.read_text())) == []
    names = deploy.env_file_names(ENV_EXAMPLE.read_text())
    assert len(names) == len(set(names)), "a setting is listed twice"


def _without(compose: dict, *path: str) -> dict:
    changed = copy.deepcopy(compose)
    node = changed
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    return changed


def _with(compose: dict, value, *path: str) -> dict:
    changed = copy.deepcopy(compose)
    node = changed
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return changed


MUTATIONS = {
    "service removed": (lambda c: _without(c, "services", "beat"), "service 'beat' is missing"),
    "postgres unpinned": (lambda c: _with(c, "pgvector/pgvector:pg18", "services", "postgres", "image"),
                          "not pinned"),
    "redis unpinned": (lambda c: _with(c, "redis:7-alpine", "services", "redis", "image"), "not pinned"),
    "healthcheck removed": (lambda c: _without(c, "services", "web", "healthcheck"), "web: no healthcheck"),
    "start order lost": (lambda c: _with(c, ["postgres", "redis"], "services", "worker", "depends_on"),
                         "depends_on migrate must wait for service_completed_successfully"),
    "unknown variable": (lambda c: _with(c, {**c["services"]["web"]["environment"], "RECSYS_EF_SERACH": "40"},
                                         "services", "web", "environment"), "RECSYS_EF_SERACH is not a recsys setting"),
    "required setting removed": (lambda c: _with(c, {k: v for k, v in c["services"]["migrate"]["environment"].items()
                                                     if k != "DATABASE_URL"}, "services", "migrate", "environment"),
                                 "DATABASE_URL is not set"),
    "GPU reservation removed": (lambda c: _without(c, "services", "worker", "deploy"), "no NVIDIA GPU device"),
    "second sweeper": (lambda c: _with(c, ["recsys", "worker", "--beat-only"], "services", "worker", "command"),
                       "exactly one service, beat"),
    "models disagree": (lambda c: _with(c, {**c["services"]["worker"]["environment"], "RECSYS_LLM_MODEL": "other"},
                                        "services", "worker", "environment"), "RECSYS_LLM_MODEL differs"),
}


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_the_compose_check_fails_when_something_is_taken_away(compose, name):
    mutate, expected = MUTATIONS[name]
    assert deploy.check_compose(compose) == []
    found = messages(deploy.check_compose(mutate(compose)))
    assert any(expected in line for line in found), found


def test_the_env_example_check_fails_when_a_setting_is_missing_or_unknown():
    text = ENV_EXAMPLE.read_text()
    dropped = re.sub(r"^RECSYS_EF_SEARCH=.*\n", "", text, flags=re.MULTILINE)
    assert messages(deploy.check_env_example(dropped)) == [".env.example: setting RECSYS_EF_SEARCH is missing"]
    assert messages(deploy.check_env_example(text + "RECSYS_EF_SERACH=40\n")) == [
        ".env.example: RECSYS_EF_SERACH is not a recsys setting"]


DOCKERFILE_MUTATIONS = {
    "single stage": (lambda t: t.replace("FROM ${PYTHON_IMAGE} AS runtime", "").replace(
        "COPY --from=build /opt/venv /opt/venv\n", "").replace("COPY --from=build /app /app\n", ""), "not multi-stage"),
    "runs as root": (lambda t: t.replace("USER recsys", ""), "runs as root"),
    "unpinned base": (lambda t: t.replace("python:3.11.14-slim-bookworm", "python:3.11-slim"), "not pinned"),
    "fat base": (lambda t: t.replace("python:3.11.14-slim-bookworm", "python:3.11.14-bookworm"), "not a slim image"),
    "torch fixed": (lambda t: t.replace("ARG TORCH=cpu", ""), "no TORCH build argument"),
}


@pytest.mark.parametrize("name", list(DOCKERFILE_MUTATIONS))
def test_the_dockerfile_check_fails_when_a_property_is_lost(name):
    mutate, expected = DOCKERFILE_MUTATIONS[name]
    text = DOCKERFILE.read_text()
    assert deploy.check_dockerfile(text) == []
    changed = mutate(text)
    assert changed != text
    found = messages(deploy.check_dockerfile(changed))
    assert any(expected in line for line in found), found


def test_deploy_check_command_names_the_missing_setting_and_exits_1(tmp_path):
    env = tmp_path / ".env"
    env.write_text("POSTGRES_PASSWORD=secret\nHF_TOKEN=\n")
    result = CliRunner().invoke(cli, ["deploy", "check", "--compose", str(COMPOSE), "--env-file", str(env),
                                      "--dockerfile", str(DOCKERFILE)])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "recsys: error: .env: RECSYS_SECRET_KEY is not set; the compose file requires it"]
    env.write_text("POSTGRES_PASSWORD=secret\nRECSYS_SECRET_KEY=k\n")
    ok = CliRunner().invoke(cli, ["deploy", "check", "--compose", str(COMPOSE), "--env-file", str(env)])
    assert ok.exit_code == 0 and ok.output.strip() == "ok", ok.output
    missing = CliRunner().invoke(cli, ["deploy", "check", "--compose", str(tmp_path / "nope.yml")])
    assert missing.exit_code == 1
    assert len(missing.output.strip().splitlines()) == 1 and "nope.yml" in missing.output


def _docker_compose_config(directory: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["docker-compose", "--profile", "gpu", "--profile", "cpu", "config", "-q"],
                          cwd=directory, env={**os.environ, **env}, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(shutil.which("docker-compose") is None,
                    reason="Debian's docker-compose is not installed (`make test` installs it through apt when it can)")
def test_docker_compose_config_validates_the_file_and_rejects_a_broken_one(tmp_path, compose):
    env = {"POSTGRES_PASSWORD": "secret", "RECSYS_SECRET_KEY": "key"}
    good = tmp_path / "good"
    good.mkdir()
    shutil.copy(COMPOSE, good / "docker-compose.yml")
    result = _docker_compose_config(good, env)
    assert result.returncode == 0, result.stderr

    missing_secret = _docker_compose_config(good, {"POSTGRES_PASSWORD": "secret", "RECSYS_SECRET_KEY": ""})
    assert missing_secret.returncode != 0 and "RECSYS_SECRET_KEY" in missing_secret.stderr

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "docker-compose.yml").write_text(yaml.safe_dump(_without(compose, "services", "redis")))
    result = _docker_compose_config(broken, env)
    assert result.returncode != 0 and "redis" in result.stderr
