"""Train the built-in default model on the Python standard library's own sources, deterministically.

    python -m router_service.train_default_model                # writes router_service/builtin_model/
    python -m router_service.train_default_model --out DIR      # anywhere else

The corpus is text every machine with Python has: the `.py` files of the running interpreter's
standard library (`sysconfig.get_paths()["stdlib"]`, tests and site-packages left out), which are
code, docstrings and comments, plus `pydoc_data/topics.py`, the language reference as English prose.
Files are read in sorted order; a file is held out for evaluation when the CRC-32 of its path is 0
mod `HOLDOUT_MOD`, so the split depends only on the file's name. Each file is one document:
`<bos> bytes <eos>`.

The model is the default model's DeepSeek-V3 architecture (`TRAINED_CONFIG`: MLA, a dense first
layer, then MoE layers of 16 fine-grained routed experts, top-4 within 2 of 4 groups, one shared
expert, sigmoid gate with `e_score_correction_bias`), trained from a seeded init by plain AdamW on
random windows of the training files, in fp32 on the CPU with a fixed thread count. The gate bias
follows V3's auxiliary-loss-free balancing rule (after every step, `bias += gamma * sign(mean load -
load)` per expert), so the checkpoint's bias is the trained kind, and no expert starves in training
while per-text load stays skewed. The weights are saved in bf16 (the bias in fp32, as V3 keeps it)
with `config.json` asking for fp32 compute, which is what the engine and `transformers` run by
default on a CPU, so both load the same upcast weights.

Determinism: fixed seeds, `torch.use_deterministic_algorithms`, `THREADS` intra-op threads and the
step count fixed (never "train for N minutes"). The same Python (the corpus), torch build and CPU
family give the same bytes; another CPU's GEMM kernels round differently in the last bits, so the
weights differ slightly there while the figures `training_info.json` records stay the same to the
digits shown.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import sysconfig
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from router_service.default_model import (
    BUILTIN_MODEL_DIR,
    TINY_CONFIG,
    VOCAB_SIZE,
    make_tokenizer,
)
from router_service.serving.chat import DEFAULT_CHAT_TEMPLATE

SEED = 0
# One intra-op thread: on the shared 2-core machine it was made on, a step took 0.83 s with 1 thread
# and 3.4 s with 2 while another process ran (OpenMP threads spin and fight for the cores).
THREADS = 1
HOLDOUT_MOD = 20  # about 1 file in 20 is held out
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
BOS_ID, EOS_ID = TINY_CONFIG["bos_token_id"], TINY_CONFIG["eos_token_id"]

# The default model's architecture, smaller in width (few MB in bf16, minutes to train on 2 cores)
# and with half the experts; V3's routing rules unchanged.
TRAINED_CONFIG = {
    **TINY_CONFIG,
    "hidden_size": 128,
    "intermediate_size": 384,  # the dense first layer's MLP
    "moe_intermediate_size": 96,
    "num_hidden_layers": 4,
    "n_routed_experts": 16,
    "num_experts_per_tok": 4,
    "n_group": 4,
    "topk_group": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "q_lora_rank": 64,
    "kv_lora_rank": 32,
    "qk_rope_head_dim": 16,
    "qk_nope_head_dim": 16,
    "v_head_dim": 32,
    "max_position_embeddings": 2048,
}


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 600
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 3e-3
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1  # cosine decay to this fraction of lr
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    bias_update_speed: float = 1e-4  # the aux-loss-free bias step (V3: 1e-3, over far more steps)
    eval_windows: int = 64  # held-out windows of seq_len bytes, the first ones of the held-out stream


# ---- corpus ---------------------------------------------------------------------------------------


def corpus_files(root: Path | None = None) -> list[Path]:
    """The standard library's non-empty .py files, sorted by path relative to `root`; tests left out."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    return sorted(
        (
            p
            for p in root.rglob("*.py")
            if not SKIP_DIRS & set(p.relative_to(root).parts[:-1]) and p.stat().st_size > 0
        ),
        key=lambda p: p.relative_to(root).as_posix(),
    )


def is_held_out(relpath: str) -> bool:
    return zlib.crc32(relpath.encode()) % HOLDOUT_MOD == 0


