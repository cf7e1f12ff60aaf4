"""`torch:<module>:<factory>`: a torch module the user's own code builds, with weights from a checkpoint.

    build_recipe("torch:my_models:make_classifier", {
        "weights": "classifier.pt",                      # a state_dict, a {"state_dict"|"model": ...} checkpoint,
        "factory_args": {"width": 64},                   #   or a pickled nn.Module
        "inputs": [{"name": "image", "dtype": "float32", "shape": [3, 32, 32]}],
    })

The factory's module must take the inputs positionally in the order given and return a tensor or a tuple of
tensors. Checkpoints load with `torch.load(weights_only=True)`; only a whole pickled nn.Module (whose class must
be importable) is unpickled in full, which runs code from the file, and the recipe's notes say so.
"""

from __future__ import annotations

import importlib
import logging
import pickle
import re
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field, field_validator

from core.errors import RecipeError
from recipes.agreement import SampleOptions
from recipes.base import TensorSpec
from recipes.pretrained import InputDescription, Predictor, PretrainedRecipe, dry_run_inputs, output_specs

log = logging.getLogger(__name__)

_STATE_KEYS = ("state_dict", "model", "model_state_dict")  # where training scripts commonly keep the weights
_SHOWN_KEYS = 5
_REFUSED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


class TorchSourceOptions(SampleOptions):
    weights: str | None = Field(None, description="checkpoint file; None: the factory's own initialization")
    factory_args: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the factory")
    inputs: tuple[InputDescription, ...] = Field(description="the module's inputs, in forward order")
    output_names: tuple[str, ...] = Field((), description="names of the outputs; (): output, or output_0, output_1...")

    @field_validator("inputs")
    @classmethod
    def _some_inputs(cls, inputs: tuple[InputDescription, ...]) -> tuple[InputDescription, ...]:
        if not inputs:  # checked here, not with min_length, which also fires when an item is invalid
            raise ValueError("describe at least one input: [{name, dtype, shape}]")
        return inputs


class TorchSourceRecipe(PretrainedRecipe):
    kind = "torch"
    Options = TorchSourceOptions
    source_example = "torch:my_package.models:make_model"

    def __init__(self, options: TorchSourceOptions | None = None):
        super().__init__(options)
        module_name, _, factory_name = self.source.rpartition(":")
        if not module_name or not factory_name:
            raise RecipeError(f"'{self.name}': expected torch:<module>:<factory>, e.g. {self.source_example}")
        weights = self.options.weights
        if weights is not None and not Path(weights).is_file():
            raise RecipeError(f"'{self.name}': weights file {weights} does not exist")

    @property
    def inputs(self) -> list[TensorSpec]:
        return [description.spec() for description in self.options.inputs]

    @cached_property
    def outputs(self) -> list[TensorSpec]:
        runs = []
        for other_sizes in (False, True):
            inputs = dry_run_inputs(self.inputs, other_sizes)
            runs.append((self._run(inputs), inputs))
        count = len(runs[0][0])
        names = list(self.options.output_names) or (["output"] if count == 1 else [f"output_{i}" for i in range(count)])
        if len(names) != count:
            raise RecipeError(f"'{self.name}': output_names has {len(names)} name(s) but the module returns {count}")
        return output_specs(names, runs, self.inputs)

    def build_model(self) -> torch.nn.Module:
        """The factory's module with the checkpoint's weights, built once (every caller gets the same module)."""
        return self._model

    @cached_property
    def _model(self) -> torch.nn.Module:
        module = self._call_factory()
        if self.options.weights is not None:
            state, note = read_checkpoint(Path(self.options.weights))
            if note:
                log.warning("%s: %s", self.name, note)
                self.notes.append(note)
            load_matching(module, state, self.options.weights, self.source)
        return module.eval()

    def _call_factory(self) -> torch.nn.Module:
        module_name, _, factory_name = self.source.rpartition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise RecipeError(
                f"'{self.name}': cannot import module {module_name!r} ({error}); is it on PYTHONPATH?"
            ) from error
        factory = getattr(module, factory_name, None)
        if not callable(factory):
            raise RecipeError(f"'{self.name}': {factory_name!r} in {module_name!r} is not callable (got {factory!r})")
        try:
            built = factory(**self.options.factory_args)
        except Exception as error:
            raise RecipeError(
                f"factory {self.source} raised {type(error).__name__}: {error} (called with factory_args "
                f"{self.options.factory_args}); fix the factory or its arguments"
            ) from error
        if not isinstance(built, torch.nn.Module):
            raise RecipeError(f"factory {self.source} returned {type(built).__name__}, expected a torch.nn.Module")
        return built

    def _run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        with torch.no_grad():
            result = self._model(*(torch.from_numpy(inputs[spec.name]) for spec in self.inputs))
        results = [result] if isinstance(result, torch.Tensor) else result
        if not isinstance(results, (tuple, list)) or not all(isinstance(r, torch.Tensor) for r in results):
            raise RecipeError(
                f"'{self.name}': the module returned {type(result).__name__}; it must return a tensor or a tuple "
                "of tensors (wrap it so forward returns them in a fixed order)"
            )
        return [r.detach().float().numpy() if r.is_floating_point() else r.numpy() for r in results]

    def _reference(self) -> Predictor:
        return lambda inputs: self._run(inputs)[0]


