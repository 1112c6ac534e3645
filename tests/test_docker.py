"""docker/: the compose file's structure and settings, and its commands checked against the real CLIs.

No Docker engine is needed: compose.yaml is read with PyYAML and interpolated the way Compose does
(``${VAR}``, ``${VAR:-default}``, ``${VAR:?error}``, ``$$``) with the values of docker/.env.example.
"""

from __future__ import annotations

import copy
import fnmatch
import re
import shlex
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from sqlalchemy.engine import make_url
from typer.main import get_command

from ablate.cli import app

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
ENV_EXAMPLE = DOCKER / ".env.example"
DOCKERFILE = DOCKER / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
DOCS = ROOT / "docs" / "distributed.md"

# --------------------------------------------------------------------------------------
# Compose's variable interpolation
# --------------------------------------------------------------------------------------

_VAR = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


class MissingVariable(Exception):
    """A ``${VAR:?message}`` whose variable is unset or empty."""


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Substitute variables in one string as Compose does."""

    def sub(m: re.Match[str]) -> str:
        if m["escaped"]:
            return "$"
        name = m["name"] or m["bare"]
        value, op, arg = env.get(name), m["op"], m["arg"] or ""
        present = value is not None and (value != "" or not (op or "").startswith(":"))
        if op in ("-", ":-"):
            return value if present else arg  # type: ignore[return-value]
        if op in ("?", ":?"):
            if not present:
                raise MissingVariable(f"{name}: {arg}")
            return value  # type: ignore[return-value]
        if op in ("+", ":+"):
            return arg if present else ""
        return value or ""

    return _VAR.sub(sub, text)


def interpolate_all(node: Any, env: Mapping[str, str]) -> Any:
    """Interpolate every string value of a parsed compose file."""
    if isinstance(node, dict):
        return {k: interpolate_all(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate_all(v, env) for v in node]
    return interpolate(node, env) if isinstance(node, str) else node


def referenced(node: Any) -> set[str]:
    """The names of all variables a compose file refers to."""
    if isinstance(node, dict):
        return set().union(*(referenced(v) for v in node.values())) if node else set()
    if isinstance(node, list):
        return set().union(*(referenced(v) for v in node)) if node else set()
    if isinstance(node, str):
        return {m["name"] or m["bare"] for m in _VAR.finditer(node) if not m["escaped"]}
    return set()


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of an env file (comments and blank lines skipped)."""
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path.name}: not KEY=VALUE: {line!r}"
            out[key.strip()] = value.strip()
    return out


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def env() -> dict[str, str]:
    return read_env_file(ENV_EXAMPLE)


