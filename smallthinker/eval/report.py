"""Result files of one suite run: `results.json` (everything needed to reproduce and compare),
`results.md` (our number beside the tech report's, labelled with the protocol) and `samples.jsonl`."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from lm_eval.utils import handle_non_serializable

# Tech report (arXiv 2507.20984) table for the instruct models: 0-shot, chat template, "non-thinking
# mode"; its MMLU is 0-shot chain of thought. See /work/shared/SMALLTHINKER.md section 6.
REPORTED: dict[str, dict[str, float]] = {
    "SmallThinker-4B-A0.6B": {"mmlu": 66.11, "gpqa_diamond": 31.31},
    "SmallThinker-21B-A3B": {"mmlu": 84.43, "gpqa_diamond": 55.05},
}
REPORTED_PROTOCOL = (
    "instruct models, 0-shot, chat template, non-thinking mode; MMLU as 0-shot chain of thought"
)
BENCHMARK_TITLES = {"mmlu": "MMLU", "gpqa_diamond": "GPQA-Diamond"}
# Keys of lm-eval's result dict kept in results.json ("samples" go to samples.jsonl instead).
LM_EVAL_KEYS = (
    "results",
    "groups",
    "group_subtasks",
    "configs",
    "versions",
    "n-shot",
    "higher_is_better",
    "n-samples",
)


def headline(lm_eval_results: dict[str, Any], task: str, metric: str) -> dict[str, Any]:
    """Value, standard error and number of questions of `metric` ("name,filter") for a task or group."""
    name, filter_name = metric.split(",")
    row = lm_eval_results.get("groups", {}).get(task) or lm_eval_results["results"][task]
    leaves = lm_eval_results.get("group_subtasks", {}).get(task) or [task]
    n = sum(lm_eval_results["n-samples"][leaf]["effective"] for leaf in leaves)
    stderr = row.get(f"{name}_stderr,{filter_name}")
    return {
        "task": task,
        "metric": metric,
        "value": float(row[metric]),
        "stderr": float(stderr) if isinstance(stderr, float) and math.isfinite(stderr) else None,
        "n_samples": n,
    }


def _shots(n_shot: dict[str, int]) -> str:
    return "/".join(str(n) for n in sorted(set(n_shot.values())))


def _pct(value: float, stderr: float | None) -> str:
    return f"{100 * value:.2f}" + (f" ± {100 * stderr:.2f}" if stderr is not None else "")


def markdown_table(record: dict[str, Any]) -> str:
    """The markdown summary: one row with our number and the report's, then every metric lm-eval gave."""
    head, model = record["headline"], record["model"]
    title = BENCHMARK_TITLES[record["benchmark"]]
    reported = [REPORTED[name][record["benchmark"]] for name in REPORTED]
    lines = [
        f"## {title}: suite `{record['suite']}`",
        "",
        f"- model: `{model.get('model_name_or_path')}` ({model.get('model_class')}, "
        f"{model.get('model_num_parameters', 0) / 1e6:.1f} M parameters, {model.get('model_dtype')})",
        f"- data: `{record['data']['source']}`, {head['n_samples']} questions"
        + (f" (limit {record['limit']} per task)" if record["limit"] is not None else ""),
        f"- lm-eval {record['lm_eval_version']}, chat template: {'yes' if record['chat_template'] else 'no'}, "
        f"{_shots(record['n_shot'])}-shot, seeds "
        + ", ".join(f"{k} {v}" for k, v in record["seed"].items())
        + (f", max_gen_toks {record['max_gen_toks']}" if record["max_gen_toks"] else ""),
        "",
        f"| benchmark | protocol | n | ours ({head['metric']}) | {' | '.join(f'{n} (report)' for n in REPORTED)} |",
        "|---|---|---|---|" + "---|" * len(REPORTED),
        f"| {title} | {record['protocol']} | {head['n_samples']} | {_pct(head['value'], head['stderr'])} | "
        + " | ".join(f"{v:.2f}" for v in reported)
        + " |",
        "",
        f"Report numbers: {REPORTED_PROTOCOL}.",
    ]
    if not record["report_protocol"]:
        lines.append(
            f"Our protocol differs from the report's, so the {title} numbers are not directly comparable."
        )
    lines += ["", "| task | metric | filter | value | stderr |", "|---|---|---|---|---|"]
    row = (
        record["lm_eval_results"].get("groups", {}).get(head["task"])
        or record["lm_eval_results"]["results"][head["task"]]
    )
    for key, value in row.items():
        if "," not in key or "_stderr" in key or not isinstance(value, float):
            continue
        name, filter_name = key.split(",")
        stderr = row.get(f"{name}_stderr,{filter_name}")
        stderr_text = f"{stderr:.4f}" if isinstance(stderr, float) else "n/a"
        lines.append(f"| {head['task']} | {name} | {filter_name} | {value:.4f} | {stderr_text} |")
    return "\n".join(lines) + "\n"


def _write_atomic(path: Path, text: str) -> None:
    """Write via a temporary sibling and rename, so an interrupted run never leaves a truncated file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def write_results(
    out_dir: Path, record: dict[str, Any], samples: dict[str, list[dict[str, Any]]]
) -> dict[str, Path]:
    """Write results.json, results.md and samples.jsonl under `out_dir`; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out_dir / "results.json",
        "markdown": out_dir / "results.md",
        "samples": out_dir / "samples.jsonl",
    }
    lines = (
        json.dumps({"task": task, **sample}, ensure_ascii=False, default=handle_non_serializable) + "\n"
        for task, task_samples in samples.items()
        for sample in task_samples
    )
    _write_atomic(paths["samples"], "".join(lines))
    _write_atomic(paths["markdown"], markdown_table(record))
    # results.json last: its presence means the run completed.
    _write_atomic(paths["json"], json.dumps(record, indent=2, default=handle_non_serializable) + "\n")
    return paths
