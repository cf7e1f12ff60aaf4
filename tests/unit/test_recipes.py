import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from core.errors import ConfigError, RecipeError
from recipes import build_recipe
from recipes.stdlib_gpt import StdlibGptOptions, read_stdlib_text
from tests.conftest import TINY_DIGITS, TINY_GPT


def test_digits_split_is_deterministic_and_disjoint():
    first, second = build_recipe("digits-cnn", TINY_DIGITS), build_recipe("digits-cnn", TINY_DIGITS)
    train_images, _ = first._splits["train"]
    val_images, val_labels = first._splits["validation"]
    assert len(train_images) + len(val_images) == 1797
    assert np.array_equal(val_images, second._splits["validation"][0])
    train_rows = {row.tobytes() for row in train_images}
    overlap = sum(row.tobytes() in train_rows for row in val_images)
    assert overlap <= 5  # the data set has a few duplicate images; the split itself is disjoint by index
    assert set(np.unique(val_labels)) == set(range(10))


def test_stdlib_validation_text_comes_only_from_held_out_files():
    options = StdlibGptOptions(**TINY_GPT)
    splits = read_stdlib_text(options)
    assert len(splits["train"]) == 500_000 and len(splits["validation"]) == 200_000
    # a 64-byte window of validation text is not found in training text (files never straddle the split)
    train, validation = splits["train"].tobytes(), splits["validation"].tobytes()
    probes = [validation[i : i + 64] for i in range(0, 150_000, 15_000)]
    assert sum(probe in train for probe in probes) <= 1


def test_stdlib_eval_batches_target_the_byte_after_the_window():
    recipe = build_recipe("stdlib-gpt", TINY_GPT)
    batch = next(iter(recipe.eval_batches(4, max_samples=8)))
    tokens = batch.inputs["tokens"]
    assert tokens.shape == (4, 32) and tokens.dtype == np.int64
    data = recipe._splits["validation"]
    start = 0  # the first window starts at byte 0
    assert np.array_equal(tokens[0], data[start : start + 32]) and batch.targets[0] == data[32]


def test_invalid_options_report_every_problem_at_once():
    with pytest.raises(ConfigError) as caught:
        build_recipe("stdlib-gpt", {"n_layer": 0, "n_embd": 30, "n_head": 4, "block_sz": 64})
    text = str(caught.value)
    assert "n_layer" in text and "greater than or equal to 1" in text
    assert "block_sz" in text  # the unknown field is named
    assert len(caught.value.problems) == 2  # field errors first; the cross-field check needs valid fields


def test_cross_field_check_names_both_fields_and_the_fix():
    with pytest.raises(ConfigError, match=r"n_embd \(30\) must be a multiple of n_head \(4\); try n_embd=32"):
        build_recipe("stdlib-gpt", {"n_embd": 30, "n_head": 4})


def test_unknown_recipe_lists_the_known_ones():
    with pytest.raises(RecipeError, match="digits-cnn"):
        build_recipe("mnist-mlp")


def test_user_recipe_from_module_attribute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "my_recipes.py").write_text(
        textwrap.dedent("""
        from recipes.digits_cnn import DigitsCnnRecipe

        class SmallDigits(DigitsCnnRecipe):
            name = "small-digits"
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = build_recipe("my_recipes:SmallDigits", {"channels": 2})
    assert recipe.name == "small-digits" and recipe.options.channels == 2
    with pytest.raises(RecipeError, match="not a Recipe subclass"):
        build_recipe("my_recipes:DigitsCnnRecipeX")
    sys.modules.pop("my_recipes", None)
