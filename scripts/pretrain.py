"""Pre-train SmallThinker with the shared training loop.

    python -m scripts.pretrain --config configs/train/pretrain_tiny.yaml
    python -m scripts.pretrain --config configs/train/pretrain_tiny.yaml --resume latest
    accelerate launch --config_file configs/accelerate/ddp.yaml -m scripts.pretrain \
        --config configs/train/pretrain_4b.yaml
"""

from __future__ import annotations

import sys

from smallthinker.synthetic.prepare import prepare_for_run
from smallthinker.train.cli import main

if __name__ == "__main__":
    main(sys.argv[1:], "pretrain", __doc__, prepare_data=prepare_for_run)
