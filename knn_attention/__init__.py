"""kNN attention (Haris, "kNN Attention Demystified"); modules land with issue 3."""
