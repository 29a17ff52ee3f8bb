"""The HTTP ingress: a Ray Serve deployment with a FastAPI app in front of the Router actor.

Routes: OpenAI-compatible `POST /v1/completions` (text or token-id prompts) and
`POST /v1/chat/completions` (messages rendered with the model's chat template), both streamed (SSE)
or not, with `n`, `stop`, `logprobs` and penalties (request parsing and answer formats in
`openai_api`), `echo` (the prompt's logprobs, `max_tokens: 0`), `GET /v1/models` and `GET /v1/models/{id}`;
vLLM's `POST /tokenize`, `POST /detokenize`, `GET /tokenizer_info`; tensor routes `POST /v1/forward` and `POST /v1/layers/{layer}/moe` (JSON nested
lists, or msgpack `{dtype, shape, data}` maps when Content-Type or Accept is application/msgpack);
`GET /v1/cluster`, `POST /v1/cluster/scale`, `POST /v1/cluster/rebalance`,
`POST /v1/cluster/routers`, `GET /healthz` (and `GET /health`, the name vLLM, SGLang and TGI serve
and probes copied from them use), `GET /metrics`. Every error is a JSON `{"error": {...}}` body with a 4xx/5xx status, never a
traceback; an unknown path is a JSON 404 naming it, a known path with another method a JSON 405
with `Allow`.

In front of the routes (`_Edge`): CORS when `allowed_origins` is set (Starlette's CORSMiddleware,
outermost, so that preflights need no key and refusals carry CORS headers), then the API / admin
key check (`auth.AccessMiddleware`) when keys are set.

The deployment's `forward` / `moe_layer` / `generate` / `cluster_state` / `scale` / `rebalance` /
`health` methods are also the backend of the gRPC server, which calls them through a deployment handle: one replica, one set of
batches and metrics for both protocols. Concurrent forward and MoE-layer requests are merged by
`serve.batch` into one router call; generation requests are batched continuously by the router.
"""

import asyncio
import contextlib
import dataclasses
import json
import logging
import time

import anyio
import msgpack
import ray
import torch
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.exceptions import RayServeException
from starlette.exceptions import HTTPException as StarletteHTTPException

from moe_models.loading import spec_from_pretrained
from moe_serving import tensors
from moe_serving.errors import ServingError, invalid
from moe_serving.types import GenerateParams
from router_service.config import EngineConfig
from router_service.default_model import ensure_default_model
from router_service.runtime.cluster import attach_cluster, router_handles, stop_cluster
from router_service.runtime.ray_transport import NAMESPACE
from router_service.serving import openai_api, schemas, tokenizer_api
from router_service.serving.auth import AccessMiddleware
from router_service.serving.core import (
    IngressCore,
    check_forward_request,
    check_moe_request,
    check_size,
    merge_streams,
)
from router_service.serving.grpc_ingress import GrpcIngress
from router_service.serving.metrics import CONTENT_TYPE, Metrics
from router_service.serving.prompt_logprobs import echo_text, echo_token_logprobs, prompt_logprobs
from router_service.serving.settings import ServingSettings

log = logging.getLogger(__name__)
MSGPACK = "application/msgpack"

app = FastAPI(title="moe-serving", docs_url="/docs", redoc_url=None)


def _openapi() -> dict:
    """The OpenAPI document (/openapi.json, /docs): FastAPI's, with every request body and the
    optional bearer key (`schemas.document`)."""
    if app.openapi_schema is None:
        app.openapi_schema = schemas.document(
            get_openapi(
                title=app.title, version=app.version, description=OPENAPI_DESCRIPTION, routes=app.routes
            )
        )
    return app.openapi_schema


OPENAPI_DESCRIPTION = (
    "OpenAI-compatible completions and chat (structured output, tools), vLLM's tokenizer routes, "
    "the model's tensors, and the cluster. Errors are OpenAI's {'error': {...}} shape. docs/serving.md"
)
app.openapi = _openapi


