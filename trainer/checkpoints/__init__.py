"""What happens to a lineage's checkpoints on disk: triage (fresh, resume, repair), the experimental resume, export."""
