"""The gRPC front end as a Ray actor: MoEService over the HTTP deployment's handle.

The gRPC server calls the `MoEIngress` deployment's backend methods through a Serve deployment
handle, so HTTP and gRPC requests share one set of batches, limits and metrics. It runs in its own
(async) actor, next to the Serve proxy, rather than in the driver: the serving processes then live
in the cluster, whatever process started them.
"""

from __future__ import annotations

import asyncio

from ray import serve
from ray.exceptions import RayTaskError

from moe_serving.types import GenerateParams
from router_service.serving.auth import AccessKeys
from router_service.serving.grpc_server import start_grpc_server
from router_service.serving.settings import GrpcTls


def _unwrap(e: BaseException) -> BaseException:
    if isinstance(e, RayTaskError) and e.cause is not None:
        return e.cause
    return e


class HandleBackend:
    """The gRPC servicer's backend (see grpc_server.MoEServicer) over a DeploymentHandle."""

    def __init__(self, handle):
        self.handle = handle

    async def _call(self, method: str, *args):
        try:
            return await getattr(self.handle, method).remote(*args)
        except Exception as e:
            raise _unwrap(e) from None

    async def forward(self, input_ids, attention_mask):
        return await self._call("forward", input_ids, attention_mask, "grpc")

    async def moe_layer(self, layer: int, hidden_states):
        return await self._call("moe_layer", layer, hidden_states, "grpc")

    async def generate(self, params: GenerateParams):
        stream = self.handle.options(stream=True).generate.remote(params, "grpc")
        try:
            async for chunk in stream:
                yield chunk
        except Exception as e:
            raise _unwrap(e) from None
        finally:
            stream.cancel()  # a no-op when finished; frees the batch slot when the client left

    async def cluster_state(self) -> dict:
        return await self._call("cluster_state")

    async def scale(self, num_workers: int) -> dict:
        return await self._call("scale", num_workers, "grpc")

    async def rebalance(self) -> dict:
        return await self._call("rebalance", "grpc")

    async def scale_routers(self, num_routers: int) -> dict:
        return await self._call("scale_routers", num_routers, "grpc")

    async def health(self) -> dict:
        return await self._call("health")


HEALTH_POLL_S = 1.0  # how often the gRPC health status follows the router's


class GrpcIngress:
    """Ray actor hosting the grpc.aio server (started by `start`, stopped by `stop`).

    Its health service follows the router's: SERVING while the router can serve, NOT_SERVING while
    it cannot (no expert worker, the router down), checked every HEALTH_POLL_S.
    """

    def __init__(self, app_name: str, deployment_name: str):
        self.app_name, self.deployment_name = app_name, deployment_name
        self.server = None
        self._poll = None
        self.serving = False

    async def start(
        self, host: str, port: int, access: AccessKeys | None = None, tls: GrpcTls | None = None
    ) -> int:
        handle = serve.get_deployment_handle(self.deployment_name, app_name=self.app_name)
        backend = HandleBackend(handle)
        self.server = await start_grpc_server(backend, host, port, access=access, tls=tls)
        # NOT_SERVING until the first check: the deployment may still be constructing (it starts us).
        await self.server.set_serving(False)
        self._poll = asyncio.get_running_loop().create_task(self._poll_health(backend))
        return self.server.port

    async def _follow(self, backend: HandleBackend) -> None:
        try:
            serving = bool((await asyncio.wait_for(backend.health(), timeout=10)).get("serving"))
        except Exception:  # the deployment or the router does not answer
            serving = False
        if self.server is not None:
            await self.server.set_serving(serving)
            self.serving = serving

    async def is_serving(self) -> bool:
        """What the health service reports now (for a caller that cannot reach it over TLS)."""
        return self.serving

    async def _poll_health(self, backend: HandleBackend) -> None:
        while self.server is not None:
            await self._follow(backend)
            await asyncio.sleep(HEALTH_POLL_S)

    async def stop(self, grace: float = 2.0) -> None:
        if self._poll is not None:
            self._poll.cancel()
        if self.server is not None:
            server, self.server = self.server, None
            await server.stop(grace)
