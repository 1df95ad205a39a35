"""Core: what every other part stands on and nothing model-specific — project paths and atomic writes, the versioned
data (word lists, prompts, questions), confidence intervals. Imports nothing else from the package."""
