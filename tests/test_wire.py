"""Wire codecs (moe_serving.tensors): msgpack maps, protobuf Tensor, JSON; and the HTTP client's
request and answer handling against a mock transport."""

import base64
import json
import struct

import httpx
import msgpack
import pytest
import torch

from moe_serving.errors import ServingError
from moe_serving.http_client import AsyncHTTPClient, HTTPClient
from moe_serving.tensors import (
    DTYPES,
    from_json,
    tensor_from_map,
    tensor_from_proto,
    tensor_to_json_map,
    tensor_to_map,
    tensor_to_proto,
    to_json_lists,
)
from moe_serving.types import GenerateChunk
from moe_serving.v1 import moe_service_pb2 as pb


def sample(dtype: torch.dtype, shape) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.rand(shape) > 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape) * 100).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -(2**62)), min(info.max, 2**62), shape, dtype=dtype)


SHAPES = [(), (0,), (3, 0, 2), (1,), (2, 3), (2, 3, 5)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", list(DTYPES))
def test_round_trips_are_exact(name, shape):
    t = sample(DTYPES[name], shape)
    m = tensor_to_map(t)
    assert m["dtype"] == name and m["shape"] == list(shape) and isinstance(m["data"], bytes)
    for back in (
        tensor_from_map(m),
        tensor_from_map(msgpack.unpackb(msgpack.packb(m, use_bin_type=True), raw=False)),
        tensor_from_proto(pb.Tensor.FromString(tensor_to_proto(t).SerializeToString())),
        from_json(json.loads(json.dumps(tensor_to_json_map(t)))),
    ):
        assert back.dtype == t.dtype and back.shape == t.shape
        assert torch.equal(back, t)
        if t.numel():  # owns writable memory (not a view of the message's bytes)
            back.view(-1)[0] = back.view(-1)[0]


def test_bytes_are_little_endian_c_order():
    t = torch.tensor([[1, 2], [3, 4]], dtype=torch.int32).t()  # not contiguous
    assert tensor_to_map(t)["data"] == struct.pack("<4i", 1, 3, 2, 4)
    b = torch.tensor([1.0, -2.5], dtype=torch.bfloat16)
    # bf16 = the top 16 bits of the float32: 1.0 -> 0x3F80, -2.5 -> 0xC020
    assert tensor_to_map(b)["data"] == struct.pack("<2H", 0x3F80, 0xC020)
    assert torch.equal(
        tensor_from_map({"dtype": "bfloat16", "shape": [2], "data": struct.pack("<2H", 0x3F80, 0xC020)}), b
    )
    big = torch.tensor([2**40 + 7, -3], dtype=torch.int64)
    assert tensor_to_map(big)["data"] == struct.pack("<2q", 2**40 + 7, -3)


def test_bfloat16_keeps_every_bit():
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    t = bits.view(torch.bfloat16)  # every bf16 bit pattern, NaNs and infinities included
    back = tensor_from_proto(tensor_to_proto(t))
    assert torch.equal(back.view(torch.int16), bits)


def test_json_lists():
    t = torch.tensor([[1.5, -2.0], [0.25, 3.0]], dtype=torch.bfloat16)
    assert to_json_lists(t) == [[1.5, -2.0], [0.25, 3.0]]
    assert to_json_lists(torch.tensor(7)) == 7
    ids = from_json([[1, 2, 3], [4, 5, 6]])
    assert ids.dtype == torch.int64 and ids.tolist() == [[1, 2, 3], [4, 5, 6]]
    assert from_json([[1, 2.5]]).dtype == torch.float32
    assert from_json([[1, 2]], "float32").dtype == torch.float32
    assert from_json([[1.0, 2.0]], "int64").tolist() == [[1, 2]]
    assert from_json([[1.5, 2.0]], torch.bfloat16).dtype == torch.bfloat16
    assert from_json([[], []], "int64").shape == (2, 0)
    assert from_json([], "float32").shape == (0,)
    assert from_json(3, "int32").shape == ()
    assert from_json([True, False], "bool").tolist() == [True, False]


BAD_MAPS = [
    ({"dtype": "float8", "shape": [1], "data": b"\0"}, "unknown dtype"),
    ({"dtype": "", "shape": [1], "data": b"\0"}, "unknown dtype (missing)"),
    ({"dtype": "float32", "shape": [2, 3], "data": b"\0" * 23}, "23 bytes"),
    ({"dtype": "float32", "shape": [2, 3], "data": b"\0" * 25}, "needs 24"),
    ({"dtype": "int64", "shape": [], "data": b""}, "needs 8"),
    ({"dtype": "float32", "shape": [-1, 2], "data": b""}, "negative dimension"),
    ({"dtype": "float32", "shape": [1.5], "data": b"\0" * 4}, "list of ints"),
    ({"dtype": "float32", "shape": "2", "data": b"\0" * 8}, "list of ints"),
    ({"dtype": "float32", "shape": [2], "data": "abcdefgh"}, "data must be bytes"),
    ({"dtype": "float32", "shape": [2]}, "missing data"),
    ([1, 2], "expected a map"),
]


@pytest.mark.parametrize(("bad", "needle"), BAD_MAPS)
def test_bad_maps_are_invalid_argument(bad, needle):
    with pytest.raises(ServingError) as e:
        tensor_from_map(bad, "input_ids")
    assert e.value.code == "invalid_argument"
    assert needle in e.value.message and e.value.message.startswith("input_ids:")


@pytest.mark.parametrize(
    ("msg", "needle"),
    [
        (pb.Tensor(dtype="complex64", shape=[1], data=b"\0" * 8), "unknown dtype"),
        (pb.Tensor(), "unknown dtype (missing)"),
        (pb.Tensor(dtype="float32", shape=[2, 2], data=b"\0" * 12), "12 bytes"),
        (pb.Tensor(dtype="float32", shape=[-2, -2], data=b"\0" * 16), "negative dimension"),
    ],
)
def test_bad_protos_are_invalid_argument(msg, needle):
    with pytest.raises(ServingError) as e:
        tensor_from_proto(msg)
    assert e.value.code == "invalid_argument" and needle in e.value.message


@pytest.mark.parametrize(
    ("value", "dtype", "needle"),
    [
        ([[1, 2], [3]], "int64", "ragged"),
        ([[1, 2], 3], "int64", "ragged"),
        ([1, [2, 3]], "int64", "ragged"),
        ([[[1]], [[1, 2]]], None, "ragged"),
        ([["a", "b"]], None, "expected numbers"),
        ([[None]], "float32", "expected numbers"),
        ([True], "int64", "expected numbers"),
        ([1.5], "int64", "must be integers"),
        ([2**70], "int64", "out of range"),
        ([300], "uint8", "out of range"),
        ([1], "float8", "unknown dtype"),
        ({"dtype": "float32", "shape": [1], "data": "***"}, None, "base64"),
        ({"dtype": "float32", "shape": [1], "data": [1, 2]}, None, "base64 string"),
        ({"dtype": "float32", "shape": [2], "data": base64.b64encode(b"\0" * 4).decode()}, None, "needs 8"),
        (
            {"dtype": "int32", "shape": [1], "data": base64.b64encode(b"\0" * 4).decode()},
            "int64",
            "must be int64",
        ),
    ],
)
def test_bad_json_is_invalid_argument(value, dtype, needle):
    with pytest.raises(ServingError) as e:
        from_json(value, dtype)
    assert e.value.code == "invalid_argument" and needle in e.value.message


# ---- HTTP client over a mock transport ------------------------------------------------------------


def mock_server(request: httpx.Request) -> httpx.Response:
    path = request.url.path
    if path == "/healthz":
        return httpx.Response(200, text="ok")
    if path == "/v1/forward":
        if request.headers["content-type"] == "application/msgpack":
            assert request.headers["accept"] == "application/msgpack"
            body = msgpack.unpackb(request.content, raw=False)
            ids = tensor_from_map(body["input_ids"])
            assert ("attention_mask" in body) == (ids.shape[0] == 2)
            logits = ids.float().unsqueeze(-1).repeat(1, 1, 3)
            out = msgpack.packb({"logits": tensor_to_map(logits)})
            return httpx.Response(200, content=out, headers={"content-type": "application/msgpack"})
        ids = from_json(json.loads(request.content)["input_ids"], "int64")
        return httpx.Response(200, json={"logits": to_json_lists(ids.float().unsqueeze(-1).repeat(1, 1, 3))})
    if path == "/v1/layers/9/moe":
        return httpx.Response(
            400, json=ServingError("invalid_argument", "layer 9 is not a MoE layer").to_json()
        )
    if path.startswith("/v1/layers/"):
        if request.headers["content-type"] == "application/msgpack":
            h = tensor_from_map(msgpack.unpackb(request.content, raw=False)["hidden_states"])
            out = msgpack.packb({"hidden_states": tensor_to_map(h * 2)})
            return httpx.Response(200, content=out, headers={"content-type": "application/msgpack"})
        h = from_json(json.loads(request.content)["hidden_states"], "float32")
        return httpx.Response(200, json={"hidden_states": to_json_lists(h * 2)})
    if path == "/v1/completions":
        body = json.loads(request.content)
        if body["max_tokens"] > 100:
            return httpx.Response(
                413, json=ServingError("resource_exhausted", "max_tokens over 100").to_json()
            )
        if not body.get("stream"):
            return httpx.Response(200, json={"object": "text_completion", "choices": [{"text": "abc"}]})
        events = [
            {"choices": [{"text": "a", "token_ids": [5], "finish_reason": None}]},
            {"choices": [{"text": "b", "token_ids": [6], "finish_reason": None}]},
            {"choices": [{"text": "", "token_ids": [7], "finish_reason": "length"}]},
            {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}},
        ]
        text = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + ": keep-alive\n\ndata: [DONE]\n\n"
        return httpx.Response(200, text=text, headers={"content-type": "text/event-stream"})
    if path == "/v1/cluster":
        return httpx.Response(200, json={"num_workers": 2})
    if path == "/v1/models":
        return httpx.Response(500, text="Internal Server Error")
    return httpx.Response(404, json={"detail": "Not Found"})


