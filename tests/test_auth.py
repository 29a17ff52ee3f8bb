"""API and admin keys without a cluster: loading them (flags, environment, files), the rules
`AccessKeys.check` applies, the constant-time comparison, the start-up warning, the HTTP middleware
over a small Starlette app, the gRPC interceptor over a real grpc.aio server (plaintext and mutual
TLS), and the deployment files taking keys from secrets only. The served model behind keys and
TLS: test_auth_serving.py."""

import asyncio
import hmac
import logging
import re
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient
from tls_certs import make_certs

from cluster.serve_app import AppArgs, build_app, configs
from moe_serving.credentials import api_key_from_env, tls_credentials
from moe_serving.errors import ServingError
from moe_serving.grpc_client import AsyncGrpcClient
from router_service.serving import auth
from router_service.serving.auth import ADMIN, API, AccessKeys, AccessMiddleware, open_warning
from router_service.serving.grpc_server import start_grpc_server
from router_service.serving.settings import GrpcTls, ServingSettings

REPO = Path(__file__).resolve().parents[1]


# ---- loading ------------------------------------------------------------------------------------


def test_keys_from_flags_environment_and_files(tmp_path):
    api_file = tmp_path / "api.keys"
    api_file.write_text("# one key a line\nfile-key-1\n\n  file-key-2  \n")
    admin_file = tmp_path / "admin.keys"
    admin_file.write_text("admin-from-file\n")
    env = {"MOE_SERVE_API_KEY": " env-1, env-2 ,", "MOE_SERVE_ADMIN_KEY": "admin-from-env"}
    keys = AccessKeys.load(
        api_keys=["flag-key", "env-1"],
        api_key_files=[api_file],
        admin_key_files=[admin_file],
        environ=env,
    )
    assert keys.api_keys == ("flag-key", "env-1", "env-2", "file-key-1", "file-key-2")  # no duplicates
    assert keys.admin_keys == ("admin-from-env", "admin-from-file")
    assert AccessKeys.load(environ={}) == AccessKeys() and not AccessKeys().enabled
    assert AccessKeys.load(environ={"MOE_SERVE_API_KEY": ""}).enabled is False


def test_keys_never_shown_and_bad_ones_refused(tmp_path):
    keys = AccessKeys(api_keys=("secret-api",), admin_keys=("secret-admin",))
    for text in (repr(keys), str(keys), repr(ServingSettings(access=keys))):
        assert "secret" not in text and "1 api keys, 1 admin keys" in text
    for bad in (("",), ("has space",), ("a,b",)):
        with pytest.raises(ValueError) as e:
            AccessKeys(api_keys=bad)
        assert "has space" not in str(e.value)
    with pytest.raises(ValueError, match="one string"):
        AccessKeys(api_keys="abc")
    with pytest.raises(ValueError, match="cannot read the key file"):
        AccessKeys.load(api_key_files=[tmp_path / "missing"], environ={})


def test_client_key_from_the_environment():
    assert api_key_from_env(environ={"OPENAI_API_KEY": "o", "MOE_SERVE_API_KEY": "m1,m2"}) == "m1"
    assert api_key_from_env(environ={"OPENAI_API_KEY": "o"}) == "o"
    assert api_key_from_env(environ={}) is None


# ---- the rules ----------------------------------------------------------------------------------


def h(key: str | None) -> str | None:
    return None if key is None else f"Bearer {key}"


@pytest.mark.parametrize(
    "keys, header, admin, expected",
    [
        # no key configured: open
        (AccessKeys(), None, False, None),
        (AccessKeys(), None, True, None),
        # API keys only: both kinds of route take an API key
        (AccessKeys(api_keys=("a",)), h("a"), False, API),
        (AccessKeys(api_keys=("a",)), h("a"), True, API),
        (AccessKeys(api_keys=("a",)), None, False, "unauthenticated"),
        (AccessKeys(api_keys=("a",)), h("b"), True, "unauthenticated"),
        (AccessKeys(api_keys=("a",)), "Basic a", False, "unauthenticated"),
        (AccessKeys(api_keys=("a",)), "a", False, "unauthenticated"),
        # both: the admin routes need the admin key, which opens the data routes too
        (AccessKeys(api_keys=("a",), admin_keys=("z",)), h("a"), False, API),
        (AccessKeys(api_keys=("a",), admin_keys=("z",)), h("z"), False, ADMIN),
        (AccessKeys(api_keys=("a",), admin_keys=("z",)), h("a"), True, "permission_denied"),
        (AccessKeys(api_keys=("a",), admin_keys=("z",)), h("z"), True, ADMIN),
        (AccessKeys(api_keys=("a",), admin_keys=("z",)), None, True, "unauthenticated"),
        # an admin key only: the data routes stay open
        (AccessKeys(admin_keys=("z",)), None, False, None),
        (AccessKeys(admin_keys=("z",)), h("z"), True, ADMIN),
        (AccessKeys(admin_keys=("z",)), h("a"), True, "unauthenticated"),
    ],
)
def test_check(keys, header, admin, expected):
    if expected in ("unauthenticated", "permission_denied"):
        with pytest.raises(ServingError) as e:
            keys.check(header, admin)
        assert e.value.code == expected
        assert e.value.http_status == (401 if expected == "unauthenticated" else 403)
        if expected == "unauthenticated":
            assert e.value.to_json()["error"]["code"] == "invalid_api_key"
    else:
        assert keys.check(header, admin) == expected


