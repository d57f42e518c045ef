"""The ``duoattn`` command line; the only place that reads argv.

Each sub-command has an ``add_<name>`` function that declares its flags and a ``run_<name>`` function that turns
the parsed flags into the dataclass config of its module and runs it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


# --------------------------------------------------------------------------------------------------- demo
def add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="passkey retrieval: full attention vs DuoAttention vs StreamingLLM")
    p.add_argument("--model", default=None, help="HF id, directory or .gguf (default: embedded SmolLM2-135M)")
    p.add_argument("--pattern", default=None, help="pattern directory (default: the shipped SmolLM2 pattern)")
    p.add_argument("--sparsity", type=_fraction, default=0.5, help="fraction of streaming heads (default 0.5)")
    p.add_argument("--lengths", type=_ints, default=[1024, 2048, 4096], help="prompt lengths in tokens")
    p.add_argument("--samples", type=int, default=3, help="prompts per length")
    p.add_argument("--sink", type=int, default=None)
    p.add_argument("--recent", type=int, default=None)
    p.add_argument("--prefill-chunk-size", type=int, default=None)
    p.add_argument("--device", default=None)


def run_demo(args: argparse.Namespace) -> None:
    from .demo import DemoConfig, run_demo as demo

    demo(
        DemoConfig(
            model=args.model,
            pattern=args.pattern,
            sparsity=args.sparsity,
            lengths=args.lengths,
            samples=args.samples,
            sink=args.sink,
            recent=args.recent,
            prefill_chunk_size=args.prefill_chunk_size,
            device=args.device,
        )
    )


COMMANDS: dict[str, tuple[Callable[[argparse._SubParsersAction], None], Callable[[argparse.Namespace], None]]] = {
    "demo": (add_demo, run_demo),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="duoattn", description="DuoAttention for Hugging Face transformers")
    sub = parser.add_subparsers(dest="command", required=True)
    for add, _ in COMMANDS.values():
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command][1](args)
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as err:
        print(f"duoattn {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
