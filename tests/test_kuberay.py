"""cluster/kuberay/rayservice.yaml, the KubeRay RayService, without Kubernetes: its serveConfigV2 passes
Ray Serve's own schema and builds the same application as cluster/serve_config.yaml (AppArgs parse its
args); the Ray cluster is laid out as the app needs it (expert workers only on worker pods, the
ingress pinned to the head, room for the routers, ports, token auth from a Secret, /dev/shm), also
with the routers moved to pods of their own as the manifest says; its fields are ones the
RayService CRD knows (a few facts of KubeRay v1.7.0's CRD, written out here: the CRD itself is not
vendored); and Ray's KubeRay autoscaler reads the node types the app's workers need from it. Each
check also runs on broken copies of the manifest, which it must reject."""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

from cluster.serve_app import AppArgs

REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO / "cluster" / "kuberay" / "rayservice.yaml"
SERVE_CONFIG = REPO / "cluster" / "serve_config.yaml"

SECRET_KEY = "auth_token"  # the key KubeRay's authOptions.secretName requires in the Secret
EXPERT_RESOURCE = "expert_node"
ROUTER_RESOURCE = "router_node"  # what the `routers` group's pods have, one router each
ROUTER_GROUP = "routers"
# args that differ from cluster/serve_config.yaml on purpose (the manifest says why); any other
# difference is drift between the two.
K8S_ARGS = {
    "model",
    "num_threads",
    "worker_cpus",
    "worker_gpus",
    "worker_resources",
    "router_resources",
    "serving_resources",
    "autoscaling_config",
}

# Facts of the RayService CRD (ray.io/v1, KubeRay v1.7.0): the fields each object may have and those
# it must have. (The manifest was validated against the whole CRD schema once, by hand.)
CRD_FIELDS = {
    "spec": (
        {
            "deploymentUnhealthySecondThreshold",
            "excludeHeadPodFromServeSvc",
            "managedBy",
            "rayClusterConfig",
            "rayClusterDeletionDelaySeconds",
            "serveConfigV2",
            "serveService",
            "serviceUnhealthySecondThreshold",
            "suspend",
            "upgradeStrategy",
        },
        {"rayClusterConfig"},
    ),
    "rayClusterConfig": (
        {
            "authOptions",
            "autoscalerOptions",
            "enableInTreeAutoscaling",
            "gcsFaultToleranceOptions",
            "headGroupSpec",
            "headServiceAnnotations",
            "historyServerOptions",
            "managedBy",
            "networkPolicy",
            "rayVersion",
            "suspend",
            "tlsOptions",
            "upgradeStrategy",
            "workerGroupSpecs",
        },
        {"headGroupSpec"},
    ),
    "headGroupSpec": (
        {
            "enableIngress",
            "headService",
            "ingressOptions",
            "labels",
            "rayStartParams",
            "resources",
            "serviceType",
            "template",
        },
        {"template"},
    ),
    "workerGroupSpec": (
        {
            "groupName",
            "idleTimeoutSeconds",
            "labels",
            "maxReplicas",
            "minReplicas",
            "numOfHosts",
            "priority",
            "rayStartParams",
            "replicas",
            "resources",
            "scaleStrategy",
            "suspend",
            "template",
        },
        {"groupName", "maxReplicas", "minReplicas", "template"},
    ),
    "authOptions": ({"enableK8sTokenAuth", "mode", "secretName"}, set()),
    "autoscalerOptions": (
        {
            "args",
            "command",
            "env",
            "envFrom",
            "idleTimeoutSeconds",
            "image",
            "imagePullPolicy",
            "resources",
            "securityContext",
            "upscalingMode",
            "version",
            "volumeMounts",
        },
        set(),
    ),
}
AUTH_MODES = {"disabled", "token"}
UPSCALING_MODES = {"Default", "Aggressive", "Conservative"}


