"""deploy/ (Kustomize) and deploy/docker/: offline checks, no cluster and no container engine.

- every resource file a user applies, and each overlay rendered, validates with kubernetes-validate
  (bundled schemas, Kubernetes K8S_VERSION, strict: unknown fields fail); KEDA's ScaledObject, which it has no
  schema for, against KEDA_SCALEDOBJECT below (the fields this repo uses, from KEDA's docs; strict too);
- overlays are rendered here (`render`: resources + strategic-merge patches, lists of named items merged
  by name) and, where `kubectl` is installed, compared with `kubectl kustomize`;
- every command, flag and COSYSERVE_* variable in the manifests and Dockerfiles goes through the real
  parser (server.config.load_config), and every probe path is served by a real server of that role
  (in process, fake engines), on the port the manifests name.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import re
import shutil
import subprocess
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import requests
import yaml

from server.config import ServerConfig, env_name, load_config
from server.remote_engine import RemoteEngine
from server.server_thread import ServerThread
from server.wiring import create_app
from tests.fakes import FakeBackendEngine, FakeEngine, FakeExtractor, fake_text_preparer

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
OVERLAYS = ("cpu", "gpu", "keda")
K8S_VERSION = "1.31.0"  # the oldest Kubernetes the manifests target (autoscaling/v2, policy/v1)
ENV_NAMES = {env_name(f) for f in fields(ServerConfig)}
SERVER_CMD = ["python", "-m", "server"]

# KEDA ScaledObject (keda.sh/v1alpha1), the subset of https://keda.sh/docs/latest/reference/scaledobject-spec/
# this repo uses, unknown fields refused.
_STRICT = {"additionalProperties": False}
KEDA_SCALEDOBJECT: dict[str, Any] = {
    "type": "object", **_STRICT, "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"}, "kind": {"const": "ScaledObject"},
        "metadata": {"type": "object", "required": ["name"], **_STRICT, "properties": {
            "name": {"type": "string"}, "namespace": {"type": "string"},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            "annotations": {"type": "object", "additionalProperties": {"type": "string"}}}},
        "spec": {"type": "object", **_STRICT, "required": ["scaleTargetRef", "triggers"], "properties": {
            "scaleTargetRef": {"type": "object", **_STRICT, "required": ["name"], "properties": {
                "apiVersion": {"type": "string"}, "kind": {"type": "string"}, "name": {"type": "string"},
                "envSourceContainerName": {"type": "string"}}},
            "pollingInterval": {"type": "integer"}, "cooldownPeriod": {"type": "integer"},
            "initialCooldownPeriod": {"type": "integer"}, "idleReplicaCount": {"type": "integer"},
            "minReplicaCount": {"type": "integer"}, "maxReplicaCount": {"type": "integer"},
            "fallback": {"type": "object"},
            "advanced": {"type": "object", **_STRICT, "properties": {
                "restoreToOriginalReplicaCount": {"type": "boolean"},
                "horizontalPodAutoscalerConfig": {"type": "object", **_STRICT, "properties": {
                    "name": {"type": "string"}, "behavior": {"type": "object"}}},
                "scalingModifiers": {"type": "object"}}},
            "triggers": {"type": "array", "minItems": 1, "items": {
                "type": "object", **_STRICT, "required": ["type", "metadata"], "properties": {
                    "type": {"type": "string"}, "name": {"type": "string"},
                    "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                    "useCachedMetrics": {"type": "boolean"},
                    "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
                    "authenticationRef": {"type": "object", **_STRICT, "required": ["name"], "properties": {
                        "name": {"type": "string"}, "kind": {"type": "string"}}}}}}}},
    },
}


# ---- loading and rendering ----

def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _kustomization(directory: Path) -> dict[str, Any]:
    return yaml.safe_load((directory / "kustomization.yaml").read_text())


def _patch_files() -> set[Path]:
    return {(k.parent / p["path"]).resolve() for k in DEPLOY.rglob("kustomization.yaml")
            for p in yaml.safe_load(k.read_text()).get("patches", [])}


def _resource_files() -> list[Path]:
    """Every manifest of whole resources (patches are checked in the rendered overlays)."""
    patches = _patch_files()
    return sorted(p for p in DEPLOY.rglob("*.yaml") if p.name != "kustomization.yaml" and p.resolve() not in patches)


def _merge(base: Any, patch: Any) -> Any:
    """Strategic merge as these patches need it: maps merge, lists of named maps merge by name."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            out[key] = _merge(base[key], value) if key in base else copy.deepcopy(value)
        return out
    named = all(isinstance(x, dict) and "name" in x for x in [*base, *patch]) if isinstance(base, list) else False
    if isinstance(base, list) and isinstance(patch, list) and named:
        out_list = [dict(x) for x in base]
        for item in patch:
            i = next((i for i, x in enumerate(out_list) if x["name"] == item["name"]), None)
            if i is None:
                out_list.append(copy.deepcopy(item))
            else:
                out_list[i] = _merge(out_list[i], item)
        return out_list
    return copy.deepcopy(patch)


