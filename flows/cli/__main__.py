"""`python -m flows.cli`: the `fidel` command, as torchrun workers (trainer.training.distributed) start it."""

import sys

from flows.cli import main

sys.exit(main())