@pytest.fixture(scope="module")
def manifest() -> dict:
    return yaml.safe_load(MANIFEST.read_text())


# ---- helpers --------------------------------------------------------------------------------------


def cluster_of(m: dict) -> dict:
    return m["spec"]["rayClusterConfig"]


def groups(m: dict) -> dict[str, dict]:
    """'head' and each worker group by groupName."""
    c = cluster_of(m)
    return {"head": c["headGroupSpec"], **{g["groupName"]: g for g in c.get("workerGroupSpecs", [])}}


def ray_container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]  # KubeRay: the Ray container comes first


def serve_config(m: dict) -> dict:
    text = m["spec"]["serveConfigV2"]
    assert isinstance(text, str), "serveConfigV2 is a YAML document in a string"
    return yaml.safe_load(text)


def the_app(m: dict) -> dict:
    apps = serve_config(m)["applications"]
    assert len(apps) == 1, apps
    return apps[0]


def custom_resources(start_params: dict) -> dict:
    """rayStartParams' `resources`, read by its three consumers, which must agree: the shell that runs
    KubeRay's `ray start ... --resources=VALUE` line, the operator (Go: strings.Trim of quotes, then
    JSON) and Ray's KubeRay autoscaler (drops the first and last character and every backslash, then
    JSON with integer values)."""
    value = start_params.get("resources")
    if value is None:
        return {}
    words = shlex.split(f"--resources={value}")
    assert len(words) == 1, f"rayStartParams resources {value!r} is not one shell word"
    by_shell = json.loads(words[0].removeprefix("--resources="))
    by_operator = json.loads(value.strip("'\"` "))
    by_autoscaler = json.loads(value[1:-1].replace("\\", ""))
    assert by_shell == by_operator == by_autoscaler, (value, by_shell, by_operator, by_autoscaler)
    assert all(isinstance(v, int) and not isinstance(v, bool) for v in by_autoscaler.values()), (
        f"the autoscaler wants integer custom resources, got {value!r}"
    )
    return by_shell


def quantity(q) -> float:
    """A Kubernetes quantity (CPU or bytes) as a number."""
    units = {
        "m": 1e-3,
        "k": 1e3,
        "M": 1e6,
        "G": 1e9,
        "T": 1e12,
        "Ki": 2**10,
        "Mi": 2**20,
        "Gi": 2**30,
        "Ti": 2**40,
    }
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([A-Za-z]*)", str(q))
    assert match and match[2] in ("", *units), f"not a quantity: {q!r}"
    return float(match[1]) * units.get(match[2], 1)


def version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


# ---- the checks (each test runs one on the manifest, and on broken copies) ----------------------


def check_crd_fields(m: dict) -> None:
    assert m["apiVersion"] == "ray.io/v1" and m["kind"] == "RayService"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", m["metadata"]["name"]), m["metadata"]["name"]

    def fields(obj: dict, kind: str) -> None:
        allowed, required = CRD_FIELDS[kind]
        assert set(obj) <= allowed, f"{kind}: fields the CRD does not have: {sorted(set(obj) - allowed)}"
        assert required <= set(obj), f"{kind}: required fields missing: {sorted(required - set(obj))}"

    fields(m["spec"], "spec")
    c = cluster_of(m)
    fields(c, "rayClusterConfig")
    fields(c["headGroupSpec"], "headGroupSpec")
    for g in c.get("workerGroupSpecs", []):
        fields(g, "workerGroupSpec")
    fields(c.get("authOptions", {}), "authOptions")
    fields(c.get("autoscalerOptions", {}), "autoscalerOptions")
    assert c.get("authOptions", {}).get("mode", "token") in AUTH_MODES
    assert c.get("autoscalerOptions", {}).get("upscalingMode", "Default") in UPSCALING_MODES
    for name, g in groups(m).items():
        params = g.get("rayStartParams", {})
        assert all(isinstance(v, str) for v in params.values()), f"{name}: rayStartParams values are strings"
        assert not (params.keys() & {"num-cpus", "num-gpus", "memory", "resources"} and g.get("resources")), (
            f"{name}: KubeRay refuses resources in both rayStartParams and the group's `resources`"
        )
        assert g["template"]["spec"]["containers"], f"{name}: no container"
    for g in c.get("workerGroupSpecs", []):
        for key in ("replicas", "minReplicas", "maxReplicas"):
            assert isinstance(g.get(key, 0), int) and g.get(key, 0) >= 0, (g["groupName"], key)
    # No longer used by KubeRay (kuberay#1685): setting them would only look like a health policy.
    assert not m["spec"].keys() & {"serviceUnhealthySecondThreshold", "deploymentUnhealthySecondThreshold"}


