"""The subcommands of the `smallthinker` command: their arguments, checks of the user's input, and runs.

Each command checks what a user most often gets wrong (a path that is not there, a checkpoint of another model
family, a truncated weights file) before the heavy libraries load, and raises `UsageError` or the library's own
error types; `smallthinker.cli` turns those into one `error:` line and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".txt", ".csv")


class UsageError(ValueError):
    """The command line asks for something that cannot work; the message says what to do instead."""


@dataclass(frozen=True)
class Command:
    name: str
    summary: str
    description: str
    examples: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]
    takes_overrides: bool = False
    progress_bars: bool = True
    """Whether library progress bars show without --verbose (the demo and evaluation print their own lines)."""


def quiet_libraries(verbose: bool, progress_bars: bool = True) -> None:
    """Progress bars and notices of datasets / transformers / lm-eval only with --verbose (`progress_bars=False`:
    every tqdm bar, lm-eval's included).

    Environment variables, because the libraries read them when first imported (after this runs).
    """
    if verbose:
        return
    if not progress_bars:
        os.environ.setdefault("TQDM_DISABLE", "1")
    for key in ("HF_DATASETS_DISABLE_PROGRESS_BARS", "HF_HUB_DISABLE_PROGRESS_BARS"):
        os.environ.setdefault(key, "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging

    for name in ("lm_eval", "lm-eval", "datasets", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)


def say(message: str) -> None:
    """A note on stderr, from the main process only (every rank of a launched run checks the same inputs)."""
    if _is_main_process():
        print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# Input checks shared by the commands
# ------------------------------------------------------------------------------------------------
def looks_like_hub_id(value: str) -> bool:
    """`org/name` that is not a local path: left to the hub (or its cache) to resolve."""
    return value.count("/") == 1 and not value.startswith((".", "/", "~")) and not Path(value).exists()


def require_checkpoint(value: str, what: str) -> Path:
    """A local, intact SmallThinker checkpoint directory (CheckpointFileError naming the problem otherwise)."""
    from smallthinker.integrity import require_smallthinker_checkpoint

    path = Path(value)
    if not path.exists():
        raise UsageError(f"{what} {value} does not exist")
    return require_smallthinker_checkpoint(path)


def check_data_sources(cfg: Any) -> None:
    """Local data files named by the config must exist and hold something (files inside the synthetic data
    folder are made when the run starts)."""
    synthetic = Path(cfg.synthetic_dir).resolve() if cfg.synthetic_dir else None
    for source in cfg.data.get("sources") or []:
        raw = source.get("path") if isinstance(source, dict) else None
        if not raw or looks_like_hub_id(str(raw)):
            continue
        path = Path(raw)
        if not path.exists():
            if synthetic is not None and path.resolve().is_relative_to(synthetic):
                continue
            if path.suffix in DATA_SUFFIXES or "/" in str(raw):
                raise UsageError(f"data source {raw} does not exist; fix --data.sources or the recipe")
            continue
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.suffix in DATA_SUFFIXES]
        if not any(has_content(f) for f in files):
            raise UsageError(f"data source {raw} is empty; give a file with at least one document")


def has_content(path: Path, probe: int = 1 << 20) -> bool:
    """Whether a data file holds more than whitespace (blank lines make no documents)."""
    with path.open("rb") as f:
        return bool(f.read(probe).strip())


# ------------------------------------------------------------------------------------------------
# pretrain / sft
# ------------------------------------------------------------------------------------------------
def add_train_arguments(parser: argparse.ArgumentParser, task: str) -> None:
    parser.add_argument(
        "--config",
        default=f"{task}_tiny",
        help=f"a recipe name ({task}_tiny, {task}_4b, ...) or a YAML file (default {task}_tiny)",
    )
    parser.add_argument(
        "--resume", help="'latest' (newest intact checkpoint of run_dir) or a checkpoint folder"
    )
    parser.add_argument("--verbose", action="store_true", help="show dataset and library progress output")


def train_examples(task: str) -> str:
    if task == "pretrain":
        return """examples:
  smallthinker pretrain                                   # recipe pretrain_tiny: offline, about 80 s on 2 cores
  smallthinker pretrain --max_steps=100 --optim.lr=1e-3   # any config field: --section.field=value
  smallthinker pretrain --resume latest                   # continue after Ctrl-C
  accelerate launch --config_file configs/accelerate/ddp.yaml -m smallthinker pretrain --config pretrain_4b

Ctrl-C (SIGINT) or SIGTERM finishes the step, writes a checkpoint and prints the command that resumes."""
    return """examples:
  smallthinker sft                                         # recipe sft_tiny, from runs/pretrain_tiny
  smallthinker sft --model.init_from=runs/pretrain_tiny/checkpoints/step_00000900 --max_steps=50
  smallthinker sft --config sft_4b --model.init_from=PowerInfer/SmallThinker-4BA0.6B-Instruct"""


def split_overrides(extra: list[str]) -> list[str]:
    bad = [item for item in extra if not item.startswith("--") or "=" not in item]
    if bad:
        raise UsageError(
            f"unrecognised arguments {' '.join(bad)}: config overrides are written --section.field=value "
            "(e.g. --max_steps=100)"
        )
    return extra


def load_run_config(args: argparse.Namespace, task: str) -> Any:
    from smallthinker.train.config import load_train_config

    overrides = split_overrides(args.overrides)
    if args.resume:
        overrides.append(f"--checkpoint.resume={args.resume}")
    cfg = load_train_config(args.config, overrides)
    if cfg.task != task:
        raise UsageError(f"{args.config} is a {cfg.task} recipe; run it with `smallthinker {cfg.task}`")
    return cfg


def check_inputs(cfg: Any) -> None:
    """The data and start weights a run names, before any heavy library loads."""
    check_data_sources(cfg)
    init = cfg.model.init_from
    if init and not cfg.checkpoint.resume and not looks_like_hub_id(init):
        if not Path(init).exists():
            raise UsageError(
                f"model.init_from {init} does not exist; train it first (e.g. `smallthinker pretrain`) or pass "
                "--model.init_from=CHECKPOINT_DIR"
            )
        require_checkpoint(init, "model.init_from")


def resolve_resume(cfg: Any) -> Path | None:
    """The checkpoint a run resumes from, with notes on finished runs and a changed LR horizon."""
    if not cfg.checkpoint.resume:
        return None
    from smallthinker.train import checkpoint as ckpt
    from smallthinker.train.config import parse_yaml

    path = ckpt.resolve_resume(cfg.checkpoint.resume, cfg.run_dir)
    cfg.checkpoint.resume = str(path)  # resolved once: `latest` is not looked up (and reported) twice
    saved = parse_yaml((path / "train_config.yaml").read_text())
    step = ckpt.read_trainer_state(path).step
    before = saved["schedule"].get("total_steps") or saved["max_steps"]
    now = cfg.schedule.total_steps or cfg.max_steps
    if step < cfg.max_steps and before != now:
        say(
            f"note: the LR schedule horizon changed from {before} to {now} steps, so the learning rate continues "
            f"on a stretched curve from step {step}; pass --schedule.total_steps={before} to keep the original "
            "schedule"
        )
    say(f"resuming from {path} (step {step})")
    return path


def finished_already(cfg: Any, resume_path: Path | None) -> bool:
    if resume_path is None:
        return False
    from smallthinker.train import checkpoint as ckpt

    step = ckpt.read_trainer_state(resume_path).step
    if step < cfg.max_steps:
        return False
    say(
        f"{cfg.run_dir} is finished: its checkpoint {resume_path.name} is at step {step} and max_steps is "
        f"{cfg.max_steps}; nothing to do. To train further, raise --max_steps (e.g. --max_steps={2 * step})."
    )
    return True


def resume_command(args: argparse.Namespace) -> str:
    """The command line that continues this run: the same arguments with `--resume latest`."""
    kept, skip = [], False
    for item in args.argv:
        if skip:
            skip = False
            continue
        if item == "--resume":
            skip = True
            continue
        if not item.startswith("--resume="):
            kept.append(item)
    return shlex.join([*args.invocation, *kept, "--resume", "latest"])


def train_summary(cfg: Any, result: Any, seconds: float, plots: Path | None) -> str:
    losses = [r["loss"] for r in result.history if "loss" in r]
    final = sum(losses[-10:]) / len(losses[-10:]) if losses else float("nan")
    lines = [
        f"{cfg.task} done: steps {result.start_step} -> {result.step}, {result.tokens_seen:,} tokens seen, "
        f"final loss {final:.3f} (mean of the last {min(10, len(losses))} logged steps), {seconds:.0f} s",
        f"  checkpoint: {result.last_checkpoint}",
        f"  metrics:    {Path(cfg.run_dir) / 'metrics.jsonl'}",
    ]
    if plots is not None:
        lines.append(f"  plots:      {plots}")
    return "\n".join(lines)


def render_plots(run_dir: Path) -> Path | None:
    from smallthinker.train.plots import plot_run

    try:
        made = plot_run(run_dir)
    except (OSError, ValueError) as err:  # plots are a convenience: a failure must not fail the run
        say(f"no plots: {err}")
        return None
    return made[0].parent if made else None


def run_training(args: argparse.Namespace, task: str) -> int:
    cfg = load_run_config(args, task)
    check_inputs(cfg)
    resume_path = resolve_resume(cfg)
    if finished_already(cfg, resume_path):
        return 0
    from smallthinker.synthetic.prepare import prepare_for_run
    from smallthinker.train.loop import train

    started = time.perf_counter()
    # The synthetic corpus and tokenizer a recipe names are made on first use (main process first).
    result = train(cfg, prepare_for_run)
    args.result = result  # for callers that run the command in-process (tests, notebooks)
    if result.stopped_by is not None:
        name = signal.Signals(result.stopped_by).name
        say(f"stopped by {name} after step {result.step}; checkpoint {result.last_checkpoint}")
        say(f"resume with:\n  {resume_command(args)}")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            say(
                "  (started by a launcher: run it the same way, e.g. accelerate launch ... -m smallthinker ...)"
            )
        return 128 + result.stopped_by
    plots = render_plots(Path(cfg.run_dir)) if _is_main_process() else None
    if _is_main_process():
        print(train_summary(cfg, result, time.perf_counter() - started, plots), flush=True)
    return 0


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


# ------------------------------------------------------------------------------------------------
# merge
# ------------------------------------------------------------------------------------------------
def add_merge_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--inputs", nargs="+", required=True, help="checkpoint directories (same config)")
    parser.add_argument("--weights", nargs="+", type=float, required=True, help="one weight per input")
    parser.add_argument("--out", required=True, help="output checkpoint directory")
    parser.add_argument(
        "--no-normalize", action="store_true", help="use weights as given (need not sum to 1)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")


def run_merge(args: argparse.Namespace) -> int:
    for value in args.inputs:
        require_checkpoint(value, "merge input")
    from smallthinker.merge import merge_checkpoints

    out = merge_checkpoints(
        args.inputs, args.weights, args.out, normalize=not args.no_normalize, overwrite=args.overwrite
    )
    print(f"merged {len(args.inputs)} checkpoints -> {out}")
    return 0


# ------------------------------------------------------------------------------------------------
# chat
# ------------------------------------------------------------------------------------------------
def add_chat_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True, help="checkpoint directory (an expert store with --offload)"
    )
    parser.add_argument("--prompt", help="answer this one message and exit")
    parser.add_argument("--system", help="system message")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.6, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], default=None, help="default: the checkpoint's"
    )
    parser.add_argument(
        "--weight-format",
        choices=["bf16", "int8", "int4"],
        default=None,
        help="experts, attention and LM head in this format, computed in bf16, each new token in one native "
        "step (with --offload: the store's expert format); default: the weights as stored",
    )
    offload = parser.add_argument_group("offloading (experts on disk, --model is an expert store)")
    offload.add_argument("--offload", action="store_true", help="run from an expert store under a memory cap")
    offload.add_argument("--memory-budget", default="1GB", help="memory cap, e.g. 1GB, 300MB (default 1GB)")
    offload.add_argument(
        "--max-context", type=int, default=4096, help="tokens the KV cache holds (default 4096)"
    )
    offload.add_argument(
        "--overhead", default="128MiB", help="memory kept for activations and buffers (default 128MiB)"
    )


def check_chat_model(args: argparse.Namespace) -> None:
    from smallthinker.integrity import (
        CheckpointFileError,
        model_family_problem,
        require_smallthinker_checkpoint,
    )

    path = Path(args.model)
    if not path.exists():
        raise UsageError(f"--model {args.model} does not exist")
    if args.offload:
        if not (path / "manifest.json").is_file():
            hint = (
                f"; convert it first: smallthinker convert-store --src {path} --dst STORE"
                if (path / "config.json").is_file()
                else ""
            )
            raise UsageError(f"--offload needs an expert store, and {path} has no manifest.json{hint}")
        problem = model_family_problem(path)
        if problem:
            raise CheckpointFileError(problem)
    else:
        if (path / "manifest.json").is_file() and not any(path.glob("model*.safetensors")):
            raise UsageError(f"{path} is an expert store: add --offload --memory-budget SIZE")
        require_smallthinker_checkpoint(path)


def run_chat(args: argparse.Namespace) -> int:
    check_chat_model(args)
    from smallthinker.chat import ChatSession, SamplingConfig, chat_repl, load_chat_model

    sampling = SamplingConfig(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    model, tokenizer = load_chat_model(
        args.model,
        offload=args.offload,
        memory_budget=args.memory_budget,
        dtype=args.dtype,
        max_context=args.max_context,
        overhead=args.overhead,
        weight_format=args.weight_format,
    )
    session = ChatSession(model, tokenizer, system=args.system, sampling=sampling)
    if args.prompt is None:
        chat_repl(session)
        return 0
    reply = session.ask(args.prompt, stream_to=sys.stdout)
    print(reply.stats_line())
    return 0


# ------------------------------------------------------------------------------------------------
# evaluate
# ------------------------------------------------------------------------------------------------
def _batch_size(value: str) -> int | str:
    if value == "auto" or (value.isdigit() and int(value) > 0):
        return value if value == "auto" else int(value)
    raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {value!r}")


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--suite", required=True, help="one or more suites, comma-separated (see above)")
    parser.add_argument(
        "--model", required=True, help="checkpoint directory or hub id of a SmallThinker model"
    )
    parser.add_argument(
        "--tokenizer", help="tokenizer directory or hub id (default: the one saved with --model)"
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--data", type=Path, help="folder with mmlu/{dev,validation,test}.jsonl, gpqa/gpqa_diamond.jsonl"
    )
    source.add_argument(
        "--hub", action="store_true", help="cais/mmlu and Idavidrein/gpqa from the hub or its cache"
    )
    parser.add_argument("--limit", type=int, help="at most this many questions per task (per MMLU subject)")
    parser.add_argument(
        "--out", type=Path, default=Path("runs/eval"), help="results go to OUT/SUITE (default runs/eval)"
    )
    parser.add_argument(
        "--batch-size", type=_batch_size, default=8, help="requests per forward pass, or 'auto' (GPU)"
    )
    parser.add_argument("--max-gen-toks", type=int, help="generation budget of the CoT suites (default 4096)")
    parser.add_argument("--device", help="cpu, cuda, cuda:0 ... (default: cuda when available)")
    parser.add_argument("--dtype", default="auto", help="auto (the checkpoint's), bfloat16, float32")
    parser.add_argument("--verbose", action="store_true", help="show lm-eval's log")


def run_evaluate(args: argparse.Namespace) -> int:
    if not looks_like_hub_id(args.model):
        require_checkpoint(args.model, "--model")
    from smallthinker.eval import evaluate_suite, get_suite

    suites = [get_suite(name.strip()).name for name in args.suite.split(",")]
    for suite in suites:
        record = evaluate_suite(
            args.model,
            suite,
            args.out / suite,
            data_dir=args.data,
            hub=args.hub,
            tokenizer=args.tokenizer,
            limit=args.limit,
            batch_size=args.batch_size,
            max_gen_toks=args.max_gen_toks,
            device=args.device,
            dtype=args.dtype,
        )
        print((args.out / suite / "results.md").read_text())
        headline = record["headline"]
        print(f"{suite}: {headline['metric']} = {headline['value']:.4f} -> {args.out / suite}")
    return 0


# ------------------------------------------------------------------------------------------------
# convert-store
# ------------------------------------------------------------------------------------------------
def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--src", required=True, help="checkpoint directory (config.json + *.safetensors)")
    parser.add_argument("--dst", required=True, help="directory for the store (new or empty)")
    # The same names as smallthinker.inference.store.QUANT_MODES (not imported: --help stays instant).
    parser.add_argument(
        "--quant", choices=("none", "int8", "int4"), default="none", help="expert weight format"
    )
    parser.add_argument("--verify", action="store_true", help="read the store back and check every checksum")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing store in --dst")


def target_for_store(dst: Path, overwrite: bool) -> Path:
    """Where to convert into: `dst` itself when new or empty, else (with --overwrite, over a store only) a
    temporary sibling swapped in afterwards, so a failed conversion leaves the old store intact."""
    if not dst.exists() or (dst.is_dir() and not any(dst.iterdir())):
        return dst
    if not overwrite:
        raise FileExistsError(f"{dst} is not empty: choose another --dst or pass --overwrite")
    if not (dst / "manifest.json").is_file():
        raise UsageError(f"{dst} is not an expert store (no manifest.json); --overwrite replaces only stores")
    tmp = dst.parent / f".{dst.name}.converting-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def swap_in(tmp: Path, dst: Path) -> None:
    if tmp == dst:
        return
    old = dst.parent / f".{dst.name}.old-{os.getpid()}"
    dst.rename(old)
    tmp.rename(dst)
    shutil.rmtree(old)


def run_convert(args: argparse.Namespace) -> int:
    src, dst = require_checkpoint(args.src, "--src"), Path(args.dst)
    target = target_for_store(dst, args.overwrite)
    from smallthinker.inference.store import ExpertStore, convert_checkpoint

    try:
        convert_checkpoint(src, target, quant=args.quant)
        swap_in(target, dst)
    except BaseException:
        if target != dst:
            shutil.rmtree(target, ignore_errors=True)
        raise
    store = ExpertStore(dst)
    if args.verify:
        store.verify_all()
    print(
        f"wrote {dst}: {store.num_layers} layers x {store.num_experts} experts, "
        f"{store.record_bytes / 1e6:.2f} MB per expert, {store.expert_bytes_total / 1e9:.2f} GB of experts"
    )
    return 0


# ------------------------------------------------------------------------------------------------
# plot, kv-report, demo
# ------------------------------------------------------------------------------------------------
def add_plot_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a training run directory (holds metrics.jsonl)")
    parser.add_argument("--out", default=None, help="output folder (default RUN_DIR/plots)")


def run_plot(args: argparse.Namespace) -> int:
    from smallthinker.train.plots import plot_run

    for path in plot_run(args.run_dir, args.out):
        print(path)
    return 0


def add_kv_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="smallthinker-21b", help="model preset or config.json path")
    parser.add_argument("--tokens", type=int, default=16384, help="context length")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument(
        "--bytes-per-value", type=int, default=2, choices=(1, 2, 4), help="2 for bf16, 4 for fp32"
    )


def run_kv_report(args: argparse.Namespace) -> int:
    from smallthinker.kv_report import report

    if args.tokens < 1 or args.batch < 1:
        raise UsageError("--tokens and --batch must be positive")
    print(report(args.preset, args.tokens, args.batch, args.bytes_per_value))
    return 0


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    # Defaults live in QuickstartConfig; None here means "the demo's default" without importing torch for --help.
    parser.add_argument(
        "--out", type=Path, default=Path("runs/quickstart"), help="output folder (default runs/quickstart)"
    )
    parser.add_argument(
        "--data", type=Path, default=Path("data/generated/synthetic"), help="synthetic data folder"
    )
    parser.add_argument("--pretrain-steps", type=int, help="pre-training steps (default: the demo's)")
    parser.add_argument("--sft-steps", type=int, help="SFT steps (default: the demo's)")
    parser.add_argument("--eval-limit", type=int, default=None, help="questions per task (per MMLU subject)")
    parser.add_argument(
        "--reduced", action="store_true", help="the short version the tests run (under a minute)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier demo in --out")
    parser.add_argument("--verbose", action="store_true", help="show library progress output")


def run_demo(args: argparse.Namespace) -> int:
    from smallthinker.quickstart import (
        QuickstartConfig,
        offload_chat_command,
        reduced,
        run_quickstart,
        summary_table,
    )

    cfg = QuickstartConfig(
        out_dir=args.out, data_dir=args.data, eval_limit=args.eval_limit, overwrite=args.overwrite
    )
    if args.reduced:
        cfg = reduced(cfg)
    cfg.pretrain_steps = args.pretrain_steps or cfg.pretrain_steps
    cfg.sft_steps = args.sft_steps or cfg.sft_steps
    report = run_quickstart(cfg)
    print()
    print(summary_table(report))
    print(f"\nreport: {cfg.out_dir / 'report.md'}")
    print(
        f"chat with the offloaded model at its minimum budget:\n  {offload_chat_command(cfg.out_dir, report.numbers['offload'])}"
    )
    return 0


# ------------------------------------------------------------------------------------------------
# The table of commands
# ------------------------------------------------------------------------------------------------
COMMANDS: tuple[Command, ...] = (
    Command(
        "pretrain",
        "pre-train a SmallThinker model (recipes: pretrain_tiny, pretrain_4b, pretrain_21b)",
        "Pre-train with the shared training loop. Any config field is overridden as --section.field=value.",
        train_examples("pretrain"),
        lambda p: add_train_arguments(p, "pretrain"),
        lambda a: run_training(a, "pretrain"),
        takes_overrides=True,
    ),
    Command(
        "sft",
        "instruct-tune a checkpoint on chat data (recipes: sft_tiny, sft_4b)",
        "Supervised fine-tuning with the pre-training loop; the loss is on assistant tokens only.",
        train_examples("sft"),
        lambda p: add_train_arguments(p, "sft"),
        lambda a: run_training(a, "sft"),
        takes_overrides=True,
    ),
    Command(
        "merge",
        "interpolate checkpoints of one architecture",
        "Weighted linear interpolation of N checkpoints, streamed tensor by tensor and written atomically.",
        """example:
  smallthinker merge --inputs runs/sft_tiny/checkpoints/step_00000050 runs/sft_tiny/checkpoints/step_00000100 \\
      --weights 0.5 0.5 --out runs/merged""",
        add_merge_arguments,
        run_merge,
    ),
    Command(
        "chat",
        "chat with a checkpoint (or an expert store under a memory cap)",
        "Interactive chat (/reset, /exit) or one answer with --prompt; replies stream, then tokens/s.",
        """examples:
  smallthinker chat --model runs/quickstart/merged --prompt "What is the capital of the country Vugais?" --temperature 0
  smallthinker chat --model runs/quickstart/merged          # interactive
  smallthinker chat --model runs/quickstart/expert_store --offload --memory-budget 3MB --max-context 512 \\
      --overhead 512KiB""",
        add_chat_arguments,
        run_chat,
    ),
    Command(
        "evaluate",
        "MMLU / GPQA-Diamond through lm-evaluation-harness",
        "Suites: mmlu, mmlu_cot, mmlu_continuation, gpqa_diamond, gpqa_diamond_cot, gpqa_diamond_continuation.",
        """examples:
  smallthinker evaluate --suite mmlu,gpqa_diamond_continuation --model runs/quickstart/merged \\
      --data data/generated/synthetic/benchmarks --limit 20
  smallthinker evaluate --suite mmlu_cot,gpqa_diamond_cot --hub --model PowerInfer/SmallThinker-4BA0.6B-Instruct""",
        add_evaluate_arguments,
        run_evaluate,
    ),
    Command(
        "convert-store",
        "write the expert store the offload engine reads",
        "Experts go to one flat, aligned file with a crc32 per expert; the other weights to resident.safetensors.",
        """example:
  smallthinker convert-store --src runs/quickstart/merged --dst stores/merged --verify
  smallthinker chat --model stores/merged --offload --memory-budget 1GB""",
        add_convert_arguments,
        run_convert,
    ),
    Command(
        "plot",
        "PNG plots of a training run",
        "Loss and LR, expert load per layer, load balance, ReGLU neuron sparsity, from RUN_DIR/metrics.jsonl.",
        """example:
  smallthinker plot runs/pretrain_tiny            # writes runs/pretrain_tiny/plots/*.png""",
        add_plot_arguments,
        run_plot,
    ),
    Command(
        "kv-report",
        "KV-cache size of a model layout, hybrid vs all-global attention",
        "KV-cache bytes after N tokens: sliding-window layers keep only their window.",
        """example:
  smallthinker kv-report --preset smallthinker-21b --tokens 16384""",
        add_kv_arguments,
        run_kv_report,
    ),
    Command(
        "demo",
        "the whole pipeline offline on a tiny model: data, pre-training, SFT, merge, eval, offloaded chat",
        "Synthetic corpus and tokenizer -> pre-train -> SFT -> merge -> lm-eval -> chat through the offload "
        "engine under budgets smaller than the model -> runs/quickstart/report.md with plots.",
        """examples:
  smallthinker demo --overwrite      # about 3 minutes on 2 cores
  smallthinker demo --reduced --out runs/demo_small""",
        add_demo_arguments,
        run_demo,
        progress_bars=False,
    ),
)
