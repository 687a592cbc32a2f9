"""Long-context truth (issue 14): tasks that need retrieval far back, and end-to-end evaluation of each method."""
