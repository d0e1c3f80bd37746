"""The demo: a synthetic Amharic-like corpus, a toy codec that makes it listenable, and the flow that runs it."""
