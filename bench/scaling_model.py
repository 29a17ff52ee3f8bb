"""Decode tokens/s against the number of expert workers, extended past this machine by a model of the
per-layer costs a `bench.decode_profile` trace measured.

A served decode step with T sequences, L MoE layers and W workers costs

    step(W) = R + L * (s + o + c(W) + n(W))

- R: the router's own time per step (dense layers, gate, plan, combine, sampling: everything but
  submitting and waiting), from the trace;
- s: submitting one layer (framing, the writes), from the trace; o: the transport's own share of a
  round trip on loopback (wait minus the slowest worker's call), from the trace;
- c(W): the slowest worker's expert compute per layer. Decode is memory-bound (the bytes of the
  experts a step touches), and a step of T >= 8 sequences touches most experts, so a worker's time is
  proportional to the experts it holds: c(W) = c(W0) * W0 / W, from the traced W0. This assumes each
  worker brings its own cores and memory bandwidth (a machine of its own, as on a cluster); on this
  2-core machine the workers share both, which is why the measured table flattens;
- n(W): the network, per layer: each worker receives the rows routed to it and returns a partial of
  the same size, H x 4 bytes each (fp32), the shares of all workers crossing the router's link one
  after another: n(W) = 2 * T * H * 4 * f(W) * W / bandwidth + latency, with f(W) = 1 - (1 - 1/W)^K
  the fraction of tokens with at least one of their K experts on a given worker.

tokens/s = T / step(W). The knee is where c(W) has shrunk to the size of the fixed terms
(R / L + s + o + n): past it, more workers buy nothing, and the router's step is the limit.

    python -m bench.scaling_model --trace decode-trace.json --workers 2 --preset trained
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.decode_profile import breakdown


def model_table(
    b: dict,
    traced_workers: int,
    hidden: int,
    top_k: int,
    tokens: float,
    layers: float,
    counts: list[int],
    gbit_s: float,
    latency_us: float,
) -> list[dict]:
    per_step, per_layer = b["per_step_ms"], b["per_layer_ms"]
    router = per_step["step"] - per_step["submit"] - per_step["wait"]  # prefills between steps excluded
    s = per_step["submit"] / layers
    o = max(per_layer["transport's own (wait - worker call)"], 0.0)
    c0 = per_layer["slowest worker's call"]
    rows = []
    for w in counts:
        c = c0 * traced_workers / w
        frac = 1 - (1 - 1 / w) ** top_k
        net = 2 * tokens * hidden * 4 * frac * w / (gbit_s * 1e9 / 8) * 1e3 + latency_us / 1e3
        step = router + layers * (s + o + c + net)
        rows.append(
            {
                "workers": w,
                "router_ms": router,
                "per_layer_fixed_ms": s + o + net,
                "expert_ms": c,
                "step_ms": step,
                "tok_s": tokens / step * 1e3,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trace", required=True, help="a trace written by bench.decode_profile")
    p.add_argument("--workers", type=int, required=True, help="the workers the trace was taken with")
    p.add_argument("--preset", default="trained", help="the built-in model the trace served")
    p.add_argument("--model", default=None, help="its checkpoint dir (overrides --preset)")
    p.add_argument("--counts", default="1,2,4,8,16,32,64", help="worker counts to model")
    p.add_argument("--gbit-s", type=float, default=25.0, help="the router's network link")
    p.add_argument("--latency-us", type=float, default=30.0, help="network round-trip latency per layer")
    args = p.parse_args(argv)

    from moe_models.loading import spec_from_pretrained
    from router_service.default_model import default_model_dir

    spec = spec_from_pretrained(args.model or default_model_dir(args.preset))
    events = json.loads(Path(args.trace).read_text())["traceEvents"]
    b = breakdown(events)
    rows = model_table(
        b,
        args.workers,
        spec.hidden_size,
        spec.top_k,
        b["mean_batch"],
        b["layers_per_step"],
        [int(x) for x in args.counts.split(",")],
        args.gbit_s,
        args.latency_us,
    )
    print(
        f"model of {Path(args.trace).name}: {b['mean_batch']:.1f} sequences, {b['layers_per_step']:.0f} MoE "
        f"layers, hidden {spec.hidden_size}, top-{spec.top_k}, {args.gbit_s:g} Gbit/s, {args.latency_us:g} us\n"
    )
    print("| workers | router ms / step | fixed ms / layer | expert ms / layer | step ms | tokens/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['workers']} | {r['router_ms']:.2f} | {r['per_layer_fixed_ms']:.2f} | {r['expert_ms']:.2f} "
            f"| {r['step_ms']:.2f} | {r['tok_s']:.0f} |"
        )


if __name__ == "__main__":
    main()
