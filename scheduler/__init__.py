"""Torch-free continuous-batching scheduler: decides what the runner (kernels/) executes."""
