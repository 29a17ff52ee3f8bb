"""Decode tokens/s against the number of expert workers, and of routers sharing them, extended past
this machine by a model of the per-layer costs a `bench.decode_profile` trace measured.

One router, W workers. A served decode step with T sequences, L MoE layers and W workers costs

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

M routers, W workers (`--routers`): M router replicas, each on a machine of its own with its own T
sequences (its own batch, KV caches and scheduler, running its own steps), share one pool of W
workers, each on a machine of its own. Every router's R, s and o stay its own (they run in
parallel); every worker serves the layers of all M routers.

- A worker's expert time for one layer over n rows (tokens) is the bytes of the experts it touches
  plus a small per-row term:

      c(W, n) = c(W0) * [(1 - p) * h(W) / h(W0) * t(n) / t(T) + p * W0 / W * n / T]

  with t(n) = 1 - (1 - K/E)^n the fraction of a worker's experts that n tokens touch (E experts per
  layer, top-K, picks taken as independent), h(W) = max(E / W, 1) the experts a worker holds (past
  W = E a worker holds one expert, replicated, and its bytes stop falling) and p (`--row-share`,
  default 0.1) the share of the traced call that grows with the rows. At n = T and W <= E this is
  the one-router c(W).
- merged: a worker merges the frames of one layer that wait together into one grouped FFN, so a
  layer of k routers' rows costs c(W, k * T), about one router's when T already touches every expert;
  unmerged: it runs them one after another, k * c(W, T). At 524c0c5 the worker's data plane
  (`DataPlaneServer` in `router_service/runtime/data_plane.py`) runs one frame at a time under a
  lock: unmerged. The multi-router change under way merges the frames of one layer that queued
  behind a running call and makes none wait to be merged: each frame alone below saturation (as the
  per-router step below assumes), merged at saturation (the merged capacity below).
- network: a router's link carries its own rows (n(W) above); a worker's link carries all M
  routers': M * 2 * T * H * 4 * f(W) / bandwidth per layer. A layer's network time is the slower
  of the two links plus the latency.
- per-router step = R + L * (s + o + c(W, T) + network), as if its frames found the workers free;
  total tokens/s = min(M * T / step, the workers' capacity). Every step of every router reaches
  every worker (T * K rows over W workers), so the pool's capacity is one worker's: unmerged
  T / (L * c(W, T)) (a router step's L layers, one frame each), merged M * T / (L * c(W, M * T))
  (each of the L layers one batch of all M routers' frames: the best case, reached when saturated
  workers hold the routers in step). A bound: near the crossing, queueing makes the real figure lower.
- knee: for each M, the first worker count past which tokens/s grows by < 5% per doubling; and the
  fewest workers with which the routers' steps, not the workers' capacity, bind.
- transport budget per layer (submit + the transport's own wait, both directions, one router's
  frame) at the knee, two ways: serial, as the step runs today (no overlap), the time that costs at
  most 5% of tokens/s against a free transport; pipelined, as Step-3 sets its 273 us (50 ms per
  token / 61 layers / 3 stages: attention, FFN and communication each get the same time per layer
  and micro-batch), the time of the slowest other stage per layer, max(R / L, the workers' time per
  layer for all M routers), so that the transport is never the slowest stage.

Past W = E the model's tokens/s may fall slightly: a worker's bytes stop falling while the router's
link carries more copies of each row. These are model figures from one machine's trace, not
measurements of a cluster.

`--workers` is one number, the workers the trace was taken with (the rows then come from `--counts`,
as before), or a comma list of the worker counts to model (the traced count then from
`--traced-workers`, else the trace's worker processes). `--costs R=..,s=..,o=..,c=..,T=..,L=..` gives
a trace's figures instead of the trace (ms per step for R, per layer for s, o and c, c at the traced
worker count).

    python -m bench.scaling_model --trace decode-trace.json --workers 2 --preset trained
    python -m bench.scaling_model --trace decode-trace.json --workers 1,2,4,8,16,32,64 --routers 1,2,4,8
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

from bench.decode_profile import breakdown
from moe_models.loading import spec_from_pretrained
from router_service.default_model import default_model_dir

# Step-3 (StepFun, attention-FFN disaggregation): 50 ms per token over 61 layers and 3 pipeline stages
# (attention, FFN, communication) gives each stage, the communication's two directions included, 273 us
# per layer and micro-batch.
STEP3_TRANSPORT_US = 273.0
KNEE_GROWTH = 0.05  # the knee: tokens/s grows by less than this per doubling of the workers
BUDGET_LOSS = 0.05  # serial budget: the transport may cost this share of tokens/s


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


# ---- M routers x W workers -------------------------------------------------------------------------


@dataclass(frozen=True)
class Costs:
    """What a trace measured: per step R, per layer s, o and the slowest worker's call c(W0) (ms)."""

    router_ms: float
    submit_ms: float
    transport_ms: float
    expert_ms: float
    traced_workers: int
    tokens: float
    layers: float

    @classmethod
    def from_breakdown(cls, b: dict, traced_workers: int) -> Costs:
        per_step, per_layer = b["per_step_ms"], b["per_layer_ms"]
        layers = b["layers_per_step"]
        return cls(
            router_ms=per_step["step"] - per_step["submit"] - per_step["wait"],
            submit_ms=per_step["submit"] / layers,
            transport_ms=max(per_layer["transport's own (wait - worker call)"], 0.0),
            expert_ms=per_layer["slowest worker's call"],
            traced_workers=traced_workers,
            tokens=b["mean_batch"],
            layers=layers,
        )

    def as_breakdown(self) -> dict:
        """The parts of `bench.decode_profile.breakdown`'s answer that these costs fill."""
        layers = self.layers
        return {
            "mean_batch": self.tokens,
            "layers_per_step": layers,
            "per_step_ms": {
                "step": self.router_ms + layers * (self.submit_ms + self.transport_ms + self.expert_ms),
                "submit": layers * self.submit_ms,
                "wait": layers * (self.transport_ms + self.expert_ms),
            },
            "per_layer_ms": {
                "slowest worker's call": self.expert_ms,
                "transport's own (wait - worker call)": self.transport_ms,
            },
        }


