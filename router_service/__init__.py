"""The router: dense model, gate, plan and combine, and the Engine users hold.

`Engine` and `EngineConfig` are imported on first use: expert-worker processes import
`router_service.runtime.ray_transport` and must not pay for `transformers` (the router's dense
model), which would add seconds to every worker start and so to every scale-up.
"""

__all__ = ["Engine", "EngineConfig"]


def __getattr__(name: str):
    if name in __all__:
        from router_service import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'router_service' has no attribute {name!r}")
