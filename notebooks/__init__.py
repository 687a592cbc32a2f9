"""One notebook per paper plus the comparison; `python -m notebooks.run_all` executes them headless."""
