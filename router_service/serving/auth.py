"""Who may call what: the API keys and admin keys of the HTTP and gRPC front ends, in one place.

`AccessKeys` holds the keys (from `--api-key` / `--admin-key`, the environment variables
`MOE_SERVE_API_KEY` / `MOE_SERVE_ADMIN_KEY` (comma-separated) and key files, one key a line) and
answers one question, `check(authorization, admin)`: may a request with this `Authorization`
header (HTTP) or `authorization` metadata (gRPC) call a data route (admin False) or an admin route
(admin True)? Both front ends ask it: HTTP through `AccessMiddleware` (ASGI, before routing), gRPC
through `AccessInterceptor` (a server interceptor, before the servicer).

The rules:
- no key configured: everything is open (the quick start on 127.0.0.1 needs none);
- API keys: every route but the open ones needs `Bearer <an API key or an admin key>`;
- admin keys: the admin routes (`/v1/cluster` and below it: cluster state, scale, rebalance,
  routers; gRPC GetClusterState, Scale, Rebalance, ScaleRouters) need an admin key; an API key
  there is refused with 403 / PERMISSION_DENIED. With API keys and no admin key, the admin routes
  take an API key; with admin keys and no API key, the data routes are open;
- always open: `/healthz`, `/health`, `/docs`, `/openapi.json`, `/metrics` (unless
  `protect_metrics`: then it needs a data key), gRPC health and reflection.

A refusal is 401 with OpenAI's error body (`code: invalid_api_key`) and `WWW-Authenticate: Bearer`,
gRPC UNAUTHENTICATED. A token is compared with every configured key by `hmac.compare_digest`, all of
them whatever matched, so the time taken does not tell which key (or how much of one) matched. Keys
never appear in a repr, a log line or an answer.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from starlette.responses import JSONResponse

from moe_serving.errors import ServingError

API_KEY_ENV = "MOE_SERVE_API_KEY"
ADMIN_KEY_ENV = "MOE_SERVE_ADMIN_KEY"

# HTTP paths that never need a key: probes, and the schema a user reads before holding a key.
OPEN_PATHS = frozenset({"/healthz", "/health", "/docs", "/docs/oauth2-redirect", "/openapi.json"})
METRICS_PATH = "/metrics"
ADMIN_PATH = "/v1/cluster"  # and every path below it
ADMIN_METHODS = frozenset({"GetClusterState", "Scale", "Rebalance", "ScaleRouters"})  # of MoEService

ADMIN, API = "admin", "api"  # the roles a key gives

__all__ = [
    "ADMIN_KEY_ENV",
    "API_KEY_ENV",
    "AccessInterceptor",
    "AccessKeys",
    "AccessMiddleware",
    "open_warning",
    "read_key_file",
]


def read_key_file(path: str | Path) -> list[str]:
    """The keys in a file: one a line; blank lines and lines starting with # are skipped."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ValueError(f"cannot read the key file {path}: {e.strerror or e}") from None
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def _env_keys(environ: Mapping[str, str], name: str) -> list[str]:
    return [k.strip() for k in environ.get(name, "").split(",") if k.strip()]


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` value (scheme case-insensitive), else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def _matches(token: bytes, keys: tuple[str, ...]) -> bool:
    # A list, not a generator: every key is compared, whichever matches.
    return any([hmac.compare_digest(token, key.encode()) for key in keys])


def unauthenticated(message: str) -> ServingError:
    return ServingError("unauthenticated", message, reason="invalid_api_key")


@dataclass(frozen=True)
class AccessKeys:
    """The keys a server accepts (see the module docstring for the rules).

    api_keys: keys for the data routes (completions, chat, models, tensors, tokenizer); none: those
      routes are open.
    admin_keys: keys for the admin routes (and the data routes); none: the admin routes take the
      API keys (open when there are none either).
    protect_metrics: /metrics needs a data key too (it is open by default, for scrapers).
    """

    api_keys: tuple[str, ...] = field(default=(), repr=False)
    admin_keys: tuple[str, ...] = field(default=(), repr=False)
    protect_metrics: bool = False

    def __post_init__(self):
        for name in ("api_keys", "admin_keys"):
            keys = getattr(self, name)
            if isinstance(keys, str):
                raise ValueError(f"{name} must be a sequence of keys, not one string")
            keys = tuple(dict.fromkeys(keys))  # order kept, duplicates dropped
            for key in keys:
                # The values are never shown, only what is wrong with them.
                if not isinstance(key, str) or not key or any(c.isspace() or c == "," for c in key):
                    raise ValueError(f"{name}: a key must be a non-empty string without spaces or commas")
            object.__setattr__(self, name, keys)

    @classmethod
    def load(
        cls,
        api_keys: Iterable[str] = (),
        api_key_files: Iterable[str | Path] = (),
        admin_keys: Iterable[str] = (),
        admin_key_files: Iterable[str | Path] = (),
        protect_metrics: bool = False,
        environ: Mapping[str, str] | None = None,
    ) -> AccessKeys:
        """The keys given on the command line, in the environment (MOE_SERVE_API_KEY,
        MOE_SERVE_ADMIN_KEY: comma-separated) and in key files, all of them together."""
        env = os.environ if environ is None else environ
        api = [*api_keys, *_env_keys(env, API_KEY_ENV), *(k for f in api_key_files for k in read_key_file(f))]
        admin = [
            *admin_keys,
            *_env_keys(env, ADMIN_KEY_ENV),
            *(k for f in admin_key_files for k in read_key_file(f)),
        ]
        return cls(api_keys=tuple(api), admin_keys=tuple(admin), protect_metrics=protect_metrics)

    @property
    def enabled(self) -> bool:
        """Whether any key is configured (else everything is open)."""
        return bool(self.api_keys or self.admin_keys)

    def __repr__(self) -> str:
        return (
            f"AccessKeys({len(self.api_keys)} api keys, {len(self.admin_keys)} admin keys, "
            f"protect_metrics={self.protect_metrics})"
        )

    def role(self, authorization: str | None) -> str | None:
        """ADMIN, API, or None (no token, or one that is no key of ours)."""
        token = bearer_token(authorization)
        if token is None:
            return None
        given = token.encode()
        is_admin, is_api = _matches(given, self.admin_keys), _matches(given, self.api_keys)
        return ADMIN if is_admin else API if is_api else None

    def check(self, authorization: str | None, admin: bool) -> str | None:
        """The caller's role when it may call a data route (admin False) or an admin route (admin
        True); raises ServingError unauthenticated (401) or permission_denied (403) when not."""
        needs_admin = admin and bool(self.admin_keys)
        if not needs_admin and not self.api_keys:
            return None  # open
        role = self.role(authorization)
        if role is None:
            if bearer_token(authorization) is None:
                raise unauthenticated(
                    "this server needs an API key: send the header 'Authorization: Bearer <key>'"
                    + (" (an admin key for this route)" if needs_admin else "")
                )
            raise unauthenticated(
                "invalid API key" + (" (this route needs an admin key)" if needs_admin else "")
            )
        if needs_admin and role != ADMIN:
            raise ServingError(
                "permission_denied",
                "this route changes or reveals the cluster: it needs an admin key, not an API key",
                reason="admin_key_required",
            )
        return role

    def http_scope(self, path: str) -> bool | None:
        """None: `path` is open; else whether it is an admin route."""
        if path in OPEN_PATHS or (path == METRICS_PATH and not self.protect_metrics):
            return None
        return path == ADMIN_PATH or path.startswith(ADMIN_PATH + "/")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may be reachable from anywhere


def open_warning(hosts: Iterable[str], access: AccessKeys) -> str | None:
    """The warning a server bound to a non-loopback address without keys logs at start, else None."""
    exposed = sorted({h for h in hosts if h and not _is_loopback(h)})
    if access.enabled or not exposed:
        return None
    return (
        f"NO API KEY: this server listens on {', '.join(exposed)} without --api-key or --admin-key: "
        "anyone who reaches its ports can run the model AND reconfigure the cluster (scale, "
        "rebalance, routers). Set keys (--api-key-file / MOE_SERVE_API_KEY, --admin-key-file / "
        "MOE_SERVE_ADMIN_KEY) or bind to 127.0.0.1 (docs/deploy.md, 'Secure deployment')."
    )


# ---- HTTP -----------------------------------------------------------------------------------------


def refusal_response(error: ServingError) -> JSONResponse:
    """The HTTP answer of a refused request: OpenAI's error body, and `WWW-Authenticate` on a 401."""
    headers = {"WWW-Authenticate": "Bearer"} if error.http_status == 401 else None
    return JSONResponse(error.to_json(), status_code=error.http_status, headers=headers)


class AccessMiddleware:
    """ASGI middleware: each HTTP request's `Authorization` header is checked before routing (so an
    unknown path under a protected prefix answers 401, not 404: nothing is revealed without a key).

    access: the AccessKeys, or a function returning them (read once, at the first request: a Serve
    replica's settings exist only once its constructor has run)."""

    def __init__(self, app, access: AccessKeys | Callable[[], AccessKeys]):
        self.app = app
        self._access = access

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if callable(self._access):
            self._access = self._access()
        admin = self._access.http_scope(scope["path"])
        if admin is not None:
            header = None
            for name, value in scope["headers"]:
                if name == b"authorization":
                    header = value.decode("latin-1")
                    break
            try:
                self._access.check(header, admin)
            except ServingError as e:
                return await refusal_response(e)(scope, receive, send)
        return await self.app(scope, receive, send)


# ---- gRPC -----------------------------------------------------------------------------------------


def _refusal_handler(handler: grpc.RpcMethodHandler, error: ServingError) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that aborts with `error`'s status."""
    code = grpc.StatusCode[error.code.upper()]

    async def abort(request, context):
        await context.abort(code, error.message)

    make = (
        grpc.unary_stream_rpc_method_handler if handler.unary_stream else grpc.unary_unary_rpc_method_handler
    )
    return make(
        abort,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class AccessInterceptor(grpc.aio.ServerInterceptor):
    """A grpc.aio server interceptor: calls of `service` need `authorization: Bearer <key>` metadata
    (an admin key for ADMIN_METHODS); other services (health, reflection) stay open."""

    def __init__(self, access: AccessKeys, service: str):
        self.access, self.service = access, service

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        service, _, method = handler_call_details.method.lstrip("/").rpartition("/")
        if handler is None or service != self.service:
            return handler
        header = None
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                header = value if isinstance(value, str) else value.decode("latin-1")
                break
        try:
            self.access.check(header, method in ADMIN_METHODS)
        except ServingError as e:
            return _refusal_handler(handler, e)
        return handler
