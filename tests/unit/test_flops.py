import torch

from accounting.flops import count_flops, inference_flops_per_sample, six_n_d, tokens_per_step, training_step_flops
from recipes import build_recipe
from tests.conftest import TINY_GPT


def test_linear_stack_counts_exactly_the_closed_form():
    widths, batch = [64, 128, 32, 10], 16
    model = torch.nn.Sequential(*[torch.nn.Linear(a, b, bias=False) for a, b in zip(widths, widths[1:])])
    x = torch.randn(batch, widths[0])
    forward = sum(2 * batch * a * b for a, b in zip(widths, widths[1:]))  # one multiply-add per weight per row
    assert count_flops(lambda: model(x)) == forward
    # backward: the gradient of the input (skipped for the first layer, whose input needs none) and of each weight
    backward = sum(2 * batch * a * b for a, b in zip(widths, widths[1:])) + sum(
        2 * batch * a * b for a, b in list(zip(widths, widths[1:]))[1:]
    )
    assert count_flops(lambda: model(x).sum().backward()) == forward + backward


def test_tiny_transformer_training_step_is_within_ten_percent_of_6nd():
    recipe = build_recipe("stdlib-gpt", TINY_GPT)
    model = recipe.build_model()
    counted = training_step_flops(recipe, model, batch_size=8)
    rule = six_n_d(model, tokens_per_step(recipe, 8))
    assert abs(counted / rule - 1) < 0.10


def test_inference_flops_per_sample_grow_with_width():
    small = build_recipe("stdlib-gpt", TINY_GPT)
    wide = build_recipe("stdlib-gpt", {**TINY_GPT, "n_embd": 64})
    assert inference_flops_per_sample(wide, wide.build_model()) > 2 * inference_flops_per_sample(
        small, small.build_model()
    )