def render(directory: Path) -> list[dict[str, Any]]:
    """A kustomization's resources (files or directories, recursively) with its patches applied."""
    k = _kustomization(directory)
    assert set(k) <= {"apiVersion", "kind", "resources", "patches"}, f"{directory}: render() knows no {set(k)}"
    out: list[dict[str, Any]] = []
    for entry in k.get("resources", []):
        path = directory / entry
        out += render(path) if path.is_dir() else _docs(path)
    for p in k.get("patches", []):
        for patch in _docs(directory / p["path"]):
            i = next(i for i, r in enumerate(out) if (r["kind"], r["metadata"]["name"])
                     == (patch["kind"], patch["metadata"]["name"]))
            out[i] = _merge(out[i], patch)
    return out


def _canonical(obj: Any) -> Any:
    """Lists of named items in name order (kustomize puts a patch's new items first; the order is moot)."""
    if isinstance(obj, dict):
        return {k: _canonical(v) for k, v in obj.items()}
    if isinstance(obj, list):
        items = [_canonical(x) for x in obj]
        return sorted(items, key=lambda x: x["name"]) if all(isinstance(x, dict) and "name" in x for x in items) \
            and items else items
    return obj


def _validate(doc: dict[str, Any]) -> None:
    if doc["apiVersion"].startswith("keda.sh/"):
        jsonschema.validate(doc, KEDA_SCALEDOBJECT)
        return
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def _find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def _deployments(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == "Deployment"]


# ---- (a) schemas ----

def test_the_validator_is_strict() -> None:
    """An unknown field fails (so the checks below mean something); K8S_VERSION's schemas are bundled."""
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "data": {}}
    kubernetes_validate.validate(cm, K8S_VERSION, strict=True)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate({**cm, "dat": {}}, K8S_VERSION, strict=True)
    with pytest.raises(jsonschema.ValidationError):
        so = _find(render(DEPLOY / "overlays" / "keda"), "ScaledObject", "cosyserve-backend")
        jsonschema.validate({**so, "spec": {**so["spec"], "maxReplicas": 3}}, KEDA_SCALEDOBJECT)


