"""The OpenAI-compatible HTTP front end (FastAPI) over vLLM's AsyncLLM engine."""
