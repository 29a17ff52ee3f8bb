"""Docker health checks of the compose cluster's containers (docker-compose.yml), one per role:

    python /opt/moe/healthcheck.py server       # GET /healthz is 200 and gRPC health says SERVING
    python /opt/moe/healthcheck.py ray-head     # the GCS answers and this node's raylet is alive
    python /opt/moe/healthcheck.py ray-worker   # this node's raylet is alive

Exit 0 healthy, 1 not (the reason on stderr). Standard library, grpcio and grpc_health only: the
image has no curl. The ports are the containers' own (the host may publish them elsewhere); the Ray
endpoints are the dashboard's and its per-node agent's public health routes, open under token auth.

A server started with TLS (`--tls-cert`, `--grpc-tls-cert` in MOE_SERVE_ARGS, docs/deploy.md) is
checked over HTTPS without verifying its certificate (this is the container's own loopback port,
asked whether it is up, not who it is), and its gRPC port by a TCP connection only: with mutual TLS
the gRPC health service needs a client certificate this check does not hold. /healthz already
follows the router's health, and neither needs a key.
"""

import os
import socket
import ssl
import sys
import urllib.error
import urllib.request

HTTP_PORT = 8000
GRPC_PORT = 50051
RAY_DASHBOARD_PORT = 8265  # the head's
RAY_AGENT_PORT = 52365  # every node's dashboard agent
TIMEOUT_S = 5.0


def http_ok(url: str) -> None:
    context = None
    if url.startswith("https:"):
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S, context=context) as reply:
            if reply.status != 200:
                raise SystemExit(f"{url}: HTTP {reply.status}")
    except (urllib.error.URLError, OSError) as e:
        raise SystemExit(f"{url}: {e}") from None


def grpc_serving(target: str) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT_S
            )
        except grpc.RpcError as e:
            raise SystemExit(f"gRPC health {target}: {e.code().name}") from None
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        raise SystemExit(
            f"gRPC health {target}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
        )


def tcp_open(host: str, port: int) -> None:
    try:
        socket.create_connection((host, port), timeout=TIMEOUT_S).close()
    except OSError as e:
        raise SystemExit(f"gRPC port {host}:{port}: {e}") from None


def server() -> None:
    args = os.environ.get("MOE_SERVE_ARGS", "").split()
    http_ok(f"{'https' if '--tls-cert' in args else 'http'}://127.0.0.1:{HTTP_PORT}/healthz")
    if "--grpc-tls-cert" in args:
        tcp_open("127.0.0.1", GRPC_PORT)
    else:
        grpc_serving(f"127.0.0.1:{GRPC_PORT}")


def ray_head() -> None:
    http_ok(f"http://127.0.0.1:{RAY_DASHBOARD_PORT}/api/gcs_healthz")
    ray_worker()


def ray_worker() -> None:
    http_ok(f"http://127.0.0.1:{RAY_AGENT_PORT}/api/local_raylet_healthz")


CHECKS = {"server": server, "ray-head": ray_head, "ray-worker": ray_worker}


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in CHECKS:
        print(f"usage: healthcheck.py {{{','.join(CHECKS)}}}", file=sys.stderr)
        return 2
    CHECKS[argv[0]]()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
