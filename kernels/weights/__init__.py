"""Model weights on disk: key layout, strict checkpoint reading, loading, the random-checkpoint maker."""
