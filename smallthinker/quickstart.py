"""The whole mission on one machine, offline: data -> pre-training -> SFT -> merge -> evaluation -> offloaded chat.

Every stage uses the same library code a real run uses (the training loop, lm-eval, the offload engine); only the
data is synthetic and the model tiny. Results land in `out_dir`: `report.md`, `summary.json`, PNG plots and the
checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import smallthinker.modeling  # noqa: F401  (registers the model)
from smallthinker.chat import SamplingConfig, chat_once
from smallthinker.eval import evaluate_suite
from smallthinker.inference import convert_checkpoint, load_offloaded, minimum_budget
from smallthinker.merge import merge_checkpoints
from smallthinker.synthetic import prepare_synthetic
from smallthinker.synthetic.instructions import heldout_exact_match
from smallthinker.train.config import RECIPES_DIR, load_train_config
from smallthinker.train.loop import train
from smallthinker.train.plots import plot_run, subplots

# The tiny model's context and activations are small: reserving the engine's defaults (a 4096-token KV cache,
# 128 MiB of activations) would dwarf its weights and hide the point, a budget smaller than the model.
OFFLOAD_CONTEXT = 512
# The letter-scored suites are the classic protocols; the continuation suites score each answer's text, which
# measures what a model this small knows without asking it to master the multiple-choice letter format.
SUITES = ("mmlu", "mmlu_continuation", "gpqa_diamond", "gpqa_diamond_continuation")
OFFLOAD_OVERHEAD = "512KiB"


@dataclass
class QuickstartConfig:
    out_dir: Path = Path("runs/quickstart")
    data_dir: Path = Path("data/generated/synthetic")
    pretrain_steps: int = 900
    chat_mix: float = 0.3
    """Share of pre-training data drawn from chat-formatted questions and answers about the SFT entities (the
    rest is the corpus): what lets the model answer about the other entities too."""
    sft_steps: int = 100
    sft_lr: float = 1e-4
    """A gentle SFT: longer or stronger instruct-tuning on the SFT entities' chats overfits them and lowers the
    held-out accuracy (measured: 62 % -> 37 % after 200 steps at 5e-4)."""
    curve_points: int = 6
    """Pre-training checkpoints at which the held-out accuracy is measured (the learning curve)."""
    eval_limit: int | None = None
    """Questions per task (per MMLU subject) in the lm-eval runs; None = all."""
    heldout_questions: int | None = None
    """Held-out synthetic questions answered by generation (None = all of them)."""
    expert_cache_fraction: float = 0.25
    """Share of the expert bytes the offload budget leaves room for (on top of the minimum)."""
    overwrite: bool = False
    verbose: bool = False
    """Show lm-eval's progress bars and messages (by default the demo prints one line per stage)."""


def reduced(cfg: QuickstartConfig) -> QuickstartConfig:
    """The short run the tests use: every stage, few steps and questions."""
    return replace(cfg, pretrain_steps=20, sft_steps=10, eval_limit=4, heldout_questions=4, curve_points=2)


@dataclass
class Report:
    stages: list[dict[str, Any]] = field(default_factory=list)
    numbers: dict[str, Any] = field(default_factory=dict)
    plots: list[str] = field(default_factory=list)

    def stage(self, name: str, seconds: float, **details: Any) -> None:
        self.stages.append({"stage": name, "seconds": round(seconds, 1), **details})
        print(f"[quickstart] {name}: {seconds:.1f} s {details if details else ''}", flush=True)


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    return fn(), time.perf_counter() - start


def _prepare_out(cfg: QuickstartConfig) -> None:
    if cfg.out_dir.exists() and any(cfg.out_dir.iterdir()):
        if not cfg.overwrite:
            raise FileExistsError(
                f"{cfg.out_dir} already holds a quickstart run; pass --overwrite to replace it or --out for a "
                "new folder"
            )
        shutil.rmtree(cfg.out_dir)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)


