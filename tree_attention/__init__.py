"""Tree attention ("High Attention Scores and Where to Find Them", ETH Zurich deep learning project report, 2024):
a tree over the keys, descended towards high attention scores; mass estimators; kernel variance analysis.
"""
from . import np_attention  # noqa: F401  (registers "tree")
