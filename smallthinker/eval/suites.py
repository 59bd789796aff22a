"""Named evaluation suites: which task YAML, which protocol, which headline metric.

A suite turns validated data (`smallthinker.eval.data.PreparedData`) into lm-eval task configs:
the YAML in `tasks/` is the task code, and only the data files differ between the hub, a manual
download and the synthetic benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from lm_eval.tasks._yaml_loader import load_yaml

from smallthinker.eval.data import GPQA_FILE, MMLU_SPLITS, EvalError, PreparedData

TASKS_DIR = Path(__file__).parent / "tasks"


@dataclass(frozen=True)
class Suite:
    name: str
    benchmark: str  # "mmlu" or "gpqa_diamond": which data and which report column
    task_yaml: str  # file in tasks/
    chat_template: bool  # render prompts with the tokenizer's chat template (instruct protocol)
    metric: str  # headline lm-eval metric key, "metric,filter"
    protocol: str  # what the number means, printed beside it
    report_protocol: bool  # True when this is how the tech report measured its numbers
    default_max_gen_toks: int | None = None  # generation budget for generative suites


SUITES: dict[str, Suite] = {
    s.name: s
    for s in (
        Suite(
            "mmlu",
            "mmlu",
            "mmlu.yaml",
            chat_template=False,
            metric="acc,none",
            protocol="5-shot log-likelihood (classic MMLU, base-model protocol; not the report's 0-shot CoT)",
            report_protocol=False,
        ),
        Suite(
            "mmlu_cot",
            "mmlu",
            "mmlu_cot.yaml",
            chat_template=True,
            metric="exact_match,flexible-extract",
            protocol="0-shot chain of thought, chat template, greedy, test split (report protocol)",
            report_protocol=True,
            default_max_gen_toks=4096,
        ),
        Suite(
            "mmlu_continuation",
            "mmlu",
            "mmlu_continuation.yaml",
            chat_template=False,
            metric="acc,none",
            protocol="0-shot log-likelihood of each answer's text (lm-eval's mmlu_continuation; not the report's)",
            report_protocol=False,
        ),
        Suite(
            "gpqa_diamond",
            "gpqa_diamond",
            "gpqa_diamond.yaml",
            chat_template=False,
            metric="acc,none",
            protocol="0-shot log-likelihood of the choice label (not the report's generative protocol)",
            report_protocol=False,
        ),
        Suite(
            "gpqa_diamond_continuation",
            "gpqa_diamond",
            "gpqa_diamond_continuation.yaml",
            chat_template=False,
            metric="acc,none",
            protocol="0-shot log-likelihood of each answer's text (continuation protocol; not the report's)",
            report_protocol=False,
        ),
        Suite(
            "gpqa_diamond_cot",
            "gpqa_diamond",
            "gpqa_diamond_cot.yaml",
            chat_template=True,
            metric="exact_match,flexible-extract",
            protocol="0-shot chain of thought, chat template, greedy (report protocol)",
            report_protocol=True,
            default_max_gen_toks=4096,
        ),
    )
}


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        raise EvalError(f"unknown suite {name!r}; choose one of {sorted(SUITES)}")
    return SUITES[name]


def num_fewshot(suite: Suite) -> int:
    """How many solved examples precede each question (the YAML's `num_fewshot`)."""
    return int(load_yaml(TASKS_DIR / suite.task_yaml, resolve_func=False).get("num_fewshot") or 0)


def _generation_override(suite: Suite, cfg: dict[str, Any], max_gen_toks: int | None) -> dict[str, Any]:
    """`generation_kwargs` with the suite's generation budget, or {} for log-likelihood suites."""
    if cfg["output_type"] != "generate_until":
        if max_gen_toks is not None:
            raise EvalError(f"suite {suite.name!r} scores log-likelihoods; max_gen_toks does not apply")
        return {}
    budget = max_gen_toks or suite.default_max_gen_toks
    return {"generation_kwargs": {**cfg["generation_kwargs"], "max_gen_toks": budget}}


def _aggregates(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Group aggregates: every metric under every filter, weighted by subject size (= mean over questions)."""
    filters = [f["name"] for f in cfg.get("filter_list") or []] or ["none"]
    return [
        {"metric": m["metric"], "weight_by_size": True, "filter_list": f}
        for m in cfg["metric_list"]
        for f in filters
    ]


def _write_yaml(path: Path, cfg: dict[str, Any]) -> None:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))


def write_task_configs(
    suite: Suite,
    data: PreparedData,
    task_dir: Path,
    max_gen_toks: int | None = None,
    cache_dir: Path | None = None,
) -> str:
    """Write the lm-eval task YAMLs of `suite` over the prepared data into `task_dir`; returns the name to run.

    Each file `include`s the suite's YAML from tasks/ and adds only the data files (and the generation
    budget), so the prompts and metrics are those of the shipped YAML whatever the data source. The
    written folder is passed to lm-eval as its include path and stays next to the results as a record.
    """
    template = TASKS_DIR / suite.task_yaml
    cfg = load_yaml(template, resolve_func=False)
    task_dir.mkdir(parents=True, exist_ok=True)
    common = {"include": str(template), **_generation_override(suite, cfg, max_gen_toks)}
    cache = {"cache_dir": str(cache_dir)} if cache_dir is not None else {}
    if suite.benchmark == "gpqa_diamond":
        files = {"train": str(data.root / "gpqa" / GPQA_FILE)}
        _write_yaml(
            task_dir / f"{cfg['task']}.yaml", {**common, "dataset_kwargs": {"data_files": files, **cache}}
        )
        return cfg["task"]
    # MMLU: one task per subject inside a group, as lm-eval's mmlu, so the few-shot examples and the
    # prompt's subject line come from that subject.
    names = []
    for subject in data.subjects:
        name = f"{cfg['task']}_{subject}"
        files = {split: str(data.root / "mmlu" / subject / f"{split}.jsonl") for split in MMLU_SPLITS}
        task = {
            **common,
            "task": name,
            "task_alias": subject,
            "dataset_kwargs": {"data_files": files, **cache},
        }
        _write_yaml(task_dir / f"{name}.yaml", task)
        names.append(name)
    group = {
        "group": cfg["task"],
        "task": names,
        "aggregate_metric_list": _aggregates(cfg),
        "metadata": {"version": cfg["metadata"]["version"]},
    }
    _write_yaml(task_dir / f"_{cfg['task']}.yaml", group)
    return cfg["task"]
