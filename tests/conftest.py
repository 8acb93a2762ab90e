"""Shared test setup: keep PyTorch to the cores CI has."""
import torch

torch.set_num_threads(2)
