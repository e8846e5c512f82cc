"""Quality measurements: perplexity on held-out text."""
