"""`stdlib-gpt`: a byte-level GPT trained on the Python standard library's own source files.

Every Python installation ships this text, so nothing is downloaded. Files are split into train and
validation by a hash of their relative path, so the split is deterministic and never mixes a file's bytes.
The served model maps a context of byte ids (B, T) to next-byte logits (B, 256).
"""

from __future__ import annotations

import hashlib
import math
import sysconfig
from functools import cached_property
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from pydantic import Field, model_validator
from torch.nn import functional as F

from recipes.base import Batch, Recipe, RecipeOptions, TensorSpec

VOCAB_SIZE = 256  # bytes


class StdlibGptOptions(RecipeOptions):
    n_layer: int = Field(4, ge=1, le=48, description="transformer blocks")
    n_embd: int = Field(128, ge=8, le=4096, description="model width; a multiple of n_head")
    n_head: int = Field(4, ge=1, le=64, description="attention heads")
    block_size: int = Field(128, ge=8, le=4096, description="longest context the model takes, in bytes")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    train_megabytes: float = Field(8.0, gt=0.0, le=512.0, description="cap on training text read from the stdlib")
    validation_megabytes: float = Field(1.0, gt=0.0, le=64.0, description="cap on held-out text")
    validation_every: int = Field(10, ge=2, le=1000, description="one file in this many is held out")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> "StdlibGptOptions":
        if self.n_embd % self.n_head:
            raise ValueError(
                f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head}); "
                f"try n_embd={self.n_head * max(1, round(self.n_embd / self.n_head))}"
            )
        return self


class CausalSelfAttention(torch.nn.Module):
    def __init__(self, options: StdlibGptOptions):
        super().__init__()
        self.n_head = options.n_head
        self.qkv = torch.nn.Linear(options.n_embd, 3 * options.n_embd)
        self.proj = torch.nn.Linear(options.n_embd, options.n_embd)
        self.dropout = options.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, time, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=2)
        # (B, T, C) -> (B, nh, T, hs)
        q, k, v = (t.view(batch, time, self.n_head, width // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(batch, time, width))


class Block(torch.nn.Module):
    def __init__(self, options: StdlibGptOptions):
        super().__init__()
        self.ln_1 = torch.nn.LayerNorm(options.n_embd)
        self.attn = CausalSelfAttention(options)
        self.ln_2 = torch.nn.LayerNorm(options.n_embd)
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(options.n_embd, 4 * options.n_embd),
            torch.nn.GELU(),
            torch.nn.Linear(4 * options.n_embd, options.n_embd),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class ByteGpt(torch.nn.Module):
    """Decoder-only transformer over bytes; forward gives logits at every position."""

    def __init__(self, options: StdlibGptOptions):
        super().__init__()
        self.block_size = options.block_size
        self.wte = torch.nn.Embedding(VOCAB_SIZE, options.n_embd)
        self.wpe = torch.nn.Embedding(options.block_size, options.n_embd)
        self.blocks = torch.nn.ModuleList(Block(options) for _ in range(options.n_layer))
        self.ln_f = torch.nn.LayerNorm(options.n_embd)
        self.lm_head = torch.nn.Linear(options.n_embd, VOCAB_SIZE, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: torch.nn.Module) -> None:
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, torch.nn.Linear) and module.bias is not None:
            torch.nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, T) int64 -> (B, T, 256)
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.wte(tokens) + self.wpe(positions)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


class NextByteHead(torch.nn.Module):
    """What is exported and served: the logits of the byte that follows the context."""

    def __init__(self, gpt: ByteGpt):
        super().__init__()
        self.gpt = gpt

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, 256)
        return self.gpt(tokens)[:, -1, :]


def _held_out(relative_path: str, every: int) -> bool:
    return int(hashlib.sha256(relative_path.encode()).hexdigest(), 16) % every == 0


