"""The plain single-request synthesis path the batched engine is checked against, and its CLI."""
