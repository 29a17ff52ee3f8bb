"""`moe-serve`: the command line, a thin layer that parses flags and calls the Engine, the server
launcher or the HTTP client.

Subcommands live in `COMMANDS` (name -> how to add its flags, what to run), so a new one is one
entry. Flag defaults are read from the signatures of `Engine.from_pretrained`, `Engine.generate` and
`start_server` and from the fields of `ServerOptions`, `ServingSettings` and `BatchLimits`, so the API
stays the one place that states them. Errors a user can cause (a bad flag value, a directory that is
not a checkpoint, a config we do not serve, a port in use, a server that is not there) are
`ValueError`s or `ServingError`s below; they are printed here as one `moe-serve: error: ...` line
with exit status 2, never as a traceback.

    moe-serve serve --workers 2                       # HTTP :8000, gRPC :50051 until Ctrl-C / SIGTERM
    moe-serve generate --url http://127.0.0.1:8000 --prompt Hello
    moe-serve cluster --url http://127.0.0.1:8000     # workers, experts, expert load
    moe-serve scale 4 --url http://127.0.0.1:8000     # or --grpc 127.0.0.1:50051
    MOE_SERVE_API_KEY=... moe-serve serve --host 0.0.0.0 --admin-key-file admin.key   # keys
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import logging
import signal
import ssl
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from expert_workers.kernels import KERNELS
from moe_serving.credentials import API_KEY_ENVS, api_key_from_env, tls_credentials
from moe_serving.errors import ServingError
from moe_serving.grpc_client import GrpcClient
from moe_serving.http_client import HTTPClient
from moe_serving.plot import plot_expert_load
from router_service.config import (
    PLACEMENT_STRATEGIES,
    TRANSPORTS,
    AutoscalingConfig,
    BatchLimits,
    ElasticConfig,
    RouterAutoscalingConfig,
    WorkerResources,
    from_dict,
)
from router_service.default_model import default_model_dir, default_model_path, make_default_model
from router_service.engine import DTYPES, Engine
from router_service.serving.auth import ADMIN_KEY_ENV, API_KEY_ENV, AccessKeys
from router_service.serving.chat import chat_prompt_ids
from router_service.serving.detokenize import StopStrings
from router_service.serving.launch import ServerOptions, start_server
from router_service.serving.settings import GrpcTls, ServingSettings

PROG = "moe-serve"


def _defaults(fn: Callable) -> dict:
    return {
        name: p.default
        for name, p in inspect.signature(fn).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def _field_defaults(cls: type) -> dict:
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


ENGINE_DEFAULTS = _defaults(Engine.from_pretrained)
GENERATE_DEFAULTS = _defaults(Engine.generate)
SERVER_DEFAULTS = _defaults(start_server)
SERVER_OPTIONS = _field_defaults(ServerOptions)
SERVING_SETTINGS = _field_defaults(ServingSettings)
BATCH_LIMITS = _field_defaults(BatchLimits)
ELASTIC = _field_defaults(ElasticConfig)
WORKER_RESOURCES = _field_defaults(WorkerResources)
MAX_NEW_TOKENS = 32  # the API has no default for it; this is the command line's
SERVED_TRANSPORTS = [t for t in TRANSPORTS if t != "local"]  # serving needs Ray
DEFAULT_URL = f"http://{SERVER_OPTIONS['host']}:{SERVER_OPTIONS['http_port']}"


def progress_mode(args: argparse.Namespace) -> str:
    """Worker load progress follows -v like our logs: quiet by default, bar or log lines with -v."""
    return "auto" if args.verbose else "off"


# ---- shared flag groups ---------------------------------------------------------------------------


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Which checkpoint to load and how to run it; `engine_from_args` turns them into an Engine."""
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        metavar="DIR",
        type=Path,
        help="Hugging Face checkpoint directory (default: the built-in tiny DeepSeek-V3, built on first use)",
    )
    g.add_argument(
        "--workers",
        dest="num_workers",
        metavar="N",
        type=int,
        default=ENGINE_DEFAULTS["num_workers"],
        help="expert workers (default: %(default)s)",
    )
    g.add_argument(
        "--dtype", choices=list(DTYPES), default=ENGINE_DEFAULTS["dtype"], help="default: %(default)s"
    )
    g.add_argument(
        "--device",
        metavar="DEV",
        default=ENGINE_DEFAULTS["device"],
        help="cpu, cuda, cuda:N or auto (default)",
    )
    g.add_argument(
        "--expert-kernel",
        choices=["auto", *KERNELS],
        default=ENGINE_DEFAULTS["expert_kernel"],
        help="grouped expert matmul (default: %(default)s, chosen by device and dtype)",
    )


