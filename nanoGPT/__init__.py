"""A compact GPT whose attention is chosen by name from common's registry."""
