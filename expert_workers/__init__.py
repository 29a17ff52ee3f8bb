"""Expert workers: each hosts a slice of the routed experts and the shared experts."""

from expert_workers.worker import ExpertBatch, ExpertWorker

__all__ = ["ExpertBatch", "ExpertWorker"]