def resolve_model_dir(model: Path | None) -> Path:
    if model is not None:
        return model
    if not default_model_path().is_dir():
        print(f"{PROG}: building the default model in {default_model_path()} (first use)", file=sys.stderr)
    return default_model_dir()


def engine_from_args(args: argparse.Namespace) -> Engine:
    return Engine.from_pretrained(
        args.model_dir,
        num_workers=args.num_workers,
        dtype=args.dtype,
        device=args.device,
        expert_kernel=args.expert_kernel,
    )


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load a tokenizer from {model_dir}: {e}") from e


# ---- subcommands ----------------------------------------------------------------------------------


def add_make_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("outdir", metavar="OUTDIR", type=Path, help="directory to write the checkpoint into")


def run_make_model(args: argparse.Namespace) -> None:
    print(make_default_model(args.outdir))


def add_generate_args(p: argparse.ArgumentParser, chat: bool = False) -> None:
    if chat:
        p.add_argument("--message", "-m", required=True, help="the user's message")
        p.add_argument("--system", metavar="TEXT", help="a system message before it")
    else:
        p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument(
        "--stop",
        metavar="TEXT",
        action="append",
        default=[],
        help="end the answer before this text (repeatable)",
    )
    p.add_argument(
        "--url",
        metavar="URL",
        help="ask the server at URL (e.g. http://127.0.0.1:8000) and stream its answer; "
        "without it the model is loaded in this process",
    )
    add_client_credentials(p)
    p.add_argument(
        "--max-new-tokens",
        "--max-tokens",
        dest="max_new_tokens",
        metavar="N",
        type=int,
        default=MAX_NEW_TOKENS,
        help="default: %(default)s",
    )
    p.add_argument(
        "--temperature",
        metavar="T",
        type=float,
        default=GENERATE_DEFAULTS["temperature"],
        help="0 is greedy (default: %(default)s)",
    )
    p.add_argument(
        "--top-p", metavar="P", type=float, default=GENERATE_DEFAULTS["top_p"], help="default: %(default)s"
    )
    p.add_argument(
        "--seed", metavar="N", type=int, default=GENERATE_DEFAULTS["seed"], help="makes sampling reproducible"
    )
    add_engine_args(p)


def add_chat_args(p: argparse.ArgumentParser) -> None:
    add_generate_args(p, chat=True)


def chat_messages(args: argparse.Namespace) -> list[dict]:
    system = [{"role": "system", "content": args.system}] if args.system else []
    return [*system, {"role": "user", "content": args.message}]


def run_generate(args: argparse.Namespace) -> None:
    if args.url is not None:
        return generate_remote(args)
    import torch

    args.model_dir = resolve_model_dir(args.model)
    with engine_from_args(args) as engine:  # validates the config before any weight is read
        tokenizer = load_tokenizer(args.model_dir)
        if getattr(args, "message", None) is not None:
            ids = chat_prompt_ids(tokenizer, chat_messages(args))  # a ServingError without a template
        else:
            ids = tokenizer(args.prompt)["input_ids"]
        out = engine.generate(
            torch.tensor([ids]),
            args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
        )
    text = tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)  # only the continuation
    print(StopStrings(args.stop).push(text)[0] if args.stop else text)


ENGINE_FLAGS = {
    "model": "--model",
    "num_workers": "--workers",
    "dtype": "--dtype",
    "device": "--device",
    "expert_kernel": "--expert-kernel",
}


def generate_remote(args: argparse.Namespace) -> None:
    """Stream the server's completion to stdout as it arrives, then a newline."""
    given = [flag for dest, flag in ENGINE_FLAGS.items() if getattr(args, dest) != ENGINE_DEFAULTS.get(dest)]
    if given:
        raise ValueError(f"{', '.join(given)}: the server chose its model and workers; not with --url")
    wrote = False
    try:
        with HTTPClient(args.url, api_key=client_key(args), verify=http_verify(args)) as client:
            options = dict(
                max_tokens=args.max_new_tokens,
                temperature=args.temperature,
                top_p=args.top_p,
                seed=args.seed,
                stop=args.stop or None,
            )
            if getattr(args, "message", None) is not None:
                chunks = client.chat_stream(chat_messages(args), **options)
            else:
                chunks = client.stream(args.prompt, **options)
            for chunk in chunks:
                if chunk.text:
                    sys.stdout.write(chunk.text)
                    sys.stdout.flush()
                    wrote = True
    finally:
        if wrote or sys.exc_info()[0] is None:
            print(flush=True)  # end the line, also before an error that cut the stream short


