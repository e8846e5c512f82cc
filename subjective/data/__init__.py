"""Text corpora for fine-tuning and perplexity, built from documentation Debian ships."""
