"""`hf:<local dir or hub id>`: a Hugging Face transformers model, as it is.

    build_recipe("hf:./my-bert", {"task": "text-classification", "samples": "texts.txt"})

Tasks: text-classification, feature-extraction, causal-lm, image-classification (None: read from the config's
`architectures`). Nothing is downloaded: a hub id must already be in the local Hugging Face cache. The exported
module takes the model's real inputs positionally (input_ids, attention_mask, token_type_ids where the model has
segments; or pixel_values) and returns one plain tensor: logits, or last_hidden_state for feature-extraction.
"""

from __future__ import annotations

import inspect
import logging
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from core.errors import RecipeError
from recipes.agreement import SampleOptions
from recipes.base import TensorSpec
from recipes.pretrained import Predictor, PretrainedRecipe, dry_run_inputs, files_digest, output_specs

log = logging.getLogger(__name__)

Task = Literal["text-classification", "feature-extraction", "causal-lm", "image-classification"]
_AUTO_CLASSES = {
    "text-classification": "AutoModelForSequenceClassification",
    "feature-extraction": "AutoModel",
    "causal-lm": "AutoModelForCausalLM",
    "image-classification": "AutoModelForImageClassification",
}
_ARCHITECTURE_SUFFIXES = (  # config.architectures[0] ends with ... -> task
    ("ForSequenceClassification", "text-classification"),
    ("ForCausalLM", "causal-lm"),
    ("LMHeadModel", "causal-lm"),
    ("ForImageClassification", "image-classification"),
    ("Model", "feature-extraction"),
)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model")
_TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class HfOptions(SampleOptions):
    task: Task | None = Field(None, description="what the model does; None: from the config's `architectures`")
    sequence_length: int = Field(
        128, ge=1, le=1_000_000, description="typical text length in tokens: synthesized samples, the export's opt"
    )
    max_sequence_length: int | None = Field(
        None, ge=1, description="longest text the exported model takes; None: the model's position limit"
    )


class TextForward(torch.nn.Module):
    """A transformers text model as forward(input_ids, attention_mask, token_type_ids) -> one tensor."""

    def __init__(self, model: torch.nn.Module, output_field: str, causal: bool):
        super().__init__()
        self.model, self.output_field, self.causal = model, output_field, causal

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        named = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        extra = {"use_cache": False} if self.causal else {}  # no past key/values: plain logits out
        given = {name: tensor for name, tensor in named.items() if tensor is not None}
        return getattr(self.model(**given, **extra, return_dict=True), self.output_field)


class ImageForward(torch.nn.Module):
    """A transformers vision model as forward(pixel_values) -> one tensor."""

    def __init__(self, model: torch.nn.Module, output_field: str):
        super().__init__()
        self.model, self.output_field = model, output_field

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return getattr(self.model(pixel_values=pixel_values, return_dict=True), self.output_field)


def _transformers():
    try:
        import transformers
    except ImportError as error:
        raise RecipeError(
            "hf: model sources need the `transformers` package: pip install transformers==5.24.0"
        ) from error
    return transformers