def _micro_batch_setting(value: str) -> int | str:
    if value in ("auto", "off"):
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int, 'auto' or 'off', got {value!r}") from None


def add_serve_args(p: argparse.ArgumentParser) -> None:
    add_engine_args(p)
    g = p.add_argument_group("serving")
    g.add_argument(
        "--transport",
        choices=SERVED_TRANSPORTS,
        default=SERVER_DEFAULTS["transport"],
        help="how the router drives the workers (default: %(default)s)",
    )
    g.add_argument(
        "--micro-batch-min-tokens",
        metavar="N|auto|off",
        type=_micro_batch_setting,
        default="auto",
        help="decode steps of at least N sequences run as two overlapped micro-batches "
        "(docs/performance.md); default: %(default)s",
    )
    g.add_argument(
        "--no-merge-frames",
        dest="merge_frames",
        action="store_false",
        help="workers run every frame on its own instead of merging one layer's frames that wait "
        "together (several routers, or two micro-batches) into one grouped FFN (docs/performance.md)",
    )
    g.add_argument(
        "--ray-address",
        metavar="ADDR",
        default=SERVER_DEFAULTS["ray_address"],
        help="join this Ray cluster ('auto': the one `ray start` made here); default: start a local one",
    )
    g.add_argument(
        "--host", default=SERVER_OPTIONS["host"], help="address to listen on (default: %(default)s)"
    )
    g.add_argument(
        "--http-port",
        metavar="PORT",
        type=int,
        default=SERVER_OPTIONS["http_port"],
        help="default: %(default)s",
    )
    g.add_argument(
        "--grpc-port",
        metavar="PORT",
        type=int,
        default=SERVER_OPTIONS["grpc_port"],
        help="default: %(default)s",
    )
    g.add_argument(
        "--ready-timeout",
        dest="ready_timeout_s",
        metavar="SECONDS",
        type=float,
        default=SERVER_OPTIONS["ready_timeout_s"],
        help="give up when not serving after this long (default: %(default)s)",
    )
    g.add_argument(
        "--served-model-name",
        metavar="NAME",
        help="the model's name in the API (default: the model directory's name)",
    )
    add_security_args(p)
    g = p.add_argument_group("limits")
    g.add_argument(
        "--max-model-len",
        metavar="N",
        type=int,
        default=SERVING_SETTINGS["max_model_len"],
        help="the context, prompt + completion tokens: more is refused with 400 "
        "context_length_exceeded, and chat without max_tokens runs up to it (default: the "
        "model's max_position_embeddings; at most that)",
    )
    g.add_argument(
        "--max-request-tokens",
        metavar="N",
        type=int,
        default=SERVING_SETTINGS["max_request_tokens"],
        help="largest request (prompt + max_tokens, or tokens of a forward) accepted (default: %(default)s)",
    )
    g.add_argument(
        "--max-batch-tokens",
        metavar="N",
        type=int,
        help="tokens merged into one batch, by the ingress (default: "
        f"{SERVING_SETTINGS['max_batch_tokens']}) and by the generation batch, prompt + max_tokens "
        f"summed (default: {BATCH_LIMITS['max_batch_tokens']})",
    )
    g.add_argument(
        "--max-batch-size",
        metavar="N",
        type=int,
        default=BATCH_LIMITS["max_batch_size"],
        help="sequences decoded together per step (default: %(default)s)",
    )
    g = p.add_argument_group("expert workers on the Ray cluster (docs/running-on-ray.md)")
    g.add_argument(
        "--worker-cpus",
        metavar="N",
        type=float,
        default=WORKER_RESOURCES["num_cpus"],
        help="Ray CPUs per expert worker (default: %(default)s)",
    )
    g.add_argument(
        "--worker-gpus",
        metavar="N",
        type=float,
        default=None,
        help="Ray GPUs per expert worker (default: 1 when the cluster has a GPU for every worker, else 0)",
    )
    g.add_argument(
        "--worker-resources",
        metavar="JSON",
        type=json_object,
        default={},
        help="custom node resources per worker, e.g. '{\"expert_node\": 1}' for nodes started with them",
    )
    g.add_argument(
        "--router-resources",
        metavar="JSON",
        type=json_object,
        default={},
        help="custom node resources for each router and (unless --serving-resources is given) the "
        "serving actors, e.g. '{\"head\": 0.01}' to keep them on a head started with that resource "
        "(default: any node)",
    )
    g.add_argument(
        "--serving-resources",
        metavar="JSON",
        type=json_object,
        default=None,
        help="custom node resources for the serving actors (the controller, the ingress, the gRPC "
        "server), e.g. '{\"head\": 0.01}' with --router-resources '{\"router_node\": 1}': routers on "
        "nodes of their own, the rest on the head (default: --router-resources)",
    )
    g.add_argument(
        "--routers",
        dest="num_routers",
        metavar="N",
        type=int,
        default=ENGINE_DEFAULTS["num_routers"],
        help="routers: replicas of the dense model over one pool of expert workers, requests spread "
        "over them by load (default: %(default)s; docs/deploy.md says how to size them)",
    )
    g.add_argument(
        "--router-strategy",
        choices=("SPREAD", "PACK", "STRICT_SPREAD"),
        default=ENGINE_DEFAULTS["router_strategy"],
        help="where routers go (default: %(default)s: the node with the fewest of them)",
    )
    g.add_argument(
        "--placement-strategy",
        choices=PLACEMENT_STRATEGIES,
        default=WORKER_RESOURCES["strategy"],
        help="where new workers go (default: %(default)s: the node with the fewest of them)",
    )
    g = p.add_argument_group("elasticity (docs/elasticity.md)")
    g.add_argument(
        "--redundant-experts",
        metavar="R",
        type=int,
        default=ELASTIC["redundant_experts"],
        help="extra expert slots, filled with replicas of the busiest experts (default: %(default)s)",
    )
    g.add_argument(
        "--worker-timeout",
        dest="worker_timeout_s",
        metavar="SECONDS",
        type=float,
        default=ELASTIC["worker_timeout_s"],
        help="a worker that answers no health check this long is replaced (default: %(default)s)",
    )
    g.add_argument(
        "--rebalance-every",
        dest="rebalance_every_steps",
        metavar="STEPS",
        type=int,
        default=ELASTIC["rebalance_every_steps"],
        help="check the expert balance every STEPS decode steps and rebalance below "
        "--rebalance-threshold (default: %(default)s, never)",
    )
    g.add_argument(
        "--rebalance-threshold",
        metavar="X",
        type=float,
        default=ELASTIC["rebalance_threshold"],
        help="balancedness (mean / max worker load) below which to rebalance (default: %(default)s)",
    )
    g.add_argument(
        "--autoscaling-config",
        metavar="JSON",
        type=json_object,
        help='autoscale the workers, e.g. \'{"min_workers": 1, "max_workers": 4, '
        '"target_tokens_per_worker": 16}\' (fields: AutoscalingConfig; default: off)',
    )
    g.add_argument(
        "--router-autoscaling-config",
        metavar="JSON",
        type=json_object,
        default=None,
        help='autoscale the routers, e.g. \'{"min_routers": 1, "max_routers": 4, '
        '"target_sequences_per_router": 32}\' (default: off; docs/elasticity.md)',
    )