def _train(
    preset: str, run_dir: Path, steps: int, data_dir: Path, source: str, extra: list[str], verbose: bool
) -> Path:
    """Run a shipped training recipe with its data source and run folder moved under the quickstart's folders."""
    overrides = [
        f"run_dir={run_dir}",
        f"max_steps={steps}",
        f"synthetic_dir={data_dir}",
        f"data.sources=[{source}]",
        "logging.tensorboard=false",
        f"logging.progress_bar={str(verbose).lower()}",  # the demo prints a line per stage
        *extra,
    ]
    result = train(load_train_config(RECIPES_DIR / preset, overrides))
    if result.stopped_by is not None:
        # Ctrl-C / SIGTERM: the stage has checkpointed and stopped; the demo must not go on to the next stage.
        raise StageStopped(result.stopped_by, result.last_checkpoint)
    return result.last_checkpoint


class StageStopped(KeyboardInterrupt):
    """A training stage of the demo stopped on a signal after writing its checkpoint."""

    def __init__(self, signum: int, checkpoint: Path | None) -> None:
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}; the stage's checkpoint is {checkpoint}")


def _losses(run_dir: Path) -> tuple[float, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    losses = [r["loss"] for r in records if "loss" in r]
    return losses[0], sum(losses[-10:]) / len(losses[-10:])


def _answer_fn(model: Any, tokenizer: Any) -> Callable[[str], str]:
    greedy = SamplingConfig(max_new_tokens=16, temperature=0.0)
    return lambda q: chat_once(model, tokenizer, [{"role": "user", "content": q}], greedy).text


def _heldout_accuracy(checkpoint: Path, rows: list[dict[str, str]]) -> float:
    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    return heldout_exact_match(rows, _answer_fn(model, tokenizer))


def _evaluate(checkpoint: Path, out: Path, data: Path, limit: int | None, verbose: bool) -> dict[str, float]:
    scores = {}
    with contextlib.nullcontext() if verbose else _stderr_to_devnull():
        for suite in SUITES:
            record = evaluate_suite(
                str(checkpoint), suite, out / suite, data_dir=data, limit=limit, batch_size=16
            )
            scores[suite] = record["headline"]["value"]
    return scores


@contextlib.contextmanager
def _stderr_to_devnull() -> Iterator[None]:
    """lm-eval draws progress bars and its helpers' subprocesses print to the stderr file descriptor itself;
    the demo's stage lines say what runs. Errors still surface: they are raised, not printed."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def _greedy_tokens(model: Any, prompt_ids: torch.Tensor, new_tokens: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(
            prompt_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
        )
    return out[0, prompt_ids.shape[1] :].tolist()


def _offload_chat(merged: Path, out: Path, question: str, prompt: str, fraction: float) -> dict[str, Any]:
    """Resident vs offloaded greedy chat reply and 64-token continuation of `prompt`, under budgets whose expert
    cache holds nothing beyond the minimum, `fraction` and half of the expert bytes."""
    store = out / "expert_store"
    convert_checkpoint(merged, store)
    tokenizer = AutoTokenizer.from_pretrained(merged)
    resident = AutoModelForCausalLM.from_pretrained(merged).eval()
    messages = [{"role": "user", "content": question}]
    greedy = SamplingConfig(max_new_tokens=32, temperature=0.0)
    reference = chat_once(resident, tokenizer, messages, greedy)
    prompt_ids = tokenizer(prompt, return_tensors="pt")["input_ids"][:, :32]
    reference_tokens = _greedy_tokens(resident, prompt_ids, 64)
    experts = [layer.block_sparse_moe.experts for layer in resident.model.layers]
    expert_bytes = sum(e.gate_up_proj.nbytes + e.down_proj.nbytes for e in experts)
    floor = minimum_budget(store, max_context=OFFLOAD_CONTEXT, overhead=OFFLOAD_OVERHEAD)
    runs = []
    for share in sorted({0.0, fraction, 0.5}):
        budget = floor + int(share * expert_bytes)
        model = load_offloaded(store, budget, max_context=OFFLOAD_CONTEXT, overhead=OFFLOAD_OVERHEAD)
        engine = model.offload_engine
        reply = chat_once(model, tokenizer, messages, greedy)
        engine.reset_stats()
        start = time.perf_counter()
        tokens = _greedy_tokens(model, prompt_ids, 64)
        seconds = time.perf_counter() - start
        stats = engine.stats()
        engine.close()
        runs.append(
            {
                "expert_share": share,
                "budget_bytes": budget,
                "expert_slots": engine.cache.num_slots,
                "identical_to_resident": reply.token_ids == reference.token_ids
                and tokens == reference_tokens,
                "hit_rate": stats["hit_rate"],
                "bytes_per_token": stats["bytes_per_token"],
                "tokens_per_s": len(tokens) / seconds,
                "reply": reply.text,
            }
        )
    return {
        "question": question,
        "resident_reply": reference.text,
        "model_bytes": sum(p.numel() * p.element_size() for p in resident.parameters()),
        "expert_bytes": expert_bytes,
        "minimum_budget_bytes": floor,
        "total_experts": sum(e.num_experts for e in experts),
        "runs": runs,
    }


def _plot_heldout_curve(curve: list[dict[str, Any]], pretrain_steps: int, path: Path, run_name: str) -> Path:
    """Held-out exact match over training: pre-training checkpoints, then SFT steps counted on from there."""
    fig, ax = subplots(figsize=(8, 4.2))
    colors = {"pre-training": "#4c72b0", "SFT": "#dd8452", "SFT + merged": "#55a868"}
    for stage, color in colors.items():
        points = [p for p in curve if p["stage"] == stage]
        offset = 0 if stage == "pre-training" else pretrain_steps
        xs = [offset + p["step"] for p in points]
        ys = [100 * p["exact_match"] for p in points]
        # At the last SFT step: a hollow diamond around that step's point, labelled below it.
        merged = stage == "SFT + merged"
        ax.plot(xs, ys, marker="D" if merged else "o", color=color, label=stage, markersize=11 if merged else 6,
                markerfacecolor="none" if merged else color, markeredgewidth=2 if merged else 1,
                linestyle="-" if stage == "pre-training" else "none")  # fmt: skip
        for x, y in zip(xs, ys):
            ax.annotate(f"{y:.0f} %", (x, y), textcoords="offset points", xytext=(0, -19 if merged else 6),
                        ha="center", fontsize="small", color=color if merged else "black")  # fmt: skip
    ax.axvline(pretrain_steps, color="grey", linestyle=":", linewidth=1)
    ax.set_ylim(0, 105)
    ax.set_xlabel("optimizer step (SFT steps counted after the pre-training steps)")
    ax.set_ylabel("held-out questions, exact match (%)")
    ax.set_title(f"{run_name}: answers about entities SFT never saw, over pre-training and SFT")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def offload_chat_command(out_dir: Path, offload: dict[str, Any]) -> str:
    """The `smallthinker chat` line that runs the demo's store at its minimum budget (same context and overhead
    as the demo's budgets, so the listed minimum is exactly what chat accepts)."""
    return shlex.join(
        ["smallthinker", "chat", "--model", str(out_dir / "expert_store"), "--offload",
         "--memory-budget", str(offload["minimum_budget_bytes"]), "--max-context", str(OFFLOAD_CONTEXT),
         "--overhead", OFFLOAD_OVERHEAD, "--temperature", "0", "--prompt", offload["question"]]
    )  # fmt: skip


def _plot_offload(offload: dict[str, Any], path: Path, run_name: str) -> Path:
    """Hit rate and decode speed per memory budget, each bar labelled with its value (a 0 % hit rate, the
    minimum budget's, must read as a measured zero rather than a missing bar)."""
    runs = offload["runs"]
    labels = [
        f"{r['budget_bytes'] / 1e6:.2f} MB\n({r['budget_bytes'] / offload['model_bytes']:.0%} of model)\n"
        f"{r['expert_slots']} of {offload['total_experts']} experts"
        for r in runs
    ]
    fig, (ax_hit, ax_speed) = subplots(1, 2, figsize=(10, 4))
    panels = (
        (ax_hit, [100 * r["hit_rate"] for r in runs], "expert cache hit rate (%)", "{:.1f} %", "#4c72b0"),
        (ax_speed, [r["tokens_per_s"] for r in runs], "decode speed (tokens/s)", "{:.1f}", "#55a868"),
    )
    for ax, values, ylabel, fmt, color in panels:
        bars = ax.bar(labels, values, color=color)
        ax.bar_label(bars, labels=[fmt.format(v) for v in values], padding=2)
        ax.set_ylabel(ylabel)
        ax.set_xlabel("memory budget")
        ax.set_ylim(0, max(max(values) * 1.2, 1.0))
        ax.tick_params(axis="x", labelsize="small")
    ax_hit.set_ylim(0, 110)
    fig.suptitle(
        f"{run_name}: offloaded decode of the merged SFT model under memory budgets "
        f"(model {offload['model_bytes'] / 1e6:.2f} MB)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def run_quickstart(cfg: QuickstartConfig) -> Report:
    """Run every stage, write `report.md` + `summary.json` + plots into `cfg.out_dir`, return the report."""
    # The tiny model's matrices are too small to split across cores: one thread avoids OpenMP spin-waits that
    # otherwise fight the offload engine's I/O threads (and anything else on the machine) for the cores. The
    # caller's setting is restored afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_stages(cfg)
    finally:
        torch.set_num_threads(threads)


def _run_stages(cfg: QuickstartConfig) -> Report:
    _prepare_out(cfg)
    torch.manual_seed(0)
    report, out = Report(), cfg.out_dir
    paths, s = _timed(lambda: prepare_synthetic(cfg.data_dir))
    report.stage("synthetic data + tokenizer", s, root=str(paths["root"]))
    heldout = [json.loads(x) for x in paths["heldout_qa"].read_text().splitlines() if x][
        : cfg.heldout_questions
    ]

    sources = (
        f"{{path: '{paths['train']}', text_field: text, weight: {1 - cfg.chat_mix}}}, "
        f"{{path: '{paths['chat_train']}', text_field: text, weight: {cfg.chat_mix}}}"
    )
    every = max(cfg.pretrain_steps // cfg.curve_points, 1)
    keep = f"checkpoint.keep_last={cfg.curve_points + 1}"
    base, s = _timed(
        lambda: _train(
            "pretrain_tiny.yaml", out / "pretrain", cfg.pretrain_steps, cfg.data_dir, sources,
            [f"checkpoint.every={every}", keep], cfg.verbose,
        )
    )  # fmt: skip
    first, last = _losses(out / "pretrain")
    report.stage(
        "pre-training", s, steps=cfg.pretrain_steps, loss_start=round(first, 3), loss_end=round(last, 3)
    )
    report.numbers["pretrain_loss"] = [first, last]

    scores, s = _timed(
        lambda: _evaluate(base, out / "eval_base", paths["benchmarks"], cfg.eval_limit, cfg.verbose)
    )
    report.stage("lm-eval, pre-trained model", s, **scores)
    report.numbers["eval_base"] = scores
    curve = [
        {
            "stage": "pre-training",
            "step": int(c.name.split("_")[1]),
            "exact_match": _heldout_accuracy(c, heldout),
        }
        for c in sorted((out / "pretrain" / "checkpoints").glob("step_*"))
    ]
    acc = curve[-1]["exact_match"]
    report.numbers["heldout_em_base"] = acc

    every = max(cfg.sft_steps // 2, 1)
    extra = [f"model.init_from={base}", f"checkpoint.every={every}", "checkpoint.keep_last=2",
             f"optim.lr={cfg.sft_lr}", f"schedule.warmup_steps={min(10, cfg.sft_steps // 10)}"]  # fmt: skip
    sft, s = _timed(
        lambda: _train(
            "sft_tiny.yaml",
            out / "sft",
            cfg.sft_steps,
            cfg.data_dir,
            f"{{path: '{paths['sft_train']}', messages_field: messages}}",
            extra,
            cfg.verbose,
        )
    )
    first, last = _losses(out / "sft")
    report.stage("SFT", s, steps=cfg.sft_steps, loss_start=round(first, 3), loss_end=round(last, 3))
    report.numbers["sft_loss"] = [first, last]

    checkpoints = sorted((out / "sft" / "checkpoints").glob("step_*"))[-2:]
    merged = out / "merged"
    _, s = _timed(lambda: merge_checkpoints(checkpoints, [0.5, 0.5], merged, progress=False))
    report.stage("merge", s, inputs=[c.name for c in checkpoints])

    acc_sft, s = _timed(lambda: _heldout_accuracy(merged, heldout))
    report.numbers["heldout_em_sft"] = acc_sft
    curve += [
        {"stage": "SFT", "step": int(c.name.split("_")[1]), "exact_match": _heldout_accuracy(c, heldout)}
        for c in checkpoints
    ]
    curve.append({"stage": "SFT + merged", "step": cfg.sft_steps, "exact_match": acc_sft})
    report.numbers["heldout_curve"] = curve
    report.numbers["heldout_questions"] = len(heldout)
    report.stage("held-out questions", s, before_sft=round(acc, 3), after_sft=round(acc_sft, 3))
    scores, s = _timed(
        lambda: _evaluate(merged, out / "eval_sft", paths["benchmarks"], cfg.eval_limit, cfg.verbose)
    )
    report.stage("lm-eval, SFT + merged model", s, **scores)
    report.numbers["eval_sft"] = scores

    prompt = json.loads(paths["validation"].read_text().splitlines()[0])["text"]
    offload, s = _timed(
        lambda: _offload_chat(merged, out, heldout[0]["question"], prompt, cfg.expert_cache_fraction)
    )
    report.stage("offloaded chat", s, identical=all(r["identical_to_resident"] for r in offload["runs"]))
    report.numbers["offload"] = offload

    plots = plot_run(out / "pretrain", out / "plots" / "pretrain") + plot_run(
        out / "sft", out / "plots" / "sft"
    )
    plots.append(_plot_offload(offload, out / "plots" / "offload_hit_rate.png", out.resolve().name))
    plots.append(
        _plot_heldout_curve(report.numbers["heldout_curve"], cfg.pretrain_steps,
                            out / "plots" / "heldout_curve.png", out.resolve().name)
    )  # fmt: skip
    report.plots = [str(p.relative_to(out)) for p in plots]
    write_report(report, cfg)
    return report


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def _quality_row(name: str, scores: dict[str, float], heldout: float) -> str:
    return f"| {name} | " + " | ".join(_pct(scores[suite]) for suite in SUITES) + f" | {_pct(heldout)} |"


def markdown(report: Report, cfg: QuickstartConfig) -> str:
    n = report.numbers
    off = n["offload"]
    lines = [
        "# SmallThinker quickstart report",
        "",
        "A tiny SmallThinker (4 layers, 8 experts top-2) trained from scratch on the synthetic corpus, instruct-",
        "tuned on synthetic chats, merged, evaluated with lm-eval, and served by the CPU offload engine.",
        "",
        "## Stages",
        "",
        "| stage | seconds | details |",
        "|---|---|---|",
    ]
    for st in report.stages:
        details = ", ".join(f"{k}={v}" for k, v in st.items() if k not in ("stage", "seconds"))
        lines.append(f"| {st['stage']} | {st['seconds']} | {details} |")
    lines += [
        "",
        "## Quality (synthetic data; chance = 25 % on the four-way tasks)",
        "",
        "| model | MMLU-format, 5-shot letter | MMLU-format, 0-shot continuation | GPQA-format, 0-shot letter | "
        "GPQA-format, 0-shot continuation | held-out questions, exact match |",
        "|---|---|---|---|---|---|",
        _quality_row("pre-trained", n["eval_base"], n["heldout_em_base"]),
        _quality_row("SFT + merged", n["eval_sft"], n["heldout_em_sft"]),
        "",
        "Letter scoring asks the model to map an answer to its letter, a skill a model of this size does not pick",
        "up from a facts corpus; the continuation scores compare the answers' own texts (lm-eval's",
        "`mmlu_continuation` protocol).",
        "",
        f"Training loss: pre-training {n['pretrain_loss'][0]:.3f} -> {n['pretrain_loss'][1]:.3f}, "
        f"SFT {n['sft_loss'][0]:.3f} -> {n['sft_loss'][1]:.3f} (mean of the last 10 steps).",
        "",
        f"## Held-out questions ({n['heldout_questions']} questions about entities SFT never saw)",
        "",
        f"Pre-training mixes chat-formatted questions about the SFT entities ({cfg.chat_mix:.0%} of the data) into",
        "the corpus that states the facts of every entity; greedy replies are scored by exact match.",
        "",
        "| stage | step | exact match |",
        "|---|---|---|",
        *[f"| {p['stage']} | {p['step']} | {_pct(p['exact_match'])} |" for p in n["heldout_curve"]],
        "",
        "## Offloaded chat",
        "",
        f"Question: {off['question']!r}; resident reply: {off['resident_reply'].strip()!r}.",
        f"Model {off['model_bytes'] / 1e6:.2f} MB, of which experts {off['expert_bytes'] / 1e6:.2f} MB; "
        f"minimum budget {off['minimum_budget_bytes'] / 1e6:.2f} MB.",
        "",
        "Each budget runs the chat question and a 64-token greedy continuation of a held-out corpus document;",
        "hit rate, bytes read and tokens/s are those of the continuation. The same chat at the minimum budget:",
        "",
        "```bash",
        offload_chat_command(cfg.out_dir, off),
        "```",
        "",
        "| budget | vs model size | expert slots | same tokens as resident | hit rate | bytes read / token | tokens/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in off["runs"]:
        lines.append(
            f"| {r['budget_bytes'] / 1e6:.2f} MB | {r['budget_bytes'] / off['model_bytes']:.0%} | "
            f"{r['expert_slots']} of {off['total_experts']} | "
            f"{'yes' if r['identical_to_resident'] else 'NO'} | {_pct(r['hit_rate'])} | "
            f"{r['bytes_per_token'] / 1e3:.1f} kB | {r['tokens_per_s']:.1f} |"
        )
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in report.plots]
    return "\n".join(lines) + "\n"


def write_report(report: Report, cfg: QuickstartConfig) -> None:
    (cfg.out_dir / "report.md").write_text(markdown(report, cfg))
    summary = {"config": {k: str(v) for k, v in asdict(cfg).items()}, **asdict(report)}
    (cfg.out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))


def summary_table(report: Report) -> str:
    n = report.numbers
    rows = [
        ("pre-training loss", f"{n['pretrain_loss'][0]:.3f} -> {n['pretrain_loss'][1]:.3f}"),
        ("SFT loss", f"{n['sft_loss'][0]:.3f} -> {n['sft_loss'][1]:.3f}"),
        *[
            (f"{suite} (base -> SFT)", f"{_pct(n['eval_base'][suite])} -> {_pct(n['eval_sft'][suite])}")
            for suite in SUITES
        ],
        ("held-out exact match", f"{_pct(n['heldout_em_base'])} -> {_pct(n['heldout_em_sft'])}"),
        (
            "held-out, over training",
            ", ".join(
                f"{p['stage']} {p['step']}: {100 * p['exact_match']:.0f} %" for p in n["heldout_curve"]
            ),
        ),
        (
            "offloaded = resident",
            str(all(r["identical_to_resident"] for r in n["offload"]["runs"])),
        ),
        ("total seconds", f"{sum(s['seconds'] for s in report.stages):.0f}"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
