"""Python clients of the gRPC API (`moe_serving.v1.MoEService`): `GrpcClient` (blocking) and
`AsyncGrpcClient` (grpc.aio).

    with GrpcClient("localhost:50051") as client:
        logits = client.forward(torch.tensor([[1, 2, 3]]))
        for chunk in client.generate(prompt="Hello", max_tokens=8, seed=0):
            print(chunk.text, end="")
        for chunk in client.chat([{"role": "user", "content": "Hi"}], max_tokens=8, stop=["\n"]):
            print(chunk.text, end="")
        print(client.cluster_state()["workers"])

Tensors travel as `moe_serving.v1.Tensor` (exact, any dtype). A non-OK status raises
`ServingError`: its code is the gRPC status name in lower case (statuses the serving API does not
use map to the nearest one of `moe_serving.errors.HTTP_STATUS`), its message the status details,
and `status` the gRPC status name ("INVALID_ARGUMENT", ...).

A server started with keys needs one: `api_key=` (default: MOE_SERVE_API_KEY, else OPENAI_API_KEY),
sent as `authorization: Bearer <key>` metadata on every call. TLS: `credentials=tls_credentials(ca)`
(`moe_serving.credentials`; with cert and key for mutual TLS).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moe_serving.credentials import api_key_from_env
from moe_serving.errors import HTTP_STATUS, ServingError
from moe_serving.tensors import tensor_from_proto, tensor_to_proto
from moe_serving.types import GenerateChunk, GenerateParams, StructuredOutput, TokenLogprob
from moe_serving.v1 import moe_service_pb2 as pb
from moe_serving.v1 import moe_service_pb2_grpc as pb_grpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["MoEService"].full_name  # "moe_serving.v1.MoEService"

# gRPC statuses the serving API does not raise itself -> the nearest ServingError code
_NEAREST = {
    "unknown": "internal",
    "data_loss": "internal",
    "deadline_exceeded": "unavailable",
    "aborted": "unavailable",
    "out_of_range": "invalid_argument",
    "already_exists": "invalid_argument",
}

__all__ = ["SERVICE_NAME", "AsyncGrpcClient", "GrpcClient", "generate_request", "serving_error"]


def serving_error(e: grpc.RpcError) -> ServingError:
    """The ServingError of a failed call."""
    code = e.code() if hasattr(e, "code") else None
    name = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
    lower = name.lower()
    details = e.details() if hasattr(e, "details") else None
    return ServingError(
        lower if lower in HTTP_STATUS else _NEAREST.get(lower, "internal"),
        details or f"gRPC call failed with status {name}",
        status=name,
    )


def _tensor(x: Any, dtype: torch.dtype) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=dtype)


def _forward_request(input_ids, attention_mask) -> pb.ForwardRequest:
    req = pb.ForwardRequest()
    tensor_to_proto(_tensor(input_ids, torch.int64), req.input_ids)
    if attention_mask is not None:
        tensor_to_proto(_tensor(attention_mask, torch.int64), req.attention_mask)
    return req


def _layer_request(layer: int, hidden_states) -> pb.MoELayerRequest:
    req = pb.MoELayerRequest(layer=int(layer))
    tensor_to_proto(_tensor(hidden_states, torch.float32), req.hidden_states)
    return req


def generate_request(params: GenerateParams | None = None, **kwargs) -> pb.GenerateRequest:
    """The GenerateRequest of a GenerateParams, or of its fields as keyword arguments."""
    if params is None:
        params = GenerateParams(**kwargs)
    elif kwargs:
        raise TypeError("pass either a GenerateParams or keyword arguments, not both")
    req = pb.GenerateRequest(
        max_tokens=int(params.max_tokens or 0),  # 0: the server's default
        temperature=float(params.temperature),
        top_p=float(params.top_p),
        n=int(params.n),
        stop=[params.stop] if isinstance(params.stop, str) else list(params.stop),
        stop_token_ids=[int(t) for t in params.stop_token_ids],
        presence_penalty=float(params.presence_penalty),
        frequency_penalty=float(params.frequency_penalty),
        repetition_penalty=float(params.repetition_penalty),
        min_tokens=int(params.min_tokens),
        ignore_eos=bool(params.ignore_eos),
    )
    if params.prompt is not None:
        req.prompt = params.prompt
    if params.prompt_token_ids is not None:
        req.prompt_token_ids.extend(int(t) for t in params.prompt_token_ids)
    for m in params.messages or []:
        msg = req.messages.add(role=str(m["role"]), content=str(m.get("content") or ""))
        if m.get("tool_calls"):
            msg.tool_calls_json = json.dumps(m["tool_calls"])
        if m.get("tool_call_id"):
            msg.tool_call_id = str(m["tool_call_id"])
    if params.seed is not None:
        req.seed = int(params.seed)
    if params.logprobs is not None:
        req.logprobs = int(params.logprobs)
    req.top_k = int(params.top_k)
    if params.min_p:
        req.min_p = float(params.min_p)
    for token, bias in (params.logit_bias or {}).items():
        req.logit_bias[int(token)] = float(bias)
    req.allowed_token_ids.extend(int(t) for t in params.allowed_token_ids or ())
    if params.structured is not None:
        _structured_to_proto(params.structured, req.structured_output)
    return req


def _structured_to_proto(so: StructuredOutput, out: pb.StructuredOutput) -> None:
    if so.kind == "json":
        out.json_schema = so.value if isinstance(so.value, str) else json.dumps(so.value)
    elif so.kind == "json_object":
        out.json_object = True
    elif so.kind == "choice":
        out.choice.choices.extend(so.value)
    elif so.kind in ("regex", "grammar"):
        setattr(out, so.kind, so.value)
    else:
        raise ValueError(f"unknown structured output kind {so.kind!r}")
    out.any_whitespace = not so.compact_json


def _logprob(msg: pb.TokenLogprob) -> TokenLogprob:
    return TokenLogprob(
        token_id=msg.token_id,
        token=msg.token,
        logprob=msg.logprob,
        bytes=list(msg.bytes),
        top_logprobs=[_logprob(alt) for alt in msg.top_logprobs],
        text_offset=msg.text_offset,
    )


def _chunk(resp: pb.GenerateResponse) -> GenerateChunk:
    chunk = GenerateChunk(
        token_ids=list(resp.token_ids),
        text=resp.text,
        finish_reason=resp.finish_reason or None,
        index=resp.index,
        logprobs=[_logprob(lp) for lp in resp.logprobs] or None,
        tool_calls=[
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in resp.tool_calls
        ]
        or None,
    )
    if resp.HasField("usage"):
        chunk.prompt_tokens = resp.usage.prompt_tokens
        chunk.completion_tokens = resp.usage.completion_tokens
    return chunk


def cluster_state_dict(msg: pb.ClusterState) -> dict:
    """The state dict of a ClusterState: its `json` field (everything), else the typed fields."""
    if msg.json:
        return json.loads(msg.json)
    return {
        "model_type": msg.model_type,
        "transport": msg.transport,
        "dtype": msg.dtype,
        "placement_version": msg.placement_version,
        "num_workers": msg.num_workers,
        "moe_layers": list(msg.moe_layers),
        "workers": [
            {
                "worker_id": w.worker_id,
                "device": w.device,
                "dtype": w.dtype,
                "kernel": w.kernel,
                "experts": {str(k): list(v.ids) for k, v in sorted(w.experts.items())},
                "param_bytes": w.param_bytes,
                **({"node_id": w.node_id, "node_ip": w.node_ip} if w.node_id or w.node_ip else {}),
            }
            for w in msg.workers
        ],
        "expert_load": {
            "window_batches": msg.load_window_batches,
            "batches_seen": {str(x.layer): x.batches_seen for x in msg.expert_load},
            "tokens": {str(x.layer): list(x.tokens) for x in msg.expert_load},
        },
    }


def _channel_options(max_message_mb: int, options) -> list:
    size = int(max_message_mb) * 1024 * 1024
    return [
        ("grpc.max_send_message_length", size),
        ("grpc.max_receive_message_length", size),
        *(options or []),
    ]


def _auth_metadata(api_key: str | None) -> tuple:
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


class GrpcClient:
    """Blocking client of `moe_serving.v1.MoEService` at `target` ("host:port").

    timeout: seconds per unary call (None: no deadline); generate streams have none.
    credentials: grpc.ChannelCredentials for TLS (None: plaintext; see `credentials.tls_credentials`).
    api_key: sent as `authorization: Bearer` metadata (default: from the environment).
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = None,
        max_message_mb: int = 256,
        credentials: grpc.ChannelCredentials | None = None,
        options: list | None = None,
        api_key: str | None = None,
    ):
        self.target = target
        self.timeout = timeout
        self._metadata = _auth_metadata(api_key or api_key_from_env())
        opts = _channel_options(max_message_mb, options)
        if credentials is None:
            self._channel = grpc.insecure_channel(target, options=opts)
        else:
            self._channel = grpc.secure_channel(target, credentials, options=opts)
        self._stub = pb_grpc.MoEServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def _call(self, method, request):
        try:
            return method(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise serving_error(e) from None

    def forward(self, input_ids, attention_mask=None) -> torch.Tensor:
        """Logits [B, S, V] (float32) for token ids [B, S]."""
        resp = self._call(self._stub.Forward, _forward_request(input_ids, attention_mask))
        return tensor_from_proto(resp.logits, "logits")

    def moe_layer(self, layer: int, hidden_states) -> torch.Tensor:
        """One MoE block on hidden states [T, H] or [B, S, H]; same shape and dtype back."""
        resp = self._call(self._stub.MoELayerForward, _layer_request(layer, hidden_states))
        return tensor_from_proto(resp.hidden_states, "hidden_states")

    def generate(self, params: GenerateParams | None = None, **kwargs) -> Iterator[GenerateChunk]:
        """Stream a generation: GenerateChunks as the tokens come; the last has finish_reason and
        the token counts. Leaving the loop early (or closing the iterator) cancels the call."""
        request = generate_request(params, **kwargs)
        call = self._stub.Generate(request, metadata=self._metadata)
        try:
            for resp in call:
                yield _chunk(resp)
        except grpc.RpcError as e:
            raise serving_error(e) from None
        finally:
            call.cancel()  # no-op once the call has finished

    def chat(self, messages: list[dict], **kwargs) -> Iterator[GenerateChunk]:
        """Stream the assistant's answer to `messages` ([{"role": ..., "content": ...}], rendered
        with the model's chat template); `kwargs`: the other GenerateParams fields (without
        max_tokens the answer runs up to the model's context)."""
        kwargs.setdefault("max_tokens", None)
        return self.generate(messages=list(messages), **kwargs)

    def cluster_state(self) -> dict:
        """Workers, experts per worker and layer, expert load (the engine's cluster_state() dict)."""
        return cluster_state_dict(self._call(self._stub.GetClusterState, pb.GetClusterStateRequest()))

    def scale(self, num_workers: int) -> dict:
        """Change the number of expert workers; returns the cluster state once the new placement
        serves."""
        return cluster_state_dict(self._call(self._stub.Scale, pb.ScaleRequest(num_workers=int(num_workers))))

    def rebalance(self) -> dict:
        """Re-place experts by EPLB over the recent load; the balance before and after."""
        return json.loads(self._call(self._stub.Rebalance, pb.RebalanceRequest()).json)

    def scale_routers(self, num_routers: int) -> dict:
        """Run `num_routers` routers; {"from_routers", "num_routers", "seconds", "routers"}."""
        request = pb.ScaleRoutersRequest(num_routers=int(num_routers))
        return json.loads(self._call(self._stub.ScaleRouters, request).json)

    def health(self, service: str = SERVICE_NAME) -> bool:
        """True when the server's health service reports SERVING for `service`."""
        try:
            resp = self._health.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=self.timeout or 10
            )
        except grpc.RpcError:
            return False
        return resp.status == health_pb2.HealthCheckResponse.SERVING

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> GrpcClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncGrpcClient:
    """asyncio client (grpc.aio): the methods of `GrpcClient`, awaitable; `generate` is an async
    iterator. Create it inside the event loop it is used from."""

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = None,
        max_message_mb: int = 256,
        credentials: grpc.ChannelCredentials | None = None,
        options: list | None = None,
        api_key: str | None = None,
    ):
        self.target = target
        self.timeout = timeout
        self._metadata = _auth_metadata(api_key or api_key_from_env())
        opts = _channel_options(max_message_mb, options)
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(target, options=opts)
        else:
            self._channel = grpc.aio.secure_channel(target, credentials, options=opts)
        self._stub = pb_grpc.MoEServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def _call(self, method, request):
        try:
            return await method(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise serving_error(e) from None

    async def forward(self, input_ids, attention_mask=None) -> torch.Tensor:
        resp = await self._call(self._stub.Forward, _forward_request(input_ids, attention_mask))
        return tensor_from_proto(resp.logits, "logits")

    async def moe_layer(self, layer: int, hidden_states) -> torch.Tensor:
        resp = await self._call(self._stub.MoELayerForward, _layer_request(layer, hidden_states))
        return tensor_from_proto(resp.hidden_states, "hidden_states")

    async def generate(self, params: GenerateParams | None = None, **kwargs) -> AsyncIterator[GenerateChunk]:
        request = generate_request(params, **kwargs)
        call = self._stub.Generate(request, metadata=self._metadata)
        try:
            async for resp in call:
                yield _chunk(resp)
        except grpc.RpcError as e:
            raise serving_error(e) from None
        finally:
            call.cancel()

    def chat(self, messages: list[dict], **kwargs) -> AsyncIterator[GenerateChunk]:
        """Stream the assistant's answer to `messages` (see GrpcClient.chat)."""
        kwargs.setdefault("max_tokens", None)
        return self.generate(messages=list(messages), **kwargs)

    async def cluster_state(self) -> dict:
        return cluster_state_dict(await self._call(self._stub.GetClusterState, pb.GetClusterStateRequest()))

    async def scale(self, num_workers: int) -> dict:
        resp = await self._call(self._stub.Scale, pb.ScaleRequest(num_workers=int(num_workers)))
        return cluster_state_dict(resp)

    async def rebalance(self) -> dict:
        return json.loads((await self._call(self._stub.Rebalance, pb.RebalanceRequest())).json)

    async def scale_routers(self, num_routers: int) -> dict:
        request = pb.ScaleRoutersRequest(num_routers=int(num_routers))
        return json.loads((await self._call(self._stub.ScaleRouters, request)).json)

    async def health(self, service: str = SERVICE_NAME) -> bool:
        try:
            resp = await self._health.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=self.timeout or 10
            )
        except grpc.RpcError:
            return False
        return resp.status == health_pb2.HealthCheckResponse.SERVING

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncGrpcClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
