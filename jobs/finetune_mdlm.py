"""Entry point of `factory finetune` for `accelerate launch` and `ray job submit` (a checkout has no
console script on the job's path). The same code and options as the command:

    accelerate launch --num_processes 2 jobs/finetune_mdlm.py out/build --model embedded --output runs/ft --steps 300
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from factory.train.finetune import cli_finetune  # noqa: E402

if __name__ == "__main__":
    cli_finetune(sys.argv[1:])
