"""The gRPC front end as a Ray actor: MoEService over the HTTP deployment's handle.

The gRPC server calls the `MoEIngress` deployment's backend methods through a Serve deployment
handle, so HTTP and gRPC requests share one set of batches, limits and metrics. It runs in its own
(async) actor, next to the Serve proxy, rather than in the driver: the serving processes then live
in the cluster, whatever process started them.
"""

from __future__ import annotations

from ray.exceptions import RayTaskError

from moe_serving.types import GenerateParams


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
        return await self._call("scale", num_workers)


class GrpcIngress:
    """Ray actor hosting the grpc.aio server (started by `start`, stopped by `stop`)."""

    def __init__(self, app_name: str, deployment_name: str):
        self.app_name, self.deployment_name = app_name, deployment_name
        self.server = None

    async def start(self, host: str, port: int) -> int:
        from ray import serve

        from router_service.serving.grpc_server import start_grpc_server

        handle = serve.get_deployment_handle(self.deployment_name, app_name=self.app_name)
        self.server = await start_grpc_server(HandleBackend(handle), host, port)
        return self.server.port

    async def stop(self, grace: float = 2.0) -> None:
        if self.server is not None:
            await self.server.stop(grace)
            self.server = None
