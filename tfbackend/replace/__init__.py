"""facts → plan: what vLLM's Transformers backend replaces, as data (`planner.build_plan`), and the wrapped model built from it (`apply`)."""
