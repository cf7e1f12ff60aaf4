"""Model sources the user brings: hf:, torch:, onnx:. Tiny random models built from configs, nothing downloaded."""

import argparse
import copy
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from core.errors import ConfigError, RecipeError
from export.onnx_export import ExportConfig, export_onnx
from recipes import build_recipe, recipe_class
from recipes.evaluation import evaluate, session_predictor, torch_predictor

BERT = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=37,
    max_position_embeddings=64,
)
WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "fast", "slow", "model", "serves", "text"]
TEXTS = ["the cat sat on the mat", "a dog ran fast", "the model serves text", "slow dog", "a cat", "the mat ran"]
SMALL = {"sequence_length": 16, "eval_samples": 24}  # short sequences, few samples: the tests stay fast


def _save(model, path: Path) -> Path:
    torch.manual_seed(0)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    """save_pretrained directories of tiny random models; BERT's has a word-piece tokenizer, GPT-2's has none."""
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    bert = transformers.BertForSequenceClassification(transformers.BertConfig(**BERT, num_labels=3))
    _save(bert, root / "bert")
    vocab = {token: index for index, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    transformers.BertTokenizer(vocab=vocab).save_pretrained(root / "bert")
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            vocab_size=99, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0
        )
    )
    _save(gpt2, root / "gpt2")
    vit = transformers.ViTForImageClassification(
        transformers.ViTConfig(
            image_size=16,
            patch_size=8,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=37,
            num_labels=4,
        )
    )
    _save(vit, root / "vit")
    return {"bert": root / "bert", "gpt2": root / "gpt2", "vit": root / "vit"}


FAMILIES = [
    ("bert", "text-classification", ["input_ids", "attention_mask", "token_type_ids"], "logits"),
    ("bert", "feature-extraction", ["input_ids", "attention_mask", "token_type_ids"], "last_hidden_state"),
    ("gpt2", "causal-lm", ["input_ids", "attention_mask"], "logits"),
    ("vit", "image-classification", ["pixel_values"], "logits"),
]


@pytest.fixture(scope="module")
def exported(model_dirs, tmp_path_factory):
    """Each task family exported by the project's exporter (which verifies ONNX Runtime against torch)."""
    results = {}
    for family, task, _, _ in FAMILIES:
        recipe = build_recipe(f"hf:{model_dirs[family]}", {"task": task, **SMALL})
        out_dir = tmp_path_factory.mktemp(task)
        results[task] = recipe, export_onnx(recipe, recipe.build_model(), out_dir, ExportConfig(verify_samples=8))
    return results


@pytest.mark.parametrize("family, task, input_names, output_name", FAMILIES)
def test_hf_task_exports_and_onnx_runtime_matches_torch(exported, family, task, input_names, output_name):
    recipe, result = exported[task]
    assert recipe.trains is False and recipe.has_torch_model and recipe.synthetic_data
    assert [spec.name for spec in recipe.inputs] == input_names
    assert [spec.name for spec in recipe.outputs] == [output_name]
    assert result.output.verification.cases >= 3
    session = ort.InferenceSession(result.output.onnx, providers=["CPUExecutionProvider"])
    model = recipe.build_model()
    lengths = (5, 16) if recipe.is_text else (None,)
    for batch_size in (1, 3):
        for length in lengths:
            inputs = recipe.example_inputs(batch_size)
            if length is not None:
                inputs = {name: array[:, :length] for name, array in inputs.items()}
            with torch.no_grad():
                expected = model(*(torch.from_numpy(inputs[name]) for name in input_names)).numpy()
            got = session.run(None, inputs)[0]
            assert got.shape == expected.shape and got.shape[0] == batch_size
            np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-3)


def test_text_inputs_are_ids_within_the_vocabulary_with_dynamic_batch_and_sequence(exported):
    recipe, result = exported["text-classification"]
    ids = next(spec for spec in recipe.inputs if spec.name == "input_ids")
    assert ids.value_range == (0, 98) and ids.ranges == {0: (1, 16, 64)}
    batch = next(iter(recipe.eval_batches(24)))
    assert batch.inputs["input_ids"].max() <= 98 and batch.inputs["input_ids"].shape == (24, 16)
    lengths = batch.inputs["attention_mask"].sum(1)
    assert lengths.min() >= 4 and len(set(lengths.tolist())) > 1  # realistic, varied lengths; right padding
    graph = onnx.load(result.output.onnx)
    dims = [[d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim] for value in graph.graph.input]
    assert all(isinstance(size, str) for shape in dims for size in shape)  # batch and sequence are dynamic
    assert len({shape[1] for shape in dims}) == 1  # one sequence dimension shared by the three inputs


