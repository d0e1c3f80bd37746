"""`python -m fidel_tts.flows.cli`: the `fidel` command, as torchrun workers (trainer.training.distributed) start it."""

import os
import sys

from fidel_tts.flows.cli import main

code = main()
if "WORLD_SIZE" in os.environ:  # a torchrun worker
    from fidel_tts.trainer.training.distributed import exit_process

    exit_process(code)
sys.exit(code)
