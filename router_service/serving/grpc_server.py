"""gRPC front end: `moe_serving.v1.MoEService` over a serving backend, plus health and reflection.

The servicer decodes and validates the protobuf tensors and requests, calls the backend and encodes
its answers. The backend is any object with these methods (the contract; in production a Ray Serve
deployment handle adapter, in tests an Engine wrapper):

    async def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor
    async def moe_layer(self, layer: int, hidden_states: torch.Tensor) -> torch.Tensor
    def generate(self, params: GenerateParams) -> AsyncIterator[GenerateChunk]
    async def cluster_state(self) -> dict
    async def scale(self, num_workers: int) -> dict
    async def rebalance(self) -> dict

Errors: a `ServingError` (from validation here or from the backend) becomes the gRPC status of its
code (`grpc.StatusCode[code.upper()]`) with its message; any other exception becomes INTERNAL with
a one-line message, its traceback goes to this process's log only. A client that cancels a
Generate stream closes the backend's iterator (`aclose`), so the backend frees the request's slot.

    server = await start_grpc_server(backend, port=50051)   # access=AccessKeys(...), tls=GrpcTls(...)
    ...
    await server.stop(grace=5)   # health -> NOT_SERVING, then stop
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from moe_serving.errors import ServingError, invalid
from moe_serving.tensors import tensor_from_proto, tensor_to_proto
from moe_serving.types import GenerateChunk, GenerateParams, StructuredOutput, TokenLogprob
from moe_serving.v1 import moe_service_pb2 as pb
from moe_serving.v1 import moe_service_pb2_grpc as pb_grpc
from router_service.serving.auth import AccessInterceptor, AccessKeys
from router_service.serving.settings import GrpcTls
from router_service.serving.tools import ToolChoice, ToolStream, parse_tools

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["MoEService"].full_name  # "moe_serving.v1.MoEService"
DEFAULT_MAX_TOKENS = GenerateParams.max_tokens  # what max_tokens = 0 (unset) means for a prompt

__all__ = [
    "SERVICE_NAME",
    "GrpcServer",
    "MoEServicer",
    "cluster_state_to_proto",
    "generate_params",
    "rebalance_to_proto",
    "server_credentials",
    "start_grpc_server",
]


# ---- request / answer conversion ----------------------------------------------------------------


def _message(m: pb.ChatMessage) -> dict:
    out = {"role": m.role, "content": m.content}
    if m.tool_calls_json:
        try:
            out["tool_calls"] = json.loads(m.tool_calls_json)
        except json.JSONDecodeError as e:
            raise invalid(f"a message's tool_calls_json is not JSON: {e}") from None
    if m.tool_call_id:
        out["tool_call_id"] = m.tool_call_id
    return out


def _structured(so: pb.StructuredOutput) -> StructuredOutput:
    kind = so.WhichOneof("kind")
    if kind is None:
        raise invalid("structured_output: set one of json_schema, json_object, regex, choice, grammar")
    value = {
        "json_schema": lambda: so.json_schema,
        "json_object": lambda: None,
        "regex": lambda: so.regex,
        "choice": lambda: tuple(so.choice.choices),
        "grammar": lambda: so.grammar,
    }[kind]()
    name = {"json_schema": "json"}.get(kind, kind)
    return StructuredOutput(name, value, compact_json=not so.any_whitespace)


def _tools(request: pb.GenerateRequest) -> ToolChoice | None:
    """The request's tools and tool_choice, checked as over HTTP (chat only)."""
    if not request.tools_json:
        if request.tool_choice not in ("", "none"):
            raise invalid(f"tool_choice={request.tool_choice!r} needs tools_json")
        return None
    if not request.messages:
        raise invalid("tools need messages (a chat)")
    try:
        tools = json.loads(request.tools_json)
    except json.JSONDecodeError as e:
        raise invalid(f"tools_json is not JSON: {e}") from None
    choice = request.tool_choice or None
    if choice not in (None, "none", "auto", "required"):
        choice = {"type": "function", "function": {"name": choice}}
    parallel = request.parallel_tool_calls if request.HasField("parallel_tool_calls") else None
    return parse_tools({"tools": tools, "tool_choice": choice, "parallel_tool_calls": parallel})


