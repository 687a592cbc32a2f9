"""Tiny Shakespeare at the character level (the text ships as input.txt; prepare.py builds the token files)."""
