"""FLOPs of training and inference, counted with PyTorch's FLOP counter on real batches.

Training: one real step (forward + backward) is counted and multiplied by the steps run. For transformers the
count is shown beside the rule of thumb 6·N·D, with N the parameters of the linear layers (the output projection
included even when its weight is tied to the embedding, since it is a matrix product every token pays for;
embedding lookups cost no FLOPs) and D the tokens trained on. The rule leaves out attention's own products
(about 6·n_layer·context·width per token), so a short-context model counts a few percent above it.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from recipes import Recipe


def count_flops(work) -> int:
    with FlopCounterMode(display=False) as counter:
        work()
    return int(counter.get_total_flops())


def training_step_flops(recipe: Recipe, model: torch.nn.Module, batch_size: int, seed: int = 0) -> int:
    """FLOPs of one optimizer step's forward and backward on a real training batch (the update itself is
    elementwise and not counted)."""
    inputs, targets = next(recipe.train_batches(batch_size, torch.Generator().manual_seed(seed)))
    model.train()

    def step() -> None:
        recipe.loss(model, inputs, targets).backward()

    flops = count_flops(step)
    model.zero_grad(set_to_none=True)
    return flops


def inference_flops_per_sample(recipe: Recipe, model: torch.nn.Module) -> int:
    """FLOPs of the served forward pass for one held-out sample."""
    sample = recipe.example_inputs(1)
    tensors = [torch.from_numpy(sample[spec.name]) for spec in recipe.inputs]
    model.eval()
    with torch.no_grad():
        return count_flops(lambda: model(*tensors))


def matmul_parameters(model: torch.nn.Module) -> int:
    """Parameters of every linear layer, a tied weight counted once per layer that multiplies by it."""
    return sum(
        p.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) for p in m.parameters(recurse=False)
    )


def six_n_d(model: torch.nn.Module, tokens: int) -> int:
    """The transformer rule of thumb: 6 FLOPs per matrix parameter per training token."""
    return 6 * matmul_parameters(model) * tokens


def tokens_per_step(recipe: Recipe, batch_size: int) -> int:
    inputs, _ = next(recipe.train_batches(batch_size, torch.Generator().manual_seed(0)))
    return int(inputs[0].numel())
