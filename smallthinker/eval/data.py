"""Benchmark data for the evaluation suites: find it, check it, lay it out for the task YAMLs.

Two sources give the same files:

- a local directory in the public schemas (what `smallthinker.synthetic` writes, or a manual download):
  `mmlu/{dev,validation,test}.jsonl` with columns `question, subject, choices[4], answer` (as the
  `cais/mmlu` "all" config) and `gpqa/gpqa_diamond.jsonl` with `Question, Correct Answer,
  Incorrect Answer 1..3` (as `Idavidrein/gpqa`, config `gpqa_diamond`);
- the Hugging Face hub (or its local cache when offline), fetched with `datasets` and written out in
  the same schema.

Every row is validated here, before lm-eval sees it, so a bad row is reported by file and row index
instead of surfacing as a KeyError deep inside a task. The prepared layout splits MMLU by subject
(`mmlu/<subject>/<split>.jsonl`) because lm-eval's MMLU is one task per subject: the 5-shot examples
come from the first dev rows of the same subject and the prompt names the subject.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smallthinker.eval.tasks.utils import clean_gpqa_text

MMLU_SPLITS = ("dev", "validation", "test")
MMLU_HUB = ("cais/mmlu", "all")
GPQA_HUB = ("Idavidrein/gpqa", "gpqa_diamond")
GPQA_FILE = "gpqa_diamond.jsonl"
GPQA_ANSWER_COLUMNS = ("Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3")

DATA_HELP = """\
How to provide the data:
  * from the Hugging Face hub: pass --hub (needs network once, or a filled HF cache). MMLU is
    `cais/mmlu` (public); GPQA is `Idavidrein/gpqa` (gated: accept its terms on the dataset page,
    then `huggingface-cli login` or set HF_TOKEN). HF_DATASETS_OFFLINE=1 reads only the local cache.
  * from local files: pass --data DIR with
      DIR/mmlu/dev.jsonl, DIR/mmlu/validation.jsonl, DIR/mmlu/test.jsonl
          one JSON object per line: {"question": str, "subject": str, "choices": [4 str], "answer": 0-3}
      DIR/gpqa/gpqa_diamond.jsonl
          {"Question": str, "Correct Answer": str, "Incorrect Answer 1": str, ... 2, ... 3, "Record ID": str}
    (e.g. `datasets.load_dataset("cais/mmlu", "all")[split].to_json(...)` on a machine with network),
  * or the offline synthetic benchmarks in these schemas: `python -m scripts.make_synthetic --out DIR` in a source checkout,
    then --data DIR/benchmarks."""


class EvalError(ValueError):
    """An evaluation cannot run as asked; the message says what is wrong and what to do."""


class EvalDataError(EvalError):
    """Benchmark data is missing or malformed; the message says what and how to fix it."""


@dataclass(frozen=True)
class PreparedData:
    """Where the validated benchmark files lie and what they hold."""

    root: Path  # prepared layout, read by the task YAMLs
    source: str  # "hub:<repo>" or the local directory
    subjects: dict[str, int]  # MMLU subject -> number of test rows (empty for GPQA)
    num_rows: dict[str, int]  # split or file -> rows
    sha256: dict[str, str]  # source file -> digest, so a result names the exact data it used


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise EvalDataError(f"missing benchmark file {path}.\n{DATA_HELP}")
    rows = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise EvalDataError(f"{path}: line {line_no + 1} is not valid JSON ({err.msg})") from err
            if not isinstance(row, dict):
                raise EvalDataError(f"{path}: line {line_no + 1} is a {type(row).__name__}, not an object")
            rows.append(row)
    if not rows:
        raise EvalDataError(f"{path} holds no rows")
    return rows


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _is_text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def validate_mmlu_row(row: dict[str, Any], where: str) -> None:
    """Raise EvalDataError naming `where` (file and row index) if `row` breaks the MMLU schema."""
    missing = [k for k in ("question", "subject", "choices", "answer") if k not in row]
    if missing:
        raise EvalDataError(
            f"{where}: missing column(s) {missing}; MMLU rows need question, subject, choices, answer"
        )
    if not _is_text(row["question"]):
        raise EvalDataError(f"{where}: 'question' must be a non-empty string, got {row['question']!r}")
    if not _is_text(row["subject"]):
        raise EvalDataError(f"{where}: 'subject' must be a non-empty string, got {row['subject']!r}")
    choices = row["choices"]
    if not isinstance(choices, list) or len(choices) != 4 or not all(isinstance(c, str) for c in choices):
        raise EvalDataError(f"{where}: 'choices' must be a list of 4 strings, got {choices!r}")
    answer = row["answer"]
    # bool is an int subclass: True would silently mean "B".
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < 4:
        raise EvalDataError(f"{where}: 'answer' must be an integer index 0-3 into choices, got {answer!r}")


def validate_gpqa_row(row: dict[str, Any], where: str) -> None:
    """Raise EvalDataError naming `where` if `row` breaks the GPQA schema or has ambiguous answers."""
    missing = [k for k in ("Question", *GPQA_ANSWER_COLUMNS) if k not in row]
    if missing:
        raise EvalDataError(
            f"{where}: missing column(s) {missing}; GPQA rows need Question and {GPQA_ANSWER_COLUMNS}"
        )
    for key in ("Question", *GPQA_ANSWER_COLUMNS):
        if not _is_text(row[key]):
            raise EvalDataError(f"{where}: {key!r} must be a non-empty string, got {row[key]!r}")
    # The task finds the gold letter by looking the cleaned correct answer up among the shuffled,
    # cleaned choices, so a duplicate would make the gold letter ambiguous.
    answers = [clean_gpqa_text(row[k]) for k in GPQA_ANSWER_COLUMNS]
    if len(set(answers)) != 4:
        raise EvalDataError(f"{where}: the four answers are not distinct ({answers!r})")


def subject_key(subject: str) -> str:
    """A subject name usable in task names and paths ('High School Biology' -> 'high_school_biology')."""
    return re.sub(r"[^0-9a-z]+", "_", subject.strip().lower()).strip("_")


def _prepare_mmlu_rows(
    splits: dict[str, list[dict[str, Any]]], source: str, out_root: Path
) -> dict[str, int]:
    """Validate MMLU rows and write them per subject; returns subject -> test rows."""
    by_subject: dict[str, dict[str, list]] = defaultdict(lambda: {s: [] for s in MMLU_SPLITS})
    for split, rows in splits.items():
        for i, row in enumerate(rows):
            validate_mmlu_row(row, f"{source} [{split}] row {i}")
            key = subject_key(row["subject"])
            if not key:
                raise EvalDataError(
                    f"{source} [{split}] row {i}: subject {row['subject']!r} has no letters or digits"
                )
            by_subject[key][split].append({**row, "subject": key})
    for key, split_rows in sorted(by_subject.items()):
        if not split_rows["test"]:
            raise EvalDataError(f"{source}: subject {key!r} has dev/validation rows but no test rows")
        for split, rows in split_rows.items():
            _write_jsonl(out_root / "mmlu" / key / f"{split}.jsonl", rows)
    return {key: len(split_rows["test"]) for key, split_rows in sorted(by_subject.items())}


def check_fewshot_pool(data: PreparedData, num_fewshot: int) -> None:
    """5-shot MMLU takes the first dev rows of each subject: make sure there are enough."""
    for subject in data.subjects:
        n_dev = sum(1 for _ in (data.root / "mmlu" / subject / "dev.jsonl").open())
        if n_dev < num_fewshot:
            raise EvalDataError(
                f"{data.source}: subject {subject!r} has {n_dev} dev rows, {num_fewshot}-shot needs {num_fewshot}"
            )


def prepare_mmlu(source: str | Path | None, out_root: Path) -> PreparedData:
    """Validate MMLU from a local dir (`source`) or the hub (`source=None`) into `out_root/mmlu/`."""
    if source is None:
        ds = _load_hub(*MMLU_HUB)
        splits = {s: [dict(r) for r in ds[s]] for s in MMLU_SPLITS}
        name, digests = f"hub:{MMLU_HUB[0]}", {}
    else:
        files = {s: Path(source) / "mmlu" / f"{s}.jsonl" for s in MMLU_SPLITS}
        splits = {s: _read_jsonl(p) for s, p in files.items()}
        name, digests = str(Path(source) / "mmlu"), {str(p): _sha256(p) for p in files.values()}
    subjects = _prepare_mmlu_rows(splits, name, out_root)
    rows = {s: len(r) for s, r in splits.items()}
    return PreparedData(root=out_root, source=name, subjects=subjects, num_rows=rows, sha256=digests)


def prepare_gpqa(source: str | Path | None, out_root: Path) -> PreparedData:
    """Validate GPQA-Diamond from a local dir or the hub into `out_root/gpqa/gpqa_diamond.jsonl`."""
    if source is None:
        rows = [dict(r) for r in _load_hub(*GPQA_HUB)["train"]]
        name, digests = f"hub:{GPQA_HUB[0]}/{GPQA_HUB[1]}", {}
    else:
        path = Path(source) / "gpqa" / GPQA_FILE
        rows = _read_jsonl(path)
        name, digests = str(path), {str(path): _sha256(path)}
    for i, row in enumerate(rows):
        validate_gpqa_row(row, f"{name} row {i}")
    _write_jsonl(out_root / "gpqa" / GPQA_FILE, rows)
    return PreparedData(
        root=out_root, source=name, subjects={}, num_rows={"train": len(rows)}, sha256=digests
    )


def _load_hub(repo: str, name: str):
    """`datasets.load_dataset` with an error that says how to get the data when it fails."""
    import datasets

    try:
        return datasets.load_dataset(repo, name)
    except Exception as err:  # network, gating and offline-cache misses all raise different types
        offline = " (HF_DATASETS_OFFLINE/HF_HUB_OFFLINE is set)" if datasets.config.HF_HUB_OFFLINE else ""
        raise EvalDataError(
            f"could not load {repo} ({name}) from the Hugging Face hub or its cache{offline}: "
            f"{type(err).__name__}: {err}\n{DATA_HELP}"
        ) from err