@pytest.fixture(scope="module")
def compose(raw: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    """compose.yaml as Compose sees it with docker/.env copied from .env.example."""
    return interpolate_all(raw, env)


def environment(service: Mapping[str, Any]) -> dict[str, str]:
    """A service's environment as a mapping (compose allows a mapping or KEY=VALUE items)."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


# --------------------------------------------------------------------------------------
# The interpolation helper itself (everything below relies on it)
# --------------------------------------------------------------------------------------


def test_interpolate_follows_compose_rules() -> None:
    env = {"SET": "x", "EMPTY": ""}
    assert interpolate("a${SET}b$SET", env) == "axbx"
    assert interpolate("${EMPTY:-d} ${EMPTY-d} ${UNSET-d} ${SET:-d}", env) == "d  d x"
    assert interpolate("$${SET} $$SET", env) == "${SET} $SET"
    assert interpolate("${SET:?no}", env) == "x"
    with pytest.raises(MissingVariable, match="EMPTY: say so"):
        interpolate("${EMPTY:?say so}", env)
    assert referenced({"a": ["${A:-x}", "$B", "$${NOT}"], "b": 1}) == {"A", "B"}


# --------------------------------------------------------------------------------------
# Structure
# --------------------------------------------------------------------------------------


def test_services_postgres_mlflow_worker(compose: dict[str, Any]) -> None:
    assert {"postgres", "mlflow", "worker"} <= set(compose["services"])


@pytest.mark.parametrize("name", ["mlflow", "worker", "ablate"])
def test_ablate_services_run_the_image_built_from_the_dockerfile(compose: dict[str, Any], name: str) -> None:
    service = compose["services"][name]
    build = service["build"]
    context = (COMPOSE.parent / build["context"]).resolve()
    assert context == ROOT
    assert (context / build["dockerfile"]).resolve() == DOCKERFILE
    assert service["image"] == compose["services"]["worker"]["image"], "one image for all of them"


def test_worker_reserves_nvidia_gpus(compose: dict[str, Any]) -> None:
    worker = compose["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    gpus = [d for d in devices if d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", [])]
    assert len(gpus) == 1
    count = gpus[0].get("count", "all")
    assert count == "all" or (isinstance(count, int) and count >= 1)
    # SIGTERM (docker compose stop) must reach ablate, which fails its trials cleanly on it.
    assert worker.get("init") is True
    assert worker.get("restart", "no") != "always", "a worker that finished must stay finished"


def test_healthchecks_and_healthy_dependencies(compose: dict[str, Any]) -> None:
    services = compose["services"]
    pg = " ".join(services["postgres"]["healthcheck"]["test"])
    assert "pg_isready" in pg
    ml = " ".join(services["mlflow"]["healthcheck"]["test"])
    assert "/health" in ml and ":5000" in ml
    assert services["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for dep in ("postgres", "mlflow"):
        assert services["worker"]["depends_on"][dep]["condition"] == "service_healthy"
    for name, service in services.items():
        for dep, how in (service.get("depends_on") or {}).items():
            if how.get("condition") == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep}, which has no healthcheck"


def test_mlflow_serves_ui_and_artifacts_on_port_5000(compose: dict[str, Any]) -> None:
    mlflow = compose["services"]["mlflow"]
    assert any(str(p).split(":")[-2:] == ["5000", "5000"] for p in mlflow["ports"])
    args = mlflow["command"]
    assert "--port=5000" in args and "--host=0.0.0.0" in args and "--serve-artifacts" in args
    destination = next(a.split("=", 1)[1] for a in args if a.startswith("--artifacts-destination="))
    assert any(v.endswith(":" + destination) for v in mlflow["volumes"]), "artifacts must be on a volume"
    assert "5432:5432" in [str(p) for p in compose["services"]["postgres"]["ports"]]


# --------------------------------------------------------------------------------------
# Secrets and settings
# --------------------------------------------------------------------------------------

_USERINFO = re.compile(r"[a-z][a-z0-9+.\-]*://([^/@\s]+)@")
_REF = r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::?[-?+][^}]*)?\}"


def strings(node: Any) -> list[str]:
    """Every string value in a parsed YAML document."""
    if isinstance(node, dict):
        return [s for v in node.values() for s in strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in strings(v)]
    return [node] if isinstance(node, str) else []


def secrets_problems(raw_compose: dict[str, Any], example_password: str) -> list[str]:
    """Literal secrets in a compose file: credentials in URLs or *PASSWORD* keys that are not ${...}."""
    problems = []
    for value in strings(raw_compose):
        for m in _USERINFO.finditer(re.sub(_REF, "REF", value)):
            if any(part != "REF" for part in m[1].split(":", 1)):
                problems.append(f"URL with literal credentials: {value}")
    for name, service in raw_compose["services"].items():
        for key, value in environment(service).items():
            if re.search("PASSWORD|SECRET|TOKEN", key) and not re.fullmatch(_REF, value):
                problems.append(f"{name}: {key} is not a ${{...}} reference")
    if example_password and any(example_password in v for v in strings(raw_compose)):
        problems.append("the example password appears in compose.yaml")
    return problems


def test_no_literal_password_in_compose(raw: dict[str, Any], env: dict[str, str]) -> None:
    assert secrets_problems(raw, env["POSTGRES_PASSWORD"]) == []
    urls = {v for v in strings(raw) if "${POSTGRES_PASSWORD" in v and "://" in v}
    assert len(urls) == 2, "the Optuna and MLflow URLs take the password from the env file"
    assert raw["services"]["postgres"]["env_file"] in (".env", "./.env", [".env"])
    # The checker has teeth: a literal password in a URL or an environment key is caught.
    leaked = copy.deepcopy(raw)
    leaked["services"]["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"] = (
        "postgresql://${POSTGRES_USER}:hunter2@postgres/mlflow")
    leaked["services"]["mlflow"]["environment"]["PGPASSWORD"] = "hunter2"
    found = secrets_problems(leaked, env["POSTGRES_PASSWORD"])
    assert len(found) == 2 and ":hunter2@" in found[0] and "PGPASSWORD" in found[1]


def test_env_example_defines_every_variable(raw: dict[str, Any], env: dict[str, str]) -> None:
    assert referenced(raw) - set(env) == set()
    assert set(env) - referenced(raw) == set(), ".env.example documents variables compose does not use"
    assert env["POSTGRES_PASSWORD"] and env["POSTGRES_USER"]
    assert re.fullmatch(r"[A-Za-z0-9_.~\-]+", env["POSTGRES_PASSWORD"]), "must be safe in a URL as it is"


def test_compose_refuses_to_start_without_a_password(raw: dict[str, Any], env: dict[str, str]) -> None:
    with pytest.raises(MissingVariable, match=r"POSTGRES_(USER|PASSWORD): .*docker/\.env"):
        interpolate_all(raw, {})
    with pytest.raises(MissingVariable, match="POSTGRES_PASSWORD"):
        interpolate_all(raw, {**env, "POSTGRES_PASSWORD": ""})


def test_secrets_stay_out_of_git_and_the_image() -> None:
    assert "/docker/.env" in (ROOT / ".gitignore").read_text().split()
    assert "docker/.env" in DOCKERIGNORE.read_text().split()


def test_optuna_and_mlflow_use_separate_databases(compose: dict[str, Any], env: dict[str, str]) -> None:
    services = compose["services"]
    storage = make_url(environment(services["worker"])["ABLATE_STORAGE"])
    backend = make_url(environment(services["mlflow"])["MLFLOW_BACKEND_STORE_URI"])
    assert storage.drivername == backend.drivername == "postgresql+psycopg"
    assert storage.host == backend.host == "postgres"
    assert (storage.username, storage.password) == (env["POSTGRES_USER"], env["POSTGRES_PASSWORD"])
    assert storage.database != backend.database
    # Optuna's database is the one the server creates; MLflow's is created by the init script.
    pg = services["postgres"]
    assert environment(pg)["POSTGRES_DB"] == storage.database
    init_scripts = [v.split(":")[0] for v in pg["volumes"] if ":/docker-entrypoint-initdb.d/" in v]
    created = set()
    for script in init_scripts:
        created |= set(re.findall(r"CREATE DATABASE\s+\"?(\w+)", (COMPOSE.parent / script).read_text(), re.I))
    assert backend.database in created
    assert storage.database not in created


def test_every_ablate_container_finds_the_same_stores(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert environment(services["ablate"]) == environment(services["worker"])
    assert environment(services["worker"])["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"


def test_mlflow_accepts_the_hosts_its_clients_use(raw: dict[str, Any], env: dict[str, str]) -> None:
    from mlflow.server.security_utils import get_allowed_hosts_from_env, is_allowed_host_header

    def allowed(extra: str) -> list[str]:
        value = environment(interpolate_all(raw, {**env, "MLFLOW_ALLOWED_HOSTS": extra})["services"]["mlflow"])
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MLFLOW_SERVER_ALLOWED_HOSTS", value["MLFLOW_SERVER_ALLOWED_HOSTS"])
            hosts = get_allowed_hosts_from_env()
        assert hosts is not None
        return hosts

    hosts = allowed("")
    worker_uri = environment(interpolate_all(raw, env)["services"]["worker"])["MLFLOW_TRACKING_URI"]
    assert is_allowed_host_header(hosts, urlsplit(worker_uri).netloc)
    for host in ("localhost:5000", "127.0.0.1:5000", "10.0.3.7:5000", "192.168.1.20:5000", "172.18.0.4:5000"):
        assert is_allowed_host_header(hosts, host), host
    for host in ("gpu-head:5000", "evil.example:5000", "172.99.0.1:5000"):
        assert not is_allowed_host_header(hosts, host), host
    assert is_allowed_host_header(allowed("gpu-head,gpu-head:5000"), "gpu-head:5000")


# --------------------------------------------------------------------------------------
# The Dockerfile and .dockerignore
# --------------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    lines = [ln for ln in DOCKERFILE.read_text().splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def dockerfile_args() -> dict[str, str]:
    """ARG defaults."""
    out = {}
    for word, rest in dockerfile_instructions():
        if word == "ARG" and "=" in rest:
            key, _, value = rest.partition("=")
            out[key] = value.strip('"')
    return out


def test_dockerfile_has_cuda_pytorch() -> None:
    args = dockerfile_args()
    ins = dockerfile_instructions()
    base = next(interpolate(rest, args) for word, rest in ins if word == "FROM")
    runs = [interpolate(rest, args) for word, rest in ins if word == "RUN"]
    cuda_base = re.search(r"nvidia/cuda|pytorch/pytorch:.*cuda", base)
    cuda_wheels = any(re.search(r"pip install .*--(extra-)?index-url\W+https://download\.pytorch\.org/whl/cu\d+"
                                r".*torch", r) for r in runs)
    assert cuda_base or cuda_wheels, (base, runs)


def test_dockerfile_installs_ablate_with_postgres_and_runs_it() -> None:
    ins = dockerfile_instructions()
    copies = [rest.split() for word, rest in ins if word == "COPY"]
    copied = {src for c in copies for src in c[:-1]}
    assert {"pyproject.toml", "README.md", "ablate", "studies"} <= copied
    installs = [shlex.split(rest) for word, rest in ins if word == "RUN" and "pip install" in rest]
    package = [cmd for cmd in installs if any(re.fullmatch(r"\.(\[[\w,]*postgres[\w,]*\])?", t) for t in cmd)]
    assert package, "the package must be pip-installed from the build context"
    assert any(".[postgres]" in cmd and "--no-deps" not in cmd for cmd in package), "psycopg comes with the extra"
    workdir = [rest for word, rest in ins if word == "WORKDIR"][-1]
    assert workdir == "/app"
    # ablate looks for studies/NAME.toml in the working directory: compose mounts the repo's there.
    ablate_service = yaml.safe_load(COMPOSE.read_text())["services"]["ablate"]
    assert f"../studies:{workdir}/studies:ro" in ablate_service["volumes"]
    entrypoint = [rest for word, rest in ins if word == "ENTRYPOINT"][-1]
    assert yaml.safe_load(entrypoint) == ["ablate"], "exec form, so signals reach ablate"
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["ablate"] == "ablate.cli:main"
    user = [rest for word, rest in ins if word == "USER"]
    assert user and user[-1] not in ("root", "0")


def test_dockerignore_keeps_the_context_small_but_complete() -> None:
    patterns = [ln.strip() for ln in DOCKERIGNORE.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    for local in (".git", ".venv", "mlflow.db", "optuna.db", "mlruns", "reports", ".mypy_cache", "docker/.env"):
        assert any(fnmatch.fnmatch(local, p) for p in patterns), f"{local} would be sent to the build"
    for needed in ("pyproject.toml", "README.md", "ablate", "studies", "docker/Dockerfile"):
        assert not any(fnmatch.fnmatch(needed, p) for p in patterns), f"{needed} is needed by the build"


# --------------------------------------------------------------------------------------
# The commands match the real CLIs
# --------------------------------------------------------------------------------------


def _cli(program: str) -> Any:
    if program == "ablate":
        return get_command(app)
    if program == "mlflow":
        from mlflow.cli import cli

        return cli
    raise AssertionError(f"no CLI known for {program!r}")


def check_cli(argv: list[str]) -> None:
    """Parse argv with the real CLI of argv[0]: subcommands, option names and argument count must fit."""
    cmd, args, path = _cli(argv[0]), list(argv[1:]), [argv[0]]
    while hasattr(cmd, "commands") and args and not args[0].startswith("-"):
        sub = cmd.commands.get(args[0])
        assert sub is not None, f"{' '.join(path)}: no command {args[0]!r} (has {sorted(cmd.commands)})"
        cmd, path = sub, [*path, args.pop(0)]
    names = {"--help"} | {o for p in cmd.params for o in (*p.opts, *p.secondary_opts) if o.startswith("-")}
    for token in args:
        if token == "--":
            break
        if token.startswith("-") and len(token) > 1:
            assert token.split("=", 1)[0] in names, f"{' '.join(path)}: no option {token!r}"
    try:
        cmd.make_context(" ".join(path), list(args), resilient_parsing=False)
    except Exception as e:
        if type(e).__name__ == "Exit" and getattr(e, "exit_code", 1) == 0:  # --help
            return
        raise AssertionError(f"{' '.join(path)} {shlex.join(args)}: {type(e).__name__}: {e}") from None


def service_argv(compose: dict[str, Any], name: str) -> list[str]:
    """The argv a service runs: its entrypoint (or the image's) followed by its command (or the image's)."""
    ins = dockerfile_instructions()
    service = compose["services"][name]
    entrypoint = service.get("entrypoint") or yaml.safe_load([r for w, r in ins if w == "ENTRYPOINT"][-1])
    command = service.get("command") or yaml.safe_load([r for w, r in ins if w == "CMD"][-1])
    as_list = [shlex.split(x) if isinstance(x, str) else list(x) for x in (entrypoint, command)]
    return as_list[0] + as_list[1]


@pytest.mark.parametrize("name", ["mlflow", "worker", "ablate"])
def test_service_commands_match_the_cli(compose: dict[str, Any], name: str) -> None:
    check_cli(service_argv(compose, name))


def test_worker_command_takes_the_study_and_its_devices(compose: dict[str, Any], env: dict[str, str]) -> None:
    argv = service_argv(compose, "worker")
    assert argv[:3] == ["ablate", "worker", env["ABLATE_STUDY"]]
    assert "--storage" not in argv, "the storage URL (with its password) comes from ABLATE_STORAGE"
    # A machine with four GPUs: one worker process per device.
    four = service_argv(interpolate_all(yaml.safe_load(COMPOSE.read_text()),
                                        {**env, "ABLATE_DEVICES": "cuda:0,cuda:1,cuda:2,cuda:3"}), "worker")
    check_cli(four)
    assert four[four.index("--devices") + 1] == "cuda:0,cuda:1,cuda:2,cuda:3"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c.__setitem__(c.index("--devices"), "--device"), "no option '--device'"),
        (lambda c: c.__setitem__(0, "workers"), "no command 'workers'"),
        (lambda c: c.pop(1), "Missing (argument|parameter)"),
        (lambda c: c.insert(2, "extra"), "unexpected extra argument"),
        (lambda c: c.__setitem__(c.index("--heartbeat") + 1, "0"), "--heartbeat"),
    ],
    ids=["unknown-option", "unknown-command", "missing-study", "extra-argument", "heartbeat-below-min"],
)
def test_command_checker_catches_mistakes(compose: dict[str, Any], change: Any, message: str) -> None:
    broken = copy.deepcopy(compose)
    command = broken["services"]["worker"]["command"]
    change(command)
    with pytest.raises(AssertionError, match=message):
        check_cli(service_argv(broken, "worker"))


def test_checker_catches_a_wrong_mlflow_flag(compose: dict[str, Any]) -> None:
    broken = copy.deepcopy(compose)
    broken["services"]["mlflow"]["command"].append("--artifact-destination=/x")
    with pytest.raises(AssertionError, match="no option '--artifact-destination=/x'"):
        check_cli(service_argv(broken, "mlflow"))


# --------------------------------------------------------------------------------------
# docs/distributed.md: its commands run
# --------------------------------------------------------------------------------------


def doc_commands() -> list[list[str]]:
    """Shell commands in the fenced code blocks of docs/distributed.md (continuations joined)."""
    blocks = re.findall(r"```(?:bash|sh|console)?\n(.*?)```", DOCS.read_text(), re.S)
    commands = []
    for block in blocks:
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                commands.append(shlex.split(line))
    return commands


# Options of `docker compose` and of its subcommands that take a value.
_COMPOSE_VALUE_OPTS = {"-f", "--file", "--profile", "--env-file", "-p", "--project-name", "--project-directory"}
_SUBCOMMAND_VALUE_OPTS = {
    "up": {"--scale", "-t", "--timeout", "--exit-code-from", "--wait-timeout"},
    "run": {"-e", "--env", "-v", "--volume", "-u", "--user", "--name", "-w", "--workdir", "--entrypoint",
            "-p", "--publish", "-l", "--label"},
    "logs": {"-n", "--tail", "--since", "--until"},
    "down": {"-t", "--timeout", "--rmi"},
    "stop": {"-t", "--timeout"},
}


def compose_services_named(argv: list[str]) -> tuple[str, list[str], list[str]]:
    """(subcommand, services named, the command after the service for `run`) of a docker compose line."""
    args = argv[2:]
    while args and args[0].startswith("-"):
        if args.pop(0) in _COMPOSE_VALUE_OPTS:
            args.pop(0)
    sub, args = args[0], args[1:]
    takes_value = _SUBCOMMAND_VALUE_OPTS.get(sub, set())
    services: list[str] = []
    rest: list[str] = []
    while args:
        token = args.pop(0)
        if token in takes_value:
            value = args.pop(0)
            if token == "--scale":
                services.append(value.split("=")[0])
        elif not token.startswith("-"):
            services.append(token)
            if sub in ("run", "exec"):
                rest = args
                break
    return sub, services, rest


def test_docs_commands_match_the_cli_and_the_compose_file(raw: dict[str, Any]) -> None:
    commands = doc_commands()
    ablate_lines = [c for c in commands if c[0] == "ablate"]
    compose_lines = [c for c in commands if c[:2] == ["docker", "compose"]]
    assert len(ablate_lines) >= 3 and len(compose_lines) >= 8, "the guide shows both ways"
    for argv in ablate_lines:
        check_cli(argv)
    for argv in compose_lines:
        sub, services, rest = compose_services_named(argv)
        assert set(services) <= set(raw["services"]), f"{shlex.join(argv)}: unknown service"
        if sub == "run" and services == ["ablate"]:
            check_cli(["ablate", *rest])
    used = {flag for argv in [*ablate_lines, *compose_lines] for flag in argv if flag.startswith("--")}
    assert {"--storage", "--tracking-uri", "--jobs", "--devices"} <= used
