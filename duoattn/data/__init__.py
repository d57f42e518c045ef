"""Text data: the long natural-text haystack, and the synthetic prompts built on it."""
