"""Thin Prefect tasks around trainer/: retries, logging, artifacts and MLflow live here."""