# `--costs` keys: the docstring's letters
COST_KEYS = {
    "R": "router_ms",
    "s": "submit_ms",
    "o": "transport_ms",
    "c": "expert_ms",
    "T": "tokens",
    "L": "layers",
}


def parse_costs(text: str, traced_workers: int) -> Costs:
    """`R=11.3,s=0.72,o=0.43,c=1.32,T=15.4,L=3` (ms; c at `traced_workers` workers) -> Costs."""
    given = dict(kv.split("=", 1) for kv in text.split(","))
    if set(given) != set(COST_KEYS):
        raise SystemExit(f"--costs needs exactly {', '.join(COST_KEYS)}; got {', '.join(given)}")
    return Costs(traced_workers=traced_workers, **{COST_KEYS[k]: float(v) for k, v in given.items()})


@dataclass(frozen=True)
class Cluster:
    """The modelled machines: the model's shape, the links, and the per-row share of a worker's call."""

    hidden: int
    top_k: int
    experts: int
    gbit_s: float = 25.0
    latency_us: float = 30.0
    row_share: float = 0.1


def touched(rows: float, top_k: int, experts: int) -> float:
    """The fraction of a worker's experts that `rows` tokens touch: 1 - (1 - K/E)^rows."""
    return 1 - (1 - top_k / experts) ** rows


def worker_expert_ms(costs: Costs, cl: Cluster, workers: int, rows: float) -> float:
    """One worker's expert time for one layer over `rows` tokens (one grouped FFN)."""
    held = lambda w: max(cl.experts / w, 1.0)  # noqa: E731
    t, w0 = costs.tokens, costs.traced_workers
    weights = (1 - cl.row_share) * held(workers) / held(w0)
    weights *= touched(rows, cl.top_k, cl.experts) / touched(t, cl.top_k, cl.experts)
    per_row = cl.row_share * w0 / workers * rows / t
    return costs.expert_ms * (weights + per_row)


def network_ms(costs: Costs, cl: Cluster, workers: int, routers: int) -> float:
    """A layer's network time: the slower of a router's link and a worker's, plus the latency."""
    frac = 1 - (1 - 1 / workers) ** cl.top_k  # tokens with at least one expert on a given worker
    per_worker = 2 * costs.tokens * cl.hidden * 4 * frac  # one router's rows and partials, bytes
    link = max(per_worker * workers, routers * per_worker)  # router's link, worker's link
    return link / (cl.gbit_s * 1e9 / 8) * 1e3 + cl.latency_us / 1e3


def router_step_ms(costs: Costs, cl: Cluster, workers: int, routers: int, transport_ms=None) -> float:
    """One router's step when its frames find the workers free; `transport_ms` replaces s + o."""
    if transport_ms is None:
        transport_ms = costs.submit_ms + costs.transport_ms
    c = worker_expert_ms(costs, cl, workers, costs.tokens)
    return costs.router_ms + costs.layers * (transport_ms + c + network_ms(costs, cl, workers, routers))


def worker_layer_ms(costs: Costs, cl: Cluster, workers: int, routers: int, merged: bool) -> float:
    """A worker's time for one layer of all `routers` routers."""
    if merged:
        return worker_expert_ms(costs, cl, workers, routers * costs.tokens)
    return routers * worker_expert_ms(costs, cl, workers, costs.tokens)