def split_corpus(root: Path | None = None) -> tuple[list[Path], list[Path]]:
    """(train files, held-out files) of `corpus_files(root)`."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = corpus_files(root)
    held = [p for p in files if is_held_out(p.relative_to(root).as_posix())]
    return [p for p in files if p not in set(held)], held


def token_stream(files: list[Path]) -> torch.Tensor:
    """The files as one stream of token ids: `<bos> bytes <eos>` per file. ids: int64 [N]."""
    parts = []
    for p in files:
        data = torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8).long()
        parts += [torch.tensor([BOS_ID]), data, torch.tensor([EOS_ID])]
    return torch.cat(parts)


def eval_windows(stream: torch.Tensor, seq_len: int, n: int) -> torch.Tensor:
    """The first `n` non-overlapping windows of `seq_len + 1` ids (input + next-token target)."""
    n = min(n, (stream.numel() - 1) // seq_len)
    return torch.stack([stream[i * seq_len : i * seq_len + seq_len + 1] for i in range(n)])


# ---- measures -------------------------------------------------------------------------------------


def unigram_nll(train: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean NLL (nats per token) of `targets` under the add-one-smoothed byte unigram of `train`."""
    counts = torch.bincount(train, minlength=VOCAB_SIZE).double() + 1
    logp = counts.log() - counts.sum().log()
    return -logp[targets].mean().item()


class LoadCounter:
    """Tokens per expert per MoE layer, counted by forward hooks on the gates. counts: [L, E]."""

    def __init__(self, model):
        gates = [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "gate")]
        self.gates = gates
        self.counts = torch.zeros(len(gates), gates[0].num_experts, dtype=torch.long)
        self.handles = [g.register_forward_hook(self._hook(i)) for i, g in enumerate(gates)]

    def _hook(self, i):
        def hook(module, args, output):
            topk_ids = output[2]  # [T, K]
            self.counts[i] += torch.bincount(topk_ids.flatten(), minlength=self.counts.shape[1])

        return hook

    def reset(self) -> None:
        self.counts.zero_()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, batch_size: int = 16) -> tuple[float, torch.Tensor]:
    """(mean NLL in nats per byte over every predicted token, expert load [L, E]) on `windows`."""
    model.eval()
    load = LoadCounter(model)
    total, count = 0.0, 0
    try:
        for i in range(0, len(windows), batch_size):
            batch = windows[i : i + batch_size]
            logits = model(batch[:, :-1]).logits.float()  # [B, S, V]
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
            )
            total, count = total + nll.item(), count + batch[:, 1:].numel()
    finally:
        load.remove()
    return total / count, load.counts


def load_skew(counts: torch.Tensor) -> dict:
    """Per MoE layer: max / mean tokens per expert, and the share of the busiest quarter of experts."""
    counts = counts.double()
    mean = counts.mean(dim=1)
    top = counts.sort(dim=1, descending=True).values[:, : max(1, counts.shape[1] // 4)]
    return {
        "max_over_mean": [round(v, 2) for v in (counts.max(dim=1).values / mean).tolist()],
        "min_over_mean": [round(v, 2) for v in (counts.min(dim=1).values / mean).tolist()],
        "busiest_quarter_share": [round(v, 3) for v in (top.sum(1) / counts.sum(1)).tolist()],
    }


# ---- training -------------------------------------------------------------------------------------


def lr_at(step: int, s: TrainSettings) -> float:
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    t = (step - s.warmup_steps) / max(1, s.steps - s.warmup_steps)
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def build_model():
    from transformers import AutoModelForCausalLM, DeepseekV3Config

    cfg = DeepseekV3Config(**TRAINED_CONFIG)
    # grouped_mm: one batched GEMM over all experts, 1.5x faster a training step than the per-expert loop
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, experts_implementation="grouped_mm")


def train(s: TrainSettings, log=print):
    """Train from a seeded init; returns (model, info dict of the figures)."""
    torch.manual_seed(SEED)
    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)
    train_files, held_files = split_corpus()
    train_ids, held_ids = token_stream(train_files), token_stream(held_files)
    windows = eval_windows(held_ids, s.seq_len, s.eval_windows)
    log(
        f"corpus: {len(train_files)} train files ({train_ids.numel() / 1e6:.2f} MB), "
        f"{len(held_files)} held out ({held_ids.numel() / 1e6:.2f} MB; eval on {windows[:, 1:].numel()} bytes)"
    )
    model = build_model()
    n_params = sum(p.numel() for p in model.parameters())
    untrained_nll, _ = evaluate(model, windows)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=s.lr,
        betas=(0.9, 0.95),
    )
    load = LoadCounter(model)
    gen = torch.Generator().manual_seed(SEED)
    offsets = torch.arange(s.seq_len + 1)
    start = time.perf_counter()
    for step in range(s.steps):
        model.train()
        starts = torch.randint(0, train_ids.numel() - s.seq_len - 1, (s.batch_size,), generator=gen)
        batch = train_ids[starts[:, None] + offsets]  # [B, S + 1]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, s)
        load.reset()
        logits = model(batch[:, :-1]).logits  # [B, S, V]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        opt.step()
        with torch.no_grad():  # V3's auxiliary-loss-free balancing: nudge the bias against the load
            for gate, counts in zip(load.gates, load.counts.float(), strict=True):
                gate.e_score_correction_bias += s.bias_update_speed * torch.sign(counts.mean() - counts)
        if step % 50 == 0 or step == s.steps - 1:
            log(
                f"step {step:5d}  loss {loss.item():.3f}  lr {lr_at(step, s):.2e}  {time.perf_counter() - start:.0f} s"
            )
    seconds = time.perf_counter() - start
    load.remove()

    nll, counts = evaluate(model, windows)
    info = {
        "settings": asdict(s),
        "seed": SEED,
        "threads": THREADS,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "train_files": len(train_files),
        "train_bytes": int(train_ids.numel()),
        "held_out_files": [p.relative_to(sysconfig.get_paths()["stdlib"]).as_posix() for p in held_files],
        "eval_bytes": int(windows[:, 1:].numel()),
        "parameters": n_params,
        "train_seconds": round(seconds, 1),
        "perplexity_per_byte": {
            "trained": round(math.exp(nll), 3),
            "unigram": round(math.exp(unigram_nll(train_ids, windows[:, 1:].flatten())), 3),
            "untrained": round(math.exp(untrained_nll), 3),
        },
        "bits_per_byte": round(nll / math.log(2), 3),
        "expert_load_held_out": {**load_skew(counts), "tokens_per_expert": counts.tolist()},
    }
    return model, info


