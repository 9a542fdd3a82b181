"""Static checks of the deployment files: prefect.yaml, the Dockerfiles, infra/compose.yaml, infra/k8s/.

Nothing is built or started (no Docker daemon, cluster or Prefect server): every file is parsed and each
reference it makes is resolved against the repository, the installed packages and the code it runs:
flow entrypoints are loaded the way a Prefect worker loads them, probe paths are looked up in the service's
own OpenAPI routes, RECSYS_SERVING_* settings are validated by ``ServingConfig.from_env``.
"""

from __future__ import annotations

import ast
import asyncio
import functools
import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
PREFECT_YAML = ROOT / "prefect.yaml"
COMPOSE = INFRA / "compose.yaml"
K8S = INFRA / "k8s"
DOCKERFILES = sorted((INFRA / "docker").glob("*.Dockerfile"))
SERVICE_REF = "recsys.serving.service:RecommendationService"


@functools.cache
def pyproject() -> dict[str, Any]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def dependency_names() -> set[str]:
    names = set()
    for spec in pyproject()["project"]["dependencies"]:
        names.add(re.split(r"[\s<>=!~;\[]", spec, maxsplit=1)[0].lower().replace("_", "-"))
    return names


def pinned_version(package: str) -> str:
    for spec in pyproject()["project"]["dependencies"]:
        match = re.fullmatch(rf"{re.escape(package)}==([\w.]+)", spec.strip())
        if match:
            return match.group(1)
    raise AssertionError(f"pyproject.toml does not pin {package} with ==")


@functools.cache
def prefect_config() -> dict[str, Any]:
    return yaml.safe_load(PREFECT_YAML.read_text())


@functools.cache
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@functools.cache
def k8s_docs() -> tuple[tuple[str, dict[str, Any]], ...]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return tuple(docs)


def k8s_one(kind: str) -> dict[str, Any]:
    found = [d for _, d in k8s_docs() if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind} in infra/k8s, found {len(found)}"
    return found[0]


@functools.cache
def service_routes() -> dict[str, set[str]]:
    """HTTP path -> methods, from the BentoML service's own OpenAPI document (its APIs + BentoML's routes)."""
    from recsys.serving.service import RecommendationService

    paths = RecommendationService.openapi_spec.asdict()["paths"]
    return {path: {m.upper() for m in ops} for path, ops in paths.items()}


def deployments() -> list[dict[str, Any]]:
    return prefect_config()["deployments"]


def deployment(name: str) -> dict[str, Any]:
    found = [d for d in deployments() if d["name"] == name]
    assert len(found) == 1, f"prefect.yaml: expected one deployment named {name!r}, found {len(found)}"
    return found[0]


@functools.cache
def load_flow(entrypoint: str):
    """The flow object, loaded the way `prefect deploy` and the worker load it (file path, then attribute)."""
    from prefect.flows import load_flow_from_entrypoint

    path, _, name = entrypoint.rpartition(":")
    return load_flow_from_entrypoint(f"{ROOT / path}:{name}", use_placeholder_flow=False)


# -- commands (Dockerfile CMD, compose `command`) -----------------------------------------------------------
def command_lines(command: str | list[str]) -> list[list[str]]:
    """argv of each command; `sh -c "a && b; c"` is split into its commands."""
    argv = shlex.split(command) if isinstance(command, str) else list(command)
    if argv[:2] == ["sh", "-c"] or argv[:2] == ["bash", "-c"]:
        lines: list[list[str]] = []
        for part in re.split(r"&&|\|\||;", argv[2]):
            words = [w for w in shlex.split(part) if not w.startswith((">", "2>"))]
            if words:
                lines.append(words)
        return lines
    return [argv]


@functools.cache
def console_scripts() -> dict[str, str]:
    """Console script -> the distribution providing it (installed environment)."""
    scripts = {}
    for ep in importlib.metadata.entry_points(group="console_scripts"):
        scripts[ep.name] = (ep.dist.name if ep.dist else "").lower().replace("_", "-")
    return scripts


