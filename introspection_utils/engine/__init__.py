"""The engine: prompts, vectors, trials, the one injection pass (:mod:`.traced_pass`), the measurement API
(:mod:`.measure`), components, generation and executors."""
