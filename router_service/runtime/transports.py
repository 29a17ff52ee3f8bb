"""The one place a transport is chosen, by `EngineConfig.transport`: every transport module is
imported here, and nothing below the router imports this module."""

from __future__ import annotations

from router_service.config import EngineConfig
from router_service.runtime.compiled_transport import CompiledTransport
from router_service.runtime.ray_transport import RayTransport
from router_service.runtime.socket_transport import SocketTransport
from router_service.runtime.transport import LocalTransport, Transport, WorkerPool, WorkerSetup


def make_transport(config: EngineConfig, setup: WorkerSetup, owns_workers: bool = True) -> Transport:
    """The one place a transport is chosen. owns_workers: False for a router whose workers a
    controller elsewhere manages (its transport is then only a data plane)."""
    if config.transport == "local":
        return LocalTransport(setup)
    cls = {"ray": RayTransport, "compiled": CompiledTransport, "socket": SocketTransport}[config.transport]
    return cls(
        setup,
        config.worker_resources,
        config.progress,
        cluster=config.cluster_name,
        worker_timeout_s=config.elastic.worker_timeout_s,
        expected_workers=config.num_workers,
        owns_workers=owns_workers,
    )


def make_pool(config: EngineConfig, setup: WorkerSetup) -> WorkerPool:
    """The controller's worker pool for a Ray transport: the workers as named, detached actors
    (every Ray transport's workers are the same actors; only the routers' data planes differ)."""
    return RayTransport(
        setup,
        config.worker_resources,
        config.progress,
        cluster=config.cluster_name,
        worker_timeout_s=config.elastic.worker_timeout_s,
        expected_workers=config.num_workers,
    )
