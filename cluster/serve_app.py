"""The Ray Serve application as Ray users deploy one.

    serve run cluster.serve_app:build_app model=/models/my-moe num_workers=4
    serve deploy cluster/serve_config.yaml        # the same app, on a running cluster
    serve status; serve shutdown -y                # healthy; everything removed

`build_app(args)` is the application builder Ray Serve calls (`serve run MODULE:build_app key=value
...`, `import_path` + `args` in a Serve config file, a KubeRay RayService's `serveConfigV2`). It
returns the same application `moe-serve serve` runs (`router_service.serving.launch.application`):
the `MoEIngress` deployment, whose replica starts (or finds) the cluster's membership controller
(which runs the expert workers and the routers) and the gRPC server, and stops them all when the app
is deleted. HTTP host and port are
Serve's own (`http_options` in the config, `serve run --host/--port`); gRPC is an argument here.

`serve run` passes every argument as a string; a config file passes YAML values. `AppArgs` takes
both, and refuses unknown names and bad values with a message naming them.

Keys are never arguments (a config file is committed, and Serve shows its args): the app reads
them from MOE_SERVE_API_KEY / MOE_SERVE_ADMIN_KEY in the environment of the node that builds it
(a KubeRay pod's `secretKeyRef`) or from `api_key_file` / `admin_key_file` (a mounted Secret).
HTTPS is Serve's: `http_options.ssl_certfile` / `ssl_keyfile` in the config.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import typing
from dataclasses import dataclass, field
from pathlib import Path

from router_service.config import (
    AutoscalingConfig,
    BatchLimits,
    ElasticConfig,
    RouterAutoscalingConfig,
    WorkerResources,
    from_dict,
)
from router_service.default_model import default_model_path
from router_service.engine import make_config
from router_service.serving.auth import AccessKeys, open_warning
from router_service.serving.launch import APP_NAME, application, fit_settings
from router_service.serving.settings import GrpcTls, ServingSettings

log = logging.getLogger(__name__)

__all__ = ["AppArgs", "build_app", "serve_config"]


@dataclass(frozen=True)
class AppArgs:
    """Everything the app is built from; the names of `moe-serve serve`'s flags, with underscores."""

    model: str | None = None  # a checkpoint directory readable on every node; None: the built-in model
    served_model_name: str | None = None  # default: the model directory's name
    num_workers: int = 2
    transport: str = "socket"
    dtype: str = "float32"
    device: str = "auto"
    expert_kernel: str = "auto"
    num_threads: int | None = None
    grpc_host: str = "0.0.0.0"
    grpc_port: int = 50051  # 0: no gRPC front end
    max_model_len: int | None = None  # the context; None: the model's max_position_embeddings
    max_request_tokens: int = 8192
    max_batch_tokens: int = 16384
    max_batch_size: int = 32
    worker_cpus: float = 1.0
    worker_gpus: float | None = None
    worker_resources: dict = field(default_factory=dict)
    placement_strategy: str = "SPREAD"
    redundant_experts: int = 0
    worker_timeout_s: float = 10.0
    rebalance_every_steps: int = 0
    rebalance_threshold: float = 0.8
    autoscaling_config: dict | None = None
    cluster_name: str | None = None  # the Ray actors' name prefix; default: "moe-serving"
    router_resources: dict = field(default_factory=dict)  # e.g. {"head": 0.01}: the routers on the head
    # the controller, ingress and gRPC actors; None: router_resources. {"head": 0.01} with
    # router_resources {"router_node": 1}: the routers on nodes of their own, the rest on the head
    serving_resources: dict | None = None
    num_routers: int = 1
    router_strategy: str = "SPREAD"
    router_autoscaling_config: dict | None = None  # RouterAutoscalingConfig's fields; None: off
    progress: str = "log"
    # keys: from the environment (MOE_SERVE_API_KEY, MOE_SERVE_ADMIN_KEY) and these files, never here
    api_key_file: str | None = None
    admin_key_file: str | None = None
    protect_metrics: bool = False
    allowed_origins: str | None = None  # CORS, comma-separated ("*": any); None: off
    grpc_tls_cert: str | None = None  # PEM files on the node the gRPC actor runs on
    grpc_tls_key: str | None = None
    grpc_tls_client_ca: str | None = None  # mutual TLS

    @classmethod
    def from_args(cls, args: dict | None) -> AppArgs:
        """From Serve's `args`: strings (`serve run key=value`) or YAML values; unknown keys refused."""
        args = dict(args or {})
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(args) - set(known))
        if unknown:
            raise ValueError(f"unknown application argument(s) {unknown}; known: {sorted(known)}")
        hints = typing.get_type_hints(cls)
        return cls(**{name: _coerce(name, value, hints[name]) for name, value in args.items()})

    def to_args(self) -> dict:
        """Every field that is set (not None), as a Serve config's `args`: explicit, to edit."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) is not None
        }


def _coerce(name: str, value, hint):
    """`value` as the field's type; strings from the command line are parsed."""
    if value is None:
        return None
    kinds = [t for t in typing.get_args(hint) if t is not type(None)] or [hint]
    kind = kinds[0]
    if isinstance(value, str) and kind is not str:
        text = value.strip()
        if text.lower() in ("none", "null", ""):
            return None
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(f"application argument {name}={value!r} is not a boolean")
            return text.lower() in ("true", "1", "yes")
        try:
            value = json.loads(text) if kind is dict else kind(text)
        except (ValueError, json.JSONDecodeError):
            raise ValueError(
                f"application argument {name}={value!r} is not a valid {kind.__name__}"
            ) from None
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ValueError(f"application argument {name} must be a {kind.__name__}, got {value!r}")
    return value


