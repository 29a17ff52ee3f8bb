"""`python -m cluster up|status|down|add-node|kill-node`: the launcher of `cluster/launcher.py` from
the command line. Flags after `--` go to `moe-serve serve` as they are:

    python -m cluster up --workers 2 --http-port 8000 -- --max-batch-size 16
    python -m cluster up --workers 2 --router-nodes 2   # 2 routers, each on a node of its own
    python -m cluster status
    python -m cluster down
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys

from cluster.launcher import ClusterOptions, ClusterStatus, LauncherError, LocalCluster, default_base_dir

PROG = "python -m cluster"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="A Ray head, Ray worker nodes and the MoE server on this machine (docker-compose's "
        "topology, without Docker).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    up = sub.add_parser(
        "up", help="start the cluster and the server", usage=f"{PROG} up [options] [-- moe-serve serve flags]"
    )
    up.add_argument(
        "--workers",
        type=int,
        default=ClusterOptions.workers,
        metavar="N",
        help="Ray worker nodes (default: %(default)s)",
    )
    up.add_argument(
        "--router-nodes",
        type=int,
        default=ClusterOptions.router_nodes,
        metavar="K",
        help="Ray nodes for routers only, and K routers on them (default: %(default)s: the router on the head)",
    )
    up.add_argument(
        "--expert-workers",
        type=int,
        metavar="M",
        help="the server's expert workers (default: one per worker node)",
    )
    up.add_argument("--model", metavar="DIR", help="checkpoint directory (default: the built-in tiny model)")
    up.add_argument("--http-port", type=int, metavar="P", help="default: the server's; 0: a free one")
    up.add_argument("--grpc-port", type=int, metavar="P", help="default: the server's; 0: a free one")
    up.add_argument("--ray-port", type=int, metavar="P", help="the head's GCS port (default: a free one)")
    up.add_argument(
        "--node-cpus",
        type=int,
        default=ClusterOptions.node_cpus,
        metavar="C",
        help="logical CPUs of each worker node (default: %(default)s)",
    )
    up.add_argument(
        "--head-cpus",
        type=int,
        default=ClusterOptions.head_cpus,
        metavar="C",
        help="logical CPUs of the head (default: %(default)s)",
    )
    up.add_argument(
        "--slots-per-node",
        type=int,
        default=ClusterOptions.slots_per_node,
        metavar="S",
        help="expert workers one worker node may host (default: %(default)s)",
    )
    up.add_argument(
        "--node-timeout",
        dest="node_timeout_s",
        type=float,
        default=ClusterOptions.node_timeout_s,
        metavar="SECONDS",
        help="give up on a Ray node not up after this long (default: %(default)s)",
    )
    up.add_argument(
        "--server-timeout",
        dest="server_timeout_s",
        type=float,
        default=ClusterOptions.server_timeout_s,
        metavar="SECONDS",
        help="give up on a server not ready after this long (default: %(default)s)",
    )
    status = sub.add_parser("status", help="what runs: nodes, server, addresses, /healthz")
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    down = sub.add_parser("down", help="stop exactly what `up` started")
    down.add_argument(
        "--timeout",
        dest="stop_timeout_s",
        type=float,
        metavar="SECONDS",
        help="SIGKILL what has not stopped after SIGTERM this long (default: the one `up` had)",
    )
    add = sub.add_parser("add-node", help="start one more worker node (or router node)")
    add.add_argument(
        "--router", action="store_true", help="a router node (then `moe-serve routers N` to use it)"
    )
    kill = sub.add_parser("kill-node", help="SIGKILL a worker or router node's processes (a node failure)")
    kill.add_argument("index", type=int, help="the node's index in `status` (1..)")
    for p in (up, status, down, sub.choices["add-node"], kill):
        p.add_argument(
            "--base-dir", metavar="DIR", help=f"state, logs and Ray temp dirs (default: {default_base_dir()})"
        )
    return parser


def format_status(s: ClusterStatus) -> str:
    if not s.nodes:
        return f"no cluster in {s.base_dir}"
    lines = [
        f"cluster in {s.base_dir}: Ray {s.ray_address} (token auth), {'running' if s.running else 'stopped'}"
    ]
    lines.append(f"{'node':>4}  {'role':<6}  {'pid':>7}  {'alive':<5}  {'node id':<8}  {'procs':>5}  actors")
    for n in s.nodes:
        lines.append(
            f"{n.index:>4}  {n.role:<6}  {n.pid:>7}  {'yes' if n.alive else 'no':<5}  {n.node_id[:8]:<8}  "
            f"{n.processes:>5}  {', '.join(n.actors) or '-'}"
        )
    if s.server_pid is not None:
        lines.append(f"server pid {s.server_pid} {'alive' if s.server_alive else 'not running'}")
    if s.http_url:
        lines.append(f"HTTP {s.http_url}  gRPC {s.grpc_target}")
    if s.health:
        lines.append(f"/healthz: {s.health}")
    return "\n".join(lines)


def run(args: argparse.Namespace, server_args: list[str]) -> int:
    if args.command == "up":
        fields = {f.name for f in dataclasses.fields(ClusterOptions)}
        given = {k: v for k, v in vars(args).items() if k in fields and v is not None}
        cluster = LocalCluster(args.base_dir, ClusterOptions(**given, server_args=tuple(server_args)))
        s = cluster.up()
        print(format_status(s))
        print(f"stop with: {PROG} down" + (f" --base-dir {args.base_dir}" if args.base_dir else ""))
        return 0
    if server_args:
        raise LauncherError(f"flags after `--` are for `up` only: {server_args}")
    cluster = LocalCluster(args.base_dir)
    if args.command == "status":
        s = cluster.status()
        print(json.dumps(dataclasses.asdict(s), indent=2) if args.json else format_status(s))
        return 0 if s.running else 1
    if args.command == "down":
        if args.stop_timeout_s is not None:
            cluster.options = dataclasses.replace(cluster.options, stop_timeout_s=args.stop_timeout_s)
        stopped = cluster.down()
        print(f"stopped {stopped} processes" if stopped else f"nothing running in {cluster.base_dir}")
        return 0
    if args.command == "add-node":
        print(f"{'router' if args.router else 'worker'} node {cluster.add_node(router=args.router)} up")
        return 0
    killed = cluster.kill_node(args.index)
    print(f"killed node {args.index} ({len(killed)} processes)")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    server_args: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, server_args = argv[:split], argv[split + 1 :]
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="cluster: %(message)s", stream=sys.stderr)
    logging.getLogger("cluster").setLevel(logging.INFO)  # progress of up / down; not httpx's requests
    try:
        return run(args, server_args)
    except (LauncherError, ValueError) as e:
        message, _, tail = str(e).partition("\n")
        print(f"{PROG}: error: {message}", file=sys.stderr)
        if tail:
            print(tail, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
