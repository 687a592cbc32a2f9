"""Datasets of the GPT, each in its own folder with a ``prepare`` module that builds the token files."""