def test_every_key_is_compared_in_constant_time(monkeypatch):
    calls, original = [], hmac.compare_digest

    def compare(a, b):
        calls.append((a, b))
        return original(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", compare)
    keys = AccessKeys(api_keys=("k1", "k2", "k3"), admin_keys=("z1", "z2"))
    for header in (h("k1"), h("z2"), h("nothing")):
        calls.clear()
        keys.role(header)
        assert sorted(b for _, b in calls) == [b"k1", b"k2", b"k3", b"z1", b"z2"], header


def test_which_paths_are_open():
    keys = AccessKeys(api_keys=("a",))
    assert [keys.http_scope(p) for p in ("/healthz", "/health", "/metrics", "/docs", "/openapi.json")] == [
        None
    ] * 5
    assert keys.http_scope("/v1/completions") is False and keys.http_scope("/tokenize") is False
    assert keys.http_scope("/v1/cluster") is True and keys.http_scope("/v1/cluster/scale") is True
    assert keys.http_scope("/v1/clusterx") is False
    assert AccessKeys(api_keys=("a",), protect_metrics=True).http_scope("/metrics") is False


def test_warning_when_exposed_without_a_key(caplog):
    assert open_warning(["127.0.0.1"], AccessKeys()) is None
    assert open_warning(["localhost", "::1"], AccessKeys()) is None
    assert open_warning(["0.0.0.0"], AccessKeys(api_keys=("a",))) is None
    text = open_warning(["0.0.0.0", "127.0.0.1"], AccessKeys())
    assert "0.0.0.0" in text and "reconfigure" in text and "127.0.0.1" not in text.split(":")[0]
    assert open_warning(["serving.example"], AccessKeys()) is not None


def test_serve_app_reads_keys_from_the_environment_and_warns_without(monkeypatch, caplog, tmp_path):
    """The Serve application (`serve run` / KubeRay) takes keys from the environment or a file only,
    and says so loudly when its gRPC port is exposed without one."""
    monkeypatch.delenv("MOE_SERVE_API_KEY", raising=False)
    monkeypatch.delenv("MOE_SERVE_ADMIN_KEY", raising=False)
    with caplog.at_level(logging.WARNING, logger="cluster.serve_app"):
        build_app({"grpc_host": "0.0.0.0"})
    assert any("NO API KEY" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    caplog.clear()
    monkeypatch.setenv("MOE_SERVE_API_KEY", "from-env")
    admin = tmp_path / "admin.key"
    admin.write_text("from-file\n")
    with caplog.at_level(logging.WARNING, logger="cluster.serve_app"):
        build_app({"grpc_host": "0.0.0.0", "admin_key_file": str(admin), "protect_metrics": "true"})
    assert not any("NO API KEY" in r.getMessage() for r in caplog.records)
    _, _, settings, _ = configs(AppArgs.from_args({"admin_key_file": str(admin), "allowed_origins": "*"}))
    assert settings.access.api_keys == ("from-env",) and settings.access.admin_keys == ("from-file",)
    assert settings.allowed_origins == ("*",)
    assert "api_key" not in {f for f in AppArgs.__dataclass_fields__ if "file" not in f}


# ---- HTTP middleware ------------------------------------------------------------------------------


def test_http_middleware():
    async def ok(request):
        return PlainTextResponse("ok")

    inner = Starlette(routes=[Route(p, ok) for p in ("/healthz", "/v1/models", "/v1/cluster")])
    keys = AccessKeys(api_keys=("a",), admin_keys=("z",))
    client = TestClient(AccessMiddleware(inner, lambda: keys))  # a function: read at the first request
    assert client.get("/healthz").text == "ok"
    r = client.get("/v1/models")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert r.json()["error"]["code"] == "invalid_api_key"
    assert client.get("/v1/models", headers={"Authorization": "Bearer a"}).text == "ok"
    assert client.get("/v1/cluster", headers={"Authorization": "Bearer a"}).status_code == 403
    assert client.get("/v1/cluster", headers={"Authorization": "Bearer z"}).text == "ok"
    assert client.get("/v1/unknown").status_code == 401, "nothing revealed without a key"


# ---- gRPC interceptor -----------------------------------------------------------------------------


class Backend:
    """The servicer's backend contract, answering only what these tests call."""

    async def cluster_state(self) -> dict:
        return {"num_workers": 3, "workers": []}

    async def rebalance(self) -> dict:
        return {"placement_version": 1}

    def generate(self, params):
        raise ServingError("invalid_argument", "no model here")


async def _grpc_round(tls: GrpcTls | None, credentials) -> None:
    keys = AccessKeys(api_keys=("a",), admin_keys=("z",))
    server = await start_grpc_server(Backend(), "127.0.0.1", 0, access=keys, tls=tls)
    target = f"{'localhost' if tls else '127.0.0.1'}:{server.port}"
    try:
        for key, expected in (
            (None, "UNAUTHENTICATED"),
            ("b", "UNAUTHENTICATED"),
            ("a", "PERMISSION_DENIED"),
        ):
            async with AsyncGrpcClient(target, api_key=key, credentials=credentials, timeout=30) as c:
                assert await c.health(), "health stays open"
                with pytest.raises(ServingError) as e:
                    await c.cluster_state()
                assert e.value.status == expected, key
                with pytest.raises(ServingError) as e:  # a streaming method
                    [x async for x in c.generate(prompt="x")]
                assert e.value.status == ("INVALID_ARGUMENT" if key == "a" else "UNAUTHENTICATED")
        async with AsyncGrpcClient(target, api_key="z", credentials=credentials, timeout=30) as c:
            assert (await c.cluster_state())["num_workers"] == 3
            assert (await c.rebalance())["placement_version"] == 1
    finally:
        await server.stop(None)


def test_grpc_interceptor_plaintext(monkeypatch):
    monkeypatch.delenv("MOE_SERVE_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    asyncio.run(_grpc_round(None, None))


def test_grpc_interceptor_mutual_tls(tmp_path, monkeypatch):
    monkeypatch.delenv("MOE_SERVE_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    certs = make_certs(tmp_path)
    tls = GrpcTls(str(certs.server_cert), str(certs.server_key), str(certs.ca))
    asyncio.run(_grpc_round(tls, tls_credentials(certs.ca, certs.client_cert, certs.client_key)))

    async def without_client_cert():
        server = await start_grpc_server(Backend(), "127.0.0.1", 0, tls=tls)
        try:
            channel = grpc.aio.secure_channel(f"localhost:{server.port}", tls_credentials(certs.ca))
            async with channel:
                with pytest.raises(grpc.RpcError) as e:
                    await health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(), timeout=30
                    )
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            await server.stop(None)

    asyncio.run(without_client_cert())
    with pytest.raises(ValueError, match="cannot read the gRPC TLS key"):
        GrpcTls(str(certs.server_cert), str(tmp_path / "missing.key")).read()


# ---- deployment files ---------------------------------------------------------------------------


def test_deployment_files_take_keys_from_secrets():
    manifest = yaml.safe_load((REPO / "cluster" / "kuberay" / "rayservice.yaml").read_text())
    cluster = manifest["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for g in groups:
        for container in g["template"]["spec"]["containers"]:
            env = {e["name"]: e for e in container.get("env", [])}
            for name, key in (("MOE_SERVE_API_KEY", "api_key"), ("MOE_SERVE_ADMIN_KEY", "admin_key")):
                assert "value" not in env[name], f"{container['name']}: a key in the manifest"
                ref = env[name]["valueFrom"]["secretKeyRef"]
                assert ref == {"name": "moe-serving-keys", "key": key, "optional": True}
    serve_config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    args = serve_config["applications"][0]["args"]
    assert not any("key" in name and "file" not in name for name in args), "no key among the app's args"
    example = (REPO / ".env.example").read_text()
    assert re.search(r"^MOE_SERVE_API_KEY=$", example, re.M) and re.search(
        r"^MOE_SERVE_ADMIN_KEY=$", example, re.M
    )
    compose = (REPO / "docker-compose.yml").read_text()
    assert "MOE_SERVE_API_KEY=" not in compose and "--api-key " not in compose
