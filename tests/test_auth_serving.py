"""Keys, TLS, CORS and the router's own refusals on a real server (Ray Serve over HTTPS, gRPC over
mutual TLS), one server for the module: API keys and an admin key, CORS for one origin.

What a client without a key, with a wrong key or with the plain API key on an admin route gets
(401 / 403 in OpenAI's error shape, gRPC UNAUTHENTICATED / PERMISSION_DENIED), what stays open
(/healthz, /health, /metrics, gRPC health), CORS preflights, JSON 404 / 405 with `Allow`, gRPC
refusing a client without a certificate, and the CLI and Python clients with keys and CA roots.
"""

import importlib.util
import io
import os
import ssl
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import grpc
import httpx
import pytest
import ray
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tls_certs import make_certs

from moe_serving import ServingError
from moe_serving.credentials import tls_credentials
from moe_serving.grpc_client import GrpcClient
from moe_serving.http_client import HTTPClient
from router_service import cli
from router_service.default_model import default_model_dir
from router_service.serving.auth import AccessKeys
from router_service.serving.launch import ServerOptions, start_server
from router_service.serving.settings import GrpcTls, ServingSettings

REPO = Path(__file__).resolve().parents[1]

API_KEYS = ("api-key-one-7f3a", "api-key-two-91bc")
ADMIN_KEY = "admin-key-5d2e"
ORIGIN = "https://ui.example"


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def server(certs):
    settings = ServingSettings(
        model_name="tiny-moe",
        access=AccessKeys(api_keys=API_KEYS, admin_keys=(ADMIN_KEY,)),
        allowed_origins=(ORIGIN,),
        grpc_tls=GrpcTls(str(certs.server_cert), str(certs.server_key), client_ca=str(certs.ca)),
    )
    options = ServerOptions(
        http_port=0,
        grpc_port=0,
        tls_cert=str(certs.server_cert),
        tls_key=str(certs.server_key),
        ready_timeout_s=600,
    )
    with start_server(
        default_model_dir(),
        num_workers=1,
        transport="ray",
        options=options,
        settings=settings,
        progress="off",
    ) as s:
        yield s


@pytest.fixture(scope="module")
def http(server, certs):
    """A plain httpx client that trusts the test CA and sends no key by itself."""
    with httpx.Client(
        base_url=server.http_url, verify=ssl.create_default_context(cafile=certs.ca), timeout=120
    ) as c:
        yield c


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def assert_openai_error(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "code"} and err["code"] == code, err
    assert err["type"] == "invalid_request_error"
    return err


def grpc_client(server, certs, key: str | None, client_cert: bool = True) -> GrpcClient:
    credentials = tls_credentials(
        certs.ca, certs.client_cert if client_cert else None, certs.client_key if client_cert else None
    )
    return GrpcClient(server.grpc_target, api_key=key, credentials=credentials, timeout=120)


# ---- HTTP ---------------------------------------------------------------------------------------


def test_https_and_the_open_routes(server, http):
    assert server.http_url.startswith("https://")
    for path in ("/healthz", "/health", "/metrics"):
        assert http.get(path).status_code == 200, path
    with pytest.raises(httpx.ConnectError):  # the certificate is not one the system trusts
        httpx.get(f"{server.http_url}/healthz", timeout=30)


def test_data_routes_need_a_key(http):
    r = http.get("/v1/models")
    err = assert_openai_error(r, 401, "invalid_api_key")
    assert r.headers["www-authenticate"] == "Bearer"
    assert "Authorization: Bearer" in err["message"]
    err = assert_openai_error(http.get("/v1/models", headers=bearer("nope")), 401, "invalid_api_key")
    assert "nope" not in err["message"], "a key is never echoed"
    assert_openai_error(
        http.get("/v1/models", headers={"Authorization": API_KEYS[0]}), 401, "invalid_api_key"
    )
    assert_openai_error(http.post("/tokenize", json={"prompt": "hi"}), 401, "invalid_api_key")
    for key in (*API_KEYS, ADMIN_KEY):  # every API key, and the admin key, open the data routes
        r = http.get("/v1/models", headers=bearer(key))
        assert r.status_code == 200 and r.json()["data"][0]["id"] == "tiny-moe", r.text
    r = http.post(
        "/v1/completions",
        json={"prompt": "Hello", "max_tokens": 3, "temperature": 0},
        headers={"authorization": f"bearer {API_KEYS[1]}"},  # the scheme is case-insensitive
    )
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3, r.text