def json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def worker_resources_from_args(args: argparse.Namespace) -> WorkerResources:
    return WorkerResources(
        num_cpus=args.worker_cpus,
        num_gpus=args.worker_gpus,
        resources=args.worker_resources,
        strategy=args.placement_strategy,
    )


def elastic_from_args(args: argparse.Namespace) -> ElasticConfig:
    return ElasticConfig(
        redundant_experts=args.redundant_experts,
        worker_timeout_s=args.worker_timeout_s,
        rebalance_every_steps=args.rebalance_every_steps,
        rebalance_threshold=args.rebalance_threshold,
        autoscaling=from_dict(AutoscalingConfig, args.autoscaling_config, "--autoscaling-config"),
        router_autoscaling=from_dict(
            RouterAutoscalingConfig, args.router_autoscaling_config, "--router-autoscaling-config"
        ),
    )


def add_security_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("keys, TLS and CORS (docs/deploy.md, 'Secure deployment')")
    g.add_argument(
        "--api-key",
        dest="api_keys",
        metavar="KEY",
        action="append",
        default=[],
        help="require 'Authorization: Bearer KEY' on every route but /healthz, /health, /metrics, "
        f"/docs (repeatable; also ${API_KEY_ENV}, comma-separated, and --api-key-file). A key "
        "given here shows in `ps`: prefer the variable or the file",
    )
    g.add_argument(
        "--api-key-file",
        dest="api_key_files",
        metavar="FILE",
        action="append",
        default=[],
        help="keys, one a line",
    )
    g.add_argument(
        "--admin-key",
        dest="admin_keys",
        metavar="KEY",
        action="append",
        default=[],
        help="the key /v1/cluster (state, scale, rebalance, routers) and their gRPC methods need; "
        f"it opens the data routes too (also ${ADMIN_KEY_ENV}, --admin-key-file). Without one "
        "they take an API key",
    )
    g.add_argument(
        "--admin-key-file",
        dest="admin_key_files",
        metavar="FILE",
        action="append",
        default=[],
        help="keys, one a line",
    )
    g.add_argument("--protect-metrics", action="store_true", help="/metrics needs a key too")
    g.add_argument("--tls-cert", metavar="PEM", help="serve HTTPS (Serve's proxy), with --tls-key")
    g.add_argument("--tls-key", metavar="PEM", help="the HTTPS certificate's private key")
    g.add_argument("--grpc-tls-cert", metavar="PEM", help="serve gRPC over TLS, with --grpc-tls-key")
    g.add_argument("--grpc-tls-key", metavar="PEM", help="the gRPC certificate's private key")
    g.add_argument(
        "--grpc-tls-client-ca",
        metavar="PEM",
        help="mutual TLS: gRPC clients need a certificate signed by this CA",
    )
    g.add_argument(
        "--allowed-origins",
        metavar="LIST",
        type=_comma_list,
        default=(),
        help="CORS: browser origins allowed to call the HTTP API, comma-separated ('*': any); off by default",
    )
    for what in ("methods", "headers"):
        g.add_argument(
            f"--allowed-{what}",
            metavar="LIST",
            type=_comma_list,
            default=SERVING_SETTINGS[f"allowed_{what}"],
            help=f"CORS: the {what} allowed (default: {','.join(SERVING_SETTINGS[f'allowed_{what}'])})",
        )


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def security_from_args(args: argparse.Namespace) -> dict:
    """ServingSettings' access, CORS and gRPC TLS fields of the flags (and the key variables)."""
    if (args.grpc_tls_cert is None) != (args.grpc_tls_key is None):
        raise ValueError("gRPC TLS needs both --grpc-tls-cert and --grpc-tls-key")
    if args.grpc_tls_client_ca and not args.grpc_tls_cert:
        raise ValueError("--grpc-tls-client-ca needs --grpc-tls-cert and --grpc-tls-key")
    tls = (
        GrpcTls(args.grpc_tls_cert, args.grpc_tls_key, args.grpc_tls_client_ca)
        if args.grpc_tls_cert
        else None
    )
    if tls is not None:
        tls.read()  # the serving actors read the files on this machine: say now if one is missing
    access = AccessKeys.load(
        api_keys=args.api_keys,
        api_key_files=args.api_key_files,
        admin_keys=args.admin_keys,
        admin_key_files=args.admin_key_files,
        protect_metrics=args.protect_metrics,
    )
    return {
        "access": access,
        "grpc_tls": tls,
        "allowed_origins": args.allowed_origins,
        "allowed_methods": args.allowed_methods,
        "allowed_headers": args.allowed_headers,
    }


