"""Text: the normaliser and the extended sentencepiece tokenizer."""
