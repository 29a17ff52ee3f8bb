"""`moe-serve`: the command line, a thin layer that parses flags and calls the Engine.

Subcommands live in `COMMANDS` (name -> how to add its flags, what to run), so a new one is one
entry. Flag defaults are read from the signatures of `Engine.from_pretrained` and `Engine.generate`,
so the API stays the one place that states them. Errors a user can cause (a bad flag value, a
directory that is not a checkpoint, a config we do not serve) are `ValueError`s below; they are
printed here as one `moe-serve: error: ...` line with exit status 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from expert_workers.kernels import KERNELS
from router_service.engine import DTYPES, Engine

PROG = "moe-serve"


def _defaults(fn: Callable) -> dict:
    return {
        name: p.default
        for name, p in inspect.signature(fn).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


ENGINE_DEFAULTS = _defaults(Engine.from_pretrained)
GENERATE_DEFAULTS = _defaults(Engine.generate)
MAX_NEW_TOKENS = 32  # the API has no default for it; this is the command line's


# ---- shared flag groups ---------------------------------------------------------------------------


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Which checkpoint to load and how to run it; `engine_from_args` turns them into an Engine."""
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        metavar="DIR",
        type=Path,
        help="Hugging Face checkpoint directory (default: the built-in tiny DeepSeek-V3, built on first use)",
    )
    g.add_argument(
        "--workers",
        dest="num_workers",
        metavar="N",
        type=int,
        default=ENGINE_DEFAULTS["num_workers"],
        help="expert workers (default: %(default)s)",
    )
    g.add_argument(
        "--dtype", choices=list(DTYPES), default=ENGINE_DEFAULTS["dtype"], help="default: %(default)s"
    )
    g.add_argument(
        "--device",
        metavar="DEV",
        default=ENGINE_DEFAULTS["device"],
        help="cpu, cuda, cuda:N or auto (default)",
    )
    g.add_argument(
        "--expert-kernel",
        choices=["auto", *KERNELS],
        default=ENGINE_DEFAULTS["expert_kernel"],
        help="grouped expert matmul (default: %(default)s, chosen by device and dtype)",
    )


def resolve_model_dir(model: Path | None) -> Path:
    from router_service.default_model import default_model_dir, default_model_path

    if model is not None:
        return model
    if not default_model_path().is_dir():
        print(f"{PROG}: building the default model in {default_model_path()} (first use)", file=sys.stderr)
    return default_model_dir()


def engine_from_args(args: argparse.Namespace) -> Engine:
    return Engine.from_pretrained(
        args.model_dir,
        num_workers=args.num_workers,
        dtype=args.dtype,
        device=args.device,
        expert_kernel=args.expert_kernel,
    )


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load a tokenizer from {model_dir}: {e}") from e


# ---- subcommands ----------------------------------------------------------------------------------


def add_make_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("outdir", metavar="OUTDIR", type=Path, help="directory to write the checkpoint into")


def run_make_model(args: argparse.Namespace) -> None:
    from router_service.default_model import make_default_model

    print(make_default_model(args.outdir))


def add_generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument(
        "--max-new-tokens", metavar="N", type=int, default=MAX_NEW_TOKENS, help="default: %(default)s"
    )
    p.add_argument(
        "--temperature",
        metavar="T",
        type=float,
        default=GENERATE_DEFAULTS["temperature"],
        help="0 is greedy (default: %(default)s)",
    )
    p.add_argument(
        "--top-p", metavar="P", type=float, default=GENERATE_DEFAULTS["top_p"], help="default: %(default)s"
    )
    p.add_argument(
        "--seed", metavar="N", type=int, default=GENERATE_DEFAULTS["seed"], help="makes sampling reproducible"
    )
    add_engine_args(p)


def run_generate(args: argparse.Namespace) -> None:
    args.model_dir = resolve_model_dir(args.model)
    with engine_from_args(args) as engine:  # validates the config before any weight is read
        tokenizer = load_tokenizer(args.model_dir)
        enc = tokenizer(args.prompt, return_tensors="pt")
        out = engine.generate(
            enc["input_ids"],
            args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
            attention_mask=enc["attention_mask"],
        )
    new_ids = out[0, enc["input_ids"].shape[1] :]  # [n]: only the continuation
    print(tokenizer.decode(new_ids, skip_special_tokens=True))


@dataclass(frozen=True)
class Command:
    help: str
    add_args: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]


COMMANDS = {
    "make-model": Command(
        "write the built-in tiny DeepSeek-V3 checkpoint (random weights) to OUTDIR",
        add_make_model_args,
        run_make_model,
    ),
    "generate": Command("continue a prompt with a MoE model", add_generate_args, run_generate),
}


# ---- entry point ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Expert-parallel serving of Mixture-of-Experts LLMs."
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO) to stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, parents=[common], help=cmd.help, description=cmd.help)
        cmd.add_args(p)
    return parser


def setup_logging(verbose: bool) -> None:
    """Our logs at INFO with -v, WARNING otherwise; transformers' progress bars and advice off."""
    import transformers

    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity(logging.WARNING if verbose else logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        return COMMANDS[args.command].run(args) or 0
    except ValueError as e:  # ConfigError, CheckpointError and the Engine's input checks
        message = " ".join(str(e).split())  # one line, whatever the exception's layout
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. a cache or output directory we may not write
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
