"""docker-compose.yml, README and label configs agree with the real CLI and settings (Docker does not run here)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from backend.commands.cli import build_parser
from backend.labelstudio.label_config import parse_label_config
from backend.settings import ENV_VARS, Settings

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_settings_read_exactly_the_documented_variables():
    source = (ROOT / "backend" / "settings.py").read_text()
    read = set(re.findall(r'(?:text|number|flag|secret)\(\s*"([A-Z_]+)"', source))
    read |= set(re.findall(r'env\.get\("([A-Z_]+)"', source))
    assert read == set(ENV_VARS)
    readme = (ROOT / "README.md").read_text()
    missing = [name for name in ENV_VARS if f"`{name}`" not in readme]
    assert not missing, f"README.md does not document {missing}"


def test_compose_backend_command_and_env_match_the_cli(compose):
    backend = compose["services"]["backend"]
    argv = backend["command"]
    assert argv[0] == "sam-backend"
    args = build_parser().parse_args(argv[1:])  # exits (fails the test) on an unknown option
    assert args.command == "serve" and args.port == 9090
    env = backend["environment"]
    assert set(env) <= set(ENV_VARS), set(env) - set(ENV_VARS)
    assert env["REDIS_URL"].startswith("redis://redis:")
    assert env["LABEL_STUDIO_URL"] == "http://label-studio:8080"
    resolved = {k: re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(v)) for k, v in env.items()}
    Settings.from_env(resolved)  # every default in the file is a valid setting
    port = str(args.port)
    assert any(p.endswith(f":{port}") for p in backend["ports"])
    assert port in " ".join(backend["healthcheck"]["test"])
    dockerfile = backend["build"]["dockerfile_inline"]
    assert "torch==2.14.1" in dockerfile and "pip install --no-cache-dir ." in dockerfile
    cmd_line = re.search(r"CMD (\[.*\])", dockerfile).group(1)
    assert yaml.safe_load(cmd_line) == argv


def test_compose_keeps_jobs_and_the_cache_in_separate_redis_instances(compose):
    store = shlex.split(compose["services"]["redis"]["command"])
    assert store[0] == "redis-server" and store[store.index("--maxmemory-policy") + 1] == "noeviction"
    assert "--maxmemory" not in store and "--save" in store
    assert store[store.index("--appendonly") + 1] == "yes"  # a crash loses no queued job
    cache = compose["services"]["redis-cache"]
    words = shlex.split(cache["command"].replace("${REDIS_MAXMEMORY:-4gb}", "4gb"))
    assert words[0] == "redis-server"
    assert words[words.index("--maxmemory-policy") + 1] == "allkeys-lru"
    assert words[words.index("--maxmemory") + 1] == "4gb"
    assert "--save" in words
    env = compose["services"]["backend"]["environment"]
    assert env["CACHE_REDIS_URL"].startswith("redis://redis-cache:") and env["REDIS_URL"].startswith("redis://redis:")
    for service in ("backend", "worker"):
        assert compose["services"][service]["environment"]["CACHE_REDIS_URL"] == env["CACHE_REDIS_URL"]
        for dependency in ("redis", "redis-cache"):
            assert compose["services"][service]["depends_on"][dependency]["condition"] == "service_healthy"
    # the README's same stack without Docker sets the two servers up the same way
    readme = (ROOT / "README.md").read_text()
    jobs_line, cache_line = [shlex.split(line.split("&")[0]) for line in re.findall(r"^ *redis-server .*$", readme, re.M)]
    assert jobs_line[jobs_line.index("--maxmemory-policy") + 1] == "noeviction" and "--maxmemory" not in jobs_line
    assert jobs_line[jobs_line.index("--appendonly") + 1] == "yes"
    assert cache_line[cache_line.index("--maxmemory-policy") + 1] == "allkeys-lru" and "--maxmemory" in cache_line
    ls = compose["services"]["label-studio"]["environment"]
    assert ls["LABEL_STUDIO_ML_BLOCK_LOCAL_IP"] == "false"


@pytest.mark.parametrize("path", sorted((ROOT / "label_config").glob("*.xml")), ids=lambda p: p.name)
def test_ready_label_configs_are_servable(path):
    config = parse_label_config(path.read_text())
    assert config.prompt_tags, "no smart KeyPointLabels / RectangleLabels"
    assert config.outputs
    # every label an annotator can pick on a smart tool has somewhere to go
    from label_studio_sdk.label_interface import LabelInterface

    interface = LabelInterface(path.read_text())
    for name in config.prompt_tags:
        for label in interface.get_control(name).labels:
            assert config.outputs_for(label, "both")


def test_readme_starts_with_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", readme, re.S)
    assert "sam-backend serve" in blocks[0]
    assert "pytest" in blocks[1] or ".ci/run" in blocks[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pytest" in ci


def test_compose_worker_runs_the_real_worker_command(compose):
    worker = compose["services"]["worker"]
    args = build_parser().parse_args(worker["command"][1:])
    assert worker["command"][0] == "sam-backend" and args.command == "worker"
    assert set(worker["environment"]) <= set(ENV_VARS)
    assert worker["environment"]["REDIS_URL"] == compose["services"]["backend"]["environment"]["REDIS_URL"]
    # the backend leaves embedding to this service instead of starting its own worker
    assert compose["services"]["backend"]["environment"]["WARM_WORKERS"] == "0"
    assert worker["build"]["dockerfile_inline"] == compose["services"]["backend"]["build"]["dockerfile_inline"]


def test_readme_sections_cited_elsewhere_exist():
    # docker-compose.yml once sent admins to a README heading that did not exist
    headings = set(re.findall(r"^#+ (.+?)\s*$", (ROOT / "README.md").read_text(), flags=re.M))
    for name in ("docker-compose.yml", ".ci/run"):
        text = (ROOT / name).read_text()
        cited = re.findall(r'README(?:\.md)?,? (?:section|\(")\s*"?([^")\n]+)"', text)
        for section in cited:
            assert section.strip() in headings, f"{name} cites README section {section!r}"


def test_the_package_reads_no_files_from_its_source_tree():
    # bench prelabel once read label_config/ beside the sources: absent from an installed package
    # (the Docker image installs with `pip install .`)
    offenders = [str(p.relative_to(ROOT)) for package in ("backend", "model") for p in (ROOT / package).rglob("*.py")
                 if "__file__" in p.read_text()]
    assert offenders == []
    from backend.bench.prelabel import _CONFIG

    assert {o.kind for o in parse_label_config(_CONFIG).outputs} == {"polygon"}
