"""deploy/k8s: every rendered object is valid, and its wiring matches the code.

Rendering uses the real kustomize (``kubectl kustomize`` or ``kustomize build``); the built-in
objects are validated against the Kubernetes schemas shipped by ``kubernetes-validate``
(strict: unknown fields fail), the ScaledObject against KEDA's own CRD schema (v2.20.2, the
version the manifests are written for, vendored in tests/data/keda; unknown fields fail too).
The wiring checks take their expectations from the code: stream and group names from
``butd.workers.protocol``, probe paths from the gateway's routes, env names from the settings
classes, commands from the ``butd`` parser.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from fastapi.testclient import TestClient
from pydantic_settings import BaseSettings

from butd.cli.main import build_parser
from butd.service.app import create_app
from butd.service.settings import Settings
from butd.workers.protocol import GROUP, JOBS_STREAM, STREAMS
from butd.workers.settings import WorkerSettings
from tests.unit.app_fakes import FakeQueue, FakeStore

yaml = pytest.importorskip("yaml")
jsonschema = pytest.importorskip("jsonschema")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
# Ids that are not the "gpu" marker's name (tests/conftest.py skips items keyed "gpu").
OVERLAYS = [pytest.param(name, id=f"{name}-overlay") for name in ("cpu", "gpu")]
KUBERNETES_VERSION = "1.30.0"
KEDA_CRD = ROOT / "tests" / "data" / "keda" / "scaledobjects.keda.sh-v2.20.2.yaml"


def _renderer() -> list[str] | None:
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    return None


@cache
def render(overlay: str) -> tuple[dict[str, Any], ...]:
    cmd = _renderer()
    if cmd is None:
        pytest.skip("needs kubectl or kustomize on PATH to render deploy/k8s")
    out = subprocess.run(
        [*cmd, str(K8S / "overlays" / overlay)], check=True, capture_output=True, text=True
    ).stdout
    return tuple(doc for doc in yaml.safe_load_all(out) if doc)


def find(objs: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} objects"
    return found[0]


def containers(obj: dict[str, Any]) -> Iterator[dict[str, Any]]:
    spec = obj["spec"]["template"]["spec"]
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


# --- schemas ---------------------------------------------------------------------------------


def _closed(schema: Any) -> Any:
    """The CRD schema with ``additionalProperties: false`` wherever properties are listed and
    unknown fields are not explicitly kept: the API server would prune them silently."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _closed(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@cache
