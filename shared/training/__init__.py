"""Training data and training runs: datasets, their layout, and the run lifecycle (queue, claim, progress, finish)."""