def edge_stack(inner, settings: ServingSettings):
    """`inner` behind the key check (when keys are set) and CORS (when origins are)."""
    stack = AccessMiddleware(inner, settings.access) if settings.access.enabled else inner
    if settings.allowed_origins:
        stack = CORSMiddleware(
            stack,
            allow_origins=settings.allowed_origins,
            allow_methods=settings.allowed_methods,
            allow_headers=settings.allowed_headers,
        )
    return stack


class _Edge:
    """ASGI middleware: `edge_stack` of the replica's settings, built at the first request (the app
    is defined, and frozen by `serve.ingress`, before any replica and its settings exist)."""

    def __init__(self, app):
        self.app = app
        self.stack = None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":  # lifespan, websockets: nothing to check
            return await self.app(scope, receive, send)
        if self.stack is None:
            try:
                settings = serve.get_replica_context().servable_object.settings
            except RayServeException:  # the app alone, outside a replica: no settings, no server
                self.stack = self.app
            else:
                self.stack = edge_stack(self.app, settings)
        return await self.stack(scope, receive, send)


app.add_middleware(_Edge)


def start_grpc_actor(config: EngineConfig, settings: ServingSettings, host: str, port: int):
    """The gRPC front end in an actor of its own, owned by the calling replica; (actor, bound port).

    Its server calls this replica's deployment through a handle, so both protocols share one set of
    limits, batches and metrics."""
    context = serve.get_replica_context()
    actor = (
        ray.remote(GrpcIngress)
        .options(
            num_cpus=0,
            resources=config.serving_actor_resources,
            name=f"{config.cluster_name}:grpc",
            namespace=NAMESPACE,
        )
        .remote(context.app_name, context.deployment)
    )
    try:
        return actor, ray.get(actor.start.remote(host, port, settings.access, settings.grpc_tls))
    except Exception:
        ray.kill(actor)
        raise


class ClosingStreamingResponse(StreamingResponse):
    """A streamed answer that closes its body iterator however the response ends. When the client
    leaves, Starlette stops iterating and leaves the generator suspended for the garbage collector,
    so its cleanup (cancelling the generation in the router) would wait for it. Shielded: the
    response's own task may be the one being cancelled. (A disconnect Ray Serve's proxy does not
    pass on is another matter: docs/serving.md, "Not done yet".)"""

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()


def _error_response(err: ServingError) -> JSONResponse:
    return JSONResponse(err.to_json(), status_code=err.http_status)


@app.exception_handler(ServingError)
async def _serving_error(request: Request, exc: ServingError):
    return _error_response(exc)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    """Starlette's own refusals in OpenAI's error shape: an unknown path (404), a method the path
    does not take (405, with the `Allow` header Starlette sets: RFC 9110 requires it)."""
    path, headers = request.url.path, dict(exc.headers or {})
    if exc.status_code == 404:
        err = ServingError("not_found", f"no route {path} on this server (GET /docs lists them)")
    elif exc.status_code == 405:
        allowed = sorted(m.strip() for m in headers.get("Allow", "").split(",") if m.strip())
        headers["Allow"] = ", ".join(allowed)
        err = ServingError(
            "invalid_argument",
            f"{request.method} is not allowed on {path}; allowed: {', '.join(allowed)}",
            reason="method_not_allowed",
        )
    else:
        err = ServingError("invalid_argument", str(exc.detail))
    return JSONResponse(err.to_json(), status_code=exc.status_code, headers=headers or None)


@app.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception):
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return _error_response(ServingError("internal", f"internal error ({type(exc).__name__})"))