def _stop_on_sigterm() -> None:
    """SIGTERM stops the server the way Ctrl-C does: KeyboardInterrupt in the main thread."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, interrupt)


def run_serve(args: argparse.Namespace) -> int:
    model_dir = resolve_model_dir(args.model)
    batch = {"max_batch_tokens": args.max_batch_tokens} if args.max_batch_tokens is not None else {}
    settings = ServingSettings(
        model_name=args.served_model_name or Path(model_dir).name,
        max_model_len=args.max_model_len,
        max_request_tokens=args.max_request_tokens,
        **batch,
        **security_from_args(args),
    )
    limits = BatchLimits(max_batch_size=args.max_batch_size, **batch)
    options = ServerOptions(
        host=args.host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        ready_timeout_s=args.ready_timeout_s,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
    )
    _stop_on_sigterm()
    t0 = time.perf_counter()
    try:
        server = start_server(
            model_dir,
            num_workers=args.num_workers,
            transport=args.transport,
            dtype=args.dtype,
            ray_address=args.ray_address,
            options=options,
            settings=settings,
            batch_limits=limits,
            progress=progress_mode(args),
            device=args.device,
            expert_kernel=args.expert_kernel,
            elastic=elastic_from_args(args),
            worker_resources=worker_resources_from_args(args),
            router_resources=args.router_resources,
            serving_resources=args.serving_resources,
            num_routers=args.num_routers,
            router_strategy=args.router_strategy,
            micro_batch_min_tokens=args.micro_batch_min_tokens,
            merge_frames=args.merge_frames,
        )
    except OSError as e:  # a port in use, an address we cannot bind, a server not ready in time
        raise ValueError(e.strerror or str(e)) from e
    except (KeyboardInterrupt, SystemExit) as e:
        # Ctrl-C or SIGTERM while loading; start_server has stopped what it started. (ensure_ray
        # gives our SIGTERM handler back after ray.init; during ray.init itself Ray's own handler
        # raises SystemExit(15).)
        if isinstance(e, SystemExit) and e.code != signal.SIGTERM:
            raise
        print(f"{PROG}: stopped before the server was ready", flush=True)
        return 0
    try:
        _stop_on_sigterm()  # again: ray.init and Ray's core worker replaced ours
        print(
            f"{PROG}: serving {server.model_name} ({args.num_workers} workers, {args.transport}"
            + (f", {args.num_routers} routers" if args.num_routers > 1 else "")
            + ") — "
            f"HTTP {server.http_url}  gRPC {server.grpc_target}  "
            f"(ready in {time.perf_counter() - t0:.1f}s; Ctrl-C to stop)",
            flush=True,
        )
        while True:
            signal.pause()
    except KeyboardInterrupt as e:
        why = str(e) or "SIGINT"
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the shutdown short
        print(f"{PROG}: {why}: stopping", flush=True)
    finally:
        server.shutdown()
    print(f"{PROG}: stopped", flush=True)
    return 0


def add_server_address(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group()
    where.add_argument("--url", metavar="URL", help=f"the server's HTTP address (default: {DEFAULT_URL})")
    where.add_argument("--grpc", metavar="HOST:PORT", help="the server's gRPC address, instead of --url")
    p.add_argument("--json", action="store_true", help="print the raw JSON answer instead of tables")
    add_client_credentials(p, admin=True)


def add_client_credentials(p: argparse.ArgumentParser, admin: bool = False) -> None:
    envs = ((ADMIN_KEY_ENV,) if admin else ()) + API_KEY_ENVS
    g = p.add_argument_group("credentials (a server started with keys or TLS)")
    g.add_argument(
        "--api-key",
        metavar="KEY",
        help=f"sent as 'Authorization: Bearer KEY' (default: ${', $'.join(envs)}, the first set; "
        "the environment keeps the key out of `ps`)"
        + ("; these commands need the admin key when the server has one" if admin else ""),
    )
    g.add_argument(
        "--tls-ca",
        metavar="PEM",
        help="trust this CA for an https:// URL or a TLS gRPC server (default: the system's roots)",
    )
    if admin:
        g.add_argument(
            "--grpc-tls", action="store_true", help="connect to --grpc over TLS (implied by --tls-ca)"
        )
        g.add_argument(
            "--client-cert", metavar="PEM", help="a client certificate for a mutual-TLS gRPC server"
        )
        g.add_argument("--client-key", metavar="PEM", help="its private key")


def client_key(args: argparse.Namespace, admin: bool = False) -> str | None:
    """--api-key, else the environment's (the admin key's variable first for admin commands)."""
    envs = ((ADMIN_KEY_ENV,) if admin else ()) + API_KEY_ENVS
    return args.api_key or api_key_from_env(envs)


def http_verify(args: argparse.Namespace):
    """httpx's `verify` for --tls-ca: a context trusting that CA, else the system's roots."""
    return ssl.create_default_context(cafile=args.tls_ca) if args.tls_ca else True


def client_of(args: argparse.Namespace):
    """An HTTP or gRPC client of the server the flags name (both have the same cluster methods)."""
    key = client_key(args, admin=True)
    if args.grpc:
        tls = args.grpc_tls or args.tls_ca or args.client_cert
        credentials = tls_credentials(args.tls_ca, args.client_cert, args.client_key) if tls else None
        return GrpcClient(args.grpc, api_key=key, credentials=credentials)
    return HTTPClient(args.url or DEFAULT_URL, timeout=None, api_key=key, verify=http_verify(args))


def add_cluster_args(p: argparse.ArgumentParser) -> None:
    add_server_address(p)
    p.add_argument(
        "--plot",
        metavar="FILE",
        type=Path,
        help="also write an expert-load heatmap (layers x experts, and x worker slots) to FILE (.png, .svg)",
    )


def run_cluster(args: argparse.Namespace) -> None:
    with client_of(args) as client:
        state = client.cluster_state()
    print(json.dumps(state, indent=2) if args.json else format_cluster(state))
    if args.plot is not None:
        plot_expert_load(state, args.plot)
        print(f"wrote {args.plot}")


def add_scale_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("num_workers", metavar="N", type=int, help="the number of expert workers to run on")
    add_server_address(p)


def run_scale(args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    with client_of(args) as client:
        before = client.cluster_state()["num_workers"]
        state = client.scale(args.num_workers)
    took = time.perf_counter() - t0
    if args.json:
        print(json.dumps(state, indent=2))
        return
    print(
        f"{before} -> {state['num_workers']} expert workers, placement version "
        f"{state['placement_version']} serving ({took:.1f}s)\n"
    )
    print(format_cluster(state))


def add_routers_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("num_routers", metavar="N", type=int, help="the number of routers to run")
    add_server_address(p)


def run_routers(args: argparse.Namespace) -> None:
    with client_of(args) as client:
        result = client.scale_routers(args.num_routers)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{result['from_routers']} -> {result['num_routers']} routers ({result['seconds']:.1f}s)\n")
    print(format_routers(result.get("routers") or []))


def format_routers(routers: list[dict]) -> str:
    """One line per router: id, node, pid, sequences, tokens/s, the placement version it pins."""
    lines = [
        f"{'router':>6}  {'node ip':<15} {'pid':>7} {'running':>7} {'waiting':>7} {'tokens/s':>9}  placement"
    ]
    for r in routers:
        if "state" in r:
            lines.append(f"{r['router_id']:>6}  {r['state']}")
            continue
        lines.append(
            f"{r['router_id']:>6}  {str(r.get('node_ip', '-')):<15} {r.get('pid', '-'):>7} {r.get('running', 0):>7} "
            f"{r.get('waiting', 0):>7} {r.get('tokens_per_s', 0.0):>9.1f}  v{r.get('placement_version', '-')}"
            + ("  (draining)" if r.get("draining") else "")
        )
    return "\n".join(lines)


def add_rebalance_args(p: argparse.ArgumentParser) -> None:
    add_server_address(p)


def run_rebalance(args: argparse.Namespace) -> None:
    with client_of(args) as client:
        result = client.rebalance()
    if args.json:
        print(json.dumps(result, indent=2))
        return
    before, after = result["before"], result["after"]
    rows = [
        [layer, f"{value:.3f}", f"{after['balancedness'].get(layer, float('nan')):.3f}"]
        for layer, value in before["balancedness"].items()
    ]
    print(f"placement version {result['placement_version']} serving")
    print("\n".join(_table(["layer", "balancedness before", "after"], rows, right={0, 1, 2})))


# ---- cluster state as text ------------------------------------------------------------------------

HOTTEST = 8  # experts listed per layer in the load table


def compact_ranges(ids: Iterable[int]) -> str:
    """[0, 1, 2, 3, 7, 9, 10] -> "0-3,7,9-10"; "-" when empty."""
    ids = sorted(set(ids))
    parts: list[str] = []
    i = 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        parts.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ",".join(parts) or "-"


def _experts_per_layer(experts: dict) -> str:
    """One range when every layer holds the same experts, else "L1: 0-15  L2: 0-14,31"."""
    by_layer = {int(k): compact_ranges(v) for k, v in (experts or {}).items()}
    if not by_layer:
        return "-"
    if len(set(by_layer.values())) == 1:
        return next(iter(by_layer.values()))
    return "  ".join(f"L{layer}: {r}" for layer, r in sorted(by_layer.items()))


def _table(header: list[str], rows: list[list], right: set[int] = frozenset()) -> list[str]:
    cells = [header, *[["-" if c is None else str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for r in cells:
        out = [
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        lines.append("  ".join(out).rstrip())
    return lines


def _counts(d: dict | None) -> str:
    return " ".join(f"{k}:{v}" for k, v in sorted((d or {}).items(), key=lambda kv: int(kv[0]))) or "-"


def format_cluster(state: dict) -> str:
    """The state `GET /v1/cluster` answers, as a header, a worker table, expert load and generation
    statistics."""
    workers = state.get("workers") or []
    layers = state.get("moe_layers") or []
    lines = [
        f"model_type {state.get('model_type', '?')}   transport {state.get('transport', '?')}   "
        f"dtype {state.get('dtype', '?')}   placement version {state.get('placement_version', '?')}   "
        f"workers {state.get('num_workers', len(workers))}   MoE layers {compact_ranges(layers)}",
        "",
    ]
    elastic = state.get("elastic") or {}
    health = elastic.get("health") or {}
    if elastic:
        status = "serving" if health.get("serving") else f"NOT SERVING ({health.get('reason', '?')})"
        if health.get("degraded"):
            status += " (degraded)"
        lines[-1:] = [
            f"{status}   target workers {elastic.get('target_workers', '?')}   expert slots "
            f"{elastic.get('num_slots', '?')} ({elastic.get('redundant_experts', 0)} redundant)"
            + (f"   changing: {elastic['changing']}" if elastic.get("changing") else ""),
            "",
        ]
    rows = [
        [
            w.get("worker_id"),
            w.get("node_ip"),
            w.get("device"),
            w.get("kernel"),
            _experts_per_layer(w.get("experts")),
            f"{w['param_bytes'] / 1e6:.1f}" if w.get("param_bytes") is not None else None,
            w.get("tokens"),
        ]
        for w in workers
    ]
    lines += _table(
        ["worker", "node ip", "device", "kernel", "experts per layer", "MB", "tokens"], rows, right={0, 5, 6}
    )
    balance = (state.get("balance") or {}).get("balancedness") or {}
    if balance:
        worst = min(balance.items(), key=lambda kv: kv[1])
        lines += [
            "",
            "balancedness (mean / max worker load) per layer: "
            + " ".join(f"L{layer}:{b:.2f}" for layer, b in balance.items())
            + f"   worst L{worst[0]}",
        ]
    if elastic.get("history"):
        lines += ["", "membership events (latest last)"]
        rows = [
            [
                time.strftime("%H:%M:%S", time.localtime(e["time"])),
                e["kind"],
                f"{e['from_workers']} -> {e['to_workers']}",
                f"{e['seconds']:.2f}",
                e["placement_version"],
            ]
            for e in elastic["history"][-8:]
        ]
        lines += _table(["time", "event", "workers", "seconds", "version"], rows, right={3, 4})

    load = state.get("expert_load") or {}
    tokens = load.get("tokens") or {}
    if tokens:
        seen = load.get("batches_seen") or {}
        rows = []
        for layer, counts in sorted(tokens.items(), key=lambda kv: int(kv[0])):
            hot = sorted((c, -e) for e, c in enumerate(counts) if c > 0)[::-1][:HOTTEST]
            rows.append([layer, seen.get(layer), sum(counts), " ".join(f"e{-e}:{c}" for c, e in hot) or "-"])
        window = load.get("window_batches")
        lines += ["", f"expert load (tokens per expert{f', last {window} batches' if window else ''})"]
        lines += _table(["layer", "batches", "tokens", f"hottest {HOTTEST}"], rows, right={0, 1, 2})

    gen = state.get("generation")
    if gen:
        lines += [
            "",
            f"generation: running {gen.get('running', 0)}   waiting {gen.get('waiting', 0)}",
            f"  decode steps by batch size: {_counts(gen.get('steps_by_batch_size'))}",
        ]
        if "prefills_by_batch_size" in gen:
            lines.append(f"  prefills by batch size:     {_counts(gen.get('prefills_by_batch_size'))}")
        if gen.get("limits"):
            lines.append("  limits: " + "   ".join(f"{k} {v}" for k, v in gen["limits"].items()))
    if state.get("routers"):
        lines += ["", format_routers(state["routers"])]
    return "\n".join(lines)


@dataclass(frozen=True)
class Command:
    help: str
    add_args: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]


COMMANDS = {
    "make-model": Command(
        "write the built-in tiny DeepSeek-V3 checkpoint (random weights) to OUTDIR",
        add_make_model_args,
        run_make_model,
    ),
    "generate": Command(
        "continue a prompt with a MoE model (in this process, or a server's with --url)",
        add_generate_args,
        run_generate,
    ),
    "chat": Command(
        "answer a chat message with the model's chat template (in this process, or a server's with --url)",
        add_chat_args,
        run_generate,
    ),
    "serve": Command(
        "serve a MoE model over HTTP and gRPC until Ctrl-C or SIGTERM", add_serve_args, run_serve
    ),
    "cluster": Command(
        "show a server's workers, expert placement and expert load", add_cluster_args, run_cluster
    ),
    "scale": Command(
        "change a running server's number of expert workers (no request fails)", add_scale_args, run_scale
    ),
    "rebalance": Command(
        "re-place a running server's experts by their recent load (EPLB)", add_rebalance_args, run_rebalance
    ),
    "routers": Command(
        "change a running server's number of routers (dense-model replicas; no request fails)",
        add_routers_args,
        run_routers,
    ),
}


# ---- entry point ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Expert-parallel serving of Mixture-of-Experts LLMs."
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO) to stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, parents=[common], help=cmd.help, description=cmd.help)
        cmd.add_args(p)
    return parser


def setup_logging(verbose: bool) -> None:
    """Our logs at INFO with -v, WARNING otherwise; transformers' progress bars and advice off."""
    import transformers

    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity(logging.WARNING if verbose else logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        return COMMANDS[args.command].run(args) or 0
    except ValueError as e:  # ConfigError, CheckpointError and the Engine's input checks
        message = " ".join(str(e).split())  # one line, whatever the exception's layout
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2
    except ServingError as e:  # the server refused, or is not there
        message = " ".join(e.message.split())
        hint = " (is `moe-serve serve` running there?)" if e.code == "unavailable" else ""
        print(f"{PROG}: error: {message}{hint}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. a cache or output directory we may not write
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