def generate_params(request: pb.GenerateRequest) -> tuple[GenerateParams, ToolChoice | None]:
    """GenerateParams of a GenerateRequest (defaults applied; exactly one prompt form checked; the
    values themselves are checked by the backend, as for HTTP), and its tools (None: no tools)."""
    prompt = request.prompt or None
    ids = list(request.prompt_token_ids) or None
    messages = [_message(m) for m in request.messages] or None
    forms = [name for name, x in (("prompt", prompt), ("prompt_token_ids", ids), ("messages", messages)) if x]
    if len(forms) != 1:
        raise invalid(
            "set exactly one of prompt, prompt_token_ids and messages"
            + (f" ({'both ' if len(forms) == 2 else ''}{' and '.join(forms)} are set)" if forms else "")
        )
    if request.max_tokens < 0:
        raise invalid(
            f"max_tokens must be >= 0 (0: the default, {DEFAULT_MAX_TOKENS} for a prompt, up to the "
            f"context for messages), got {request.max_tokens}"
        )
    # Unset fields keep GenerateParams' defaults, the same ones the HTTP API applies.
    optional = (
        "temperature",
        "top_p",
        "seed",
        "logprobs",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "min_p",
    )
    given = {name: getattr(request, name) for name in optional if request.HasField(name)}
    if request.top_k:
        given["top_k"] = request.top_k
    if request.logit_bias:
        given["logit_bias"] = {int(t): float(b) for t, b in request.logit_bias.items()}
    if request.allowed_token_ids:
        given["allowed_token_ids"] = tuple(request.allowed_token_ids)
    if request.HasField("structured_output"):
        given["structured"] = _structured(request.structured_output)
    tools = _tools(request)
    if tools is not None:
        given = tools.apply(given)
    if request.max_tokens:
        given["max_tokens"] = request.max_tokens
    elif messages:
        given["max_tokens"] = None  # a chat runs up to the context, as over HTTP
    if request.n:
        given["n"] = request.n
    params = GenerateParams(
        prompt=prompt,
        prompt_token_ids=ids,
        messages=messages,
        stop=tuple(request.stop),
        stop_token_ids=tuple(request.stop_token_ids),
        min_tokens=request.min_tokens,
        ignore_eos=request.ignore_eos,
        **given,
    )
    return params, tools


def _logprob_to_proto(lp: TokenLogprob, out: pb.TokenLogprob) -> None:
    out.token_id, out.token, out.logprob = int(lp.token_id), lp.token, float(lp.logprob)
    out.bytes, out.text_offset = bytes(lp.bytes), int(lp.text_offset)
    for alt in lp.top_logprobs:
        _logprob_to_proto(alt, out.top_logprobs.add())


def _generate_response(chunk: GenerateChunk) -> pb.GenerateResponse:
    resp = pb.GenerateResponse(
        token_ids=[int(t) for t in chunk.token_ids],
        text=chunk.text or "",
        finish_reason=chunk.finish_reason or "",
        index=int(chunk.index),
    )
    for lp in chunk.logprobs or []:
        _logprob_to_proto(lp, resp.logprobs.add())
    if chunk.finish_reason:
        resp.usage.prompt_tokens = int(chunk.prompt_tokens)
        resp.usage.completion_tokens = int(chunk.completion_tokens)
        resp.usage.total_tokens = int(chunk.prompt_tokens) + int(chunk.completion_tokens)
    return resp


def _with_tool_calls(resp: pb.GenerateResponse, chunk: GenerateChunk, stream: ToolStream) -> None:
    """A chat with tools: the text that can go out now and, on the choice's last message, its
    calls and finish reason (as HTTP streams them)."""
    resp.text = stream.feed(chunk.text or "")
    if chunk.finish_reason:
        rest, calls, finish = stream.finish(chunk.finish_reason)
        resp.text += rest
        resp.finish_reason = finish or ""
        for call in calls:
            resp.tool_calls.add(
                id=call["id"], name=call["function"]["name"], arguments=call["function"]["arguments"]
            )


def _json_default(x: Any):
    if hasattr(x, "tolist"):  # torch / numpy values
        return x.tolist()
    if isinstance(x, (set, tuple)):
        return list(x)
    return str(x)


def cluster_state_to_proto(state: dict) -> pb.ClusterState:
    """ClusterState of an engine's cluster_state() dict; `json` carries the whole dict."""
    msg = pb.ClusterState(
        model_type=str(state.get("model_type", "")),
        transport=str(state.get("transport", "")),
        dtype=str(state.get("dtype", "")),
        placement_version=int(state.get("placement_version", 0)),
        num_workers=int(state.get("num_workers", len(state.get("workers", [])))),
        moe_layers=[int(x) for x in state.get("moe_layers", [])],
        json=json.dumps(state, default=_json_default),
    )
    for w in state.get("workers", []):
        ws = msg.workers.add(
            worker_id=int(w.get("worker_id", 0)),
            node_id=str(w.get("node_id") or ""),
            node_ip=str(w.get("node_ip") or ""),
            device=str(w.get("device", "")),
            dtype=str(w.get("dtype", "")),
            kernel=str(w.get("kernel") or ""),
            param_bytes=int(w.get("param_bytes", 0)),
        )
        for layer, ids in (w.get("experts") or {}).items():
            ws.experts[int(layer)].ids.extend(int(e) for e in ids)
    load = state.get("expert_load") or {}
    msg.load_window_batches = int(load.get("window_batches", 0))
    seen = {int(k): int(v) for k, v in (load.get("batches_seen") or {}).items()}
    for layer, tokens in sorted((int(k), v) for k, v in (load.get("tokens") or {}).items()):
        msg.expert_load.add(layer=layer, tokens=[int(t) for t in tokens], batches_seen=seen.get(layer, 0))
    return msg