def check_serve_config(m: dict) -> None:
    config = serve_config(m)
    ServeDeploySchema.model_validate(config)  # Ray Serve's own schema, as `serve deploy` applies it
    # ... which ignores fields it does not know: a misspelt option would silently not apply.
    assert set(config) <= set(ServeDeploySchema.model_fields), sorted(
        set(config) - set(ServeDeploySchema.model_fields)
    )
    for app in config["applications"]:
        assert set(app) <= set(ServeApplicationSchema.model_fields), sorted(
            set(app) - set(ServeApplicationSchema.model_fields)
        )
    assert config["http_options"]["port"] == 8000 and config["http_options"]["host"] == "0.0.0.0"
    app = the_app(m)
    assert app["import_path"] == "cluster.serve_app:build_app"
    args = AppArgs.from_args(app["args"])  # the builder's own parser: unknown names, bad values
    assert args.grpc_port == 50051 and args.grpc_host == "0.0.0.0"
    assert args.transport in ("socket", "ray", "compiled")
    assert args.worker_resources.get(EXPERT_RESOURCE, 0) > 0, "expert workers must ask for the worker pods"
    if args.model is not None:
        assert args.model.startswith("/models/"), "a checkpoint comes from the /models volume"


def check_same_app_as_serve_config(m: dict) -> None:
    committed = yaml.safe_load(SERVE_CONFIG.read_text())
    ours = serve_config(m)
    assert ours["http_options"] == committed["http_options"]
    assert ours["proxy_location"] == committed["proxy_location"]
    (base,) = committed["applications"]
    app = the_app(m)
    for key in ("name", "route_prefix", "import_path"):
        assert app[key] == base[key], key
    differ = {
        k for k in base["args"].keys() | app["args"].keys() if base["args"].get(k) != app["args"].get(k)
    }
    assert differ <= K8S_ARGS, f"args differ from cluster/serve_config.yaml: {sorted(differ - K8S_ARGS)}"


def serving_resources(args: AppArgs) -> dict:
    """What the ingress, the controller and the gRPC actor ask for (EngineConfig.serving_actor_resources)."""
    return args.router_resources if args.serving_resources is None else args.serving_resources


def check_ingress_on_head(m: dict) -> None:
    """The ingress replica, the membership controller and the gRPC server run on the head pod: the
    app's serving_resources (router_resources when absent) ask for a custom resource only the head
    has (and a deployment override, if any, keeps that and asks for no CPU: the head has none)."""
    from router_service.serving.launch import APP_NAME, DEPLOYMENT_NAME

    app = the_app(m)
    assert app["name"] == APP_NAME
    wanted = serving_resources(AppArgs.from_args(app["args"]))
    assert wanted, "serving_resources must ask for a head-only resource"
    by_group = {name: custom_resources(g.get("rayStartParams", {})) for name, g in groups(m).items()}
    for resource, amount in wanted.items():
        assert 0 < amount <= by_group["head"].get(resource, 0), (resource, by_group["head"])
        assert not any(resource in r for name, r in by_group.items() if name != "head"), resource
    for deployment in app.get("deployments", []):
        assert deployment["name"] == DEPLOYMENT_NAME, deployment["name"]
        assert deployment.get("num_replicas", 1) == 1, "one ingress owns the router"
        if "ray_actor_options" in deployment:  # replaces the code's options as a whole
            options = deployment["ray_actor_options"]
            assert options.get("num_cpus") == 0 and not options.get("num_gpus"), options
            assert options.get("resources") == wanted, options