def capacity_tok_s(costs: Costs, cl: Cluster, workers: int, routers: int, merged: bool) -> float:
    """Tokens/s the pool can serve: each worker sees every layer of every router's step."""
    return (
        routers * costs.tokens / (costs.layers * worker_layer_ms(costs, cl, workers, routers, merged)) * 1e3
    )


def point(costs: Costs, cl: Cluster, workers: int, routers: int, merged: bool, transport_ms=None) -> dict:
    step = router_step_ms(costs, cl, workers, routers, transport_ms)
    by_routers = routers * costs.tokens / step * 1e3
    cap = capacity_tok_s(costs, cl, workers, routers, merged)
    return {
        "workers": workers,
        "routers": routers,
        "merged": merged,
        "step_ms": step,
        "routers_tok_s": by_routers,
        "capacity_tok_s": cap,
        "tok_s": min(by_routers, cap),
        "bound": "workers" if cap < by_routers else "routers",
    }


def knee(rates: list[tuple[int, float]], growth: float = KNEE_GROWTH) -> int | None:
    """The first worker count past which tokens/s grows by < `growth` per doubling (None: not reached)."""
    rates = sorted(rates)
    for (w, r), (w2, r2) in zip(rates, rates[1:], strict=False):
        if (r2 / r) ** (1 / math.log2(w2 / w)) - 1 < growth:
            return w
    return None


def budgets(costs: Costs, cl: Cluster, workers: int, routers: int, merged: bool) -> dict:
    """Submit + transport time per layer (ms) that leaves the transport no bottleneck at this point."""
    free = point(costs, cl, workers, routers, merged, transport_ms=0.0)
    target = (1 - BUDGET_LOSS) * free["tok_s"]
    serial = (routers * costs.tokens / target * 1e3 - free["step_ms"]) / costs.layers
    stage = max(costs.router_ms / costs.layers, worker_layer_ms(costs, cl, workers, routers, merged))
    return {"serial_ms": serial, "pipelined_ms": stage}


def grid(costs: Costs, cl: Cluster, counts: list[int], routers: list[int]) -> dict:
    """(routers, workers, merged) -> point; per (routers, merged) the knee ("workers": None where there
    is none up to the largest count), the point and the budgets at the knee (else at the largest count),
    and the fewest workers with which the routers' steps, not the workers, bind ("saturated_below")."""
    points = {
        (m, w, merged): point(costs, cl, w, m, merged)
        for m in routers
        for w in counts
        for merged in (True, False)
    }
    knees = {}
    for m in routers:
        for merged in (True, False):
            k = knee([(w, points[m, w, merged]["tok_s"]) for w in counts])
            at = k or max(counts)
            free = [w for w in sorted(counts) if points[m, w, merged]["bound"] == "routers"]
            knees[m, merged] = {
                "workers": k,
                "at": at,
                "point": points[m, at, merged],
                "budgets": budgets(costs, cl, at, m, merged),
                "saturated_below": free[0] if free else None,
            }
    return {"points": points, "knees": knees}


def traced_worker_count(events: list[dict]) -> int:
    """The expert workers a trace names (its "expert worker i" processes)."""
    return sum(
        1
        for e in events
        if e.get("ph") == "M"
        and e.get("name") == "process_name"
        and e["args"]["name"].startswith("expert worker")
    )


def _ints(text: str) -> list[int]:
    out = [int(x) for x in text.split(",") if x.strip()]
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"positive integers, comma-separated: {text!r}")
    return out