def rebalance_to_proto(result: dict) -> pb.RebalanceResponse:
    """RebalanceResponse of a Router.rebalance() dict."""
    msg = pb.RebalanceResponse(
        placement_version=int(result.get("placement_version", 0)),
        json=json.dumps(result, default=_json_default),
    )
    for name in ("before", "after"):
        balance = result.get(name) or {}
        imb = {int(k): v for k, v in (balance.get("imbalance") or {}).items()}
        for layer, value in sorted((int(k), v) for k, v in (balance.get("balancedness") or {}).items()):
            getattr(msg, name).add(
                layer=layer, balancedness=float(value), imbalance=float(imb.get(layer, 0.0))
            )
    return msg


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    first = text[0][:200] if text else ""
    return f"internal error: {type(e).__name__}" + (f": {first}" if first else "")


# ---- servicer ------------------------------------------------------------------------------------


class MoEServicer(pb_grpc.MoEServiceServicer):
    """`moe_serving.v1.MoEService` over `backend` (see the module docstring for its contract)."""

    def __init__(self, backend):
        self.backend = backend

    async def _fail(self, context: grpc.aio.ServicerContext, method: str, e: Exception):
        if isinstance(e, ServingError):
            await context.abort(grpc.StatusCode[e.code.upper()], e.message)
        log.exception("%s failed", method)
        await context.abort(grpc.StatusCode.INTERNAL, _one_line(e))

    async def Forward(self, request: pb.ForwardRequest, context):
        try:
            if not request.HasField("input_ids"):
                raise invalid("input_ids is required")
            ids = tensor_from_proto(request.input_ids, "input_ids")
            mask = None
            if request.HasField("attention_mask"):
                mask = tensor_from_proto(request.attention_mask, "attention_mask")
            logits = await self.backend.forward(ids, mask)
            resp = pb.ForwardResponse()
            tensor_to_proto(logits, resp.logits)
            return resp
        except Exception as e:
            await self._fail(context, "Forward", e)

    async def MoELayerForward(self, request: pb.MoELayerRequest, context):
        try:
            if not request.HasField("hidden_states"):
                raise invalid("hidden_states is required")
            hidden = tensor_from_proto(request.hidden_states, "hidden_states")
            out = await self.backend.moe_layer(request.layer, hidden)
            resp = pb.MoELayerResponse()
            tensor_to_proto(out, resp.hidden_states)
            return resp
        except Exception as e:
            await self._fail(context, "MoELayerForward", e)

    async def Generate(self, request: pb.GenerateRequest, context):
        # Written with context.write (not as an async generator) so that the backend iterator is
        # closed here, deterministically, however the call ends: finished, failed or cancelled
        # (cancellation arrives as CancelledError at the await in progress).
        stream = None
        try:
            params, tools = generate_params(request)
            calls = {}  # choice -> ToolStream, with tools
            stream = self.backend.generate(params)
            async for chunk in stream:
                resp = _generate_response(chunk)
                if tools is not None:
                    _with_tool_calls(resp, chunk, calls.setdefault(chunk.index, ToolStream(tools)))
                await context.write(resp)
        except Exception as e:
            await self._fail(context, "Generate", e)
        finally:
            if stream is not None and hasattr(stream, "aclose"):
                with contextlib.suppress(Exception):
                    await stream.aclose()

    async def GetClusterState(self, request: pb.GetClusterStateRequest, context):
        try:
            return cluster_state_to_proto(await self.backend.cluster_state())
        except Exception as e:
            await self._fail(context, "GetClusterState", e)

    async def Scale(self, request: pb.ScaleRequest, context):
        try:
            if request.num_workers < 1:
                raise invalid(f"num_workers must be >= 1, got {request.num_workers}")
            return cluster_state_to_proto(await self.backend.scale(request.num_workers))
        except Exception as e:
            await self._fail(context, "Scale", e)

    async def Rebalance(self, request: pb.RebalanceRequest, context):
        try:
            return rebalance_to_proto(await self.backend.rebalance())
        except Exception as e:
            await self._fail(context, "Rebalance", e)

    async def ScaleRouters(self, request: pb.ScaleRoutersRequest, context):
        try:
            if request.num_routers < 1:
                raise invalid(f"num_routers must be >= 1, got {request.num_routers}")
            result = await self.backend.scale_routers(request.num_routers)
            return pb.ScaleRoutersResponse(
                from_routers=result["from_routers"],
                num_routers=result["num_routers"],
                seconds=result["seconds"],
                json=json.dumps(result),
            )
        except Exception as e:
            await self._fail(context, "ScaleRouters", e)