def test_causal_lm_targets_skip_padded_positions(exported):
    recipe, _ = exported["causal-lm"]
    batch = next(iter(recipe.eval_batches(8)))
    assert batch.targets.shape == (8, 16)
    assert np.array_equal(batch.targets < 0, batch.inputs["attention_mask"] == 0)


def test_agreement_is_one_for_the_fp32_model_and_lower_for_a_perturbed_one(exported):
    recipe, result = exported["causal-lm"]
    assert recipe.primary_metric == "top1_agreement"
    model = recipe.build_model()
    assert evaluate(recipe, torch_predictor(model, recipe))["top1_agreement"] == 1.0
    onnx_score = evaluate(recipe, session_predictor(ort.InferenceSession(result.output.onnx), recipe))
    assert onnx_score["top1_agreement"] > 0.99
    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        for parameter in perturbed.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    assert evaluate(recipe, torch_predictor(perturbed, recipe))["top1_agreement"] < 0.9


def test_embeddings_are_scored_by_cosine_similarity(exported):
    recipe, _ = exported["feature-extraction"]
    assert recipe.primary_metric == "cosine_similarity"
    model = recipe.build_model()
    assert evaluate(recipe, torch_predictor(model, recipe))["cosine_similarity"] == pytest.approx(1.0, abs=1e-6)
    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        perturbed.model.embeddings.word_embeddings.weight.mul_(-1.0)
    assert evaluate(recipe, torch_predictor(perturbed, recipe))["cosine_similarity"] < 0.99


def test_text_file_samples_go_through_the_tokenizer_and_calibration_is_held_back(model_dirs, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS * 2) + "\n")
    recipe = build_recipe(f"hf:{model_dirs['bert']}", {"samples": str(texts)})
    assert recipe.tokenizer() is not None and recipe.tokenizer_path == str(model_dirs["bert"])
    assert recipe.synthetic_data is False and recipe.task == "text-classification"  # from `architectures`
    scored = np.concatenate([b.inputs["input_ids"] for b in recipe.eval_batches(4)])
    calibration = np.concatenate([b["input_ids"] for b in recipe.calibration_inputs(100)])
    assert len(scored) == 9 and len(calibration) == 3  # 12 lines: the last quarter only calibrates
    assert scored[0, 0] == recipe.tokenizer().cls_token_id and 1 not in scored[:, 1]  # words are in the vocab, no [UNK]
    single = recipe.text_inputs("the dog ran")
    assert list(single) == ["input_ids", "attention_mask", "token_type_ids"] and single["input_ids"].shape == (1, 5)


def test_model_without_tokenizer_has_none(model_dirs):
    recipe = build_recipe(f"hf:{model_dirs['gpt2']}", SMALL)
    assert recipe.task == "causal-lm" and recipe.tokenizer() is None
    with pytest.raises(RecipeError, match="has no tokenizer"):
        recipe.text_inputs("hello")


def test_npz_with_labels_scores_accuracy(model_dirs, tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.uniform(-1, 1, (12, 3, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "images.npz", pixel_values=pixels, labels=rng.integers(0, 4, 12))
    recipe = build_recipe(f"hf:{model_dirs['vit']}", {"samples": str(tmp_path / "images.npz")})
    assert recipe.primary_metric == "accuracy" and not recipe.synthetic_data
    scores = evaluate(recipe, torch_predictor(recipe.build_model(), recipe))
    assert 0.0 <= scores["accuracy"] <= 1.0 and scores["samples"] == 9
    calibration = np.concatenate([batch["pixel_values"] for batch in recipe.calibration_inputs(100)])
    assert np.array_equal(calibration, pixels[9:])  # disjoint from the 9 scored samples


def test_npz_that_does_not_fit_reports_every_problem(model_dirs, tmp_path):
    np.savez(tmp_path / "bad.npz", input_ids=np.full((4, 8), 500), token_type_ids=np.zeros((4, 8)))
    recipe = build_recipe(f"hf:{model_dirs['bert']}", {"samples": str(tmp_path / "bad.npz")})
    with pytest.raises(RecipeError) as caught:
        recipe.example_inputs()
    text = str(caught.value)
    assert "missing array(s) ['attention_mask']" in text and "values 500..500 outside 0..98" in text


def test_hub_id_that_is_not_downloaded_says_how_to_get_it():
    with pytest.raises(RecipeError, match="'some-org/tiny-model' is not a local directory.*hf download some-org"):
        build_recipe("hf:some-org/tiny-model")


def test_synthesized_calibration_differs_from_scored_samples(model_dirs):
    recipe = build_recipe(f"hf:{model_dirs['bert']}", SMALL)
    scored = {row.tobytes() for row in recipe.example_inputs(24)["input_ids"]}
    calibration = [row.tobytes() for batch in recipe.calibration_inputs(12) for row in batch["input_ids"]]
    assert len(calibration) == 12 and not scored.intersection(calibration)


def test_recipe_class_is_stable_per_reference_and_named_after_it(model_dirs):
    reference = f"hf:{model_dirs['vit']}"
    assert recipe_class(reference) is recipe_class(reference)
    assert recipe_class(reference).name == reference and recipe_class(reference).trains is False
    assert recipe_class("digits-cnn").trains is True


# --- torch: ---------------------------------------------------------------------------------------------------------
USER_MODELS = textwrap.dedent("""
    import torch

    class TinyNet(torch.nn.Module):
        def __init__(self, width=8):
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.ReLU(), torch.nn.Linear(width, 3))

        def forward(self, features):
            return self.body(features)

    def make(width=8):
        return TinyNet(width)

    def broken(width=8):
        raise ValueError("needs a GPU")
""")
TORCH_INPUTS = [{"name": "x", "dtype": "float32", "shape": [4], "value_range": [-1, 1]}]


@pytest.fixture
def user_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "tes_user_models.py").write_text(USER_MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    import tes_user_models

    torch.manual_seed(3)
    yield tes_user_models, tes_user_models.make(), tmp_path
    sys.modules.pop("tes_user_models", None)


def _same_weights(first: torch.nn.Module, second: torch.nn.Module) -> bool:
    return all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))


