"""The serving runtime: engine thread, model runner, caches and streams, CPU/GPU settings, warm-up."""
