"""The training loop as parts: build, step, metrics, checkpointer (and writer), validator, around Trainer.run."""
