"""The three inference networks and their parts: Qwen2 LLM, flow (encoder + CFM estimator), HiFT."""