# ---- server --------------------------------------------------------------------------------------


class _Malformed:
    """A request whose bytes are not the method's protobuf message."""

    def __init__(self, message_name: str, error: Exception):
        self.text = f"malformed {message_name}: {error}"


def _lenient(message_cls):
    def parse(data: bytes):
        try:
            return message_cls.FromString(data)
        except Exception as e:  # google.protobuf.message.DecodeError and friends
            return _Malformed(message_cls.__name__, e)

    return parse


def _guard(method):
    async def handler(request, context):
        if isinstance(request, _Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.text)
        return await method(request, context)

    return handler


def _add_servicer(servicer: MoEServicer, server: grpc.aio.Server) -> None:
    """Register MoEService like the generated `add_MoEServiceServicer_to_server`, except that bytes
    that do not parse get INVALID_ARGUMENT (grpc's own deserialiser answers INTERNAL)."""
    handlers = {}
    for m in pb.DESCRIPTOR.services_by_name["MoEService"].methods:
        request_cls, response_cls = getattr(pb, m.input_type.name), getattr(pb, m.output_type.name)
        make = (
            grpc.unary_stream_rpc_method_handler
            if m.server_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        handlers[m.name] = make(
            _guard(getattr(servicer, m.name)),
            request_deserializer=_lenient(request_cls),
            response_serializer=response_cls.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))


class GrpcServer:
    """A started gRPC server: `port` (the bound port), `server` (the grpc.aio.Server; its other
    attributes are reachable on this object too), `health` (the health servicer)."""

    def __init__(self, server: grpc.aio.Server, port: int, health_servicer, servicer: MoEServicer):
        self.server = server
        self.port = port
        self.health = health_servicer
        self.servicer = servicer

    async def set_serving(self, serving: bool) -> None:
        """Report SERVING / NOT_SERVING for "" and the MoEService to health checks."""
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def stop(self, grace: float | None = None) -> None:
        """Health -> NOT_SERVING (load balancers stop sending), then stop, letting calls in flight
        finish for `grace` seconds."""
        with contextlib.suppress(Exception):
            await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)

    async def wait_for_termination(self, timeout: float | None = None) -> bool:
        return await self.server.wait_for_termination(timeout)

    def __getattr__(self, name: str):
        return getattr(self.server, name)


def _address(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def server_credentials(tls: GrpcTls) -> grpc.ServerCredentials:
    """TLS server credentials of the PEM files; with a client CA, client certificates are required."""
    cert, key, client_ca = tls.read()
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


async def start_grpc_server(
    backend,
    host: str = "0.0.0.0",
    port: int = 50051,
    *,
    max_message_mb: int = 256,
    access: AccessKeys | None = None,
    tls: GrpcTls | None = None,
) -> GrpcServer:
    """Start MoEService over `backend` with health and reflection on host:port (0: a free port).

    access: the keys MoEService's methods need (`auth.AccessInterceptor`; health and reflection stay
    open); None or no keys: open. tls: serve TLS (mutual TLS with a client CA); None: plaintext.

    Returns a GrpcServer; its `port` is the bound port. Raises OSError(EADDRINUSE) when the port
    cannot be bound (in use: SO_REUSEPORT is off, so a second server does not silently share it).
    """
    size = int(max_message_mb) * 1024 * 1024
    interceptors = [AccessInterceptor(access, SERVICE_NAME)] if access is not None and access.enabled else []
    credentials = server_credentials(tls) if tls is not None else None
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_send_message_length", size),
            ("grpc.max_receive_message_length", size),
            ("grpc.so_reuseport", 0),
        ],
    )
    servicer = MoEServicer(backend)
    _add_servicer(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
        server,
    )
    address = _address(host, port)
    try:
        if credentials is None:
            bound = server.add_insecure_port(address)
        else:
            bound = server.add_secure_port(address, credentials)
    except RuntimeError as e:
        bound, cause = 0, e
    else:
        cause = None
    if not bound:
        raise OSError(
            errno.EADDRINUSE,
            f"gRPC server cannot bind {address}: the port is in use or the address is invalid",
        ) from cause
    await server.start()
    started = GrpcServer(server, bound, health_servicer, servicer)
    await started.set_serving(True)
    log.info(
        "gRPC server (%s, health, reflection) listening on %s (%s%s)",
        SERVICE_NAME,
        _address(host, bound),
        "plaintext" if tls is None else "mutual TLS" if tls.client_ca else "TLS",
        ", API keys" if interceptors else "",
    )
    return started
