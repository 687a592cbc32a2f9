"""kNN attention (Haris, "kNN Attention Demystified: A Theoretical Exploration for Scalable Transformers",
ICLR 2025, arXiv 2411.04013): a faiss top-k set per query plus sampling of the rest of the softmax.

Modules: naive_attention / naive_backprop (quadratic references), index (faiss top-k), softmax_expectation
(lazy Gumbel sampling), forward_pass (the registered ``knn`` method), backward_pass (sampled gradients),
random_walk (Markov-chain estimates of products), experiment_grad_descent and efficiency (the experiments).
"""
from . import forward_pass  # noqa: F401  (registers "knn")