def load_tokenizer(model_dir: str):
    """The checkpoint's tokenizer, or None when it ships none (token-id prompts only then)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        log.warning("no tokenizer in %s (%s): prompts must be token ids", model_dir, e)
        return None


async def _read_body(request: Request) -> tuple[dict, bool]:
    """The request body as a dict, and whether the answer should be msgpack."""
    raw = await request.body()
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    wants_msgpack = ctype == MSGPACK or MSGPACK in request.headers.get("accept", "").lower()
    if ctype == MSGPACK:
        try:
            body = msgpack.unpackb(raw, raw=False)
        except Exception as e:  # msgpack raises several unrelated types on bad input
            raise invalid(f"malformed msgpack body: {type(e).__name__}: {e}") from None
    else:
        try:
            body = json.loads(raw) if raw else None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise invalid(f"malformed JSON body: {e}") from None
    if not isinstance(body, dict):
        raise invalid("the body must be a JSON object (or msgpack map)")
    return body, wants_msgpack


def _tensor_in(body: dict, key: str, binary: bool, dtype: str | None, required: bool = True):
    if key not in body or body[key] is None:
        if required:
            raise invalid(f"missing field {key!r}")
        return None
    value = body[key]
    if isinstance(value, dict):
        return tensors.tensor_from_map(value, key) if binary else tensors.from_json(value, name=key)
    return tensors.from_json(value, dtype, name=key)


def _tensor_out(key: str, t: torch.Tensor, binary: bool) -> Response:
    if binary:
        return Response(msgpack.packb({key: tensors.tensor_to_map(t)}), media_type=MSGPACK)
    return JSONResponse({key: tensors.to_json_lists(t)})


def _json(obj) -> JSONResponse:
    """A JSON answer of a dict that may hold ints as keys or tensors (str() of what JSON lacks)."""
    return JSONResponse(json.loads(json.dumps(obj, default=str)))


@serve.deployment(name="MoEIngress", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=4096)
@serve.ingress(app)
class MoEIngress:
    """The application's front door, and the owner of everything behind it.

    Its constructor attaches to the cluster's controller actor (detached and named; started here,
    with its workers and routers, if it is not running, so a replica that crashes and comes back
    finds the cluster as it was) and starts the gRPC server actor (owned by this replica: it lives
    and dies with it). A graceful stop of the replica (`serve shutdown`, `serve.delete`, a redeploy)
    stops the routers, the workers and the controller too: the app leaves nothing behind.
    """

    def __init__(self, config: EngineConfig, settings: ServingSettings, grpc_address: tuple[str, int] | None):
        self.config = config
        self.settings = settings
        self.router = None
        self._grpc = None
        ensure_default_model(config.model_dir)
        self.spec = spec_from_pretrained(config.model_dir)
        self.controller = attach_cluster(config)
        routers = router_handles(self.controller)
        self.router = routers[min(routers, key=int)]
        self.core = IngressCore(
            self.router, self.spec, load_tokenizer(config.model_dir), settings, controller=self.controller
        )
        self.metrics = Metrics()
        self.created = int(time.time())
        for method in (self._forward_batch, self._moe_batch):
            method.set_max_batch_size(settings.max_batch_requests)
            method.set_batch_wait_timeout_s(settings.batch_wait_s)
        if grpc_address is not None:
            self._grpc, self.grpc_port = start_grpc_actor(config, settings, *grpc_address)

    def __del__(self):
        """A graceful stop: the gRPC server, then the router and its workers."""
        if getattr(self, "_grpc", None) is not None:
            with contextlib.suppress(Exception):
                ray.get(self._grpc.stop.remote(), timeout=10)
            with contextlib.suppress(Exception):
                ray.kill(self._grpc)
            self._grpc = None
        if getattr(self, "controller", None) is not None:
            if getattr(self, "core", None) is not None:
                self.core.stop()
            stop_cluster(self.controller, False, self.config.cluster_name)
            self.controller = None

    async def grpc_port_bound(self) -> int | None:
        """The port the gRPC server listens on (None: no gRPC)."""
        return getattr(self, "grpc_port", None)

    # ---- the backend (HTTP routes below and the gRPC server call these) ----------------------------

    @contextlib.asynccontextmanager
    async def _observe(self, endpoint: str, protocol: str):
        t0, status = time.perf_counter(), "ok"
        try:
            yield
        except ServingError as e:
            status = e.code
            raise
        except asyncio.CancelledError:
            status = "cancelled"
            raise
        except Exception:
            status = "internal"
            raise
        finally:
            self.metrics.requests.labels(endpoint, protocol, status).inc()
            self.metrics.latency.labels(endpoint, protocol).observe(time.perf_counter() - t0)

    async def forward(self, input_ids: torch.Tensor, attention_mask=None, protocol: str = "grpc"):
        async with self._observe("forward", protocol):
            ids, mask = check_forward_request(input_ids, attention_mask, self.spec)
            check_size(ids.numel(), self.settings.max_request_tokens, "input_ids")
            self.metrics.forward_tokens.labels("forward").inc(ids.numel())
            return await self._forward_batch((ids, mask))

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def _forward_batch(self, requests: list) -> list:
        self.metrics.ingress_batch.labels("forward").observe(len(requests))
        return await self.core.forward_many(requests)

    async def moe_layer(self, layer: int, hidden_states: torch.Tensor, protocol: str = "grpc"):
        async with self._observe("moe_layer", protocol):
            check_moe_request(layer, hidden_states, self.spec)
            tokens = hidden_states.numel() // self.spec.hidden_size
            check_size(tokens, self.settings.max_request_tokens, "hidden_states")
            self.metrics.forward_tokens.labels("moe_layer").inc(tokens)
            return await self._moe_batch((layer, hidden_states))

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def _moe_batch(self, requests: list) -> list:
        self.metrics.ingress_batch.labels("moe_layer").observe(len(requests))
        return await self.core.moe_many(requests)

    async def generate(self, params: GenerateParams, protocol: str = "grpc"):
        """Async generator of GenerateChunk (validation errors raise before the first chunk)."""
        async with self._observe("generate", protocol):
            t0, first = time.perf_counter(), True
            async with contextlib.aclosing(self.core.generate(params)) as chunks:
                async for chunk in chunks:
                    if first:
                        self.metrics.first_token.observe(time.perf_counter() - t0)
                        self.metrics.prompt_tokens.inc(chunk.prompt_tokens)
                        first = False
                    self.metrics.generated_tokens.inc(len(chunk.token_ids))
                    yield chunk

    async def cluster_state(self) -> dict:
        return await self.core.cluster_state()

    async def scale(self, num_workers: int, protocol: str = "grpc") -> dict:
        async with self._observe("scale", protocol):
            if isinstance(num_workers, bool) or not isinstance(num_workers, int):
                raise invalid(f"num_workers must be an integer, got {num_workers!r}")
            return await self.core.scale(num_workers)

    async def rebalance(self, protocol: str = "grpc") -> dict:
        async with self._observe("rebalance", protocol):
            return await self.core.rebalance()

    async def health(self) -> dict:
        return await self.core.health()

    async def scale_routers(self, num_routers: int, protocol: str = "grpc") -> dict:
        async with self._observe("scale_routers", protocol):
            if isinstance(num_routers, bool) or not isinstance(num_routers, int):
                raise invalid(f"num_routers must be an integer, got {num_routers!r}")
            return await self.core.scale_routers(num_routers)

    # ---- HTTP routes --------------------------------------------------------------------------------

    @app.get("/healthz", responses=schemas.responses(schemas.Health, "200 while serving, 503 while not"))
    @app.get("/health", responses=schemas.responses(schemas.Health, "200 while serving, 503 while not"))
    async def healthz(self):
        """200 while the server can serve (degraded included: fewer workers than its target); 503
        with the reason while it cannot (no expert worker, the router down)."""
        h = await self.core.health()
        body = {"status": "ok" if h.get("serving") else "unavailable", "model": self.settings.model_name, **h}
        return JSONResponse(body, status_code=200 if h.get("serving") else 503)

    @app.get("/metrics", responses=schemas.responses(description="Prometheus text", media_type=CONTENT_TYPE))
    async def metrics_text(self):
        try:
            state = await self.core.cluster_state()
        except ServingError:
            state = None
        return Response(self.metrics.render(state, self.core.router_restarts), media_type=CONTENT_TYPE)

    @app.get("/v1/cluster", responses=schemas.responses(description="the cluster state (admin)"))
    async def http_cluster(self):
        return _json(await self.core.cluster_state())

    @app.post("/v1/cluster/scale", responses=schemas.responses(description="the cluster state once scaled"))
    async def http_scale(self, request: Request):
        body, _ = await _read_body(request)
        body = schemas.validated(schemas.ScaleRequest, body, "/v1/cluster/scale")
        return _json(await self.scale(body["num_workers"], "http"))

    @app.post("/v1/cluster/routers", responses=schemas.responses(description="the routers once scaled"))
    async def http_scale_routers(self, request: Request):
        body, _ = await _read_body(request)
        body = schemas.validated(schemas.ScaleRoutersRequest, body, "/v1/cluster/routers")
        return _json(await self.scale_routers(body["num_routers"], "http"))

    @app.post("/v1/cluster/rebalance", responses=schemas.responses(description="balance before and after"))
    async def http_rebalance(self, request: Request):
        await request.body()
        return _json(await self.rebalance("http"))

    def _model_card(self) -> dict:
        """OpenAI's model object, with vLLM's max_model_len (the context) beside it."""
        return {
            "id": self.settings.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "moe-serving",
            "max_model_len": self.settings.max_model_len,
        }

    @app.get("/v1/models", responses=schemas.responses(schemas.ModelList))
    async def http_models(self):
        return {"object": "list", "data": [self._model_card()]}

    @app.get("/v1/models/{model_id:path}", responses=schemas.responses(schemas.ModelCard))
    async def http_model(self, model_id: str):
        if model_id != self.settings.model_name:
            raise ServingError(
                "not_found",
                f"the model {model_id!r} does not exist; this server serves {self.settings.model_name!r}",
                reason="model_not_found",
            )
        return self._model_card()

    @app.post("/v1/forward", responses=schemas.responses(schemas.ForwardResponse))
    async def http_forward(self, request: Request):
        body, binary = await _read_body(request)
        ids = _tensor_in(body, "input_ids", binary, "int64")
        mask = _tensor_in(body, "attention_mask", binary, "int64", required=False)
        return _tensor_out("logits", await self.forward(ids, mask, "http"), binary)

    @app.post("/v1/layers/{layer}/moe", responses=schemas.responses(schemas.MoEResponse))
    async def http_moe(self, layer: str, request: Request):
        try:
            layer_i = int(layer)
        except ValueError:
            raise invalid(f"layer must be an integer, got {layer!r}") from None
        body, binary = await _read_body(request)
        hidden = _tensor_in(body, "hidden_states", binary, "float32")
        return _tensor_out("hidden_states", await self.moe_layer(layer_i, hidden, "http"), binary)

    @app.post(
        "/v1/completions",
        responses=schemas.responses(
            schemas.CompletionResponse,
            "a completion, or server-sent events of them with stream",
            streams=True,
        ),
    )
    async def http_completions(self, request: Request):
        body, _ = await _read_body(request)
        body = schemas.validated(schemas.CompletionRequest, body, "/v1/completions")
        return await self._openai(openai_api.parse_completion(body, self.settings.model_name))

    @app.post("/tokenize", responses=schemas.responses(schemas.TokenizeResponse))
    async def http_tokenize(self, request: Request):
        body, _ = await _read_body(request)
        body = schemas.validated(schemas.TokenizeRequest, body, "/tokenize")
        return tokenizer_api.tokenize(self.core.tokenizer, body, self.settings.max_model_len)

    @app.post("/detokenize", responses=schemas.responses(schemas.DetokenizeResponse))
    async def http_detokenize(self, request: Request):
        body, _ = await _read_body(request)
        body = schemas.validated(schemas.DetokenizeRequest, body, "/detokenize")
        return tokenizer_api.detokenize(self.core.tokenizer, body, self.spec.vocab_size)

    @app.get("/tokenizer_info", responses=schemas.responses(description="the tokenizer configuration"))
    async def http_tokenizer_info(self):
        return _json(tokenizer_api.tokenizer_info(self.core.tokenizer, self.settings.max_model_len))

    @app.post(
        "/v1/chat/completions",
        responses=schemas.responses(
            schemas.ChatCompletionResponse,
            "a chat completion, or server-sent events of chunks with stream",
            streams=True,
        ),
    )
    async def http_chat_completions(self, request: Request):
        body, _ = await _read_body(request)
        body = schemas.validated(schemas.ChatCompletionRequest, body, "/v1/chat/completions")
        return await self._openai(openai_api.parse_chat(body, self.settings.model_name))

    # ---- OpenAI answers -------------------------------------------------------------------------------

    async def _openai(self, req: openai_api.OpenAIRequest):
        # Tokenised (chat templates applied) and checked once, here, so that bad input answers 4xx
        # before a stream starts.
        prompts = [self.core.prompt_ids(p, generate=req.generate) for p in req.params]
        params = [
            dataclasses.replace(p, prompt=None, messages=None, prompt_token_ids=ids)
            for p, ids in zip(req.params, prompts, strict=True)
        ]
        prompt_tokens = sum(len(ids) for ids in prompts)
        echoes = await self._echoes(req, prompts) if req.echo else None
        if not req.generate:  # max_tokens 0 (echo only): the prompts, nothing generated
            choices = {i: openai_api.Choice(finish_reason="length") for i in range(len(prompts) * req.n)}
            return openai_api.whole_answer(req, self.settings.model_name, choices, prompt_tokens, echoes)
        chunks = merge_streams([self.generate(p, "http") for p in params])
        if req.stream:
            return ClosingStreamingResponse(
                self._sse_stream(req, chunks, prompt_tokens), media_type="text/event-stream"
            )
        choices: dict[int, openai_api.Choice] = {}
        async with contextlib.aclosing(chunks):
            async for k, c in chunks:
                choices.setdefault(k * req.n + c.index, openai_api.Choice()).add(c)
        return openai_api.whole_answer(req, self.settings.model_name, choices, prompt_tokens, echoes)

    async def _echoes(self, req: openai_api.OpenAIRequest, prompts: list[list[int]]) -> list[openai_api.Echo]:
        """Each prompt's echo; with logprobs, from one forward of each prompt (concurrent forwards
        merge into one router call, as /v1/forward's do)."""
        tokenizer = self.core.tokenizer
        texts = [echo_text(tokenizer, p.prompt, ids) for p, ids in zip(req.params, prompts, strict=True)]
        top = req.params[0].logprobs
        if top is None:
            return [openai_api.Echo(t) for t in texts]
        logits = await asyncio.gather(
            *(self.forward(torch.tensor([ids], dtype=torch.long), None, "http") for ids in prompts)
        )
        return [
            openai_api.Echo(text, echo_token_logprobs(tokenizer, ids, prompt_logprobs(lg[0], ids, top)))
            for text, ids, lg in zip(texts, prompts, logits, strict=True)
        ]

    async def _sse_stream(self, req: openai_api.OpenAIRequest, chunks, prompt_tokens: int):
        answer = openai_api.StreamAnswer(req, self.settings.model_name, prompt_tokens)
        try:
            for event in answer.start():
                yield event
            async for k, c in chunks:
                yield answer.chunk(k * req.n + c.index, c)
            for event in answer.end():
                yield event
        except ServingError as e:
            yield openai_api.sse(e.to_json())
            yield "data: [DONE]\n\n"
        finally:
            await chunks.aclose()
