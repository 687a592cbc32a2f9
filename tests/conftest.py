"""Shared test settings: few threads (CI has 2 cores), deterministic algorithms where cheap."""
import torch

torch.set_num_threads(2)
