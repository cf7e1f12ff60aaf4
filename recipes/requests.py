"""Requests built from a recipe: the tensors `tes infer` and the demo send to a served model."""

from __future__ import annotations

import itertools

import numpy as np

from core.errors import RecipeError
from recipes.base import Recipe


def is_byte_model(recipe: Recipe) -> bool:
    """A next-byte model like stdlib-gpt: its first input is int64 bytes, at most `block_size` of them."""
    return recipe.inputs[0].dtype == "int64" and hasattr(recipe.options, "block_size")


def byte_context(recipe: Recipe) -> int:
    """How many bytes of context a byte model takes; `RecipeError` for any other model."""
    if not is_byte_model(recipe):
        takes = ", ".join(f"{spec.name} {spec.dtype} {list(spec.shape)}" for spec in recipe.inputs)
        raise RecipeError(
            f"text is for byte models like stdlib-gpt and models with a tokenizer; a '{recipe.name}' model takes "
            f"{takes}: send --input or --sample instead"
        )
    return recipe.options.block_size


def has_tokenizer(recipe: Recipe) -> bool:
    """A model brought with its own tokenizer (an `hf:` text model): text requests go through it."""
    return callable(getattr(recipe, "text_inputs", None)) and recipe.tokenizer() is not None


def sample_inputs(recipe: Recipe, index: int = 0, text: str | None = None) -> dict[str, np.ndarray]:
    """One request (batch of 1): held-out sample `index` of the recipe's validation split, or `text`: through the
    model's own tokenizer when it has one, else, for byte models, as the context (its last `block_size` bytes,
    (1, T) int64)."""
    if text is not None and has_tokenizer(recipe):
        if not text:
            raise RecipeError("the text is empty; the tokenizer needs at least one character")
        return recipe.text_inputs(text)
    if text is not None:
        context = byte_context(recipe)
        if not text:
            raise RecipeError("the text is empty; a byte model needs at least one byte of context")
        data = np.frombuffer(text.encode(), dtype=np.uint8)[-context:]
        return {recipe.inputs[0].name: data.astype(np.int64)[None]}
    if index < 0:
        raise RecipeError(f"sample number {index} is negative; held-out samples count from 0")
    batch = next(itertools.islice(recipe.eval_batches(1, max_samples=index + 1), index, None), None)
    if batch is None:
        raise RecipeError(
            f"recipe '{recipe.name}' has fewer than {index + 1} held-out samples; pick a smaller sample number"
        )
    return batch.inputs
