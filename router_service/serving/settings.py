"""ServingSettings: the limits, keys, CORS and gRPC TLS of the HTTP and gRPC front ends, in one
dataclass (the HTTP port's own TLS is Serve's proxy's: `launch.ServerOptions`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from moe_serving.errors import context_exceeded, too_large
from router_service.serving.auth import AccessKeys


@dataclass(frozen=True)
class GrpcTls:
    """TLS for the gRPC server: PEM files, read by the gRPC actor when it starts (so they must be
    readable where it runs: the head, in compose and KubeRay; the key never travels through Ray).
    client_ca: mutual TLS, every client must present a certificate signed by it."""

    cert: str
    key: str
    client_ca: str | None = None

    def __post_init__(self):
        if not self.cert or not self.key:
            raise ValueError("gRPC TLS needs both a certificate and its key")

    def read(self) -> tuple[bytes, bytes, bytes | None]:
        """(certificate chain, private key, client CA or None), as bytes. Not checked when the
        settings are made: the app may be built on a node that does not hold the files."""

        def read(name: str, path: str) -> bytes:
            try:
                return Path(path).read_bytes()
            except OSError as e:
                raise ValueError(f"cannot read the gRPC TLS {name} file {path}: {e.strerror or e}") from None

        ca = read("client CA", self.client_ca) if self.client_ca else None
        return read("certificate", self.cert), read("key", self.key), ca


@dataclass(frozen=True)
class ServingSettings:
    """What the ingress enforces and how it batches. Generation batching limits live in the
    engine's `BatchLimits` (the router's continuous batch); these are the front end's own.

    max_model_len: the model's context, prompt + completion tokens of one sequence at most: a
      request asking for more (prompt + max_tokens) is refused with HTTP 400
      `context_length_exceeded` / gRPC INVALID_ARGUMENT, as OpenAI and vLLM refuse it, and a chat
      without max_tokens runs up to it. None: the checkpoint's max_position_embeddings
      (`launch.fit_settings` fills it in; a larger value is refused there, as vLLM does).
    max_request_tokens: the most tokens one forward / MoE-layer request may carry (B*S or T), and
      the most prompt + max_tokens one completion may ask for (a size cap, apart from the context:
      larger requests within the context are refused with HTTP 413 / gRPC RESOURCE_EXHAUSTED).
    max_batch_tokens: forward / MoE-layer requests that arrive together are merged into one router
      call up to this many tokens.
    max_batch_requests / batch_wait_s: at most this many requests merged, waiting at most this long
      for company (serve.batch's max_batch_size / batch_wait_timeout_s).
    router_restart_timeout_s: how long requests wait for a Router actor that died to be back (it
      restarts and reattaches to its workers) before they fail as unavailable.
    access: the API and admin keys both front ends check (`auth`); none: everything is open.
    allowed_origins: CORS, off when empty: the browser origins allowed to call the HTTP API ("*":
      any), with allowed_methods and allowed_headers (default: all, as vLLM's).
    grpc_tls: TLS (and mutual TLS) for the gRPC server; None: plaintext.
    """

    model_name: str = "moe-serving"
    max_model_len: int | None = None
    max_request_tokens: int = 8192
    max_batch_tokens: int = 8192
    max_batch_requests: int = 32
    batch_wait_s: float = 0.002
    router_restart_timeout_s: float = 120.0
    access: AccessKeys = AccessKeys()
    allowed_origins: tuple[str, ...] = ()
    allowed_methods: tuple[str, ...] = ("*",)
    allowed_headers: tuple[str, ...] = ("*",)
    grpc_tls: GrpcTls | None = None

    def __post_init__(self):
        for name in ("allowed_origins", "allowed_methods", "allowed_headers"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise ValueError(f"{name} must be a sequence of strings, got the string {value!r}")
            object.__setattr__(self, name, tuple(value))
        for name in ("max_request_tokens", "max_batch_tokens", "max_batch_requests"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_model_len is not None and (
            not isinstance(self.max_model_len, int)
            or isinstance(self.max_model_len, bool)
            or self.max_model_len < 1
        ):
            raise ValueError(f"max_model_len must be an integer >= 1, got {self.max_model_len!r}")
        if self.batch_wait_s < 0:
            raise ValueError(f"batch_wait_s must be >= 0, got {self.batch_wait_s}")
        if not self.router_restart_timeout_s > 0:
            raise ValueError(f"router_restart_timeout_s must be > 0, got {self.router_restart_timeout_s}")

    def completion_tokens(self, prompt_tokens: int, max_tokens: int | None) -> int:
        """The max_tokens a completion of a `prompt_tokens`-token prompt runs with: `max_tokens`
        itself, or, when None (chat's default, as OpenAI's and vLLM's), all the context leaves,
        within the size cap.

        The context is checked first: past it, a 400 `context_length_exceeded` with OpenAI's and
        vLLM's message (what SDKs turn into their context-window errors); then the size cap, 413.
        """
        context, cap = self.max_model_len, self.max_request_tokens
        # None needs room for one token; 0 (echo, prompt logprobs only) for none.
        if context is not None and prompt_tokens + (1 if max_tokens is None else max_tokens) > context:
            raise context_exceeded(context, prompt_tokens, max_tokens)
        if max_tokens is None:
            max_tokens = min(context or cap, cap) - prompt_tokens
            if max_tokens < 1:
                raise too_large(
                    f"the prompt has {prompt_tokens} tokens; this server takes at most {cap} tokens "
                    "(prompt + max_tokens) per request"
                )
        if prompt_tokens + max_tokens > cap:
            raise too_large(
                f"prompt + max_tokens has {prompt_tokens + max_tokens} tokens; this server takes at "
                f"most {cap} per request"
            )
        return max_tokens