@pytest.mark.parametrize("path", _resource_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_each_resource_file_validates(path: Path) -> None:
    docs = _docs(path)
    assert docs
    for doc in docs:
        _validate(doc)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_rendered_overlay_validates(overlay: str) -> None:
    docs = render(DEPLOY / "overlays" / overlay)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds.count("Deployment") == 2 and "HorizontalPodAutoscaler" in kinds
    assert "PodDisruptionBudget" in kinds and "Secret" in kinds and kinds.count("ConfigMap") == 2
    for doc in docs:
        _validate(doc)
    if shutil.which("kubectl"):  # our render must be what `kubectl apply -k` applies
        out = subprocess.run(["kubectl", "kustomize", str(DEPLOY / "overlays" / overlay)], check=True,
                             capture_output=True, text=True, timeout=60).stdout
        key = lambda d: (d["kind"], d["metadata"]["name"])
        assert sorted(map(_canonical, yaml.safe_load_all(out)), key=key) == sorted(map(_canonical, docs), key=key)


# ---- (b) commands, flags, env, ports, probes against the real server ----

def _container_env(docs: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, str]:
    """What the container's process sees: envFrom ConfigMaps, then env (secrets from their stringData)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env |= _find(docs, "ConfigMap", source["configMapRef"]["name"])["data"]
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = _find(docs, "Secret", ref["name"])["stringData"][ref["key"]]
    return env


def _component(dep: dict[str, Any]) -> str:
    return dep["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]


def _check_env_names(env: dict[str, str], where: str) -> None:
    unknown = {k for k in env if k.startswith("COSYSERVE_")} - ENV_NAMES
    assert not unknown, f"{where}: not a server setting: {unknown}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_manifest_commands_flags_and_env_parse(overlay: str) -> None:
    docs = render(DEPLOY / "overlays" / overlay)
    roles = set()
    for dep in _deployments(docs):
        pod = dep["spec"]["template"]["spec"]
        (main,) = pod["containers"]
        env = _container_env(docs, main)
        _check_env_names(env, f"{overlay}/{main['name']}")
        assert main["command"] == SERVER_CMD
        config = load_config(main.get("args", []), env=env)
        roles.add(config.role)
        assert config.role == _component(dep) == main["name"]
        assert config.host == "0.0.0.0"
        assert [p["containerPort"] for p in main["ports"]] == [config.port]
        if config.role == "backend":
            assert not config.tokens and "COSYSERVE_TOKENS" not in env  # public tokens never reach a backend
            service = _find(docs, "Service", dep["metadata"]["name"])
            assert service["spec"]["clusterIP"] == "None"
            assert [p["port"] for p in service["spec"]["ports"]] == [config.port]
        else:
            host, _, port = config.backend_dns.rpartition(":")
            backend_service = _find(docs, "Service", host)
            assert backend_service["spec"]["clusterIP"] == "None"
            assert int(port) in [p["port"] for p in backend_service["spec"]["ports"]]
            hpa = _find(docs, "HorizontalPodAutoscaler", dep["metadata"]["name"])
            assert hpa["spec"]["minReplicas"] >= 2 and dep["spec"]["replicas"] >= 2
        # drain: SIGKILL comes only after preStop + the server's own deadline
        pre_stop = main["lifecycle"]["preStop"]["exec"]["command"]
        assert pre_stop[0] == "sleep"
        assert pod["terminationGracePeriodSeconds"] > float(pre_stop[1]) + config.shutdown_deadline_s
        # non-root, read-only root, limits; the writable paths are volumes
        assert pod["securityContext"]["runAsNonRoot"] is True
        mounts = {m["mountPath"]: m["name"] for m in main["volumeMounts"]}
        for c in [main, *pod.get("initContainers", [])]:
            assert c["securityContext"]["readOnlyRootFilesystem"] is True
            assert c["resources"]["requests"] and c["resources"]["limits"]
        assert str(config.data_dir) in mounts and "/tmp" in mounts and str(config.model_dir) in mounts
        volumes = {v["name"] for v in pod["volumes"]}
        assert set(mounts.values()) <= volumes
        for init in pod.get("initContainers", []):  # they fill the model dir, with a real module / code
            assert "/model" in {m["mountPath"] for m in init["volumeMounts"]}
            cmd = init["command"]
            if cmd[:2] == ["python", "-m"]:
                assert importlib.util.find_spec(cmd[2]) is not None, cmd
                assert cmd[cmd.index("--out") + 1] == str(config.model_dir)
            else:
                assert cmd[:2] == ["python", "-c"]
                compile(cmd[2], init["name"], "exec")
        if overlay in ("gpu", "keda") and config.role == "backend":
            assert main["resources"]["limits"]["nvidia.com/gpu"] == 1 and pod["tolerations"]
    assert roles == {"frontend", "backend"}
    if overlay == "keda":
        so = _find(docs, "ScaledObject", "cosyserve-backend")
        assert so["spec"]["scaleTargetRef"]["name"] == "cosyserve-backend"
        assert KEDA_METRIC in so["spec"]["triggers"][0]["metadata"]["query"]


def _dockerfile(path: Path) -> tuple[list[str], dict[str, str], list[int]]:
    """ENTRYPOINT + CMD (exec form), ENV and EXPOSE of a Dockerfile."""
    text = re.sub(r"\\\n", " ", path.read_text())
    argv: dict[str, list[str]] = {}
    env: dict[str, str] = {}
    ports: list[int] = []
    for line in text.splitlines():
        word, _, rest = line.strip().partition(" ")
        if word in ("ENTRYPOINT", "CMD"):
            argv[word] = json.loads(rest)
        elif word == "ENV":
            env |= dict(pair.split("=", 1) for pair in rest.split())
        elif word == "EXPOSE":
            ports += [int(p) for p in rest.split()]
    return argv["ENTRYPOINT"] + argv["CMD"], env, ports


@pytest.mark.parametrize("role", ["frontend", "backend"])
def test_dockerfile_command_parses(role: str) -> None:
    argv, image_env, ports = _dockerfile(DEPLOY / "docker" / f"{role}.Dockerfile")
    _check_env_names(image_env, f"{role}.Dockerfile")
    assert argv[:3] == SERVER_CMD
    docs = render(DEPLOY / "overlays" / "cpu")
    dep = _find(docs, "Deployment", f"cosyserve-{role}")
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    # the image as the manifests run it: its ENV, then the pod's env (which wins)
    config = load_config(argv[3:], env=image_env | _container_env(docs, container))
    assert config.role == role and ports == [config.port]
    config = load_config(argv[3:], env=image_env | {  # the image alone, given only its secrets
        "COSYSERVE_INTERNAL_TOKEN": "s", "COSYSERVE_TOKENS": "t", "COSYSERVE_BACKEND_DNS": "b:8001"})
    assert config.role == role and ports == [config.port]


def _requirement_name(req: str) -> str:
    return re.split(r"[<>=!~ \[;]", req, maxsplit=1)[0].lower()


def test_the_frontend_image_installs_the_torch_free_extra_and_the_backend_the_engine() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    frontend = project["dependencies"] + project["optional-dependencies"]["frontend"]
    assert {"torch", "onnxruntime"}.isdisjoint(_requirement_name(r) for r in frontend)
    assert "torch" in {_requirement_name(r) for r in project["optional-dependencies"]["engine"]}
    for role, extra in (("frontend", "'.[frontend]'"), ("backend", "'.[engine]'")):
        text = (DEPLOY / "docker" / f"{role}.Dockerfile").read_text()
        assert f"pip install {extra}" in text, role


KEDA_METRIC = "cosyserve_backend_queue_depth"  # the backend's waiting jobs (server/metrics.py)


def _probes(overlay: str) -> list[tuple[str, str, int, str, str]]:
    """(role, probe kind, port, path, container) of every httpGet probe in the overlay."""
    out = []
    for dep in _deployments(render(DEPLOY / "overlays" / overlay)):
        for c in dep["spec"]["template"]["spec"]["containers"]:
            ports = {p["name"]: p["containerPort"] for p in c["ports"]}
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                get = c[kind]["httpGet"]
                port = ports[get["port"]] if isinstance(get["port"], str) else get["port"]
                out.append((_component(dep), kind, port, get["path"], c["name"]))
    return out


def test_probe_paths_are_served_by_the_real_server(tmp_path: Path) -> None:
    internal = "internal-secret"
    backend_cfg = ServerConfig(role="backend", port=0, data_dir=tmp_path / "b", internal_token=internal, workers=2)
    with ServerThread(create_app(backend_cfg, engine=FakeBackendEngine(chunk_chars=6),
                                 extract_prompt=FakeExtractor())) as backend:
        remote = RemoteEngine(backend.url, internal, fake_text_preparer(FakeEngine()))  # type: ignore[arg-type]
        frontend_cfg = ServerConfig(role="frontend", port=0, data_dir=tmp_path / "f", tokens=("t",),
                                    internal_token=internal, backends=(backend.url,), workers=2)
        with ServerThread(create_app(frontend_cfg, engine=remote, extract_prompt=remote.extract_prompt)) as front:
            servers = {"backend": backend, "frontend": front}
            probes = {p for o in OVERLAYS for p in _probes(o)}
            assert {(role, kind) for role, kind, *_ in probes} == {
                (r, k) for r in servers for k in ("startupProbe", "readinessProbe", "livenessProbe")}
            for role, _kind, _port, path, _ in sorted(probes):  # no auth header: probes send none
                assert requests.get(servers[role].url + path, timeout=5).status_code == 200, (role, path)
            # the metric the keda overlay scales on is what the backend serves (with the internal token)
            metrics = requests.get(backend.url + "/metrics", timeout=5,
                                   headers={"Authorization": f"Bearer {internal}"})
            assert metrics.status_code == 200 and f"\n{KEDA_METRIC} " in "\n" + metrics.text
            # each role's readiness probe turns 503 while draining; liveness stays 200
            for server in servers.values():
                server.call(lambda s=server: setattr(s.app, "draining", True))
            for role, kind, _port, path, _ in sorted(probes):
                want = 503 if kind == "readinessProbe" else 200
                assert requests.get(servers[role].url + path, timeout=5).status_code == want, (role, kind, path)
            for server in servers.values():
                server.call(lambda s=server: setattr(s.app, "draining", False))
