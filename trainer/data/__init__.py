"""Training data: manifests, data checks, Parquet datasets, features and their preparation."""