def read_stdlib_text(options: StdlibGptOptions) -> dict[str, np.ndarray]:
    """Train/validation byte arrays from the stdlib's `.py` files, in a fixed file order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    caps = {"train": int(options.train_megabytes * 1e6), "validation": int(options.validation_megabytes * 1e6)}
    chunks: dict[str, list[bytes]] = {"train": [], "validation": []}
    sizes = {"train": 0, "validation": 0}
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        split = "validation" if _held_out(path.relative_to(root).as_posix(), options.validation_every) else "train"
        if sizes[split] >= caps[split]:
            if all(sizes[name] >= caps[name] for name in caps):
                break
            continue
        data = path.read_bytes()[: caps[split] - sizes[split]]
        chunks[split].append(data)
        sizes[split] += len(data)
    return {split: np.frombuffer(b"".join(parts), dtype=np.uint8) for split, parts in chunks.items()}


class StdlibGptRecipe(Recipe):
    name = "stdlib-gpt"
    Options = StdlibGptOptions
    primary_metric = "next_byte_accuracy"
    max_batch_size = 32

    @property
    def inputs(self) -> list[TensorSpec]:
        context = self.options.block_size
        return [
            TensorSpec("tokens", "int64", (-1,), ranges={0: (1, context, context)}, value_range=(0, VOCAB_SIZE - 1))
        ]

    @property
    def outputs(self) -> list[TensorSpec]:
        return [TensorSpec("logits", "float32", (VOCAB_SIZE,))]

    def build_model(self) -> torch.nn.Module:
        return NextByteHead(ByteGpt(self.options))

    @cached_property
    def _splits(self) -> dict[str, np.ndarray]:
        splits = read_stdlib_text(self.options)
        for split, data in splits.items():
            if len(data) <= self.options.block_size + 1:
                raise ValueError(f"stdlib-gpt: the {split} split has only {len(data)} bytes")
        return splits

    def data_fingerprint(self) -> str:
        digest = hashlib.sha256()
        arrays = list(self._splits.values())
        for array in arrays:
            digest.update(np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()

    def train_batches(
        self, batch_size: int, generator: torch.Generator
    ) -> Iterator[tuple[tuple[torch.Tensor, ...], torch.Tensor]]:
        data = torch.from_numpy(self._splits["train"].astype(np.int64))
        context = self.options.block_size
        while True:
            starts = torch.randint(len(data) - context - 1, (batch_size,), generator=generator)
            windows = torch.stack([data[start : start + context + 1] for start in starts.tolist()])
            yield (windows[:, :-1],), windows[:, 1:]

    def loss(self, model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], targets: torch.Tensor) -> torch.Tensor:
        gpt = model.gpt if isinstance(model, NextByteHead) else model
        logits = gpt(*inputs)  # every position predicts its next byte: (B, T, 256)
        return F.cross_entropy(logits.float().reshape(-1, VOCAB_SIZE), targets.reshape(-1))

    def eval_batches(self, batch_size: int, max_samples: int | None = None) -> Iterator[Batch]:
        """Evenly spaced held-out windows; the target is the byte after each window."""
        data = self._splits["validation"]
        context = self.options.block_size
        available = len(data) - context - 1
        count = 1024 if max_samples is None else max_samples
        starts = np.linspace(0, available, num=min(count, available), dtype=np.int64)
        for offset in range(0, len(starts), batch_size):
            chunk = starts[offset : offset + batch_size]
            windows = np.stack([data[start : start + context + 1] for start in chunk]).astype(np.int64)
            yield Batch({"tokens": windows[:, :-1]}, windows[:, -1])

    def score(self, outputs: list[np.ndarray], targets: list[np.ndarray]) -> dict[str, float]:
        logits, labels = np.concatenate(outputs).astype(np.float64), np.concatenate(targets)
        shifted = logits - logits.max(-1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
        nats = -log_probs[np.arange(len(labels)), labels].mean()
        return {
            "next_byte_accuracy": float((logits.argmax(-1) == labels).mean()),
            "bits_per_byte": float(nats / math.log(2)),
            "samples": float(len(labels)),
        }
