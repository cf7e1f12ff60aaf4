"""Torch-native candidates, because they are what users pick instead of ONNX: the trained model compiled ahead
of time by torch.compile's inductor (AOTInductor, `torch-compile`), and the same after torchao's INT8 (dynamic
INT8 activations, INT8 weights: `torchao-int8`).

Each is a `.pt2` package that `core.runtimes.TorchSession` (in-process) and the Python backend (served) load with
`torch._inductor.aoti_load_package`, with no Python model code: the input and output names ride in the package's
metadata. Compiling needs a C++ compiler (g++), and takes about half a minute at the demo size.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from core.errors import VariantSkipped
from export.onnx_export import _dynamic_shapes
from recipes import Recipe
from recipes.evaluation import reference_model

log = logging.getLogger(__name__)

TORCH_VARIANTS = ("torch-compile", "torchao-int8")


def build_torch_variant(recipe: Recipe, weights: str | Path | None, out_dir: Path, name: str) -> Path:
    """`<out_dir>/<name>.pt2`, written atomically."""
    if name not in TORCH_VARIANTS:
        raise ValueError(f"unknown torch variant {name!r}: expected one of {TORCH_VARIANTS}")
    model = reference_model(recipe, weights)
    if model is None:
        raise VariantSkipped("there is no torch model to compile (this run has only an ONNX file)")
    if name == "torchao-int8":
        model = _torchao_int8(model)
    example = recipe.example_inputs(2)
    # contiguous: AOTInductor compiles for the example's strides and does not check them at run time (a view into
    # wider windows, as the byte recipes hand out, would make the package read every row at the wrong offset)
    args = tuple(torch.from_numpy(np.ascontiguousarray(example[spec.name])) for spec in recipe.inputs)
    target = out_dir / f"{name}.pt2"
    descriptor, scratch = tempfile.mkstemp(prefix=f".{name}-", suffix=".pt2", dir=out_dir)
    os.close(descriptor)
    try:
        with torch.no_grad():
            program = torch.export.export(model, args, dynamic_shapes=_dynamic_shapes(recipe))
            metadata = {
                "tes_inputs": json.dumps([spec.name for spec in recipe.inputs]),
                "tes_outputs": json.dumps([spec.name for spec in recipe.outputs]),
                "tes_variant": name,
            }
            torch._inductor.aoti_compile_and_package(
                program, package_path=scratch, inductor_configs={"aot_inductor.metadata": metadata}
            )
        os.replace(scratch, target)
    except VariantSkipped:
        raise
    except Exception as error:  # inductor raises many kinds: the variant is skipped with the reason
        raise VariantSkipped(f"torch.export / AOTInductor could not compile {name}: {error}") from error
    finally:
        if os.path.exists(scratch):
            os.unlink(scratch)
    return target


def _torchao_int8(model: torch.nn.Module) -> torch.nn.Module:
    # torchao's wheel carries CUDA kernels and warns on a CPU-only torch that it cannot load them: not our users' noise
    logging.getLogger("torchao").setLevel(logging.ERROR)
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except ImportError as error:
        raise VariantSkipped(f"torchao is not installed: {error}") from error
    quantized = copy.deepcopy(model)
    quantize_(quantized, Int8DynamicActivationInt8WeightConfig())
    return quantized
