"""The router: dense model, gate, plan and combine, and the Engine users hold."""

from router_service.engine import Engine, EngineConfig

__all__ = ["Engine", "EngineConfig"]
