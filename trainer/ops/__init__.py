"""Operations on runs: checkpoint triage, experimental resume, export, generation, evaluation gates."""
