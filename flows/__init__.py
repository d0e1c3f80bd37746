"""Prefect flows that compose the tasks, and the `fidel` command line."""