def mocked(client):
    transport = httpx.MockTransport(mock_server)
    cls = httpx.AsyncClient if isinstance(client, AsyncHTTPClient) else httpx.Client
    client._client = cls(base_url=client.base_url, transport=transport)
    return client


def test_http_client_sync():
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    with mocked(HTTPClient("http://test")) as c:
        assert c.health()
        for enc in ("msgpack", "json"):
            logits = c.forward(ids, attention_mask=torch.ones_like(ids), encoding=enc)
            assert logits.dtype == torch.float32 and torch.equal(
                logits, ids.float().unsqueeze(-1).repeat(1, 1, 3)
            )
            h = torch.randn(4, 8).bfloat16()
            out = c.moe_layer(1, h, encoding=enc)
            assert out.dtype == torch.bfloat16 and torch.equal(out, h * 2)
        assert c.forward([[1, 2]], encoding="json").shape == (1, 2, 3)
        with pytest.raises(ServingError) as e:
            c.moe_layer(9, torch.zeros(1, 8))
        assert (e.value.code, e.value.status, e.value.message) == (
            "invalid_argument",
            400,
            "layer 9 is not a MoE layer",
        )
        assert c.complete("hi")["choices"][0]["text"] == "abc"
        chunks = list(c.stream("hi", max_tokens=3))
        assert [ch.token_ids for ch in chunks] == [[5], [6], [7]]
        assert chunks[-1] == GenerateChunk([7], "", "length", 4, 3)
        with pytest.raises(ServingError) as e:
            list(c.stream("hi", max_tokens=1000))
        assert (e.value.code, e.value.status) == ("resource_exhausted", 413)
        assert c.cluster_state() == {"num_workers": 2}
        with pytest.raises(ServingError) as e:
            c.models()
        assert (e.value.code, e.value.status) == (
            "internal",
            500,
        ) and "Internal Server Error" in e.value.message
    unreachable = HTTPClient("http://127.0.0.1:9", timeout=2)
    assert not unreachable.health()
    with pytest.raises(ServingError) as e:
        unreachable.cluster_state()
    assert e.value.code == "unavailable"


def test_http_client_async():
    import asyncio

    async def main():
        async with mocked(AsyncHTTPClient("http://test")) as c:
            assert await c.health()
            ids = torch.tensor([[1, 2, 3]])
            for enc in ("msgpack", "json"):
                assert (await c.forward(ids, encoding=enc)).shape == (1, 3, 3)
            chunks = [ch async for ch in c.stream("hi", max_tokens=3)]
            assert [ch.token_ids for ch in chunks] == [[5], [6], [7]] and chunks[-1].completion_tokens == 3
            with pytest.raises(ServingError) as e:
                await c.moe_layer(9, torch.zeros(1, 8))
            assert e.value.code == "invalid_argument"

    asyncio.run(main())
