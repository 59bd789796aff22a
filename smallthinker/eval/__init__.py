"""Evaluation with lm-evaluation-harness: MMLU and GPQA-Diamond suites for SmallThinker models.

Importing this package registers the lm-eval model `smallthinker` (see `lm.py`).
"""

from smallthinker.eval.data import EvalDataError, EvalError, PreparedData, prepare_gpqa, prepare_mmlu
from smallthinker.eval.lm import NotSmallThinkerError, SmallThinkerLM
from smallthinker.eval.runner import evaluate_suite
from smallthinker.eval.suites import SUITES, Suite, get_suite

__all__ = [
    "SUITES",
    "EvalDataError",
    "EvalError",
    "NotSmallThinkerError",
    "PreparedData",
    "SmallThinkerLM",
    "Suite",
    "evaluate_suite",
    "get_suite",
    "prepare_gpqa",
    "prepare_mmlu",
]