def keda_schema() -> dict[str, Any]:
    crd = next(d for d in yaml.safe_load_all(KEDA_CRD.read_text()) if d)
    assert crd["spec"]["names"]["kind"] == "ScaledObject"
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1")
    schema: dict[str, Any] = _closed(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
    return schema


def validate_object(obj: dict[str, Any]) -> None:
    if obj["apiVersion"] == "keda.sh/v1alpha1":
        jsonschema.validate(obj, keda_schema())
    else:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates(overlay: str) -> None:
    objs = render(overlay)
    kinds = {o["kind"] for o in objs}
    assert {"Deployment", "StatefulSet", "Service", "Job", "ScaledObject"} <= kinds
    for obj in objs:
        validate_object(obj)


def test_validation_catches_mistakes() -> None:
    """The validators are not vacuous: a misspelt field, a wrong type, a bad trigger fail."""
    objs = render("gpu")
    scaled = copy.deepcopy(find(objs, "ScaledObject", "butd-worker"))
    scaled["spec"]["minReplicas"] = 0  # the field is minReplicaCount
    with pytest.raises(jsonschema.ValidationError):
        validate_object(scaled)
    scaled = copy.deepcopy(find(objs, "ScaledObject", "butd-worker"))
    scaled["spec"]["triggers"][0]["metadata"]["lagCount"] = 2  # metadata values are strings
    with pytest.raises(jsonschema.ValidationError):
        validate_object(scaled)
    worker = copy.deepcopy(find(objs, "Deployment", "butd-worker"))
    worker["spec"]["template"]["spec"]["terminationGracePeriod"] = 60
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_object(worker)


# --- wiring: KEDA <-> queue --------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_scaler_reads_the_workers_streams(overlay: str) -> None:
    objs = render(overlay)
    scaled = find(objs, "ScaledObject", "butd-worker")
    target = scaled["spec"]["scaleTargetRef"]
    assert target.get("kind", "Deployment") == "Deployment"
    worker = find(objs, "Deployment", target["name"])
    assert any(c["command"][:2] == ["butd", "worker"] for c in containers(worker))

    triggers = [t["metadata"] for t in scaled["spec"]["triggers"]]
    assert all(t["type"] == "redis-streams" for t in scaled["spec"]["triggers"])
    assert {m["consumerGroup"] for m in triggers} == {GROUP}
    assert {m["stream"] for m in triggers} == set(STREAMS)
    for stream in STREAMS:
        mine = [m for m in triggers if m["stream"] == stream]
        # lag: wakes the first worker from zero; pending: keeps workers holding entries.
        assert any(int(m.get("lagCount", 0)) > 0 for m in mine), stream
        assert any("pendingEntriesCount" in m and "lagCount" not in m for m in mine), stream

    redis_svc = find(objs, "Service", "butd-redis")
    namespace = redis_svc["metadata"]["namespace"]
    port = redis_svc["spec"]["ports"][0]["port"]
    want = f"butd-redis.{namespace}.svc.cluster.local:{port}"
    assert {m["address"] for m in triggers} == {want}


def test_gpu_overlay_scales_from_zero_on_gpus() -> None:
    objs = render("gpu")
    scaled = find(objs, "ScaledObject", "butd-worker")
    assert scaled["spec"]["minReplicaCount"] == 0
    jobs_lag = [
        t["metadata"]
        for t in scaled["spec"]["triggers"]
        if t["metadata"]["stream"] == JOBS_STREAM and "lagCount" in t["metadata"]
    ]
    assert jobs_lag and all(int(m.get("activationLagCount", "0")) == 0 for m in jobs_lag)
    worker = find(objs, "Deployment", "butd-worker")
    pod = worker["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["BUTD_DEVICE"].startswith("cuda")
    # SIGTERM drains the batch in hand: the grace period must outlast one batch and the seal.
    assert pod["terminationGracePeriodSeconds"] >= 60


def test_queue_init_job_creates_the_groups() -> None:
    job = find(render("gpu"), "Job", "butd-queue-init")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    args = build_parser().parse_args(container["command"][1:])
    assert args.handler.__module__ == "butd.cli.queue"


# --- wiring: probes, env, commands, volumes ------------------------------------------------------


def _get_routes() -> dict[str, set[str]]:
    """GET paths of the gateway and the query parameters of each (from its OpenAPI schema)."""
    app = create_app(Settings(redis_url="redis://unused"), queue=FakeQueue(FakeStore()))
    return {
        path: {p["name"] for p in ops["get"].get("parameters", []) if p["in"] == "query"}
        for path, ops in app.openapi()["paths"].items()
        if "get" in ops
    }


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_hit_real_endpoints(overlay: str, tmp_path: Path) -> None:
    gateway = find(render(overlay), "Deployment", "butd-gateway")
    (container,) = gateway["spec"]["template"]["spec"]["containers"]
    routes = _get_routes()
    store = FakeStore()
    queue = FakeQueue(store)
    queue.beats = []  # workers scaled to zero
    settings = Settings(redis_url="redis://unused", store_dir=tmp_path, worker_cache_s=0.0)
    with TestClient(create_app(settings, queue=queue, store=store)) as client:
        for probe in ("livenessProbe", "readinessProbe"):
            get = container[probe]["httpGet"]
            url = urlsplit(get["path"])
            assert url.path in routes, f"{probe} {url.path} is not a route"
            assert set(parse_qs(url.query)) <= routes[url.path], f"{probe} query {url.query}"
            named = [p for p in container["ports"] if p["name"] == get["port"]]
            assert named and named[0]["containerPort"] == int(_env(container)["BUTD_PORT"])
            # With no worker up the gateway must stay live and ready (it takes jobs).
            assert client.get(get["path"]).status_code == 200, probe
        queue.up = False
        ready = urlsplit(container["readinessProbe"]["httpGet"]["path"])
        assert client.get(f"{ready.path}?{ready.query}").status_code == 503


def _env(container: dict[str, Any]) -> dict[str, str | None]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def env_names(cls: type[BaseSettings]) -> set[str]:
    """Every environment variable a settings class reads."""
    prefix = cls.model_config.get("env_prefix", "")
    names = set()
    for name, field in cls.model_fields.items():
        alias = field.validation_alias
        choices = getattr(alias, "choices", None)
        if choices:
            names |= {str(c) for c in choices}
        else:
            names.add(f"{prefix}{name}".upper())
    return names


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_get_settings_the_code_reads(overlay: str) -> None:
    objs = render(overlay)
    readers: dict[str, type[BaseSettings]] = {
        "serve": Settings,
        "worker": WorkerSettings,
        "queue": WorkerSettings,  # butd queue init reads REDIS_URL through WorkerSettings
    }
    redis_svc = find(objs, "Service", "butd-redis")
    redis_url = f"redis://butd-redis:{redis_svc['spec']['ports'][0]['port']}/0"
    checked = 0
    for obj in objs:
        if obj["kind"] not in ("Deployment", "Job") or obj["metadata"]["name"] == "butd-redis":
            continue
        for container in containers(obj):
            command = container["command"]
            assert command[0] == "butd" and container["image"].startswith("butd")
            build_parser().parse_args(command[1:])  # a real command
            env = _env(container)
            unknown = set(env) - env_names(readers[command[1]])
            assert not unknown, f"{obj['metadata']['name']}: no setting reads {unknown}"
            assert env["REDIS_URL"] == redis_url
            checked += 1
    assert checked >= 3


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_and_workers_share_the_store(overlay: str) -> None:
    objs = render(overlay)
    claims = {o["metadata"]["name"] for o in objs if o["kind"] == "PersistentVolumeClaim"}
    mounts = {}
    for name in ("butd-gateway", "butd-worker"):
        pod = find(objs, "Deployment", name)["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        store_dir = _env(container)["BUTD_STORE_DIR"]
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == store_dir]
        claim = volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]
        assert claim in claims
        mounts[name] = claim
    assert len(set(mounts.values())) == 1
    (store,) = [o for o in objs if o["metadata"]["name"] == mounts["butd-gateway"]]
    assert "ReadWriteMany" in store["spec"]["accessModes"]


def test_every_deployed_weights_name_is_in_the_registry() -> None:
    """A worker started with an unknown BUTD_WEIGHTS name stops at once: the manifests, the
    compose files and the Slurm script must name registry entries (or a weights file path)."""
    from butd.detector.weights.registry import REGISTRY

    named: dict[str, str | None] = {}
    for overlay in ("cpu", "gpu"):
        for obj in render(overlay):
            if obj["kind"] not in ("Deployment", "Job"):
                continue
            for container in containers(obj):
                env = _env(container)
                if "BUTD_WEIGHTS" in env:
                    named[f"{overlay}/{obj['metadata']['name']}"] = env["BUTD_WEIGHTS"]
    for path in [ROOT / "docker-compose.yml", *sorted((ROOT / "deploy").glob("compose*.yml"))]:
        for name, svc in yaml.safe_load(path.read_text())["services"].items():
            env = svc.get("environment") or {}
            if isinstance(env, dict) and "BUTD_WEIGHTS" in env:
                named[f"{path.name}/{name}"] = env["BUTD_WEIGHTS"]
    slurm = (ROOT / "deploy" / "slurm-workers.sbatch").read_text()
    for default in re.findall(r"BUTD_WEIGHTS:-([^}]+)\}", slurm):
        named["slurm-workers.sbatch"] = default
    assert {"gpu/butd-worker", "docker-compose.yml/worker", "slurm-workers.sbatch"} <= set(named)
    unknown = {k: v for k, v in named.items() if v not in REGISTRY and "/" not in str(v)}
    assert unknown == {}