def test_admin_routes_need_the_admin_key(http):
    assert_openai_error(http.get("/v1/cluster"), 401, "invalid_api_key")
    for method, path, body in (
        ("GET", "/v1/cluster", None),
        ("POST", "/v1/cluster/scale", {"num_workers": 2}),
        ("POST", "/v1/cluster/rebalance", {}),
        ("POST", "/v1/cluster/routers", {"num_routers": 2}),
    ):
        r = http.request(method, path, json=body, headers=bearer(API_KEYS[0]))
        assert_openai_error(r, 403, "admin_key_required")
    r = http.get("/v1/cluster", headers=bearer(ADMIN_KEY))
    assert r.status_code == 200 and r.json()["num_workers"] == 1
    for key in (*API_KEYS, ADMIN_KEY):
        assert key not in r.text, "no key in the cluster state"
        assert key not in http.get("/metrics").text


def test_python_http_client_with_a_key(server, certs, monkeypatch):
    monkeypatch.delenv("MOE_SERVE_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with HTTPClient(server.http_url, verify=ssl.create_default_context(cafile=certs.ca)) as c:
        with pytest.raises(ServingError) as e:
            c.models()
        assert e.value.code == "unauthenticated" and e.value.status == 401
        assert e.value.reason == "invalid_api_key"
    monkeypatch.setenv("OPENAI_API_KEY", API_KEYS[0])  # read as the openai client reads it
    with HTTPClient(server.http_url, verify=ssl.create_default_context(cafile=certs.ca)) as c:
        assert c.models()["data"][0]["id"] == "tiny-moe"
        with pytest.raises(ServingError) as e:
            c.cluster_state()
        assert e.value.code == "permission_denied" and e.value.status == 403
    with HTTPClient(
        server.http_url, verify=ssl.create_default_context(cafile=certs.ca), api_key=ADMIN_KEY
    ) as c:
        assert c.cluster_state()["num_workers"] == 1


def test_cors(http):
    preflight = {
        "Origin": ORIGIN,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    r = http.options("/v1/chat/completions", headers=preflight)  # no key: browsers send none here
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in r.headers["access-control-allow-methods"]
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    r = http.options("/v1/chat/completions", headers={**preflight, "Origin": "https://evil.example"})
    assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
    # the answers themselves carry the header, refusals included (so a browser can read them)
    r = http.get("/v1/models", headers={"Origin": ORIGIN})
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == ORIGIN
    r = http.get("/v1/models", headers={"Origin": ORIGIN, **bearer(API_KEYS[0])})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN


def test_unknown_route_and_wrong_method(http):
    key = bearer(API_KEYS[0])
    assert_openai_error(http.get("/v1/nothing-here"), 401, "invalid_api_key")  # nothing revealed
    err = assert_openai_error_any(http.get("/v1/nothing-here", headers=key), 404, "not_found")
    assert "/v1/nothing-here" in err["message"]
    r = http.get("/v1/completions", headers=key)
    err = assert_openai_error_any(r, 405, "method_not_allowed")
    assert r.headers["allow"] == "POST" and "GET" in err["message"] and "/v1/completions" in err["message"]
    r = http.post("/healthz")
    assert r.status_code == 405 and "GET" in r.headers["allow"], r.headers
    assert r.json()["error"]["code"] == "method_not_allowed"


def assert_openai_error_any(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["message"], err
    return err


# ---- gRPC ---------------------------------------------------------------------------------------


def test_grpc_needs_a_key(server, certs, monkeypatch):
    monkeypatch.delenv("MOE_SERVE_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    ids = torch.tensor([[1, 2, 3]])
    for key in (None, "wrong-key"):
        with grpc_client(server, certs, key) as c:
            assert c.health(), "gRPC health stays open"
            with pytest.raises(ServingError) as e:
                c.forward(ids)
            assert e.value.status == "UNAUTHENTICATED" and e.value.code == "unauthenticated"
            with pytest.raises(ServingError) as e:
                list(c.generate(prompt="Hello", max_tokens=2))
            assert e.value.status == "UNAUTHENTICATED"
            if key:
                assert key not in e.value.message
    with grpc_client(server, certs, API_KEYS[1]) as c:
        assert c.forward(ids).shape[:2] == (1, 3)
        chunks = list(c.generate(prompt="Hello", max_tokens=2, temperature=0.0))
        assert sum(len(ch.token_ids) for ch in chunks) == 2
        for call in (c.cluster_state, lambda: c.scale(2), c.rebalance, lambda: c.scale_routers(2)):
            with pytest.raises(ServingError) as e:
                call()
            assert e.value.status == "PERMISSION_DENIED"
    with grpc_client(server, certs, ADMIN_KEY) as c:
        assert c.cluster_state()["num_workers"] == 1
        assert c.forward(ids).shape[:2] == (1, 3), "the admin key opens the data methods too"


def test_grpc_mutual_tls_refuses_a_client_without_a_certificate(server, certs):
    with grpc_client(server, certs, API_KEYS[0], client_cert=False) as c:
        with pytest.raises(ServingError) as e:
            c.forward(torch.tensor([[1, 2]]))
        assert e.value.status == "UNAVAILABLE"
        assert not c.health()
    with grpc.insecure_channel(server.grpc_target) as channel:  # plaintext to a TLS port
        with pytest.raises(grpc.RpcError) as e:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE


# ---- the command line ---------------------------------------------------------------------------


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


def test_cli_clients_with_keys_and_roots(server, certs, monkeypatch):
    for name in ("MOE_SERVE_API_KEY", "MOE_SERVE_ADMIN_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    url = ["--url", server.http_url, "--tls-ca", str(certs.ca), "--json"]
    code, _, err = run_cli(["cluster", *url])
    assert code == 2 and "API key" in err
    code, _, err = run_cli(["cluster", *url, "--api-key", API_KEYS[0]])
    assert code == 2 and "admin key" in err
    monkeypatch.setenv("MOE_SERVE_ADMIN_KEY", ADMIN_KEY)  # the admin commands read it first
    code, out, err = run_cli(["cluster", *url])
    assert code == 0 and '"num_workers": 1' in out, err
    grpc_args = ["--grpc", server.grpc_target, "--tls-ca", str(certs.ca), "--json"]
    mtls = ["--client-cert", str(certs.client_cert), "--client-key", str(certs.client_key)]
    code, out, err = run_cli(["cluster", *grpc_args, *mtls])
    assert code == 0 and '"num_workers": 1' in out, err
    code, _, err = run_cli(["cluster", *grpc_args])  # no client certificate
    assert code == 2, err
    monkeypatch.setenv("MOE_SERVE_API_KEY", API_KEYS[0])
    code, out, err = run_cli(
        [
            "generate",
            "--url",
            server.http_url,
            "--tls-ca",
            str(certs.ca),
            "--prompt",
            "Hi",
            "--max-tokens",
            "2",
        ]
    )
    assert code == 0, err


def test_compose_health_check_over_tls(server):
    """The compose containers' health check (cluster/docker/healthcheck.py) on a TLS server: HTTPS
    /healthz without a key or a trusted certificate, and the gRPC port reachable."""
    spec = importlib.util.spec_from_file_location(
        "healthcheck", REPO / "cluster" / "docker" / "healthcheck.py"
    )
    healthcheck = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(healthcheck)
    healthcheck.http_ok(f"{server.http_url}/healthz")
    host, port = server.grpc_target.rsplit(":", 1)
    healthcheck.tcp_open(host, int(port))
    with pytest.raises(SystemExit):
        healthcheck.http_ok(f"{server.http_url}/v1/models")  # a protected route: 401


def test_no_key_in_the_logs(server):
    """Ray's session logs (the driver's, Serve's controller, proxy and replica, the actors) name no
    key, after every test above sent them."""
    logs = Path(ray._private.worker.global_worker.node.get_session_dir_path()) / "logs"
    secrets = [k.encode() for k in (*API_KEYS, ADMIN_KEY)]
    for path in logs.rglob("*"):
        if path.is_file() and os.access(path, os.R_OK):
            data = path.read_bytes()
            assert not any(s in data for s in secrets), f"a key in {path}"
