"""lm-eval's own command line, with the `smallthinker` model class registered.

    python -m smallthinker.eval.cli --model smallthinker --model_args pretrained=DIR,dtype=bfloat16 \
        --tasks mmlu,gpqa_diamond_zeroshot --batch_size 8 --output_path out/lm_eval

lm-eval 0.4.13 discovers no model plugins, so `python -m lm_eval --model smallthinker` cannot find our
class by itself: this module imports it first and then hands the arguments to lm-eval unchanged. Every
lm-eval option and task works; our suites (`scripts/evaluate.py`) are the tasks in `tasks/` instead.
"""

from __future__ import annotations

from lm_eval.__main__ import cli_evaluate

import smallthinker.eval  # noqa: F401  (registers --model smallthinker)


def main() -> None:
    cli_evaluate()


if __name__ == "__main__":
    main()