@pytest.mark.parametrize("layout", ["state_dict", "checkpoint", "module"])
def test_torch_source_loads_state_dict_checkpoint_or_module(user_models, layout):
    _, trained, tmp_path = user_models
    saved = {"state_dict": trained.state_dict(), "checkpoint": {"model": trained.state_dict(), "step": 7}}
    torch.save(saved.get(layout, trained), tmp_path / "weights.pt")
    options = {"weights": str(tmp_path / "weights.pt"), "inputs": TORCH_INPUTS, "eval_samples": 24}
    recipe = build_recipe("torch:tes_user_models:make", options)
    assert _same_weights(recipe.build_model(), trained) and recipe.trains is False
    assert [(s.name, s.shape) for s in recipe.outputs] == [("output", (3,))]
    assert bool(recipe.notes) == (layout == "module")  # full unpickling is noted
    if layout == "module":
        assert "full unpickling" in recipe.notes[0]


def test_torch_source_exports_and_verifies(user_models):
    _, trained, tmp_path = user_models
    torch.save(trained.state_dict(), tmp_path / "weights.pt")
    recipe = build_recipe(
        "torch:tes_user_models:make", {"weights": str(tmp_path / "weights.pt"), "inputs": TORCH_INPUTS}
    )
    result = export_onnx(recipe, recipe.build_model(), tmp_path / "out", ExportConfig(verify_samples=8))
    assert result.output.verification.max_abs_diff["output"] < 1e-5
    assert evaluate(recipe, torch_predictor(recipe.build_model(), recipe))["top1_agreement"] == 1.0


def test_checkpoint_that_does_not_match_names_the_keys_and_the_fix(user_models):
    _, trained, tmp_path = user_models
    torch.save({f"module.{key}": value for key, value in trained.state_dict().items()}, tmp_path / "ddp.pt")
    options = {"weights": str(tmp_path / "ddp.pt"), "inputs": TORCH_INPUTS}
    with pytest.raises(RecipeError) as caught:
        build_recipe("torch:tes_user_models:make", options).build_model()
    text = str(caught.value)
    assert (
        "4 missing key(s) (first: body.0.weight" in text and "4 unexpected key(s) (first: module.body.0.weight" in text
    )
    assert "starts with 'module.'" in text
    torch.save(trained.state_dict(), tmp_path / "narrow.pt")
    wider = {"weights": str(tmp_path / "narrow.pt"), "inputs": TORCH_INPUTS, "factory_args": {"width": 16}}
    with pytest.raises(RecipeError, match=r"shape mismatch.*body.0.weight: checkpoint \[8, 4\] vs module \[16, 4\]"):
        build_recipe("torch:tes_user_models:make", wider).build_model()


def test_only_a_whole_pickled_module_is_unpickled_in_full(user_models):
    _, trained, tmp_path = user_models
    torch.save({"state_dict": trained.state_dict(), "args": argparse.Namespace(lr=0.1)}, tmp_path / "ns.pt")
    options = {"weights": str(tmp_path / "ns.pt"), "inputs": TORCH_INPUTS}
    with pytest.raises(RecipeError, match="argparse.Namespace object.*not a whole pickled nn.Module"):
        build_recipe("torch:tes_user_models:make", options).build_model()
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(RecipeError, match="cannot be read as a torch checkpoint"):
        build_recipe("torch:tes_user_models:make", {**options, "weights": str(tmp_path / "notes.txt")}).build_model()


