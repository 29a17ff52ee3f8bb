"""What the clients send to a server that needs a key or speaks TLS: the API key (given, or from
the environment as the openai client reads it) and gRPC TLS channel credentials.

    HTTPClient("https://serving.example:8000", api_key="...", verify="ca.pem")
    GrpcClient("serving.example:50051", api_key="...", credentials=tls_credentials("ca.pem"))
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import grpc

# Read in this order when no key is given: the server's own variable first (its first key, when it
# holds a comma-separated list), then the openai client's.
API_KEY_ENVS = ("MOE_SERVE_API_KEY", "OPENAI_API_KEY")

__all__ = ["API_KEY_ENVS", "api_key_from_env", "auth_header", "tls_credentials"]


def api_key_from_env(names=API_KEY_ENVS, environ: Mapping[str, str] | None = None) -> str | None:
    """The first key set in the environment variables `names`, else None."""
    env = os.environ if environ is None else environ
    for name in names:
        keys = [k.strip() for k in env.get(name, "").split(",") if k.strip()]
        if keys:
            return keys[0]
    return None


def auth_header(api_key: str | None) -> dict[str, str]:
    """The Authorization header for `api_key` (none for None)."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def tls_credentials(
    ca: str | Path | None = None, cert: str | Path | None = None, key: str | Path | None = None
) -> grpc.ChannelCredentials:
    """gRPC TLS channel credentials: `ca` the roots to trust (None: the system's), `cert` and `key`
    a client certificate for a server that wants mutual TLS (both or neither)."""
    if (cert is None) != (key is None):
        raise ValueError("a client certificate needs both cert and key")

    def read(path):
        return None if path is None else Path(path).read_bytes()

    return grpc.ssl_channel_credentials(
        root_certificates=read(ca), private_key=read(key), certificate_chain=read(cert)
    )
