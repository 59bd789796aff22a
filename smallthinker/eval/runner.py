"""Run one evaluation suite end to end: data -> model -> lm-eval -> result files."""

from __future__ import annotations

import logging
import platform
import time
from pathlib import Path
from typing import Any

import lm_eval
import torch
import transformers
from lm_eval.api.model import LM
from lm_eval.tasks import TaskManager

from smallthinker.eval.data import EvalError, PreparedData, check_fewshot_pool, prepare_gpqa, prepare_mmlu
from smallthinker.eval.lm import SmallThinkerLM
from smallthinker.eval.report import LM_EVAL_KEYS, headline, write_results
from smallthinker.eval.suites import Suite, get_suite, num_fewshot, write_task_configs

log = logging.getLogger(__name__)

# lm-eval's defaults, written into every result so a run can be repeated exactly.
RANDOM_SEED = 0
OTHER_SEED = 1234


def prepare_data(suite: Suite, data_dir: str | Path | None, hub: bool, work_dir: Path) -> PreparedData:
    """Validate the suite's benchmark data from `data_dir` or the hub into `work_dir`."""
    if (data_dir is None) == (not hub):
        raise EvalError("give exactly one data source: a local directory (--data DIR) or the hub (--hub)")
    prepare = prepare_mmlu if suite.benchmark == "mmlu" else prepare_gpqa
    data = prepare(None if hub else data_dir, work_dir)
    if suite.benchmark == "mmlu" and num_fewshot(suite) > 0:
        check_fewshot_pool(data, num_fewshot(suite))
    return data


def load_lm(
    model: str | transformers.PreTrainedModel | LM,
    tokenizer: str | transformers.PreTrainedTokenizerBase | None = None,
    batch_size: int | str = 8,
    device: str | None = None,
    dtype: str = "auto",
) -> LM:
    """An lm-eval model for a checkpoint path / hub id, an in-memory SmallThinker model, or an LM as is."""
    if isinstance(model, LM):
        return model
    if isinstance(model, str):
        return SmallThinkerLM(
            pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device, dtype=dtype
        )
    if tokenizer is None:
        raise EvalError("an in-memory model needs its tokenizer: pass tokenizer=<tokenizer or its path>")
    return SmallThinkerLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def _check_chat_template(suite: Suite, lm: LM) -> None:
    tokenizer = getattr(lm, "tokenizer", None)
    if suite.chat_template and tokenizer is not None and not getattr(tokenizer, "chat_template", None):
        raise EvalError(
            f"suite {suite.name!r} renders prompts with the chat template, but the tokenizer has none "
            "(instruct checkpoints ship one in tokenizer_config.json / chat_template.jinja). "
            "Evaluate base models with the log-likelihood suites 'mmlu' or 'gpqa_diamond'."
        )


def _check_generation_budget(suite: Suite, lm: LM, budget: int | None) -> None:
    context = getattr(lm, "max_length", None)
    if budget is not None and context is not None and budget >= context:
        raise EvalError(
            f"suite {suite.name!r}: max_gen_toks {budget} leaves no room for the prompt in the model's "
            f"{context}-token context; pass a smaller --max-gen-toks (the prompts need a few hundred tokens)"
        )


def evaluate_suite(
    model: str | transformers.PreTrainedModel | LM,
    suite: str,
    out_dir: str | Path,
    *,
    data_dir: str | Path | None = None,
    hub: bool = False,
    tokenizer: str | transformers.PreTrainedTokenizerBase | None = None,
    limit: int | None = None,
    batch_size: int | str = 8,
    max_gen_toks: int | None = None,
    device: str | None = None,
    dtype: str = "auto",
) -> dict[str, Any]:
    """Evaluate `model` on the named suite; writes results.json / results.md / samples.jsonl to `out_dir`.

    `model` is a checkpoint directory or hub id, an in-memory SmallThinker `PreTrainedModel` (give its
    `tokenizer`), or any lm-eval `LM`. `limit` caps the questions per task (per MMLU subject).
    Returns the record written to results.json.
    """
    spec, out = get_suite(suite), Path(out_dir)
    data = prepare_data(spec, data_dir, hub, out / "data")  # data errors surface before any weight loads
    task_dir = out / "tasks"
    task_name = write_task_configs(
        spec, data, task_dir, max_gen_toks=max_gen_toks, cache_dir=out / "data" / "hf_cache"
    )
    lm = load_lm(model, tokenizer, batch_size=batch_size, device=device, dtype=dtype)
    _check_chat_template(spec, lm)
    _check_generation_budget(spec, lm, max_gen_toks or spec.default_max_gen_toks)
    started = time.time()
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=[task_name],
        # Our task configs only: indexing lm-eval's ~10k YAMLs would cost seconds and risk name clashes.
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        apply_chat_template=spec.chat_template,
        fewshot_as_multiturn=False,
        limit=limit,
        log_samples=True,
        random_seed=RANDOM_SEED,
        numpy_random_seed=OTHER_SEED,
        torch_random_seed=OTHER_SEED,
        fewshot_random_seed=OTHER_SEED,
    )
    record = _record(spec, lm, data, results, task_name, limit, seconds=time.time() - started)
    paths = write_results(out, record, results.get("samples", {}))
    log.info("wrote %s", ", ".join(str(p) for p in paths.values()))
    return record


def _record(
    spec: Suite,
    lm: LM,
    data: PreparedData,
    results: dict[str, Any],
    task_name: str,
    limit: int | None,
    seconds: float,
) -> dict[str, Any]:
    """Everything results.json holds: the headline, how it was measured, and lm-eval's raw results."""
    return {
        "suite": spec.name,
        "benchmark": spec.benchmark,
        "protocol": spec.protocol,
        "report_protocol": spec.report_protocol,
        "headline": headline(results, task_name, spec.metric),
        "chat_template": spec.chat_template,
        "max_gen_toks": _generation_budget(results, task_name),
        "limit": limit,
        "seed": {"random": RANDOM_SEED, "numpy": OTHER_SEED, "torch": OTHER_SEED, "fewshot": OTHER_SEED},
        "n_shot": results["n-shot"],
        "task_versions": results["versions"],
        "lm_eval_version": lm_eval.__version__,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "model": lm.get_model_info() if hasattr(lm, "get_model_info") else {"model_class": type(lm).__name__},
        "data": {
            "source": data.source,
            "num_rows": data.num_rows,
            "subjects": data.subjects,
            "sha256": data.sha256,
        },
        "seconds": round(seconds, 1),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "lm_eval_results": {k: results[k] for k in LM_EVAL_KEYS if k in results},
    }


def _generation_budget(results: dict[str, Any], task_name: str) -> int | None:
    """The max_gen_toks lm-eval ran with (None for log-likelihood suites)."""
    leaf = (results.get("group_subtasks", {}).get(task_name) or [task_name])[0]
    return (results["configs"][leaf].get("generation_kwargs") or {}).get("max_gen_toks")
