"""Generate every synthetic dataset and the tokenizer into one folder, once.

`prepare_synthetic` is what the quickstart and the tests call. The parameters are recorded in
`manifest.json`; a second call with the same parameters returns the existing paths at once.
Everything is written into a temporary sibling folder first and renamed into place, so a crash or a
concurrent call never leaves a half-written folder behind.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from smallthinker.synthetic.benchmarks import GPQA_SIZE, write_benchmarks
from smallthinker.synthetic.corpus import write_corpus
from smallthinker.synthetic.instructions import write_instructions
from smallthinker.synthetic.world import build_world

# Bump when generated content changes for the same parameters, so old folders are not reused silently.
FORMAT_VERSION = 1
DEFAULT_DIR = "data/generated/synthetic"  # git-ignored; where the training config looks
MANIFEST = "manifest.json"


def _generate(out: Path, params: dict) -> dict[str, Path]:
    """Write all files into `out` (an empty folder); returns name -> path."""
    from smallthinker.tokenizer import iter_texts, train_tokenizer  # transformers import is slow: only here

    world = build_world(params["seed"], params["num_entities"])
    paths = write_corpus(world, out / "corpus", params["num_documents"], params["seed"])
    paths |= write_instructions(world, out / "sft", params["seed"])
    paths |= write_benchmarks(world, out / "benchmarks", params["seed"], params["gpqa_size"])
    # Train on the corpus and the chat contents with their role names, so "assistant\n" and the
    # question words are single tokens too.
    texts = list(iter_texts([paths["train"]]))
    for conversation in map(json.loads, paths["sft_train"].read_text(encoding="utf-8").splitlines()):
        texts += [f"{m['role']}\n{m['content']}" for m in conversation["messages"]]
    train_tokenizer(texts, params["vocab_size"], out / "tokenizer")
    paths["tokenizer"] = out / "tokenizer"
    paths["benchmarks"] = out / "benchmarks"  # the --data folder of the evaluation suites
    paths["mmlu"] = out / "benchmarks" / "mmlu"
    return paths


def _read_manifest(out: Path) -> dict | None:
    path = out / MANIFEST
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _paths_from(out: Path, manifest: dict) -> dict[str, Path]:
    return {name: out / rel for name, rel in manifest["files"].items()} | {
        "root": out,
        "manifest": out / MANIFEST,
    }


def prepare_for_run(cfg: Any) -> None:
    """A training run's `prepare_data` hook: the corpus and tokenizer its `synthetic_dir` names, if any."""
    if getattr(cfg, "synthetic_dir", None):
        prepare_synthetic(cfg.synthetic_dir)


def prepare_synthetic(
    out_dir: str | Path,
    seed: int = 0,
    num_entities: int = 64,
    num_documents: int = 4000,
    vocab_size: int = 2048,
    gpqa_size: int = GPQA_SIZE,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Corpus, SFT data, benchmarks and tokenizer under `out_dir`; returns name -> absolute path.

    Names: train, validation (corpus); sft_train, sft_validation, sft_*_prompt_response, heldout_qa;
    benchmarks and mmlu (folders), mmlu_dev, mmlu_validation, mmlu_test, gpqa_diamond; tokenizer (folder); root, manifest.
    Reuses `out_dir` when it holds the same parameters. A folder made with other parameters is
    replaced only with `overwrite=True`; a non-empty folder without a manifest is never touched.
    """
    out = Path(out_dir).resolve()
    params = {"format_version": FORMAT_VERSION, "seed": seed, "num_entities": num_entities,
              "num_documents": num_documents, "vocab_size": vocab_size, "gpqa_size": gpqa_size}  # fmt: skip
    existing = _read_manifest(out)
    if existing is not None and existing["params"] == params:
        return _paths_from(out, existing)
    _check_replaceable(out, existing, params, overwrite)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        start = time.perf_counter()
        paths = _generate(tmp, params)
        manifest = {
            "params": params,
            "seconds": round(time.perf_counter() - start, 2),
            "files": {name: str(p.relative_to(tmp)) for name, p in paths.items()},
            "rows": {name: _count_rows(p) for name, p in paths.items() if p.suffix == ".jsonl"},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        _move_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    final = _read_manifest(out)
    if final is None or final["params"] != params:  # lost a race to a call with other parameters
        raise RuntimeError(
            f"{out} was written concurrently with other parameters: {final and final['params']}"
        )
    return _paths_from(out, final)


def _check_replaceable(out: Path, existing: dict | None, params: dict, overwrite: bool) -> None:
    if existing is not None and not overwrite:
        changed = {
            k: (existing["params"].get(k), v) for k, v in params.items() if existing["params"].get(k) != v
        }
        raise ValueError(f"{out} holds synthetic data made with other parameters (old, new): {changed}; "
                         "pass overwrite=True (--overwrite) to replace it, or choose another folder")  # fmt: skip
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file; give a folder for the synthetic data")
    if existing is None and out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists, is not empty and has no {MANIFEST}: it is not a synthetic data "
                         "folder, so nothing is written there; choose another folder")  # fmt: skip


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename `tmp` to `out`, replacing an older synthetic folder (or an empty one) at `out`."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    try:
        tmp.rename(out)
    except OSError:
        if old.exists() and not out.exists():  # put the previous data back before giving up
            old.rename(out)
        if _read_manifest(out) is None:  # not a concurrent call that got there first
            raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def _count_rows(path: Path) -> int:
    with path.open(encoding="utf-8") as f:
        return sum(1 for _ in f)
