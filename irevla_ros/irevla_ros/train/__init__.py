"""Training: datasets from the episode store, supervised and RL stages."""