def print_routers(costs: Costs, cl: Cluster, counts: list[int], routers: list[int]) -> None:
    g = grid(costs, cl, counts, routers)
    pts, knees = g["points"], g["knees"]
    print(
        f"\nM routers x W workers, each on a machine of its own: tokens/s in total, merged / unmerged "
        f"(a worker merges one layer's frames of all routers / runs them one after another); * the "
        f"workers' capacity binds, else the routers' steps. Per-row share of a worker's call "
        f"{cl.row_share:g}, {cl.experts} experts per layer.\n"
    )
    print("| workers | " + " | ".join(f"{m} router{'s' * (m > 1)}" for m in routers) + " |")
    print("|---" * (len(routers) + 1) + "|")
    for w in counts:
        cells = []
        for m in routers:
            a, b = pts[m, w, True], pts[m, w, False]
            cells.append(
                f"{a['tok_s']:.0f}{'*' * (a['bound'] == 'workers')} / "
                f"{b['tok_s']:.0f}{'*' * (b['bound'] == 'workers')}"
            )
        print(f"| {w} | " + " | ".join(cells) + " |")

    def both(m: int, f) -> str:
        return " / ".join(f(knees[m, merged]) for merged in (True, False))

    top = max(counts)
    today = (costs.submit_ms + costs.transport_ms) * 1e3
    print(
        f"\nPer router count, merged / unmerged: the knee (the first worker count past which tokens/s grows "
        f"< {100 * KNEE_GROWTH:g}% per doubling; >{top}: none up to {top}, and the next columns are at "
        f"{top}); the fewest workers with which the routers' steps bind, not the workers' capacity; the "
        f"transport's budget per layer at the knee (submit + its own wait, both directions, one router's "
        f"frame). Serial: the step as it runs today, the time that costs {100 * BUDGET_LOSS:g}% of "
        f"tokens/s; pipelined: the slowest other stage per layer, max(R / L, the workers' time per layer "
        f"for all routers). Today's submit + transport: {today:.0f} us per layer; Step-3: "
        f"{STEP3_TRANSPORT_US:g} us.\n"
    )
    print(
        "| routers | knee (workers) | tok/s at the knee | workers before the routers bind "
        "| M*T/R, tok/s | serial budget, us | pipelined budget, us |"
    )
    print("|---|---|---|---|---|---|---|")
    for m in routers:
        limit = m * costs.tokens / costs.router_ms * 1e3
        cols = [
            both(m, lambda k: str(k["workers"]) if k["workers"] else f">{top}"),
            both(m, lambda k: f"{k['point']['tok_s']:.0f}"),
            both(m, lambda k: str(k["saturated_below"]) if k["saturated_below"] else f">{top}"),
            f"{limit:.0f}",
            both(m, lambda k: f"{k['budgets']['serial_ms'] * 1e3:.0f}"),
            both(m, lambda k: f"{k['budgets']['pipelined_ms'] * 1e3:.0f}"),
        ]
        print(f"| {m} | " + " | ".join(cols) + " |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--trace", help="a trace written by bench.decode_profile")
    src.add_argument(
        "--costs",
        help="instead of a trace, its figures: R=..,s=..,o=..,c=..,T=..,L=.. (ms per step / per layer, "
        "c at the traced workers; the docstring's letters)",
    )
    p.add_argument(
        "--workers",
        type=_ints,
        required=True,
        help="one number: the workers the trace was taken with (the rows then come from --counts); "
        "a comma list: the worker counts to model (the traced count then from --traced-workers or the trace)",
    )
    p.add_argument("--traced-workers", type=int, default=None, help="default: the trace's worker processes")
    p.add_argument("--routers", type=_ints, default=None, help="router counts to model, e.g. 1,2,4,8")
    p.add_argument("--preset", default="trained", help="the built-in model the trace served")
    p.add_argument("--model", default=None, help="its checkpoint dir (overrides --preset)")
    p.add_argument("--counts", type=_ints, default="1,2,4,8,16,32,64", help="worker counts to model")
    p.add_argument("--gbit-s", type=float, default=25.0, help="each machine's network link")
    p.add_argument("--latency-us", type=float, default=30.0, help="network round-trip latency per layer")
    p.add_argument(
        "--row-share",
        type=float,
        default=0.1,
        help="share of a worker's traced call that grows with its rows",
    )
    args = p.parse_args(argv)

    spec = spec_from_pretrained(args.model or default_model_dir(args.preset))
    events = json.loads(Path(args.trace).read_text())["traceEvents"] if args.trace else []
    if len(args.workers) == 1:
        traced, counts = args.workers[0], args.counts
    else:
        traced, counts = args.traced_workers or traced_worker_count(events), args.workers
    if not traced:
        raise SystemExit("no traced worker count (the trace names no expert worker): give --traced-workers")
    b = breakdown(events) if args.trace else parse_costs(args.costs, traced).as_breakdown()
    rows = model_table(
        b,
        traced,
        spec.hidden_size,
        spec.top_k,
        b["mean_batch"],
        b["layers_per_step"],
        counts,
        args.gbit_s,
        args.latency_us,
    )
    print(
        f"model of {Path(args.trace).name if args.trace else 'the given costs'}: {b['mean_batch']:.1f} sequences, {b['layers_per_step']:.0f} MoE "
        f"layers, hidden {spec.hidden_size}, top-{spec.top_k}, {args.gbit_s:g} Gbit/s, {args.latency_us:g} us\n"
    )
    print("| workers | router ms / step | fixed ms / layer | expert ms / layer | step ms | tokens/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['workers']} | {r['router_ms']:.2f} | {r['per_layer_fixed_ms']:.2f} | {r['expert_ms']:.2f} "
            f"| {r['step_ms']:.2f} | {r['tok_s']:.0f} |"
        )
    if args.routers:
        costs = Costs.from_breakdown(b, traced)
        cl = Cluster(
            spec.hidden_size, spec.top_k, spec.num_experts, args.gbit_s, args.latency_us, args.row_share
        )
        print_routers(costs, cl, counts, args.routers)


if __name__ == "__main__":
    main()
