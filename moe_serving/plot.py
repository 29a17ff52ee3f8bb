"""An expert-load heatmap of a server's cluster state (`moe-serve cluster --plot load.png`).

Two panels from one `GET /v1/cluster` answer:
- top: tokens routed to each logical expert over the router's load window (layers x experts);
- bottom: the same load as the workers carry it, per physical slot (a replicated expert's load split
  evenly over its replicas), slots grouped by worker with a line at each worker boundary, so an
  overloaded worker shows as a bright band and a rebalance as the band evening out.

matplotlib is imported here only (the `plot` extra of the package).
"""

from __future__ import annotations

from pathlib import Path


def _matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # a clear message instead of a traceback
        raise ValueError(
            "writing a plot needs matplotlib: pip install 'moe-serving[plot]' (or matplotlib)"
        ) from e
    return plt


def load_matrices(
    state: dict,
) -> tuple[list[int], list[list[float]], list[list[float]], list[int], list[int]]:
    """(layers, expert load [L][E], slot load [L][P], slot offsets, worker ids) of a cluster state."""
    tokens = {int(k): v for k, v in (state.get("expert_load") or {}).get("tokens", {}).items()}
    layers = sorted(tokens)
    experts = [[float(x) for x in tokens[layer]] for layer in layers]
    placement = state.get("placement") or {}
    phy2log = {int(k): v for k, v in (placement.get("phy2log") or {}).items()}
    offsets = [int(x) for x in placement.get("slot_offsets") or []]
    workers = [int(x) for x in placement.get("worker_ids") or []]
    slots = []
    for layer, load in zip(layers, experts, strict=True):
        ids = phy2log.get(layer, list(range(len(load))))
        count = {e: ids.count(e) for e in set(ids)}
        slots.append([load[e] / count[e] for e in ids])
    return layers, experts, slots, offsets, workers


def plot_expert_load(state: dict, path: str | Path) -> Path:
    """Write the heatmap of `state` (a cluster-state dict) to `path`; returns the path."""
    plt = _matplotlib()
    layers, experts, slots, offsets, workers = load_matrices(state)
    if not layers:
        raise ValueError("the cluster state has no expert load to plot")
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(max(8.0, 0.22 * len(slots[0]) + 3), 2.2 + 0.9 * len(layers)), constrained_layout=True
    )
    window = (state.get("expert_load") or {}).get("window_batches")
    im = top.imshow(experts, aspect="auto", cmap="viridis", interpolation="nearest")
    top.set_title(f"tokens per expert (last {window} batches)" if window else "tokens per expert")
    top.set_xlabel("expert")
    fig.colorbar(im, ax=top, label="tokens")
    im = bottom.imshow(slots, aspect="auto", cmap="magma", interpolation="nearest")
    balance = (state.get("balance") or {}).get("balancedness") or {}
    worst = min(balance.values()) if balance else None
    bottom.set_title(
        f"load per worker slot, placement version {state.get('placement_version', '?')}"
        + (f" (worst layer balancedness {worst:.2f})" if worst is not None else "")
    )
    bottom.set_xlabel("worker slots")
    for edge in offsets[1:-1]:
        bottom.axvline(edge - 0.5, color="white", linewidth=1.5)
    if offsets and workers:
        centers = [(a + b - 1) / 2 for a, b in zip(offsets, offsets[1:], strict=False)]
        bottom.set_xticks(centers, [f"w{w}" for w in workers])
    fig.colorbar(im, ax=bottom, label="tokens (replicas share)")
    for ax in (top, bottom):
        ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
        ax.set_ylabel("MoE layer")
    fig.suptitle(f"{state.get('model_type', '')}: {state.get('num_workers', '?')} expert workers")
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