def configs(a: AppArgs):
    """(EngineConfig, ModelSpec, ServingSettings, gRPC address or None) of the arguments, validated."""
    model = a.model or str(default_model_path())
    limits = BatchLimits(max_batch_size=a.max_batch_size, max_batch_tokens=a.max_batch_tokens)
    config, spec = make_config(
        model,
        num_workers=a.num_workers,
        transport=a.transport,
        dtype=a.dtype,
        device=a.device,
        expert_kernel=a.expert_kernel,
        num_threads=a.num_threads,
        progress=a.progress,
        batch_limits=limits,
        worker_resources=WorkerResources(
            num_cpus=a.worker_cpus,
            num_gpus=a.worker_gpus,
            resources=a.worker_resources,
            strategy=a.placement_strategy,
        ),
        elastic=ElasticConfig(
            redundant_experts=a.redundant_experts,
            worker_timeout_s=a.worker_timeout_s,
            rebalance_every_steps=a.rebalance_every_steps,
            rebalance_threshold=a.rebalance_threshold,
            autoscaling=from_dict(AutoscalingConfig, a.autoscaling_config, "autoscaling_config"),
            router_autoscaling=from_dict(
                RouterAutoscalingConfig, a.router_autoscaling_config, "router_autoscaling_config"
            ),
        ),
        # A fixed default: a replica that restarts, and `serve deploy` of the same config, find the
        # running router and workers by it.
        cluster_name=a.cluster_name or "moe-serving",
        router_resources=a.router_resources,
        serving_resources=a.serving_resources,
        num_routers=a.num_routers,
        router_strategy=a.router_strategy,
    )
    if (a.grpc_tls_cert is None) != (a.grpc_tls_key is None):
        raise ValueError("gRPC TLS needs both grpc_tls_cert and grpc_tls_key")
    settings = ServingSettings(
        model_name=a.served_model_name or Path(model).name,
        max_model_len=a.max_model_len,
        max_request_tokens=a.max_request_tokens,
        access=AccessKeys.load(
            api_key_files=[a.api_key_file] if a.api_key_file else [],
            admin_key_files=[a.admin_key_file] if a.admin_key_file else [],
            protect_metrics=a.protect_metrics,
        ),
        allowed_origins=tuple(o.strip() for o in (a.allowed_origins or "").split(",") if o.strip()),
        grpc_tls=GrpcTls(a.grpc_tls_cert, a.grpc_tls_key, a.grpc_tls_client_ca) if a.grpc_tls_cert else None,
    )
    if config.transport == "local":
        raise ValueError("the Serve application needs a Ray transport: 'socket', 'ray' or 'compiled'")
    grpc = (a.grpc_host, a.grpc_port) if a.grpc_port else None
    return config, spec, fit_settings(settings, limits, spec), grpc


def build_app(args: dict | None = None):
    """The application builder for `serve run` / `serve deploy` / KubeRay (see the module docstring)."""
    config, _, settings, grpc = configs(AppArgs.from_args(args))
    warning = open_warning([grpc[0]] if grpc else [], settings.access)
    if warning:
        log.warning(warning + " (HTTP: Serve's http_options.host)")
    return application(config, settings, grpc)


def serve_config(args: AppArgs, http_host: str = "0.0.0.0", http_port: int = 8000) -> dict:
    """A Serve config file (`serve deploy`, KubeRay's serveConfigV2) that runs this app."""
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": http_host, "port": http_port},
        "applications": [
            {
                "name": APP_NAME,
                "route_prefix": "/",
                "import_path": "cluster.serve_app:build_app",
                "args": args.to_args(),
            }
        ],
    }


def main(argv: list[str] | None = None) -> None:
    """Print a Serve config file for these arguments: `python -m cluster.serve_app [key=value ...]`
    (`cluster/serve_config.yaml` is this with no arguments; a test keeps it current)."""
    import sys

    import yaml

    pairs = sys.argv[1:] if argv is None else argv
    bad = [p for p in pairs if "=" not in p]
    if bad:
        raise SystemExit(f"arguments are key=value, got {bad}")
    args = AppArgs.from_args(dict(p.split("=", 1) for p in pairs))
    print(CONFIG_HEADER + yaml.safe_dump(serve_config(args), sort_keys=False), end="")


CONFIG_HEADER = """\
# A Ray Serve config for the moe-serving application (`serve deploy cluster/serve_config.yaml`).
# Generated by `python -m cluster.serve_app`; `args` takes every field of cluster.serve_app.AppArgs,
# e.g. model: /models/my-moe, num_workers: 4, worker_resources: {expert_node: 1}. Routers on nodes
# of their own: num_routers: 2, router_resources: {router_node: 1}, serving_resources: {head: 0.01}
# (docs/deploy.md, "Routers: how many, and where"). Ray token auth: the cluster's RAY_AUTH_TOKEN
# must be in the environment of `serve deploy` (docs/deploy.md).
"""


if __name__ == "__main__":
    main()
