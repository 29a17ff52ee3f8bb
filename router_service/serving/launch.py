"""Start and stop a whole server: Ray, the Router and expert workers, the Ray Serve HTTP app and
the gRPC actor; used by `moe-serve serve`, the tests and the load benchmark."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from router_service.config import BatchLimits
from router_service.engine import Engine
from router_service.serving.settings import ServingSettings

log = logging.getLogger(__name__)

APP_NAME = "moe-serving"
DEPLOYMENT_NAME = "MoEIngress"
GRPC_ACTOR_NAME = "moe-serving-grpc"


@dataclass(frozen=True)
class ServerOptions:
    """Where and how to serve; the model's own settings (workers, transport, dtype) are separate."""

    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 50051
    ready_timeout_s: float = 300.0


def _check_port_free(host: str, port: int, what: str) -> int:
    """Fail early with a clear message (Serve's proxy would only log the bind error); port 0 picks a
    free one."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise OSError(e.errno, f"{what} port {port} on {host} is not available: {e.strerror}") from None
        return s.getsockname()[1]


class Server:
    """A running server. `http_url`, `grpc_target`; `shutdown()` (or `with`) stops everything it
    started, Ray included when it started Ray."""

    def __init__(self, engine: Engine, grpc_actor, http_url: str, grpc_target: str, model_name: str):
        self.engine, self._grpc = engine, grpc_actor
        self.http_url, self.grpc_target, self.model_name = http_url, grpc_target, model_name

    def shutdown(self) -> None:
        import ray
        from ray import serve

        if self.engine is None:
            return
        if self._grpc is not None:
            with contextlib.suppress(Exception):
                ray.get(self._grpc.stop.remote(), timeout=10)
            with contextlib.suppress(Exception):
                ray.kill(self._grpc)
        if not self.engine.owns_ray:
            # On a cluster we joined, remove our Serve instance; a Ray instance we started goes
            # away whole with the engine (Serve's own shutdown there only adds a noisy retry of
            # its controller's last task).
            with contextlib.suppress(Exception):
                serve.shutdown()
        self.engine.shutdown()
        self.engine = None

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def start_server(
    model_dir: str | Path,
    *,
    num_workers: int = 2,
    transport: str = "ray",
    dtype: str = "float32",
    ray_address: str | None = None,
    options: ServerOptions = ServerOptions(),
    settings: ServingSettings | None = None,
    batch_limits: BatchLimits | None = None,
    progress: str = "auto",
    **engine_kwargs,
) -> Server:
    """Load the model on Ray and serve it over HTTP and gRPC; returns once both answer health checks."""
    import ray
    from ray import serve

    from router_service.serving.grpc_ingress import GrpcIngress
    from router_service.serving.http_app import MoEIngress

    if transport == "local":
        raise ValueError("serving needs a Ray transport: 'ray' or 'compiled'")
    model_dir = str(model_dir)
    settings = settings or ServingSettings(model_name=Path(model_dir).name)
    batch_limits = batch_limits or BatchLimits()
    if settings.max_request_tokens > batch_limits.max_batch_tokens:
        # The router's batch must be able to hold any request the ingress accepts.
        log.info(
            "max_request_tokens %d lowered to the router's max_batch_tokens %d",
            settings.max_request_tokens,
            batch_limits.max_batch_tokens,
        )
        settings = dataclasses.replace(settings, max_request_tokens=batch_limits.max_batch_tokens)
    # Serve's driver-side logger announces every (re)start at INFO; the addresses are printed by us.
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    http_port = _check_port_free(options.host, options.http_port, "HTTP")
    grpc_port = _check_port_free(options.host, options.grpc_port, "gRPC")
    t0 = time.perf_counter()
    engine = Engine.from_pretrained(
        model_dir,
        num_workers=num_workers,
        transport=transport,
        dtype=dtype,
        ray_address=ray_address,
        batch_limits=batch_limits,
        progress=progress,
        **engine_kwargs,
    )
    grpc_actor = None
    try:
        serve.start(
            http_options={"host": options.host, "port": http_port}, logging_config={"log_level": "WARNING"}
        )
        app = MoEIngress.options(name=DEPLOYMENT_NAME).bind(engine.actor, model_dir, settings)
        serve.run(
            app, name=APP_NAME, route_prefix="/", blocking=False, logging_config={"log_level": "WARNING"}
        )
        grpc_actor = (
            ray.remote(GrpcIngress)
            .options(num_cpus=0, name=GRPC_ACTOR_NAME)
            .remote(APP_NAME, DEPLOYMENT_NAME)
        )
        grpc_port = ray.get(grpc_actor.start.remote(options.host, grpc_port))
        connect = "127.0.0.1" if options.host in ("0.0.0.0", "::") else options.host
        server = Server(
            engine, grpc_actor, f"http://{connect}:{http_port}", f"{connect}:{grpc_port}", settings.model_name
        )
        wait_until_ready(server.http_url, server.grpc_target, options.ready_timeout_s)
    except BaseException:
        Server(engine, grpc_actor, "", "", settings.model_name).shutdown()
        raise
    log.info(
        "serving %s: HTTP %s, gRPC %s (ready in %.1fs)",
        settings.model_name,
        server.http_url,
        server.grpc_target,
        time.perf_counter() - t0,
    )
    return server


def wait_until_ready(http_url: str, grpc_target: str, timeout_s: float) -> None:
    """Poll GET /healthz and the gRPC health service until both say so."""
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
                    http_ok = httpx.get(f"{http_url}/healthz", timeout=5).status_code == 200
            if not grpc_ok:
                with contextlib.suppress(grpc.RpcError):
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
                    grpc_ok = reply.status == health_pb2.HealthCheckResponse.SERVING
            if not (http_ok and grpc_ok):
                time.sleep(0.2)