def check_routers(m: dict) -> None:
    """Every router the app may run has a place on the pods that are always there (the head, each
    group's minReplicas: a new router is pinned to a pod that exists, so it does not wait for the
    autoscaler): they hold num_routers and router autoscaling's max_routers. The `routers` group is
    for routers only (no expert slot, no CPUs), and no other pod offers its resource, so a router
    that asks for it never lands elsewhere."""
    args = AppArgs.from_args(the_app(m)["args"])
    wanted = {k: v for k, v in args.router_resources.items() if v > 0}
    most = max(args.num_routers, (args.router_autoscaling_config or {}).get("max_routers", 1))
    room = 0
    for name, g in groups(m).items():
        offered = custom_resources(g.get("rayStartParams", {}))
        if all(offered.get(k, 0) >= v for k, v in wanted.items()):
            per_pod = min((int(offered[k] // v) for k, v in wanted.items()), default=most)
            room += per_pod * (1 if name == "head" else g["minReplicas"])
    assert room >= most, f"room for {room} routers asking for {wanted}, the app may run {most}"
    routers = groups(m)[ROUTER_GROUP]
    params = routers.get("rayStartParams", {})
    assert custom_resources(params).get(ROUTER_RESOURCE, 0) >= 1, params
    assert EXPERT_RESOURCE not in custom_resources(params), "expert workers must not land on router pods"
    assert params.get("num-cpus") == "0", "nothing that asks for CPUs may land on a router pod"
    assert routers["minReplicas"] <= routers.get("replicas", routers["minReplicas"]) <= routers["maxReplicas"]
    for name, g in groups(m).items():
        if name != ROUTER_GROUP:
            assert ROUTER_RESOURCE not in custom_resources(g.get("rayStartParams", {})), name


def check_head(m: dict) -> None:
    head = groups(m)["head"]
    params = head.get("rayStartParams", {})
    assert params.get("num-cpus") == "0", "no expert worker may land on the head"
    assert EXPERT_RESOURCE not in custom_resources(params)
    container = ray_container(head)
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    # KubeRay builds the head Service from exactly these (6379: the workers join; `dashboard`: the
    # operator deploys serveConfigV2 through it), and the serve Service from `serve` and `serve-*`.
    assert ports.get("gcs-server") == 6379 and ports.get("dashboard") == 8265, ports
    assert ports.get("serve") == 8000, ports
    assert [n for n, p in ports.items() if p == 50051 and (n == "serve" or n.startswith("serve-"))], ports
    grpc_port = AppArgs.from_args(the_app(m)["args"]).grpc_port
    assert grpc_port in ports.values(), "the app's gRPC port must be declared on the head"
    service = m["spec"].get("serveService")
    if service:
        for port in service["spec"]["ports"]:
            assert ports.get(port["name"]) == port["port"], f"serveService port {port} is not a head port"


def check_worker_groups(m: dict) -> None:
    by_name = groups(m)
    cpu, gpu = by_name.get("cpu-workers"), by_name.get("gpu-workers")
    assert cpu is not None and gpu is not None, sorted(by_name)
    args = AppArgs.from_args(the_app(m)["args"])
    initial_workers = 0
    for name, g in (("cpu-workers", cpu), ("gpu-workers", gpu)):
        assert g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"], name
        assert g["maxReplicas"] >= 1, f"{name}: the autoscaler could never add a pod"
        assert custom_resources(g.get("rayStartParams", {})).get(EXPERT_RESOURCE, 0) >= 1, name
        limits = ray_container(g)["resources"]["limits"]
        per_pod = min(
            quantity(limits["cpu"]) // args.worker_cpus,
            custom_resources(g["rayStartParams"])[EXPERT_RESOURCE] // args.worker_resources[EXPERT_RESOURCE],
        )
        assert per_pod >= 1, f"{name}: a pod cannot hold one expert worker"
        initial_workers += per_pod * g.get("replicas", 0)
    assert initial_workers >= args.num_workers, "the app checks at start that its workers fit on alive nodes"
    gpu_container, cpu_container = ray_container(gpu), ray_container(cpu)
    assert str(gpu_container["resources"]["limits"].get("nvidia.com/gpu")) == "1"
    assert gpu_container["image"].split("/")[-1] == "moe-serving:cuda"
    assert cpu_container["image"].split("/")[-1] == "moe-serving:cpu"
    assert not any("gpu" in k for k in cpu_container["resources"].get("limits", {}))
    assert ray_container(by_name["head"])["image"].split("/")[-1] == "moe-serving:cpu"
    assert cluster_of(m).get("enableInTreeAutoscaling") is True


def check_token_auth(m: dict) -> None:
    """Token auth on: the operator's own dashboard calls use the Secret (authOptions) and every Ray
    container reads the same Secret; no token in the manifest."""
    auth = cluster_of(m).get("authOptions", {})
    assert auth.get("mode") == "token" and auth.get("secretName"), auth
    assert version(cluster_of(m)["rayVersion"]) >= (2, 52), "KubeRay's token auth needs Ray >= 2.52"
    for name, g in groups(m).items():
        for container in g["template"]["spec"]["containers"] + g["template"]["spec"].get(
            "initContainers", []
        ):
            env = {e["name"]: e for e in container.get("env", [])}
            assert len(env) == len(container.get("env", [])), f"{name}: duplicate env names"
            assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", name
            token = env.get("RAY_AUTH_TOKEN", {})
            assert "value" not in token, f"{name}: the token must come from the Secret, not the manifest"
            ref = token.get("valueFrom", {}).get("secretKeyRef", {})
            assert ref == {"name": auth["secretName"], "key": SECRET_KEY}, (name, ref)


def check_volumes(m: dict) -> None:
    for name, g in groups(m).items():
        spec = g["template"]["spec"]
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        mounts = {v["mountPath"]: v["name"] for v in ray_container(g).get("volumeMounts", [])}
        shm = volumes.get(mounts.get("/dev/shm"), {}).get("emptyDir")
        assert shm is not None and shm.get("medium") == "Memory", (
            f"{name}: /dev/shm must be a memory emptyDir"
        )
        store = g.get("rayStartParams", {}).get("object-store-memory")
        if store is not None and "sizeLimit" in shm:
            assert int(store) <= quantity(shm["sizeLimit"]), f"{name}: the object store outgrows /dev/shm"
        assert "/models" in mounts and "/cache" in mounts, f"{name}: the model and its cache, on every pod"
        assert all(v in volumes for v in mounts.values()), f"{name}: a mount without its volume"


def check_probes(m: dict) -> None:
    """KubeRay's injected probes are the ones meant here (see the manifest's header): none are set,
    and rayVersion picks the HTTP form (>= 2.53) that needs no wget in the image."""
    assert version(cluster_of(m)["rayVersion"]) >= (2, 53)
    for name, g in groups(m).items():
        container = ray_container(g)
        assert not container.keys() & {"readinessProbe", "livenessProbe"}, name
    assert m["spec"].get("excludeHeadPodFromServeSvc") is not True, "the head hosts the only Serve proxy"
    timeout = m["metadata"].get("annotations", {}).get("ray.io/initializing-timeout")
    assert timeout is None or re.fullmatch(r"\d+|(\d+[hms])+", timeout), timeout


CHECKS = [
    check_crd_fields,
    check_serve_config,
    check_same_app_as_serve_config,
    check_ingress_on_head,
    check_routers,
    check_head,
    check_worker_groups,
    check_token_auth,
    check_volumes,
    check_probes,
]


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_manifest(manifest, check):
    check(manifest)


def routers_on_their_own_pods(m: dict, k: int = 2) -> dict:
    """The manifest changed as its `routers` group's comment says, for K routers on router pods."""
    m = copy.deepcopy(m)
    groups(m)[ROUTER_GROUP].update(replicas=k, minReplicas=k)
    _edit_args(m, lambda a: a.update(num_routers=k, router_resources={ROUTER_RESOURCE: 1}))
    return m


@pytest.mark.parametrize(
    "check", [c for c in CHECKS if c is not check_same_app_as_serve_config], ids=lambda c: c.__name__
)
def test_manifest_with_routers_on_their_own_pods(manifest, check):
    variant = routers_on_their_own_pods(manifest)
    check(variant)
    args = AppArgs.from_args(the_app(variant)["args"])
    assert args.router_resources == {ROUTER_RESOURCE: 1} and serving_resources(args) == {"head": 0.01}


# ---- broken copies: (what, the check that must reject it, the change) -----------------------------


def _set_serve_config(m, text):
    m["spec"]["serveConfigV2"] = text


def _edit_serve_config(m, edit):
    config = serve_config(m)
    edit(config)
    m["spec"]["serveConfigV2"] = yaml.safe_dump(config)


def _edit_args(m, edit):
    _edit_serve_config(m, lambda c: edit(c["applications"][0]["args"]))


def _container(m, group):
    return ray_container(groups(m)[group])


def _params(m, group):
    return groups(m)[group]["rayStartParams"]


BROKEN = [
    ("serveConfigV2 not YAML", check_serve_config, lambda m: _set_serve_config(m, "applications: [\n")),
    ("serveConfigV2 a dict", check_serve_config, lambda m: _set_serve_config(m, serve_config(m))),
    (
        "unknown Serve option",
        check_serve_config,
        lambda m: _edit_serve_config(m, lambda c: c.update(proxy_locations="HeadOnly")),
    ),
    (
        "bad proxy_location",
        check_serve_config,
        lambda m: _edit_serve_config(m, lambda c: c.update(proxy_location="Everywhere")),
    ),
    (
        "unknown app option",
        check_serve_config,
        lambda m: _edit_serve_config(m, lambda c: c["applications"][0].update(route_prefixes="/")),
    ),
    (
        "bad http port",
        check_serve_config,
        lambda m: _edit_serve_config(m, lambda c: c["http_options"].update(port="eighty")),
    ),
    (
        "app without import_path",
        check_serve_config,
        lambda m: _edit_serve_config(m, lambda c: c["applications"][0].pop("import_path")),
    ),
    ("unknown app arg", check_serve_config, lambda m: _edit_args(m, lambda a: a.update(workers=2))),
    ("bad app arg value", check_serve_config, lambda m: _edit_args(m, lambda a: a.update(num_workers="two"))),
    ("no expert_node", check_serve_config, lambda m: _edit_args(m, lambda a: a.update(worker_resources={}))),
    ("grpc port moved", check_serve_config, lambda m: _edit_args(m, lambda a: a.update(grpc_port=9000))),
    ("model not on /models", check_serve_config, lambda m: _edit_args(m, lambda a: a.update(model="/tmp/m"))),
    (
        "args drift",
        check_same_app_as_serve_config,
        lambda m: _edit_args(m, lambda a: a.update(dtype="bfloat16")),
    ),
    (
        "other import path",
        check_same_app_as_serve_config,
        lambda m: _edit_serve_config(m, lambda c: c["applications"][0].update(import_path="x:y")),
    ),
    (
        "ingress not pinned",
        check_ingress_on_head,
        lambda m: _edit_args(m, lambda a: a.update(router_resources={}, serving_resources={})),
    ),
    (
        "pinned to a worker resource",
        check_ingress_on_head,
        lambda m: _edit_args(m, lambda a: a.update(serving_resources={"expert_node": 1})),
    ),
    (
        "ingress follows routers to router pods",
        check_ingress_on_head,
        lambda m: _edit_args(
            m, lambda a: a.update(serving_resources=None, router_resources={"router_node": 1})
        ),
    ),
    (
        "routers on router pods, none there",
        check_routers,
        lambda m: _edit_args(m, lambda a: a.update(router_resources={"router_node": 1})),
    ),
    (
        "more routers than router pods",
        check_routers,
        lambda m: _edit_args(m, lambda a: a.update(router_resources={"router_node": 1}, num_routers=5)),
    ),
    (
        "router autoscaling past the router pods",
        check_routers,
        lambda m: _edit_args(
            m,
            lambda a: a.update(
                router_resources={"router_node": 1}, router_autoscaling_config={"max_routers": 8}
            ),
        ),
    ),
    (
        "router pods with expert slots",
        check_routers,
        lambda m: _params(m, "routers").update(resources='\'{"router_node": 1, "expert_node": 16}\''),
    ),
    (
        "router pods that may scale away",
        check_routers,
        lambda m: (m.update(routers_on_their_own_pods(m)), groups(m)["routers"].update(minReplicas=0)),
    ),
    ("router pods with CPUs", check_routers, lambda m: _params(m, "routers").pop("num-cpus")),
    (
        "head offers router_node",
        check_routers,
        lambda m: _params(m, "head").update(resources='\'{"head": 1, "router_node": 1}\''),
    ),
    (
        "no router group",
        check_routers,
        lambda m: cluster_of(m)["workerGroupSpecs"].remove(groups(m)["routers"]),
    ),
    (
        "override asks for a CPU",
        check_ingress_on_head,
        lambda m: _edit_serve_config(
            m,
            lambda c: c["applications"][0].update(
                deployments=[
                    {"name": "MoEIngress", "ray_actor_options": {"num_cpus": 1, "resources": {"head": 0.01}}}
                ]
            ),
        ),
    ),
    ("head lacks the resource", check_ingress_on_head, lambda m: _params(m, "head").pop("resources")),
    ("head with CPUs", check_head, lambda m: _params(m, "head").update({"num-cpus": "4"})),
    (
        "head without 50051",
        check_head,
        lambda m: _container(m, "head").update(ports=_container(m, "head")["ports"][:-1]),
    ),
    (
        "head expert resource",
        check_head,
        lambda m: _params(m, "head").update(resources='\'{"expert_node": 1, "head": 1}\''),
    ),
    ("resources unquoted", check_head, lambda m: _params(m, "head").update(resources='{"head": 1}')),
    (
        "no gpu group",
        check_worker_groups,
        lambda m: cluster_of(m)["workerGroupSpecs"].remove(groups(m)["gpu-workers"]),
    ),
    (
        "gpu group without GPU",
        check_worker_groups,
        lambda m: _container(m, "gpu-workers")["resources"]["limits"].pop("nvidia.com/gpu"),
    ),
    (
        "gpu group CPU image",
        check_worker_groups,
        lambda m: _container(m, "gpu-workers").update(image="moe-serving:cpu"),
    ),
    (
        "workers without expert_node",
        check_worker_groups,
        lambda m: _params(m, "cpu-workers").pop("resources"),
    ),
    ("min above max", check_worker_groups, lambda m: groups(m)["cpu-workers"].update(minReplicas=9)),
    (
        "too few workers at start",
        check_worker_groups,
        lambda m: groups(m)["cpu-workers"].update(replicas=0, minReplicas=0),
    ),
    ("auth off", check_token_auth, lambda m: cluster_of(m)["authOptions"].update(mode="disabled")),
    ("literal token", check_token_auth, lambda m: _container(m, "cpu-workers")["env"][1].update(value="abc")),
    (
        "other secret",
        check_token_auth,
        lambda m: _container(m, "head")["env"][1]["valueFrom"]["secretKeyRef"].update(name="other"),
    ),
    ("token env missing", check_token_auth, lambda m: _container(m, "gpu-workers")["env"].pop(1)),
    ("old Ray", check_token_auth, lambda m: cluster_of(m).update(rayVersion="2.50.0")),
    (
        "shm on disk",
        check_volumes,
        lambda m: groups(m)["cpu-workers"]["template"]["spec"]["volumes"][0]["emptyDir"].pop("medium"),
    ),
    (
        "object store over shm",
        check_volumes,
        lambda m: _params(m, "head").update({"object-store-memory": str(8 * 2**30)}),
    ),
    ("probe overridden", check_probes, lambda m: _container(m, "head").update(readinessProbe={"exec": {}})),
    ("typo field", check_crd_fields, lambda m: groups(m)["gpu-workers"].update(minReplica=0)),
    ("no maxReplicas", check_crd_fields, lambda m: groups(m)["cpu-workers"].pop("maxReplicas")),
    ("int rayStartParam", check_crd_fields, lambda m: _params(m, "head").update({"num-cpus": 0})),
    ("bad auth mode", check_crd_fields, lambda m: cluster_of(m)["authOptions"].update(mode="tokens")),
    (
        "deprecated threshold",
        check_crd_fields,
        lambda m: m["spec"].update(serviceUnhealthySecondThreshold=900),
    ),
    ("wrong kind", check_crd_fields, lambda m: m.update(kind="RayCluster")),
]


@pytest.mark.parametrize(("what", "check", "change"), BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_copies_fail(manifest, what, check, change):
    broken = copy.deepcopy(manifest)
    change(broken)
    check(manifest)  # the intact manifest passes the same check
    with pytest.raises((AssertionError, ValueError, KeyError, TypeError, yaml.YAMLError)):
        check(broken)


def test_the_autoscaler_sees_the_node_types_the_app_needs(manifest):
    """Ray's own KubeRay autoscaler config reader on this cluster (a private Ray function: skipped if a
    Ray release drops it): the head offers no CPU and no expert slot, each worker group offers what one
    expert worker asks for, within the group's min and max."""
    reader = pytest.importorskip("ray.autoscaler._private.kuberay.autoscaling_config")
    derive = getattr(reader, "_derive_autoscaling_config_from_ray_cr", None)
    if derive is None:
        pytest.skip("this Ray has no _derive_autoscaling_config_from_ray_cr")
    cr = {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": "moe-serving", "namespace": "default"},
        "spec": copy.deepcopy(cluster_of(manifest)),
    }
    node_types = derive(cr)["available_node_types"]
    args = AppArgs.from_args(the_app(manifest)["args"])
    head = node_types["headgroup"]["resources"]
    assert head["CPU"] == 0 and EXPERT_RESOURCE not in head and head.get("head") == 1
    for name, gpus in (("cpu-workers", None), ("gpu-workers", 1)):
        group, resources = groups(manifest)[name], node_types[name]["resources"]
        assert resources.get("GPU") == gpus, (name, resources)
        assert resources["CPU"] >= args.worker_cpus and resources[EXPERT_RESOURCE] == 16, (name, resources)
        assert node_types[name]["min_workers"] == group["minReplicas"]
        assert node_types[name]["max_workers"] == group["maxReplicas"]
    # router pods: what a router on them asks for (routers_on_their_own_pods), nothing for experts
    routers = node_types[ROUTER_GROUP]
    assert routers["resources"].get(ROUTER_RESOURCE) == 1 and not routers["resources"].get("CPU"), routers
    assert EXPERT_RESOURCE not in routers["resources"]
    assert routers["max_workers"] == groups(manifest)[ROUTER_GROUP]["maxReplicas"]
