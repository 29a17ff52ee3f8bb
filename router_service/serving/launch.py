"""Start and stop a whole server: Ray, the Ray Serve application (whose ingress starts the Router,
its expert workers and the gRPC actor); used by `moe-serve serve`, the tests and the benchmarks.
`cluster.serve_app` builds the same application for `serve run` / `serve deploy` / KubeRay."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import ray
from ray import serve

from moe_models.spec import ModelSpec
from router_service.config import BatchLimits, EngineConfig
from router_service.engine import make_config
from router_service.runtime.ray_transport import NAMESPACE, check_cluster_fits, worker_bundle
from router_service.runtime.router_actor import (
    controller_name,
    ensure_ray,
    kill_cluster_actors,
    min_cluster_cpus,
    router_name,
)
from router_service.serving.auth import open_warning
from router_service.serving.http_app import MoEIngress
from router_service.serving.settings import ServingSettings

log = logging.getLogger(__name__)

APP_NAME = "moe-serving"
DEPLOYMENT_NAME = "MoEIngress"


@dataclass(frozen=True)
class ServerOptions:
    """Where and how to serve; the model's own settings (workers, transport, dtype) are separate."""

    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 50051
    ready_timeout_s: float = 300.0
    tls_cert: str | None = None  # HTTPS on the HTTP port (Serve's proxy): PEM certificate chain...
    tls_key: str | None = None  # ...and its private key; both or neither

    def __post_init__(self):
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("HTTPS needs both --tls-cert and --tls-key")
        for path in (self.tls_cert, self.tls_key):
            if path is not None and not Path(path).is_file():
                raise ValueError(f"TLS file {path} does not exist (or is not a file)")

    def http_options(self, port: int) -> dict:
        """Serve's http_options: where its proxy listens, with TLS when set."""
        tls = {"ssl_certfile": self.tls_cert, "ssl_keyfile": self.tls_key} if self.tls_cert else {}
        return {"host": self.host, "port": port, **tls}


def _check_port_free(host: str, port: int, what: str) -> int:
    """Fail early with a clear message (Serve's proxy would only log the bind error); port 0 picks a
    free one.

    The probe binds with SO_REUSEADDR, as uvicorn (Serve's proxy) and gRPC's server do: connections
    a server stopped moments ago had accepted sit in TIME_WAIT on the port for about a minute, and
    without it a restart on the same port would be refused although the servers themselves would
    bind it. A port some live socket listens on is still refused (Linux never lets a bind share a
    listener's address, SO_REUSEADDR or not)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise OSError(e.errno, f"{what} port {port} on {host} is not available: {e.strerror}") from None
        return s.getsockname()[1]


def application(config: EngineConfig, settings: ServingSettings, grpc_address: tuple[str, int] | None):
    """The Serve application: the ingress deployment, which owns the router, its workers and the
    gRPC front end (`MoEIngress`). `start_server` and `cluster.serve_app.build_app` both return this."""
    options = {"num_cpus": 0, "resources": config.serving_actor_resources}
    return MoEIngress.options(name=DEPLOYMENT_NAME, ray_actor_options=options).bind(
        config, settings, grpc_address
    )


def fit_settings(settings: ServingSettings, limits: BatchLimits, spec: ModelSpec) -> ServingSettings:
    """The settings the ingress runs with: the context (max_model_len) is the model's
    max_position_embeddings unless a smaller one is given (a larger one is refused, as vLLM does:
    positions past those the model was trained for give garbage), and the router's batch must be
    able to hold any request the ingress accepts."""
    positions = spec.max_position_embeddings
    if settings.max_model_len is None:
        settings = dataclasses.replace(settings, max_model_len=positions)
    elif positions is not None and settings.max_model_len > positions:
        raise ValueError(
            f"max_model_len {settings.max_model_len} is more than the model's context "
            f"(max_position_embeddings {positions} in its config.json)"
        )
    if settings.max_request_tokens > limits.max_batch_tokens:
        log.info(
            "max_request_tokens %d lowered to the router's max_batch_tokens %d",
            settings.max_request_tokens,
            limits.max_batch_tokens,
        )
        settings = dataclasses.replace(settings, max_request_tokens=limits.max_batch_tokens)
    return settings


def deploy_error(e: BaseException) -> ValueError:
    """One line out of a failed Serve deployment: the cause the replica's constructor raised."""
    text = str(e)
    causes = [
        line.strip()
        for line in text.splitlines()
        if line.strip().startswith(
            ("ValueError", "WorkerError", "WorkerStartError", "CheckpointError", "ConfigError")
        )
    ]
    return ValueError(
        causes[-1].split(": ", 1)[-1] if causes else f"the server did not start: {text.splitlines()[0]}"
    )


