"""Recipe lookup: built-in names, a user's own recipe as `package.module:attribute`, or a model the user
already has: `hf:<dir or hub id>`, `torch:<module>:<factory>`, `onnx:<path>` (see `recipes.pretrained`)."""

from __future__ import annotations

import importlib
from functools import lru_cache
from typing import Any

from pydantic import ValidationError

from core.errors import ConfigError, RecipeError
from recipes.base import Batch, Recipe, RecipeOptions, TensorSpec
from recipes.digits_cnn import DigitsCnnOptions, DigitsCnnRecipe
from recipes.hf import HfOptions, HfRecipe
from recipes.onnx_source import OnnxSourceOptions, OnnxSourceRecipe
from recipes.pretrained import InputDescription, PretrainedRecipe
from recipes.stdlib_gpt import StdlibGptOptions, StdlibGptRecipe
from recipes.torch_source import TorchSourceOptions, TorchSourceRecipe

BUILTIN_RECIPES: dict[str, type[Recipe]] = {
    StdlibGptRecipe.name: StdlibGptRecipe,
    DigitsCnnRecipe.name: DigitsCnnRecipe,
}
MODEL_SOURCES: dict[str, type[PretrainedRecipe]] = {
    HfRecipe.kind: HfRecipe,
    TorchSourceRecipe.kind: TorchSourceRecipe,
    OnnxSourceRecipe.kind: OnnxSourceRecipe,
}

__all__ = [
    "BUILTIN_RECIPES",
    "MODEL_SOURCES",
    "Batch",
    "DigitsCnnOptions",
    "HfOptions",
    "InputDescription",
    "OnnxSourceOptions",
    "PretrainedRecipe",
    "Recipe",
    "RecipeOptions",
    "StdlibGptOptions",
    "TensorSpec",
    "TorchSourceOptions",
    "build_recipe",
    "recipe_class",
    "validation_problems",
]


def recipe_class(reference: str) -> type[Recipe]:
    """`stdlib-gpt`, `digits-cnn`, `hf:...`, `torch:...`, `onnx:...`, or `package.module:attribute` naming a
    `Recipe` subclass."""
    if reference in BUILTIN_RECIPES:
        return BUILTIN_RECIPES[reference]
    kind, _, source = reference.partition(":")
    if kind in MODEL_SOURCES:
        return _bound_source(kind, source)
    if ":" not in reference:
        raise RecipeError(
            f"unknown recipe {reference!r}: expected one of {sorted(BUILTIN_RECIPES)}, a model source "
            f"({', '.join(f'{prefix}:...' for prefix in MODEL_SOURCES)}) or 'package.module:attribute' for your own"
        )
    module_name, _, attribute = reference.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise RecipeError(
            f"recipe {reference!r}: cannot import module {module_name!r} ({error}); is it on PYTHONPATH?"
        ) from error
    found = getattr(module, attribute, None)
    if not (isinstance(found, type) and issubclass(found, Recipe)):
        raise RecipeError(
            f"recipe {reference!r}: {attribute!r} in {module_name!r} is not a Recipe subclass (got {found!r})"
        )
    return found


@lru_cache(maxsize=None)
def _bound_source(kind: str, source: str) -> type[PretrainedRecipe]:
    """One class per source, so `recipe_class` answers the same class for the same reference."""
    return MODEL_SOURCES[kind].bind(source)


def validation_problems(error: ValidationError, prefix: str = "") -> list[str]:
    """One line per pydantic problem: `field: message (got value)`."""
    problems = []
    for item in error.errors():
        where = ".".join(str(part) for part in (prefix, *item["loc"]) if part != "")
        got = f" (got {item['input']!r})" if item["type"] not in ("missing", "value_error") else ""
        message = item["msg"].removeprefix("Value error, ")
        problems.append(f"{where}: {message}{got}" if where else f"{message}{got}")
    return problems


def build_recipe(reference: str, options: dict[str, Any] | RecipeOptions | None = None) -> Recipe:
    cls = recipe_class(reference)
    if isinstance(options, RecipeOptions):
        return cls(options)
    try:
        return cls(cls.Options(**(options or {})))
    except ValidationError as error:
        raise ConfigError(validation_problems(error), where=f"options of recipe {reference!r}") from error
