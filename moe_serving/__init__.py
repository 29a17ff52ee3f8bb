"""Client-side package of moe-serving: wire formats, protobuf code, errors and Python clients.

Light on purpose: it needs torch, numpy, msgpack, httpx and grpcio, not Ray or transformers.
"""

from moe_serving.errors import ServingError
from moe_serving.types import GenerateChunk, GenerateParams

__all__ = ["GenerateChunk", "GenerateParams", "ServingError"]