class Server:
    """A running server. `http_url`, `grpc_target`, `router` (the Router actor's handle), `spec`;
    `shutdown()` (or `with`) stops everything it started, Ray included when it started Ray."""

    def __init__(
        self, config: EngineConfig, spec, owns_ray: bool, http_url: str, grpc_target: str, model_name: str
    ):
        self.config, self.spec, self.owns_ray = config, spec, owns_ray
        self.http_url, self.grpc_target, self.model_name = http_url, grpc_target, model_name
        self._running = True

    @property
    def router(self):
        """Router 0's actor (detached and named: its handle survives its restarts)."""
        return ray.get_actor(router_name(self.config.cluster_name, "0"), namespace=NAMESPACE)

    @property
    def controller(self):
        """The membership controller's actor."""
        return ray.get_actor(controller_name(self.config.cluster_name), namespace=NAMESPACE)

    def shutdown(self) -> None:
        if not self._running:
            return
        self._running = False
        # Deleting the app stops its replica gracefully, which stops the router, its workers and the
        # gRPC actor (MoEIngress.__del__); anything a crashed replica left is killed by name.
        with contextlib.suppress(Exception):
            serve.delete(APP_NAME)
        kill_cluster_actors(self.config.cluster_name)
        if self.owns_ray:
            ray.shutdown()  # a Ray instance we started goes away whole
        else:
            with contextlib.suppress(Exception):
                serve.shutdown()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def start_server(
    model_dir: str | Path,
    *,
    num_workers: int = 2,
    transport: str = "socket",
    dtype: str = "float32",
    ray_address: str | None = None,
    options: ServerOptions = ServerOptions(),
    settings: ServingSettings | None = None,
    batch_limits: BatchLimits | None = None,
    progress: str = "auto",
    **engine_kwargs,
) -> Server:
    """Load the model on Ray and serve it over HTTP and gRPC; returns once both answer health checks.

    engine_kwargs: the other arguments of `Engine.from_pretrained` (worker_resources, elastic, ...).
    """
    if transport == "local":
        raise ValueError("serving needs a Ray transport: 'ray', 'socket' or 'compiled'")
    settings = settings or ServingSettings(model_name=Path(model_dir).name)
    batch_limits = batch_limits or BatchLimits()
    config, spec = make_config(
        model_dir,
        num_workers=num_workers,
        transport=transport,
        dtype=dtype,
        batch_limits=batch_limits,
        progress=progress,
        **engine_kwargs,
    )
    settings = fit_settings(settings, batch_limits, spec)
    warning = open_warning([options.host], settings.access)
    if warning:
        log.warning(warning)
    # Serve's driver-side logger announces every (re)start at INFO; the addresses are printed by us.
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    http_port = _check_port_free(options.host, options.http_port, "HTTP")
    grpc_port = _check_port_free(options.host, options.grpc_port, "gRPC")
    t0 = time.perf_counter()
    owns = ensure_ray(ray_address, min_cpus=min_cluster_cpus(config))
    server = Server(config, spec, owns, "", "", settings.model_name)
    try:
        # fail fast, here, rather than in the replica (GPUs "auto": left to the worker actors)
        check_cluster_fits(worker_bundle(config.worker_resources, config.worker_resources.num_gpus or 0))
        if config.router_resources:
            check_cluster_fits(config.router_resources, "the router")
        if config.serving_actor_resources not in ({}, config.router_resources):
            check_cluster_fits(config.serving_actor_resources, "the serving actors")
        serve.start(http_options=options.http_options(http_port), logging_config={"log_level": "WARNING"})
        try:
            handle = serve.run(
                application(config, settings, (options.host, grpc_port)),
                name=APP_NAME,
                route_prefix="/",
                blocking=False,
                logging_config={"log_level": "WARNING"},
            )
        except RuntimeError as e:  # the replica's constructor failed: its cause, on one line
            raise deploy_error(e) from None
        grpc_port = handle.grpc_port_bound.remote().result()
        connect = "127.0.0.1" if options.host in ("0.0.0.0", "::") else options.host
        scheme = "https" if options.tls_cert else "http"
        server.http_url, server.grpc_target = f"{scheme}://{connect}:{http_port}", f"{connect}:{grpc_port}"
        # Over TLS (mutual TLS perhaps) this process may hold no certificate the gRPC port accepts:
        # its health is read from the gRPC actor instead.
        grpc_actor = (
            ray.get_actor(f"{config.cluster_name}:grpc", namespace=NAMESPACE) if settings.grpc_tls else None
        )
        wait_until_ready(server.http_url, server.grpc_target, options.ready_timeout_s, grpc_actor)
    except BaseException:
        server.shutdown()
        raise
    log.info(
        "serving %s: HTTP %s, gRPC %s (ready in %.1fs)",
        settings.model_name,
        server.http_url,
        server.grpc_target,
        time.perf_counter() - t0,
    )
    return server


def wait_until_ready(http_url: str, grpc_target: str, timeout_s: float, grpc_actor=None) -> None:
    """Poll GET /healthz and the gRPC health service until both say so (`grpc_actor`: ask the gRPC
    actor what its health service says instead of calling it; for TLS).

    An https URL is polled without checking its certificate: this is the server we just started,
    on this machine, asked only whether it is up."""
    import grpc
    import httpx
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    http_ok = grpc_ok = False
    with grpc.insecure_channel(grpc_target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while not (http_ok and grpc_ok):
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"server not ready after {timeout_s:.0f}s (HTTP /healthz ok: {http_ok}, gRPC health ok: {grpc_ok})"
                )
            if not http_ok:
                with contextlib.suppress(httpx.HTTPError):
                    http_ok = httpx.get(f"{http_url}/healthz", timeout=5, verify=False).status_code == 200
            if not grpc_ok and grpc_actor is not None:
                with contextlib.suppress(ray.exceptions.RayError):
                    grpc_ok = ray.get(grpc_actor.is_serving.remote(), timeout=5)
            elif not grpc_ok:
                with contextlib.suppress(grpc.RpcError):
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
                    grpc_ok = reply.status == health_pb2.HealthCheckResponse.SERVING
            if not (http_ok and grpc_ok):
                time.sleep(0.2)
