"""fidel's training library: plain PyTorch, sentencepiece and pyarrow. No Prefect, no MLflow."""
