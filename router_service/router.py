"""Router: the dense model, the gate and the expert dispatch of one served model, in one process.

This is the object that runs inside the Router Ray actor (transport "ray" / "compiled") or directly
in the caller's process (transport "local"); `Engine` is the user's handle on either. It builds the
workers through the transport, then the `transformers` model minus its experts, and checks every
input at its edge with `ValueError`s that say what to change.
"""

from __future__ import annotations

import logging
import time

import torch

from moe_models.spec import load_hf_config, spec_from_hf_config
from router_service.config import EngineConfig, resolve_device
from router_service.dense_model import build_router_model
from router_service.moe_layer import ExpertDispatcher
from router_service.placement import contiguous_placement
from router_service.transport import WorkerSetup, make_transport

log = logging.getLogger(__name__)


class Router:
    """Holds the non-expert weights and runs the model layer by layer over the expert workers."""

    def __init__(self, config: EngineConfig):
        t0 = time.perf_counter()
        self.config = config
        torch.set_num_threads(config.num_threads)  # a no-op in-process unless asked for
        self.dtype = config.torch_dtype
        self.device = resolve_device(config.device)
        hf_config = load_hf_config(config.model_dir)
        self.spec = spec_from_hf_config(hf_config)
        placement = contiguous_placement(self.spec.moe_layers, self.spec.num_experts, config.num_workers)
        setup = WorkerSetup(
            config.model_dir,
            self.spec,
            self.dtype,
            config.worker_device,
            config.expert_kernel,
            config.num_threads,
        )
        transport = make_transport(config, setup, placement)
        self.dispatcher = ExpertDispatcher(self.spec, placement, transport, config.load_window)
        self.model = build_router_model(
            config.model_dir, hf_config, self.spec, self.dtype, self.device, self.dispatcher
        )
        log.info(
            "loaded %s (%d MoE layers x %d experts) on %d %s worker(s) in %.1fs",
            self.spec.model_type,
            len(self.spec.moe_layers),
            self.spec.num_experts,
            config.num_workers,
            config.transport,
            time.perf_counter() - t0,
        )

    def _out(self, t: torch.Tensor) -> torch.Tensor:
        """Results stay on the device in-process; a Router actor returns CPU tensors to its caller."""
        return t if self.config.transport == "local" else t.cpu()

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
        return input_ids.to(self.device, torch.long)

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
        return mask.to(self.device, torch.long)

    # ---- the API ---------------------------------------------------------------------------------

    @torch.inference_mode()
    def forward(self, input_ids, attention_mask=None) -> torch.Tensor:
        """Logits [B, S, V] (float32) for token ids [B, S], like transformers' model(...).logits."""
        ids = self._check_ids(input_ids)
        mask = self._check_mask(attention_mask, ids)
        return self._out(self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float())

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
        x = hidden.to(self.device, self.dtype)
        return self._out(self.model.model.layers[layer].mlp(x).to(hidden.dtype))

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
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            if seed is not None:
                torch.manual_seed(seed)
            return self._out(self.model.generate(ids, **kwargs))

    def cluster_state(self) -> dict:
        """Workers, placement version, the experts and bytes each worker holds, and expert load."""
        p = self.dispatcher.placement
        return {
            "model_type": self.spec.model_type,
            "transport": self.config.transport,
            "dtype": self.config.dtype,
            "placement_version": p.version,
            "num_workers": p.num_workers,
            "moe_layers": list(self.spec.moe_layers),
            "workers": self.dispatcher.transport.describe_workers(),
            "expert_load": self.dispatcher.load.snapshot(),
        }

    def shutdown(self) -> None:
        self.dispatcher.transport.close()
