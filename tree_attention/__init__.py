"""Tree attention ("High Attention Scores and Where to Find Them"); modules land with issue 6."""
