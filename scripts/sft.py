"""Supervised fine-tuning with the same loop as pre-training (loss on assistant tokens only).

python -m scripts.sft --config configs/train/sft_tiny.yaml
python -m scripts.sft --config configs/train/sft_4b.yaml --model.init_from=PATH_TO_CHECKPOINT
"""

from __future__ import annotations

import sys

from smallthinker.synthetic.prepare import prepare_for_run
from smallthinker.train.cli import main

if __name__ == "__main__":
    main(sys.argv[1:], "sft", __doc__, prepare_data=prepare_for_run)
