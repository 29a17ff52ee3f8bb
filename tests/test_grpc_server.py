"""The gRPC front end over a real (in-process) engine: a grpc.aio server on a loopback port, the sync
and async Python clients, raw stubs, health and reflection. No Ray."""

import asyncio
import json
import socket
import threading
import time

import grpc
import pytest
import torch
from conftest import rel_err
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from tiny_models import VOCAB

from moe_serving.errors import ServingError
from moe_serving.grpc_client import AsyncGrpcClient, GrpcClient
from moe_serving.types import GenerateChunk, GenerateParams, StructuredOutput
from moe_serving.v1 import moe_service_pb2 as pb
from moe_serving.v1 import moe_service_pb2_grpc as pb_grpc
from router_service import Engine
from router_service.serving.grpc_server import SERVICE_NAME, generate_params, start_grpc_server


class EngineBackend:
    """The backend contract over an in-process Engine; `fail_with` makes the next call raise it,
    `slow` makes generate endless (for cancellation), `closed` counts closed generate streams."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.fail_with: BaseException | None = None
        self.slow = False
        self.closed = 0

    def _maybe_fail(self):
        if self.fail_with is not None:
            e, self.fail_with = self.fail_with, None
            raise e

    async def forward(self, input_ids, attention_mask):
        self._maybe_fail()
        return self.engine.forward(input_ids, attention_mask)

    async def moe_layer(self, layer, hidden_states):
        self._maybe_fail()
        if layer not in self.engine.spec.moe_layers:
            raise ServingError("invalid_argument", f"layer {layer} is not a MoE layer")
        return self.engine.moe_forward(layer, hidden_states)

    async def generate(self, params: GenerateParams):
        try:
            self._maybe_fail()
            if params.prompt is not None:
                ids = [3 + b % (VOCAB - 3) for b in params.prompt.encode()]
            else:
                ids = list(params.prompt_token_ids)
            if self.slow:
                while True:
                    await asyncio.sleep(0.01)
                    yield GenerateChunk(token_ids=[5], text="x")
            out = self.engine.generate(
                torch.tensor([ids]), params.max_tokens, params.temperature, params.top_p, params.seed
            )
            new = out[0, len(ids) :].tolist()
            for i, t in enumerate(new):
                last = i == len(new) - 1
                finish = None
                if last:
                    finish = "length" if len(new) == params.max_tokens else "stop"
                yield GenerateChunk(
                    token_ids=[t],
                    text=f"<{t}>",
                    finish_reason=finish,
                    prompt_tokens=len(ids) if last else 0,
                    completion_tokens=len(new) if last else 0,
                )
        finally:
            self.closed += 1

    async def cluster_state(self):
        self._maybe_fail()
        return self.engine.cluster_state()

    async def scale(self, num_workers):
        self._maybe_fail()
        if num_workers != self.engine.config.num_workers:
            raise ServingError("unimplemented", "this test backend cannot scale")
        return self.engine.cluster_state()


class ServerThread:
    """A grpc.aio server running in its own event loop thread (so blocking clients can call it)."""

    def __init__(self, backend):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = self.run(start_grpc_server(backend, "127.0.0.1", 0))
        self.target = f"127.0.0.1:{self.server.port}"

    def run(self, coro, timeout=30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        self.run(self.server.stop(None))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("deepseek_v3")


@pytest.fixture(scope="module")
def served(model_dir):
    engine = Engine.from_pretrained(model_dir, num_workers=2)
    backend = EngineBackend(engine)
    srv = ServerThread(backend)
    yield srv, backend
    srv.close()
    engine.shutdown()


@pytest.fixture
def client(served):
    with GrpcClient(served[0].target, timeout=30) as c:
        yield c


@pytest.fixture
def stub(served):
    with grpc.insecure_channel(served[0].target) as channel:
        yield pb_grpc.MoEServiceStub(channel)


def run_async(coro):
    return asyncio.run(coro)


# ---- results ---------------------------------------------------------------------------------------


def test_forward_equals_transformers(client, served, model_dir):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.randint(3, VOCAB, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        exp = ref(ids).logits
        exp_masked = ref(ids, attention_mask=mask).logits
    logits = client.forward(ids)
    assert logits.dtype == torch.float32 and logits.shape == exp.shape
    assert rel_err(logits, exp) < 1e-5
    assert rel_err(client.forward(ids, attention_mask=mask), exp_masked) < 1e-5
    assert rel_err(client.forward(ids.tolist()), exp) < 1e-5  # lists are accepted too

    async def main():
        async with AsyncGrpcClient(served[0].target) as ac:
            return await ac.forward(ids)

    assert torch.equal(run_async(main()), logits)


def test_moe_layer(client, served):
    engine = served[1].engine
    for layer in engine.spec.moe_layers:
        for shape in [(5, 32), (2, 3, 32)]:
            h = torch.randn(shape)
            out = client.moe_layer(layer, h)
            assert out.shape == h.shape and torch.equal(out, engine.moe_forward(layer, h))
    with pytest.raises(ServingError) as e:
        client.moe_layer(0, torch.randn(2, 32))  # layer 0 is dense in the tiny deepseek_v3
    assert (e.value.code, e.value.status) == ("invalid_argument", "INVALID_ARGUMENT")
    assert "not a MoE layer" in e.value.message


def test_generate_streams_one_chunk_per_token(client, served):
    engine = served[1].engine
    prompt = [5, 9, 17, 33]
    exp = engine.generate(torch.tensor([prompt]), 6, 0.0)[0, len(prompt) :].tolist()
    chunks = list(client.generate(prompt_token_ids=prompt, max_tokens=6, temperature=0.0))
    assert [c.token_ids for c in chunks] == [[t] for t in exp]
    assert [c.text for c in chunks] == [f"<{t}>" for t in exp]
    assert all(c.finish_reason is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.finish_reason in ("length", "stop")
    assert (last.prompt_tokens, last.completion_tokens) == (4, len(exp))

    # seeded sampling is repeatable; a text prompt works
    params = GenerateParams(prompt="hello", max_tokens=5, temperature=1.0, top_p=0.9, seed=3)
    a = [c.token_ids for c in client.generate(params)]
    assert a == [c.token_ids for c in client.generate(params)]

    async def main():
        async with AsyncGrpcClient(served[0].target) as ac:
            return [c async for c in ac.generate(prompt_token_ids=prompt, max_tokens=6, temperature=0.0)]

    assert run_async(main()) == chunks


def test_generate_request_defaults_and_validation(stub):
    p, tools = generate_params(pb.GenerateRequest(prompt_token_ids=[1, 2]))
    assert p == GenerateParams(prompt_token_ids=[1, 2], max_tokens=16, temperature=1.0, top_p=1.0, seed=None)
    assert tools is None
    p, _ = generate_params(pb.GenerateRequest(prompt="x", max_tokens=3, temperature=0.0, top_p=0.5, seed=0))
    assert (p.prompt, p.max_tokens, p.temperature, p.top_p, p.seed) == ("x", 3, 0.0, 0.5, 0)
    chat = pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content="x")])
    assert generate_params(chat)[0].max_tokens is None  # a chat runs up to the context, as over HTTP
    # the sampling options and structured outputs HTTP takes
    p, _ = generate_params(
        pb.GenerateRequest(
            prompt="x",
            top_k=4,
            min_p=0.2,
            logit_bias={7: -1.5},
            allowed_token_ids=[7, 8],
            structured_output=pb.StructuredOutput(choice=pb.ChoiceList(choices=["a", "b"])),
        )
    )
    assert (p.top_k, p.min_p, p.logit_bias, p.allowed_token_ids) == (4, 0.2, {7: -1.5}, (7, 8))
    assert p.structured == StructuredOutput("choice", ("a", "b"))
    p, _ = generate_params(
        pb.GenerateRequest(
            prompt="x", structured_output=pb.StructuredOutput(json_schema="{}", any_whitespace=True)
        )
    )
    assert p.structured == StructuredOutput("json", "{}", compact_json=False)
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    chat.tools_json, chat.tool_choice = json.dumps([tool]), "f"
    p, tools = generate_params(chat)
    assert tools.choice == "function" and tools.function == "f" and p.structured.kind == "json"
    for bad, needle in [
        (pb.GenerateRequest(), "exactly one"),
        (pb.GenerateRequest(prompt="x", prompt_token_ids=[1]), "both"),
        (pb.GenerateRequest(prompt="x", max_tokens=-1), "max_tokens"),
        (pb.GenerateRequest(prompt="x", tool_choice="required"), "needs tools_json"),
        (pb.GenerateRequest(prompt="x", tools_json=json.dumps([tool])), "need messages"),
        (pb.GenerateRequest(prompt="x", structured_output=pb.StructuredOutput()), "structured_output"),
    ]:
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Generate(bad))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in e.value.details()


def test_cancelled_generate_closes_backend_stream(served):
    srv, backend = served
    backend.slow = True
    try:
        before = backend.closed
        with GrpcClient(srv.target) as c:
            it = c.generate(prompt_token_ids=[1, 2], max_tokens=5)
            assert next(it).token_ids == [5]
            it.close()  # cancels the call
        deadline = time.monotonic() + 5
        while backend.closed == before and time.monotonic() < deadline:
            time.sleep(0.01)
        assert backend.closed == before + 1

        async def main():
            async with AsyncGrpcClient(srv.target) as ac:
                agen = ac.generate(prompt_token_ids=[1, 2])
                assert (await agen.__anext__()).token_ids == [5]
                await agen.aclose()

        run_async(main())
        deadline = time.monotonic() + 5
        while backend.closed == before + 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert backend.closed == before + 2
    finally:
        backend.slow = False


def test_cluster_state_and_scale(client, served):
    engine = served[1].engine
    exp = json.loads(json.dumps(engine.cluster_state()))
    assert client.cluster_state() == exp

    with grpc.insecure_channel(served[0].target) as channel:
        msg = pb_grpc.MoEServiceStub(channel).GetClusterState(pb.GetClusterStateRequest())
    assert msg.model_type == "deepseek_v3" and msg.transport == "local" and msg.dtype == "float32"
    assert msg.num_workers == 2 and list(msg.moe_layers) == list(engine.spec.moe_layers)
    assert [w.worker_id for w in msg.workers] == [0, 1]
    held = sorted(e for w in msg.workers for e in w.experts[msg.moe_layers[0]].ids)
    assert held == list(range(16))  # every routed expert of the layer, once
    assert all(w.param_bytes > 0 and w.kernel for w in msg.workers)
    assert [x.layer for x in msg.expert_load] == list(msg.moe_layers)
    assert all(len(x.tokens) == 16 for x in msg.expert_load)
    assert msg.load_window_batches == exp["expert_load"]["window_batches"]

    assert client.scale(2) == client.cluster_state()
    with pytest.raises(ServingError) as e:
        client.scale(0)
    assert e.value.code == "invalid_argument" and "num_workers" in e.value.message
    with pytest.raises(ServingError) as e:
        client.scale(3)
    assert (e.value.code, e.value.status) == ("unimplemented", "UNIMPLEMENTED")


# ---- health, reflection ----------------------------------------------------------------------------


def test_health(client, served):
    srv = served[0]
    assert client.health()
    assert client.health("")
    assert not client.health("no.such.Service")  # NOT_FOUND
    srv.run(srv.server.set_serving(False))
    try:
        with grpc.insecure_channel(srv.target) as channel:
            resp = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=SERVICE_NAME)
            )
        assert resp.status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert not client.health()
    finally:
        srv.run(srv.server.set_serving(True))

    async def main():
        async with AsyncGrpcClient(srv.target) as ac:
            return await ac.health()

    assert run_async(main())
    with GrpcClient("127.0.0.1:9", timeout=2) as nobody:
        assert not nobody.health()


def test_reflection_lists_the_service(served):
    with grpc.insecure_channel(served[0].target) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = db.get_services()
        assert SERVICE_NAME in services and "grpc.health.v1.Health" in services
        fd = db.FindFileContainingSymbol(SERVICE_NAME)
        assert fd.package == "moe_serving.v1"


# ---- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "needle"),
    [
        (pb.ForwardRequest(), "input_ids is required"),
        (pb.ForwardRequest(input_ids=pb.Tensor(dtype="int64", shape=[1, 3], data=b"\0" * 20)), "20 bytes"),
        (pb.ForwardRequest(input_ids=pb.Tensor(dtype="int128", shape=[1], data=b"\0" * 16)), "unknown dtype"),
        (pb.ForwardRequest(input_ids=pb.Tensor(dtype="int64", shape=[-1], data=b"")), "negative dimension"),
        (
            pb.ForwardRequest(
                input_ids=pb.Tensor(dtype="int64", shape=[1], data=b"\1" + b"\0" * 7),
                attention_mask=pb.Tensor(dtype="int64", shape=[1], data=b""),
            ),
            "attention_mask: data has 0 bytes",
        ),
    ],
)
def test_malformed_tensor_is_invalid_argument(stub, request_, needle):
    with pytest.raises(grpc.RpcError) as e:
        stub.Forward(request_)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in e.value.details()


def test_malformed_moe_layer_tensor(stub):
    with pytest.raises(grpc.RpcError) as e:
        stub.MoELayerForward(pb.MoELayerRequest(layer=1))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "hidden_states" in e.value.details()


def test_backend_serving_error_keeps_its_code(client, served):
    backend = served[1]
    backend.fail_with = ServingError("resource_exhausted", "batch over 4096 tokens")
    with pytest.raises(ServingError) as e:
        client.forward(torch.tensor([[1, 2]]))
    assert (e.value.code, e.value.status, e.value.message) == (
        "resource_exhausted",
        "RESOURCE_EXHAUSTED",
        "batch over 4096 tokens",
    )
    backend.fail_with = ServingError("unavailable", "queue full")
    with pytest.raises(ServingError) as e:
        list(client.generate(prompt_token_ids=[1], max_tokens=2))
    assert (e.value.code, e.value.message) == ("unavailable", "queue full")


def test_unexpected_exception_is_internal_without_traceback(client, served, caplog):
    backend = served[1]

    def boom():
        raise ValueError("secret\nsecond line")

    try:
        boom()
    except ValueError as exc:
        backend.fail_with = exc
    with caplog.at_level("ERROR"), pytest.raises(ServingError) as e:
        client.cluster_state()
    assert (e.value.code, e.value.status) == ("internal", "INTERNAL")
    msg = e.value.message
    assert msg == "internal error: ValueError: secret" and "\n" not in msg
    assert "Traceback" not in msg and "File " not in msg and "second line" not in msg
    assert "GetClusterState failed" in caplog.text  # the traceback is logged server side

    async def main():
        backend.fail_with = RuntimeError("boom")
        async with AsyncGrpcClient(served[0].target) as ac:
            with pytest.raises(ServingError) as e:
                await ac.moe_layer(1, torch.zeros(1, 32))
            return e.value

    err = run_async(main())
    assert (err.code, err.message) == ("internal", "internal error: RuntimeError: boom")


def test_port_in_use_is_a_clear_error(served):
    srv = served[0]
    with pytest.raises(OSError, match="in use"):
        srv.run(start_grpc_server(served[1], "127.0.0.1", srv.server.port))
    with socket.socket() as s:  # a port held by another program
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(OSError, match="in use"):
            srv.run(start_grpc_server(served[1], "127.0.0.1", s.getsockname()[1]))
