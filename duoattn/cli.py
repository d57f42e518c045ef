"""The ``duoattn`` command line; the only place that reads argv.

Each sub-command has an ``add_<name>`` function that declares its flags and a ``run_<name>`` function that turns
the parsed flags into the dataclass config of its module and runs it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the modules behind each command are imported only when it runs
    from .eval.harness import Task


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


# --------------------------------------------------------------------------------------------------- eval
def _add_eval_common(p: argparse.ArgumentParser, task: str) -> None:
    p.add_argument("--out", default=f"runs/eval-{task}", help=f"output directory (default runs/eval-{task}); "
                   "rerunning with the same settings continues an interrupted run")
    p.add_argument("--model", default=None, help="HF id, directory or .gguf (default: embedded SmolLM2-135M)")
    p.add_argument("--pattern", default=None, help="pattern directory for 'duo' (default: the shipped one, if any)")
    p.add_argument("--methods", default="full,duo,streaming",
                   help="comma-separated: full, duo, streaming, random (default full,duo,streaming)")
    p.add_argument("--sparsity", type=_floats, default=[0.5],
                   help="fractions of streaming heads for duo and random, e.g. 0,0.25,0.5,0.75,0.9 (default 0.5)")
    p.add_argument("--random-seeds", type=int, default=3, help="seeds of the random-heads baseline (default 3)")
    p.add_argument("--sink", type=int, default=None, help="streaming sink tokens (default: the pattern's, else 64)")
    p.add_argument("--recent", type=int, default=None, help="streaming recent tokens (default: pattern's, else 256)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="cap on every task's generation budget")
    p.add_argument("--prefill-chunk-size", type=int, default=None, help="prefill in chunks of this many tokens")
    p.add_argument("--chat-template", action="store_true", help="wrap prompts in the tokenizer's chat template")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="torch dtype (default: float32 on CPU, bfloat16 on GPU)")


def add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="accuracy of full / duo / streaming / random heads, side by side")
    tasks = p.add_subparsers(dest="eval_task", required=True)
    niah = tasks.add_parser("niah", help="needle in a haystack over lengths x depths, with heatmaps")
    _add_eval_common(niah, "niah")
    niah.add_argument("--lengths", type=_ints, default=[1024, 2048, 4096, 8192], help="tokens per prompt")
    niah.add_argument("--depths", type=_floats, default=[0.0, 0.25, 0.5, 0.75, 1.0], help="needle depths in [0, 1]")
    niah.add_argument("--needle", default=None, help="the sentence hidden in the haystack")
    niah.add_argument("--question", default=None, help="the question asked about it")
    niah.add_argument("--answer", default=None, help="the words a correct answer contains (scored by word recall)")
    niah.add_argument("--answer-prefix", default=None, help="the start of the answer the model continues")
    niah.add_argument("--haystack", nargs="+", default=None, help="text files to use instead of the essays")
    ruler = tasks.add_parser("ruler", help="RULER tasks generated locally, RULER string-match scoring")
    _add_eval_common(ruler, "ruler")
    ruler.add_argument("--tasks", default=None, help="comma-separated RULER tasks (default niah_*, vt, cwe, fwe, qa_1)")
    ruler.add_argument("--lengths", type=_ints, default=[2048, 4096], help="tokens per prompt, generation included")
    ruler.add_argument("--samples", type=int, default=5, help="prompts per task and length (default 5)")
    ruler.add_argument("--seed", type=int, default=42)
    passkey = tasks.add_parser("passkey", help="the demo's quick passkey check")
    _add_eval_common(passkey, "passkey")
    passkey.add_argument("--lengths", type=_ints, default=[1024, 2048, 4096], help="prompt lengths in tokens")
    passkey.add_argument("--samples", type=int, default=3, help="passkeys per length (default 3)")
    passkey.add_argument("--seed", type=int, default=20261129)


def _eval_task(args: argparse.Namespace) -> Task:
    if args.eval_task == "niah":
        from .eval.niah import NiahTask

        given = {k: getattr(args, k) for k in ("needle", "question", "answer", "answer_prefix")}
        return NiahTask(lengths=args.lengths, depths=args.depths, haystack=args.haystack,
                        **{k: v for k, v in given.items() if v is not None})
    if args.eval_task == "ruler":
        from .eval.ruler import DEFAULT_TASKS, RulerTask

        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else list(DEFAULT_TASKS)
        return RulerTask(tasks=tasks, lengths=args.lengths, samples_per_task=args.samples, seed=args.seed)
    from .eval.passkey import PasskeyTask

    return PasskeyTask(lengths=args.lengths, samples_per_length=args.samples, seed=args.seed)


def run_eval(args: argparse.Namespace) -> None:
    from .eval.harness import EvalConfig, run_eval as evaluate

    config = EvalConfig(
        out_dir=args.out,
        model=args.model,
        pattern=args.pattern,
        methods=args.methods,
        sparsities=args.sparsity,
        random_seeds=args.random_seeds,
        sink=args.sink,
        recent=args.recent,
        max_new_tokens=args.max_new_tokens,
        prefill_chunk_size=args.prefill_chunk_size,
        chat_template=args.chat_template,
        device=args.device,
        dtype=args.dtype,
    )
    evaluate(config, _eval_task(args))


# ------------------------------------------------------------------------------------------ quant-passkey
def add_quant_passkey(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quant-passkey", help="passkey accuracy of DuoAttention with an int8 / int4 KV cache")
    p.add_argument("--out", required=True, help="output directory (results.json, passkey.png, config.json)")
    p.add_argument("--model", default=None, help="HF id, directory or .gguf (default: embedded SmolLM2-135M)")
    p.add_argument("--pattern", default=None, help="pattern directory (default: random gates, --pattern-seed)")
    p.add_argument("--pattern-seed", type=int, default=0)
    p.add_argument("--sparsity", type=_fraction, default=0.5, help="fraction of streaming heads (default 0.5)")
    p.add_argument("--methods", default="duo", help="comma-separated: duo, full (default duo)")
    p.add_argument("--kv-bits", type=_ints, default=[16, 8, 4], help="KV cache bits to compare (default 16,8,4)")
    p.add_argument("--kv-group-size", type=int, default=None, help="channels per scale (default head_dim)")
    p.add_argument("--weight-bits", type=int, default=16, choices=[16, 8])
    p.add_argument("--lengths", type=_ints, default=[2048, 4096], help="prompt lengths in tokens")
    p.add_argument("--samples", type=int, default=20, help="prompts per length")
    p.add_argument("--sink", type=int, default=64)
    p.add_argument("--recent", type=int, default=256)
    p.add_argument("--prefill-chunk-size", type=int, default=None)
    p.add_argument("--device", default=None)


def run_quant_passkey(args: argparse.Namespace) -> None:
    from .quant.accuracy import QuantPasskeyConfig, run_quant_passkey as run

    run(
        QuantPasskeyConfig(
            out=args.out,
            model=args.model,
            pattern=args.pattern,
            pattern_seed=args.pattern_seed,
            sparsity=args.sparsity,
            methods=[m.strip() for m in args.methods.split(",") if m.strip()],
            kv_bits=args.kv_bits,
            kv_group_size=args.kv_group_size,
            weight_bits=args.weight_bits,
            lengths=args.lengths,
            samples=args.samples,
            sink=args.sink,
            recent=args.recent,
            prefill_chunk_size=args.prefill_chunk_size,
            device=args.device,
        )
    )


# -------------------------------------------------------------------------------------------- quant-bench
def add_quant_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quant-bench", help="context capacity and decode speed with int8 / int4 KV and 8-bit weights")
    p.add_argument("--out", required=True, help="output directory (results.json, capacity.png, config.json)")
    p.add_argument("--shape", default="llama-3-8b", help="model shape with random weights (llama-3-8b, tiny)")
    p.add_argument("--retrieval", type=_floats, default=[1.0, 0.5, 0.25], help="retrieval-head ratios")
    p.add_argument("--kv-bits", type=_ints, default=[16, 8, 4])
    p.add_argument("--weight-bits", type=_ints, default=[16, 8])
    p.add_argument("--decode-len", type=int, default=1 << 20, help="context of the decode timing (tokens)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--sink", type=int, default=128)
    p.add_argument("--recent", type=int, default=256)
    p.add_argument("--fill-chunk", type=int, default=1 << 16)
    p.add_argument("--memory-budget-gib", type=float, default=None, help="KV memory (default: free GPU memory)")
    p.add_argument("--reserve-gib", type=float, default=3.0)
    p.add_argument("--no-capacity-check", action="store_true", help="estimate capacity without filling the cache")
    p.add_argument("--device", default=None)


def run_quant_bench(args: argparse.Namespace) -> None:
    from .quant.bench import QuantBenchConfig, run_quant_bench as run

    run(
        QuantBenchConfig(
            out=args.out,
            shape=args.shape,
            retrieval=args.retrieval,
            kv_bits=args.kv_bits,
            weight_bits=args.weight_bits,
            decode_len=args.decode_len,
            steps=args.steps,
            warmup=args.warmup,
            sink=args.sink,
            recent=args.recent,
            fill_chunk=args.fill_chunk,
            memory_budget_gib=args.memory_budget_gib,
            reserve_gib=args.reserve_gib,
            check_capacity=not args.no_capacity_check,
            device=args.device,
        )
    )


COMMANDS: dict[str, tuple[Callable[[argparse._SubParsersAction], None], Callable[[argparse.Namespace], None]]] = {
    "demo": (add_demo, run_demo),
    "eval": (add_eval, run_eval),
    "quant-passkey": (add_quant_passkey, run_quant_passkey),
    "quant-bench": (add_quant_bench, run_quant_bench),
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