def save(model, info: dict, outdir: Path) -> Path:
    """Write the checkpoint: bf16 weights (fp32 gate bias), fp32 compute, tokenizer with chat template."""
    outdir.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    with torch.no_grad():
        for p in model.parameters():  # not the buffers: the gate bias stays fp32
            p.data = p.data.to(torch.bfloat16)
    model.save_pretrained(outdir)
    # Compute in fp32, the engine's and transformers' CPU default: config.json's dtype is what
    # `from_pretrained` (dtype "auto") runs in, and save_pretrained wrote the weights' bf16.
    config = json.loads((outdir / "config.json").read_text())
    (outdir / "config.json").write_text(
        json.dumps({**config, "dtype": "float32"}, indent=2, sort_keys=True) + "\n"
    )
    tokenizer = make_tokenizer()
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    tokenizer.save_pretrained(outdir)
    (outdir / "training_info.json").write_text(json.dumps(info, indent=1) + "\n")
    return outdir


SAMPLE_PROMPTS = ("def ", "import os\n", "class Queue:\n    ", "The ")
SAMPLE_CHAT = [{"role": "user", "content": "How do I read a file?"}]


def print_samples(model_dir: Path, max_new_tokens: int = 120) -> None:
    """Greedy and temperature-0.8 (seeded) completions of `SAMPLE_PROMPTS`, and a chat reply."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(THREADS)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()

    def complete(ids: list[int], **sampling) -> str:
        torch.manual_seed(SEED)
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, **sampling)
        return tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)

    for prompt in SAMPLE_PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        for label, sampling in (
            ("greedy", {"do_sample": False}),
            ("T=0.8", {"do_sample": True, "temperature": 0.8, "top_k": 0}),
        ):
            print(f"--- {prompt!r}, {label}:\n{prompt}{complete(ids, **sampling)}\n")
    ids = tokenizer.apply_chat_template(SAMPLE_CHAT, add_generation_prompt=True, tokenize=False)
    ids = tokenizer.encode(ids, add_special_tokens=False)
    print(f"--- chat {SAMPLE_CHAT}, greedy:\n{tokenizer.decode(ids)}{complete(ids, do_sample=False)}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m router_service.train_default_model",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=BUILTIN_MODEL_DIR, help="default: %(default)s")
    p.add_argument("--steps", type=int, default=TrainSettings.steps, help="default: %(default)s")
    p.add_argument("--samples", action="store_true", help="print samples of the model in --out; no training")
    args = p.parse_args(argv)
    if args.samples:
        print_samples(args.out)
        return 0
    model, info = train(TrainSettings(steps=args.steps), log=lambda m: print(m, file=sys.stderr))
    save(model, info, args.out)
    print(json.dumps({k: v for k, v in info.items() if k != "held_out_files"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