def test_factory_that_raises_is_named(user_models):
    with pytest.raises(RecipeError, match="factory tes_user_models:broken raised ValueError: needs a GPU"):
        build_recipe("torch:tes_user_models:broken", {"inputs": TORCH_INPUTS}).build_model()


def test_torch_input_description_problems_are_reported_together():
    bad = [{"name": "tokens", "dtype": "int64", "shape": [-1]}, {"name": "x", "dtype": "complex", "shape": [0]}]
    with pytest.raises(ConfigError) as caught:
        build_recipe("torch:tes_user_models:make", {"inputs": bad})
    assert len(caught.value.problems) == 2
    assert "axis 0 is dynamic (-1) and needs `ranges" in str(caught.value) and "'complex'" in str(caught.value)


def test_integer_input_without_value_range_cannot_be_synthesized(user_models):
    inputs = [{"name": "ids", "dtype": "int64", "shape": [-1], "ranges": {0: [1, 8, 16]}}]
    recipe = build_recipe("torch:tes_user_models:make", {"inputs": inputs})
    with pytest.raises(RecipeError, match="input 'ids' without knowing its values: give its `value_range`"):
        recipe.example_inputs()


# --- onnx: ----------------------------------------------------------------------------------------------------------
class TokenClassifier(torch.nn.Module):
    """Mean of the embeddings of the real tokens -> 3 logits."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = torch.nn.Embedding(50, 8), torch.nn.Linear(8, 3)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).float()  # (B, T, 1)
        return self.head((self.embed(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1.0))


@pytest.fixture(scope="module")
def token_onnx(tmp_path_factory) -> Path:
    """An ONNX file made by torch.onnx.export, with dynamic batch and sequence."""
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    torch.manual_seed(0)
    ids, mask = torch.randint(0, 50, (2, 12)), torch.ones(2, 12, dtype=torch.int64)
    batch, sequence = torch.export.Dim("batch", min=1, max=32), torch.export.Dim("sequence", min=1, max=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the shared batch and sequence Dims warn that their names are reused
        program = torch.onnx.export(
            TokenClassifier().eval(),
            (ids, mask),
            dynamo=True,
            opset_version=18,
            input_names=["input_ids", "attention_mask"],
            output_names=["logits"],
            dynamic_shapes=({0: batch, 1: sequence}, {0: batch, 1: sequence}),
        )
    program.save(str(path))
    return path


def test_onnx_source_reads_its_interface_and_scores_against_itself(token_onnx):
    recipe = build_recipe(f"onnx:{token_onnx}", {"sequence_length": 16, "max_sequence_length": 64})
    assert recipe.has_torch_model is False and recipe.trains is False and recipe.onnx_path == token_onnx
    ids, mask = recipe.inputs
    assert (ids.name, ids.dtype, ids.shape, ids.ranges) == ("input_ids", "int64", (-1,), {0: (1, 16, 64)})
    assert ids.value_range == (0, 49) and mask.value_range == (0, 1)  # the embedding table's rows; a mask
    assert [(s.name, s.shape) for s in recipe.outputs] == [("logits", (3,))]
    with pytest.raises(RecipeError, match="has no torch model"):
        recipe.build_model()
    session = ort.InferenceSession(str(token_onnx), providers=["CPUExecutionProvider"])
    assert evaluate(recipe, session_predictor(session, recipe))["top1_agreement"] == 1.0
    assert recipe.synthetic_data and recipe.data_fingerprint() == recipe.data_fingerprint()


def test_onnx_source_of_an_exported_causal_lm_finds_its_vocabulary(exported):
    causal = build_recipe(f"onnx:{exported['causal-lm'][1].output.onnx}", {"max_sequence_length": 64})
    assert causal.inputs[0].value_range == (0, 98)  # the ids reach the embedding's Gather through a Reshape
    assert [(s.name, s.shape) for s in causal.outputs] == [("logits", (-1, 99))]


def test_file_that_is_not_onnx_is_refused(tmp_path):
    (tmp_path / "model.onnx").write_text("this is a text file\n")
    with pytest.raises(RecipeError, match="is not an ONNX model"):
        build_recipe(f"onnx:{tmp_path / 'model.onnx'}")


def test_truncated_onnx_file_is_refused(token_onnx, tmp_path):
    data = token_onnx.read_bytes()
    (tmp_path / "model.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(RecipeError, match="truncated"):
        build_recipe(f"onnx:{tmp_path / 'model.onnx'}")


def test_missing_external_data_is_named(token_onnx, tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save_model(onnx.load(token_onnx), path, save_as_external_data=True, location="model.weights", size_threshold=0)
    assert [spec.name for spec in build_recipe(f"onnx:{path}").inputs] == ["input_ids", "attention_mask"]
    (tmp_path / "model.weights").unlink()
    with pytest.raises(RecipeError, match="external data file 'model.weights', which is missing beside it"):
        build_recipe(f"onnx:{path}")