class HfRecipe(PretrainedRecipe):
    kind = "hf"
    Options = HfOptions
    source_example = "hf:./my-model (a save_pretrained directory) or hf:org/name (already in the local cache)"

    def __init__(self, options: HfOptions | None = None):
        super().__init__(options)
        self.config  # read now: a source that cannot be found fails here, not at export

    @property
    def default_agreement(self) -> str:  # type: ignore[override]
        return "cosine" if self.task == "feature-extraction" else "top1"

    # --- the source ----------------------------------------------------------------------------------------------
    @cached_property
    def local_dir(self) -> Path | None:
        path = Path(self.source).expanduser()
        return path if path.is_dir() else None

    @cached_property
    def config(self) -> Any:
        path = Path(self.source).expanduser()
        if path.exists() and not path.is_dir():
            raise RecipeError(f"'{self.name}': {path} is a file; give the model's directory (with config.json)")
        if self.local_dir is not None and not (self.local_dir / "config.json").is_file():
            raise RecipeError(f"'{self.name}': {path} has no config.json; give a directory written by save_pretrained")
        try:
            return _transformers().AutoConfig.from_pretrained(self.source, local_files_only=True)
        except (OSError, ValueError) as error:
            if self.local_dir is not None:
                raise RecipeError(f"'{self.name}': cannot read the model config in {path}: {error}") from error
            raise RecipeError(
                f"'{self.name}': {self.source!r} is not a local directory and not in the Hugging Face cache, and "
                f"models are never downloaded here. Download it where there is network (`hf download {self.source} "
                f"--local-dir DIR`) and give hf:DIR, or point HF_HOME at a cache that has it"
            ) from error

    @cached_property
    def task(self) -> str:
        if self.options.task is not None:
            return self.options.task
        architectures = getattr(self.config, "architectures", None) or []
        for suffix, task in _ARCHITECTURE_SUFFIXES:
            if architectures and architectures[0].endswith(suffix):
                return task
        raise RecipeError(
            f"'{self.name}': cannot tell the task from architectures {architectures}; set `task` to one of "
            f"{list(_AUTO_CLASSES)}"
        )

    @cached_property
    def _auto_class(self) -> Any:
        return getattr(_transformers(), _AUTO_CLASSES[self.task])

    @cached_property
    def _input_names(self) -> list[str]:
        try:  # the auto class's config -> model class table: the class, without loading any weights
            model_class = self._auto_class._model_mapping[type(self.config)]
        except KeyError as error:
            raise RecipeError(
                f"'{self.name}': transformers has no {self.task} model for model type "
                f"{self.config.model_type!r}; pick another task of {list(_AUTO_CLASSES)}"
            ) from error
        takes = inspect.signature(model_class.forward).parameters
        if "pixel_values" in takes:
            return ["pixel_values"]
        if "input_ids" not in takes:
            raise RecipeError(f"'{self.name}': {model_class.__name__} takes neither input_ids nor pixel_values")
        segments = getattr(self.config, "type_vocab_size", 0) or 0  # GPT-2 takes token_type_ids but has no segments
        return [n for n in _TEXT_INPUTS if n in takes and (n != "token_type_ids" or segments > 0)]

    # --- interface -------------------------------------------------------------------------------------------------
    @property
    def is_text(self) -> bool:
        return self._input_names[0] == "input_ids"

    @cached_property
    def sequence_range(self) -> tuple[int, int, int]:
        """(min, typical, max) tokens."""
        limit = getattr(self.config, "max_position_embeddings", None)
        wanted = self.options.max_sequence_length
        if limit is None and wanted is None:
            raise RecipeError(f"'{self.name}': the config has no position limit; set `max_sequence_length`")
        longest = min(v for v in (limit, wanted) if v is not None)
        return 1, min(self.options.sequence_length, longest), longest

    @cached_property
    def inputs(self) -> list[TensorSpec]:
        config = self.config
        if not self.is_text:
            size = config.image_size
            height, width = (size, size) if isinstance(size, int) else tuple(size)
            return [TensorSpec("pixel_values", "float32", (config.num_channels, height, width))]
        sequence = {0: self.sequence_range}
        value_ranges = {
            "input_ids": (0, config.vocab_size - 1),
            "attention_mask": (0, 1),
            "token_type_ids": (0, max(0, (getattr(config, "type_vocab_size", 1) or 1) - 1)),
        }
        return [TensorSpec(name, "int64", (-1,), sequence, value_ranges[name]) for name in self._input_names]

    @cached_property
    def outputs(self) -> list[TensorSpec]:
        name = "last_hidden_state" if self.task == "feature-extraction" else "logits"
        predict = self._reference()
        runs = []
        for other_sizes in (False, True):
            inputs = dry_run_inputs(self.inputs, other_sizes)
            runs.append(([predict(inputs)], inputs))
        return output_specs([name], runs, self.inputs)

    def build_model(self) -> torch.nn.Module:
        """The loaded model behind a positional forward (loaded once; every caller gets the same module)."""
        return self._model

    @cached_property
    def _model(self) -> torch.nn.Module:
        loaded, info = self._auto_class.from_pretrained(
            self.source, local_files_only=True, dtype=torch.float32, output_loading_info=True
        )
        fresh = list(info.get("missing_keys") or [])
        if fresh:
            note = (
                f"{len(fresh)} weight(s) are not in the checkpoint and were initialized at random "
                f"(first: {', '.join(sorted(fresh)[:5])}): its {self.task} head is untrained"
            )
            log.warning("%s: %s", self.name, note)
            self.notes.append(note)
        field = "last_hidden_state" if self.task == "feature-extraction" else "logits"
        if self.is_text:
            return TextForward(loaded.eval(), field, causal=self.task == "causal-lm").eval()
        return ImageForward(loaded.eval(), field).eval()

    def _reference(self) -> Predictor:
        model, names = self._model, [spec.name for spec in self.inputs]

        @torch.no_grad()
        def predict(inputs: dict[str, np.ndarray]) -> np.ndarray:
            return model(*(torch.from_numpy(np.ascontiguousarray(inputs[name])) for name in names)).float().numpy()

        return predict

    # --- text ------------------------------------------------------------------------------------------------------
    @cached_property
    def _tokenizer(self) -> Any | None:
        if not self.is_text:
            return None
        if self.local_dir is not None and not any((self.local_dir / f).is_file() for f in _TOKENIZER_FILES):
            return None
        try:
            return _transformers().AutoTokenizer.from_pretrained(self.source, local_files_only=True)
        except (OSError, ValueError) as error:
            log.info("%s: no tokenizer (%s)", self.name, error)
            return None

    def tokenizer(self) -> Any | None:
        return self._tokenizer

    @property
    def tokenizer_path(self) -> str | None:
        """Where the tokenizer files are (the model directory or hub id), when the model has a tokenizer."""
        return self.source if self._tokenizer is not None else None

    def text_inputs(self, texts: str | list[str]) -> dict[str, np.ndarray]:
        """Texts as the model's named int64 inputs (right-padded to the longest, cut at the longest sequence)."""
        tokenizer = self._tokenizer
        if tokenizer is None:
            raise RecipeError(f"'{self.name}' has no tokenizer in {self.source}; send token ids instead of text")
        if tokenizer.pad_token is None:  # GPT-2 has none; padded positions are masked anyway
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "right"
        encoded = tokenizer(
            [texts] if isinstance(texts, str) else list(texts),
            padding="longest",
            truncation=True,
            max_length=self.sequence_range[2],
            return_tensors="np",
        )
        arrays = {}
        for spec in self.inputs:
            array = encoded.get(spec.name)
            arrays[spec.name] = np.zeros_like(encoded["input_ids"]) if array is None else array.astype(np.int64)
        if arrays["input_ids"].max(initial=0) >= self.config.vocab_size:
            raise RecipeError(
                f"'{self.name}': the tokenizer gives ids up to {arrays['input_ids'].max()} but the model's vocabulary "
                f"has {self.config.vocab_size}; the tokenizer does not belong to this model"
            )
        return arrays

    def _text_samples(self, path: Path) -> dict[str, np.ndarray]:
        texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not texts:
            raise RecipeError(f"'{self.name}': samples file {path} has no non-empty lines")
        return self.text_inputs(texts)

    def data_fingerprint(self) -> str | None:
        """The model directory's files, the samples and the transformers version; None for a hub id."""
        if self.local_dir is None:
            return None
        files = sorted(path for path in self.local_dir.rglob("*") if path.is_file())
        if self.options.samples is not None:
            files.append(Path(self.options.samples))
        return files_digest(files, _transformers().__version__)
