"""Engine: the user-facing handle on a served model (router + expert workers + transport).

`Engine.from_pretrained` validates every argument and the checkpoint's config before reading any
weight, starts the workers through the chosen transport, then builds the router's dense model. All
inputs are checked here, at the edge, with `ValueError`s that say what to change; the layers below
trust their inputs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from moe_models.spec import ModelSpec, load_hf_config, spec_from_hf_config
from router_service.dense_model import build_router_model
from router_service.moe_layer import ExpertDispatcher
from router_service.placement import contiguous_placement
from router_service.transport import TRANSPORTS, WorkerSetup, make_transport

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
        raise ValueError(f"dtype {dtype} is not supported; choose one of {list(DTYPES)}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {list(DTYPES)}")
    return DTYPES[dtype]


def parse_device(device: str | torch.device) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"unknown device {device!r}: {e}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available; use 'cpu' or 'auto'")
    return dev


@dataclass(frozen=True)
class EngineConfig:
    """The resolved settings an Engine runs with."""

    model_dir: str
    num_workers: int
    transport: str
    dtype: torch.dtype
    device: torch.device
    expert_kernel: str | None


class Engine:
    """A served MoE model. Use `Engine.from_pretrained(...)`; also a context manager."""

    def __init__(self, config: EngineConfig, spec: ModelSpec, model, dispatcher: ExpertDispatcher):
        self.config = config
        self.spec = spec
        self.model = model
        self.dispatcher = dispatcher

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        *,
        num_workers: int = 2,
        transport: str = "local",
        dtype: str | torch.dtype = "float32",
        device: str | torch.device = "auto",
        expert_kernel: str | None = "auto",
    ) -> Engine:
        """Load a Hugging Face MoE checkpoint and start its expert workers.

        expert_kernel: the expert compute path, "auto" (by device, dtype and CPU flags; the
        MOE_EXPERT_KERNEL environment variable overrides "auto") or one of
        expert_workers.kernels.KERNELS: "grouped_mm", "loop", "onednn", "upcast".
        """
        t0 = time.perf_counter()
        if transport not in TRANSPORTS:
            raise ValueError(f"unknown transport {transport!r}; choose one of {TRANSPORTS}")
        cfg = EngineConfig(
            model_dir=str(model_dir),
            num_workers=num_workers,
            transport=transport,
            dtype=parse_dtype(dtype),
            device=parse_device(device),
            expert_kernel=expert_kernel,
        )
        hf_config = load_hf_config(cfg.model_dir)  # raises before any weight is read
        spec = spec_from_hf_config(hf_config)
        if not isinstance(num_workers, int) or not 1 <= num_workers <= spec.num_experts:
            raise ValueError(
                f"num_workers must be an int between 1 and the number of experts ({spec.num_experts}), got {num_workers!r}"
            )
        placement = contiguous_placement(spec.moe_layers, spec.num_experts, num_workers)
        setup = WorkerSetup(cfg.model_dir, spec, cfg.dtype, cfg.device, expert_kernel)
        transport_impl = make_transport(transport, setup, placement)
        dispatcher = ExpertDispatcher(spec, placement, transport_impl)
        model = build_router_model(cfg.model_dir, hf_config, spec, cfg.dtype, cfg.device, dispatcher)
        log.info(
            "loaded %s (%d MoE layers x %d experts) on %d %s worker(s) in %.1fs",
            spec.model_type,
            len(spec.moe_layers),
            spec.num_experts,
            num_workers,
            transport,
            time.perf_counter() - t0,
        )
        return cls(cfg, spec, model, dispatcher)

    # ---- input checks ----------------------------------------------------------------------------

    def _check_ids(self, input_ids, name: str = "input_ids") -> torch.Tensor:
        if not isinstance(input_ids, torch.Tensor):
            try:
                input_ids = torch.as_tensor(input_ids)
            except (TypeError, ValueError, RuntimeError) as e:
                raise ValueError(f"{name} must be a [batch, seq] tensor of token ids: {e}") from e
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise ValueError(f"{name} must hold integer token ids, got dtype {input_ids.dtype}")
        if input_ids.dim() != 2:
            raise ValueError(f"{name} must be 2-D [batch, seq], got shape {tuple(input_ids.shape)}")
        if input_ids.numel() == 0:
            raise ValueError(f"{name} is empty (shape {tuple(input_ids.shape)}); send at least one token")
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.spec.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"{name} holds token id {bad}, outside the vocabulary [0, {self.spec.vocab_size})"
            )
        return input_ids.to(self.config.device, torch.long)

    def _check_mask(self, attention_mask, input_ids: torch.Tensor) -> torch.Tensor | None:
        if attention_mask is None:
            return None
        mask = torch.as_tensor(attention_mask)
        if tuple(mask.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"attention_mask shape {tuple(mask.shape)} must equal input_ids shape {tuple(input_ids.shape)}"
            )
        if not ((mask == 0) | (mask == 1)).all():
            raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
        return mask.to(self.config.device, torch.long)

    # ---- the API ---------------------------------------------------------------------------------

    @torch.inference_mode()
    def forward(self, input_ids, attention_mask=None) -> torch.Tensor:
        """Logits [B, S, V] (float32) for token ids [B, S], like transformers' model(...).logits."""
        ids = self._check_ids(input_ids)
        mask = self._check_mask(attention_mask, ids)
        return self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()

    @torch.inference_mode()
    def moe_forward(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """One MoE block (routed + shared experts) on hidden states [T, H] or [B, S, H]."""
        self.spec.check_moe_layer(layer)
        hidden = torch.as_tensor(hidden)
        h = self.spec.hidden_size
        if hidden.dim() not in (2, 3) or hidden.shape[-1] != h:
            raise ValueError(f"hidden must be [T, {h}] or [B, S, {h}], got shape {tuple(hidden.shape)}")
        if not hidden.dtype.is_floating_point:
            raise ValueError(f"hidden must be a floating-point tensor, got {hidden.dtype}")
        if hidden.numel() == 0:
            raise ValueError(f"hidden is empty (shape {tuple(hidden.shape)})")
        x = hidden.to(self.config.device, self.config.dtype)
        return self.model.model.layers[layer].mlp(x).to(hidden.dtype)

    @torch.inference_mode()
    def generate(
        self,
        input_ids,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        attention_mask=None,
    ) -> torch.Tensor:
        """Prompt + generated ids [B, S + n] with transformers' own decoding loop and KV cache.

        temperature 0 is greedy; otherwise sampling with `top_p`, reproducible when `seed` is given.
        """
        ids = self._check_ids(input_ids)
        mask = self._check_mask(attention_mask, ids)
        if mask is None:
            mask = torch.ones_like(ids)
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        if not temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        kwargs = dict(max_new_tokens=max_new_tokens, attention_mask=mask)
        if temperature == 0.0:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=None)
        gen_cfg = self.model.generation_config
        if gen_cfg.pad_token_id is None and gen_cfg.eos_token_id is not None:
            eos = gen_cfg.eos_token_id
            kwargs["pad_token_id"] = eos[0] if isinstance(eos, list) else eos
        with torch.random.fork_rng(devices=[self.config.device] if self.config.device.type == "cuda" else []):
            if seed is not None:
                torch.manual_seed(seed)
            return self.model.generate(ids, **kwargs)

    def cluster_state(self) -> dict:
        """Workers, placement version and the experts and bytes each worker holds."""
        p = self.dispatcher.placement
        return {
            "model_type": self.spec.model_type,
            "transport": self.config.transport,
            "dtype": str(self.config.dtype).removeprefix("torch."),
            "placement_version": p.version,
            "num_workers": p.num_workers,
            "moe_layers": list(self.spec.moe_layers),
            "workers": self.dispatcher.transport.describe_workers(),
        }

    def shutdown(self) -> None:
        self.dispatcher.transport.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