# --- checkpoints --------------------------------------------------------------------------------------------------
def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], str | None]:
    """The state_dict in `path`, and a note when it is a pickled nn.Module that had to be unpickled in full."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        refused = _REFUSED_GLOBAL.search(str(error))
        if refused is None:  # not an object it refused: the bytes are no pickle it understands
            reason = next((line for line in str(error).splitlines()[2:] if line.strip()), str(error)).strip()
            raise RecipeError(f"{path} cannot be read as a torch checkpoint ({reason})") from error
        return _unpickle_module(path, refused.group(1))
    except Exception as error:  # torch.load raises many types for files it cannot read (KeyError, RuntimeError...)
        raise RecipeError(f"{path} cannot be read as a torch checkpoint: {type(error).__name__}: {error}") from error
    return _state_dict_of(loaded, path), None


def _unpickle_module(path: Path, refused_class: str) -> tuple[dict[str, torch.Tensor], str]:
    """Full unpickling, only for a whole pickled nn.Module: the first object it refers to is its class."""
    module_name, _, attribute = refused_class.rpartition(".")
    try:
        found = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as error:
        raise RecipeError(
            f"{path} holds a {refused_class} object, whose class cannot be imported ({error}); put its module on "
            "PYTHONPATH, or save the weights as model.state_dict()"
        ) from error
    if not (isinstance(found, type) and issubclass(found, torch.nn.Module)):
        raise RecipeError(
            f"{path} holds a {refused_class} object, which torch.load(weights_only=True) refuses; it is not a whole "
            "pickled nn.Module, so it is not unpickled in full (that runs code from the file): save the weights as "
            "model.state_dict(), or a dict with the state_dict under 'state_dict' and only tensors and numbers"
        )
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise RecipeError(f"{path} cannot be unpickled ({error}); save model.state_dict() instead") from error
    note = (
        f"{path} is a pickled {refused_class}; it was loaded with full unpickling, which runs code from the "
        "file: use only files you trust, and prefer saving model.state_dict()"
    )
    return _state_dict_of(loaded, path), note


def _state_dict_of(loaded: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(loaded, torch.nn.Module):
        return loaded.state_dict()
    if isinstance(loaded, dict):
        if loaded and all(isinstance(value, torch.Tensor) for value in loaded.values()):
            return loaded
        for key in _STATE_KEYS:
            if key in loaded and isinstance(loaded[key], (dict, torch.nn.Module)):
                return _state_dict_of(loaded[key], path)
        keys = sorted(map(str, loaded))[:10]
        raise RecipeError(
            f"checkpoint {path} is a dict with keys {keys} and none of them holds the weights: expected a "
            f"state_dict (name -> tensor), a dict with one of {list(_STATE_KEYS)}, or a pickled nn.Module"
        )
    raise RecipeError(f"checkpoint {path} holds a {type(loaded).__name__}; expected a state_dict or an nn.Module")


def load_matching(module: torch.nn.Module, state: dict[str, torch.Tensor], path: str, factory: str) -> None:
    """Load `state` into `module`, or say which keys and shapes differ and how to fix it."""
    own = module.state_dict()
    missing = [key for key in own if key not in state]
    unexpected = [key for key in state if key not in own]
    reshaped = [
        f"{key}: checkpoint {list(state[key].shape)} vs module {list(own[key].shape)}"
        for key in own
        if key in state and state[key].shape != own[key].shape
    ]
    if not (missing or unexpected or reshaped):
        module.load_state_dict(state)
        return
    parts = [
        f"{len(found)} {what} (first: {', '.join(found[:_SHOWN_KEYS])})"
        for what, found in (
            ("missing key(s)", missing),
            ("unexpected key(s)", unexpected),
            ("shape mismatch(es)", reshaped),
        )
        if found
    ]
    raise RecipeError(
        f"checkpoint {path} does not match the module built by {factory}: {'; '.join(parts)}. "
        f"Fix: {_key_hint(list(own), list(state))}"
    )


def _key_hint(own: list[str], saved: list[str]) -> str:
    for prefix in {key.split(".", 1)[0] + "." for key in saved if "." in key}:
        if all(key.startswith(prefix) for key in saved) and {key[len(prefix) :] for key in saved} == set(own):
            return (
                f"every checkpoint key starts with {prefix!r} (a wrapper such as DistributedDataParallel); "
                f"save the inner module's state_dict, or strip the prefix"
            )
    return (
        "build the same architecture the checkpoint was saved from (check the factory and `factory_args`), "
        "or point `weights` at the checkpoint of this model"
    )
