"""Judging a trained model: decoding (generate) and the evaluation gates."""