def module_defines(module: str, attr: str) -> bool:
    """Whether ``module`` (found without importing it) defines ``attr`` at top level."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return False
    tree = ast.parse(Path(spec.origin).read_text())
    for node in tree.body:
        if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.name == attr:
            return True
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == attr for t in node.targets
        ):
            return True
    return False


def check_command(argv: list[str], where: str) -> None:
    """The executable is a console script of a pinned dependency (or the project's own); every
    ``module:attr`` argument resolves to a definition and every ``*.py`` argument is a file of the repo."""
    exe = argv[0]
    own_scripts = set(pyproject()["project"].get("scripts", {}))
    if exe in own_scripts:
        pass
    elif exe in console_scripts():
        dist = console_scripts()[exe]
        assert dist in dependency_names(), f"{where}: {exe} comes from {dist}, not a pyproject dependency"
    else:
        raise AssertionError(
            f"{where}: {exe!r} is neither a project script nor a dependency's console script"
        )
    for arg in argv[1:]:
        if re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", arg):
            module, attr = arg.split(":")
            assert module_defines(module, attr), f"{where}: {arg} does not resolve to a definition"
        elif arg.endswith(".py"):
            assert (ROOT / arg).is_file(), f"{where}: {arg} is not a file of the repository"


@pytest.mark.parametrize(
    "argv",
    [
        ["bentoml", "serve", "recsys.serving.service:NoSuchService"],
        ["streamlit", "run", "dashboard/no_such_app.py"],
        ["no-such-tool", "start"],
    ],
)
def test_command_check_catches_a_wrong_reference(argv: list[str]):
    with pytest.raises(AssertionError):
        check_command(argv, "example")


def option(argv: list[str], name: str) -> str:
    assert name in argv, f"{argv} has no {name}"
    return argv[argv.index(name) + 1]


# -- prefect.yaml ------------------------------------------------------------------------------------------
def test_prefect_yaml_is_accepted_by_prefects_own_model():
    from prefect.cli.deploy._models import PrefectYamlModel

    model = PrefectYamlModel.model_validate(prefect_config())
    names = [d.name for d in model.deployments]
    assert sorted(names) == sorted(set(names)), f"duplicate deployment names: {names}"
    assert {"nightly-incremental", "pipeline-quick", "build-features", "ab-test"} <= set(names)
    for d in model.deployments:
        assert d.work_pool is not None and d.work_pool.name == "recsys-process", d.name
        # An explicit (possibly empty) schedule list: `prefect deploy --all` never stops to ask for one.
        assert d.schedules is not None, f"{d.name}: no `schedules` key"


@pytest.mark.parametrize("name", [d["name"] for d in prefect_config()["deployments"]])
def test_deployment_entrypoint_is_a_flow_and_its_parameters_validate(name: str):
    import prefect
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools import validate

    entrypoint = deployment(name)["entrypoint"]
    path, sep, func = entrypoint.rpartition(":")
    assert sep and path.endswith(".py"), f"{name}: entrypoint {entrypoint!r} is not path.py:function"
    assert (ROOT / path).is_file(), f"{name}: {path} does not exist"
    flow = load_flow(entrypoint)
    assert isinstance(flow, prefect.Flow), f"{name}: {entrypoint} is not a Prefect flow"
    # A run with the deployment's parameters alone (the schedule, or an on-demand run with no overrides)
    # passes the server's schema check and the flow's own validation.
    params = deployment(name).get("parameters") or {}
    schema = parameter_schema(flow).model_dump_for_openapi()
    validate(params, schema, raise_on_error=True, ignore_required=False)
    flow.validate_parameters(params)


def test_pipeline_quick_deployment_runs_the_quick_profile():
    from recsys.flows.pipeline import PipelineConfig

    flow = load_flow(deployment("pipeline-quick")["entrypoint"])
    hydrated = flow.validate_parameters(deployment("pipeline-quick")["parameters"])["config"]
    # The loaded flow module has its own class objects: compare what the configs say, not their types.
    assert hydrated.model_dump(mode="json") == PipelineConfig.for_profile("quick").model_dump(mode="json")


def test_pipeline_quick_rejects_a_misspelt_field():
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools import ValidationError, validate

    schema = parameter_schema(load_flow(deployment("pipeline-quick")["entrypoint"])).model_dump_for_openapi()
    with pytest.raises(ValidationError, match="profle"):
        validate({"config": {"profle": "quick"}}, schema, raise_on_error=True)


def test_nightly_schedule_fires_at_two_utc_every_day():
    import datetime

    from prefect.client.schemas.objects import ConcurrencyLimitStrategy
    from prefect.server.schemas.schedules import CronSchedule

    nightly = deployment("nightly-incremental")
    (schedule,) = nightly["schedules"]
    assert schedule.get("active", True) is True
    # The server's own schedule model (validates the cron and the timezone) computes the run times; the
    # start is in Europe's DST switch night, where a local-time schedule would drift by an hour.
    cron = CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])
    start = datetime.datetime(2026, 3, 29, 3, 0, tzinfo=datetime.UTC)
    dates = asyncio.run(cron.get_dates(n=3, start=start))
    assert [d.isoformat() for d in dates] == [f"2026-03-{day}T02:00:00+00:00" for day in (30, 31)] + [
        "2026-04-01T02:00:00+00:00"
    ]
    assert nightly["parameters"] == {"dataset": "synthetic", "method": "sdft"}
    assert nightly["concurrency_limit"]["limit"] == 1
    ConcurrencyLimitStrategy(nightly["concurrency_limit"]["collision_strategy"])
    on_demand = [d["name"] for d in deployments() if d["name"] != "nightly-incremental"]
    assert all(not deployment(n)["schedules"] for n in on_demand), on_demand


def test_prefect_server_can_store_the_scheduled_runs(tmp_path):
    """The server's scheduler stores the runs of a schedule with one ORM bulk INSERT whose rows carry a
    ``state`` (``_insert_scheduled_flow_runs`` in prefect/server/models/deployments.py). ``FlowRun.state`` is
    a hybrid property; SQLAlchemy 2.1 refuses such a row ("Can't evaluate bulk DML statement"), so with it a
    local `prefect server start` never creates the nightly runs. Measured: fails on 2.1.9, passes on
    2.0.58."""
    import datetime
    import uuid

    import sqlalchemy as sa
    from prefect.server import schemas
    from prefect.server.database import orm_models
    from sqlalchemy.orm import Session

    engine = sa.create_engine(f"sqlite:///{tmp_path / 'prefect.db'}")
    orm_models.FlowRun.__table__.create(engine)
    when = datetime.datetime(2026, 1, 2, 2, 0, tzinfo=datetime.UTC)
    state = schemas.states.Scheduled(scheduled_time=when)
    row = {
        "id": uuid.uuid4(),
        "flow_id": uuid.uuid4(),
        "parameters": deployment("nightly-incremental")["parameters"],
        "idempotency_key": f"scheduled {when}",
        "tags": [],
        "state": state.model_dump(exclude={"id", "timestamp", "created", "updated"}),
        "state_type": schemas.states.StateType.SCHEDULED,
        "state_name": "Scheduled",
        "expected_start_time": when,
    }
    with Session(engine) as session:
        session.execute(sa.insert(orm_models.FlowRun), [row])
        stored = session.execute(sa.select(orm_models.FlowRun.parameters)).scalars().all()
    assert stored == [{"dataset": "synthetic", "method": "sdft"}]


def test_pull_step_moves_the_worker_into_the_project_dir(monkeypatch, tmp_path):
    from prefect.utilities.importtools import import_object
    from prefect.utilities.templating import apply_values

    # What the worker does when a run starts (prefect.deployments.steps.core.run_step, minus the API
    # lookups for blocks and variables, which these steps do not use): render {{ $VAR }} from its own
    # environment, then call the step.
    monkeypatch.setenv("RECSYS_PROJECT_DIR", str(ROOT))
    monkeypatch.chdir(tmp_path)
    for step in prefect_config()["pull"]:
        ((fqn, inputs),) = step.items()
        import_object(fqn)(**apply_values(inputs, dict(os.environ)))
    assert Path.cwd().resolve() == ROOT
    assert Path(deployment("pipeline-quick")["entrypoint"].rpartition(":")[0]).is_file()


# -- Dockerfiles -------------------------------------------------------------------------------------------
def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; comments dropped, continuation lines joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append((keyword.upper(), args.strip()))
    assert not pending, f"{path.name}: ends inside a continued line"
    return out


def exec_form(args: str, where: str) -> list[str]:
    argv = json.loads(args)
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv), f"{where}: not exec (JSON) form"
    return argv


def test_there_is_a_dockerfile_per_component():
    assert {p.name for p in DOCKERFILES} == {
        "service.Dockerfile",
        "worker.Dockerfile",
        "dashboard.Dockerfile",
    }


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_structure(path: Path):
    from recsys.core.environment import TELEMETRY_OFF

    ins = dockerfile_instructions(path)
    keywords = [k for k, _ in ins]
    assert keywords[0] == "FROM" and ins[0][1] == "python:3.11-slim", (
        f"{path.name}: must start FROM python:3.11-slim"
    )
    assert keywords.count("CMD") == 1, f"{path.name}: one CMD"

    ignored = [line.strip() for line in Path(f"{path}.dockerignore").read_text().splitlines()]
    for needed in (".git", ".venv", "var"):
        assert needed in ignored, f"{path.name}.dockerignore must exclude {needed}"

    copied: set[str] = set()
    for keyword, args in ins:
        if keyword not in ("COPY", "ADD"):
            continue
        words = [w for w in shlex.split(args) if not w.startswith("--")]
        for src in words[:-1]:
            name = src.rstrip("/")
            assert (ROOT / name).exists(), f"{path.name}: COPY source {src} is not in the repository"
            assert name.split("/")[0] not in ignored, f"{path.name}: COPY source {src} is dockerignored"
            copied.add(name)
    packages = {p.rstrip("*") for p in pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages <= copied, f"{path.name}: packages not copied: {sorted(packages - copied)}"
    assert {"pyproject.toml", "README.md"} <= copied

    run = " ".join(a for k, a in ins if k == "RUN")
    assert f"torch=={pinned_version('torch')}" in run, f"{path.name}: torch not pinned as in pyproject.toml"
    assert "download.pytorch.org/whl/cpu" in " ".join(a for k, a in ins if k in ("ARG", "RUN"))

    env = " ".join(a for k, a in ins if k == "ENV")
    for key, value in TELEMETRY_OFF.items():
        assert f"{key}={value}" in env, f"{path.name}: telemetry setting {key}={value} missing"

    cmd = exec_form(dict(ins)["CMD"], path.name)
    for argv in command_lines(cmd):
        check_command(argv, f"{path.name} CMD")


def test_dockerfile_commands_are_the_components():
    cmds = {p.name: exec_form(dict(dockerfile_instructions(p))["CMD"], p.name) for p in DOCKERFILES}
    assert cmds["service.Dockerfile"][:3] == ["bentoml", "serve", SERVICE_REF]
    assert cmds["worker.Dockerfile"][:3] == ["prefect", "worker", "start"]
    assert option(cmds["worker.Dockerfile"], "--pool") == deployments()[0]["work_pool"]["name"]
    assert cmds["dashboard.Dockerfile"][:3] == ["streamlit", "run", "recsys/dashboard/app.py"]
    assert option(cmds["dashboard.Dockerfile"], "--browser.gatherUsageStats") == "false"
    assert option(cmds["dashboard.Dockerfile"], "--server.headless") == "true"
    copies = " ".join(
        a for k, a in dockerfile_instructions(INFRA / "docker" / "worker.Dockerfile") if k == "COPY"
    )
    assert "prefect.yaml" in copies, "the worker image runs `prefect deploy --all`: it needs prefect.yaml"


# -- compose -----------------------------------------------------------------------------------------------
def test_compose_services_build_and_run_what_exists():
    services = compose()["services"]
    assert {"prefect-server", "worker", "service", "dashboard"} <= set(services)
    for name, svc in services.items():
        build = svc.get("build")
        if build is not None:
            context = (COMPOSE.parent / build["context"]).resolve()
            assert context == ROOT, f"{name}: the build context must be the repository root"
            assert (context / build["dockerfile"]).is_file(), f"{name}: {build['dockerfile']} missing"
        if name == "prefect-server":
            continue  # the upstream image's own CLI; checked below
        for argv in command_lines(svc["command"]):
            check_command(argv, f"compose service {name}")


def test_compose_wiring():
    services = compose()["services"]
    server = services["prefect-server"]
    assert server["image"] == f"prefecthq/prefect:{pinned_version('prefect')}-python3.11"
    assert server["command"][:3] == ["prefect", "server", "start"]
    assert option(server["command"], "--host") == "0.0.0.0"
    port = option(server["command"], "--port")
    for name in ("worker", "deploy"):
        env = services[name]["environment"]
        assert env["PREFECT_API_URL"] == f"http://prefect-server:{port}/api", name
        assert services[name]["depends_on"]["prefect-server"]["condition"] == "service_healthy"
    assert option(services["worker"]["command"], "--pool") == deployments()[0]["work_pool"]["name"]
    assert services["service"]["command"][:3] == ["bentoml", "serve", SERVICE_REF]
    assert services["dashboard"]["command"][2] == "recsys/dashboard/app.py"

    volumes = set(compose()["volumes"])
    for name in ("worker", "deploy", "service", "dashboard"):
        svc = services[name]
        home = svc["environment"]["RECSYS_HOME"]
        mounts = {m.split(":")[1]: m.split(":")[0] for m in svc["volumes"]}
        assert mounts.get(home) == "recsys-var", f"{name}: RECSYS_HOME {home} is not the shared volume"
        assert svc["environment"]["BENTOML_HOME"].startswith(home + "/"), name
        assert svc["environment"].get("RECSYS_PROJECT_DIR") == "/app", name
    assert {"recsys-var", "prefect-data"} <= volumes


def test_compose_serving_settings_are_serving_config_fields():
    from recsys.serving.service import ENV_PREFIX, ServingConfig

    env = compose()["services"]["service"]["environment"]
    fields = {ENV_PREFIX + f.upper() for f in ServingConfig.model_fields}
    serving = {k: v for k, v in env.items() if k.startswith(ENV_PREFIX)}
    assert set(serving) <= fields, f"unknown settings: {sorted(set(serving) - fields)}"
    # `${VAR:-default}` as docker compose would substitute it with nothing set in the shell.
    # A key without a value is passed through from the shell, absent when unset there.
    substituted = {
        k: re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(v)) for k, v in serving.items() if v is not None
    }
    assert ServingConfig.from_env(substituted).api_key is None


# -- Kubernetes --------------------------------------------------------------------------------------------
EXPECTED_KINDS = {
    ("ConfigMap", "v1"),
    ("PersistentVolumeClaim", "v1"),
    ("Service", "v1"),
    ("Deployment", "apps/v1"),
    ("HorizontalPodAutoscaler", "autoscaling/v2"),
}


def test_k8s_manifests_kinds_and_kustomization():
    kinds = {(d["kind"], d["apiVersion"]) for _, d in k8s_docs()}
    assert kinds == EXPECTED_KINDS
    for file, d in k8s_docs():
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", d["metadata"]["name"]), file
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    manifests = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == manifests


def test_k8s_selectors_ports_and_references():
    deploy = k8s_one("Deployment")
    pod = deploy["spec"]["template"]
    labels = pod["metadata"]["labels"]
    selector = deploy["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items(), "Deployment selector does not match its pod labels"
    svc = k8s_one("Service")
    assert svc["spec"]["selector"].items() <= labels.items(), "Service selector does not match the pods"

    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == int(option(container["command"], "--port"))
    for p in svc["spec"]["ports"]:
        assert p["targetPort"] in ports or p["targetPort"] in ports.values(), p
    for argv in command_lines(container["command"]):
        check_command(argv, "k8s Deployment")

    hpa = k8s_one("HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (hpa["kind"], hpa["apiVersion"], hpa["name"]) == (
        "Deployment",
        "apps/v1",
        deploy["metadata"]["name"],
    )

    config_maps = {c["configMapRef"]["name"] for c in container["envFrom"] if "configMapRef" in c}
    assert config_maps == {k8s_one("ConfigMap")["metadata"]["name"]}
    claims = {
        v["persistentVolumeClaim"]["claimName"]
        for v in pod["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert claims == {k8s_one("PersistentVolumeClaim")["metadata"]["name"]}
    home = k8s_one("ConfigMap")["data"]["RECSYS_HOME"]
    assert home in {m["mountPath"] for m in container["volumeMounts"]}, "RECSYS_HOME is not on the volume"


def test_k8s_probes_hit_real_get_routes_of_the_service():
    from recsys.serving.service import RecommendationService

    routes = service_routes()
    api_routes = {api.route for api in RecommendationService.apis.values()}
    assert api_routes <= set(routes), "the OpenAPI routes must include every bentoml API"
    (container,) = k8s_one("Deployment")["spec"]["template"]["spec"]["containers"]
    ports = {p["name"] for p in container["ports"]}
    probes = [container[k] for k in ("startupProbe", "readinessProbe", "livenessProbe") if k in container]
    assert {"readinessProbe", "livenessProbe"} <= set(container)
    for probe in probes:
        path = probe["httpGet"]["path"]
        assert path in routes, f"probe path {path} is not a route of RecommendationService"
        assert "GET" in routes[path], f"probe path {path} does not answer GET (kubelet probes use GET)"
        assert probe["httpGet"]["port"] in ports


def test_k8s_serving_settings_validate_and_keep_the_key_secret():
    from recsys.serving.service import ENV_PREFIX, ServingConfig

    data = k8s_one("ConfigMap")["data"]
    assert all(isinstance(v, str) for v in data.values()), "ConfigMap values must be strings"
    fields = {ENV_PREFIX + f.upper() for f in ServingConfig.model_fields}
    serving = {k: v for k, v in data.items() if k.startswith(ENV_PREFIX)}
    assert set(serving) <= fields, f"unknown settings: {sorted(set(serving) - fields)}"
    config = ServingConfig.from_env(serving)
    assert config.api_key is None, "the API key belongs in a Secret, not the ConfigMap"
    (container,) = k8s_one("Deployment")["spec"]["template"]["spec"]["containers"]
    secret_env = {
        e["name"]: e["valueFrom"]["secretKeyRef"]
        for e in container["env"]
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    assert ENV_PREFIX + "API_KEY" in secret_env
