"""The `tes` command line, in-process: every command's help and options, what it prints for a real (tiny) run,
and one clear `error:` line, never a traceback, for every mistake a user can make.

No server is started here (tests/integration covers `tes up`, `tes demo` and requests to a live Triton): the
commands that need Triton are checked to say that none is there.
"""

from __future__ import annotations

import json
from contextlib import redirect_stderr, redirect_stdout
from importlib import metadata
from io import StringIO
from pathlib import Path

import numpy as np
import pytest

from core.errors import EngineMismatch, RecipeError, RepositoryError
from flows.cli import COMMANDS, main
from tests.conftest import TINY_DIGITS, TINY_GPT

TINY_RUN = {
    "recipe": "digits-cnn",
    "digits_cnn": TINY_DIGITS,
    "training": {"steps": 20, "learning_rate": 1e-2, "eval_every": 1000, "eval_samples": 64},
    "precision": {
        "variants": ["fp32", "int8-dynamic"],
        "calibration_samples": 16,
        "score_samples": 64,
        "speed_repeats": 3,
        "accuracy_budget": 1.0,
        "min_speedup": 0.0,
    },
    "serving": {"load": False},
    "benchmark": {"enabled": False},
}

OPTIONS = {  # every command and the options README.md documents (or the old argparse CLI had)
    "up": [
        "--prefect-port",
        "--http-port",
        "--grpc-port",
        "--metrics-port",
        "--replicas",
        "--repository",
        "--s3-endpoint",
    ],
    "down": [],
    "status": [],
    "env": [],
    "run": ["--param", "--params"],
    "demo": ["--param", "--params"],
    "infer": ["MODEL", "--text", "--sample", "--input", "--dtype", "--protocol", "--url"],
    "complete": ["PROMPT", "--model", "--max-bytes", "--temperature", "--seed", "--protocol", "--url"],
    "bench": [
        "MODEL",
        "--url",
        "--grpc-url",
        "--protocol",
        "--thorough",
        "--concurrency",
        "--rate",
        "--p99-budget-ms",
        "--sweep-configs",
        "--apply-best",
        "--out",
    ],
    "report": ["RUN"],
    "variants": ["RUN"],
    "ledger": ["RUN"],
    "export-repository": [
        "OUT",
        "--run",
        "--model",
        "--cpu",
        "--target-tensorrt",
        "--target-cc",
        "--no-engines",
        "--rebuild",
        "--engine-dir",
    ],
    "scaling": ["--widths", "--steps", "--layers"],
}


def tes(capsys, *args: str) -> tuple[int, str, str]:
    """`tes ARGS` in-process: (exit code, stdout, stderr)."""
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_error(code: int, out: str, err: str, *fragments: str) -> None:
    assert code != 0
    assert "Traceback" not in out + err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [err.splitlines()[0]], err
    for fragment in fragments:
        assert fragment in err


@pytest.fixture(scope="module")
def run_home(tmp_path_factory) -> tuple[Path, Path, str]:
    """A project home holding one tiny digits-cnn run made by `tes run` (deployed, not loaded): (home, run, output)."""
    home = tmp_path_factory.mktemp("cli-home")
    out, err = StringIO(), StringIO()
    with pytest.MonkeyPatch.context() as patch, redirect_stdout(out), redirect_stderr(err):
        patch.setenv("TES_HOME", str(home))
        code = main(["run", "--params", json.dumps(TINY_RUN)])
    assert code == 0, out.getvalue()[-3000:] + err.getvalue()[-3000:]
    (run,) = (home / "runs").iterdir()
    return home, run, out.getvalue()


@pytest.fixture
def in_run_home(run_home, monkeypatch) -> tuple[Path, Path, str]:
    monkeypatch.setenv("TES_HOME", str(run_home[0]))
    return run_home


# --- help, version ----------------------------------------------------------------------------------------------------
def test_the_commands_are_the_documented_ones():
    assert [name for name, _ in COMMANDS] == list(OPTIONS)


@pytest.mark.parametrize("command", list(OPTIONS))
def test_every_command_has_help_that_lists_its_options(capsys, command):
    code, out, err = tes(capsys, command, "--help")
    assert code == 0 and not err
    for option in OPTIONS[command]:
        assert option in out, f"{command} --help lacks {option}"


def test_help_shows_defaults(capsys):
    code, out, _ = tes(capsys, "complete", "--help")
    assert code == 0
    assert "stdlib-gpt" in out and "80" in out and "0.7" in out and "http" in out


def test_version_is_the_installed_distribution(capsys):
    code, out, _ = tes(capsys, "--version")
    assert code == 0 and metadata.version("train-export-serve") in out


def test_no_arguments_prints_the_help(capsys):
    code, out, _ = tes(capsys)
    assert code == 0 and "Usage" in out and "export-repository" in out


def test_shell_completion_is_offered(capsys):
    code, out, _ = tes(capsys, "--help")
    assert code == 0 and "--install-completion" in out and "--show-completion" in out


# --- the stack, with none up ------------------------------------------------------------------------------------------
def test_status_and_env_without_a_stack_say_so(capsys, tes_home):
    for command in ("status", "env"):
        code, out, err = tes(capsys, command)
        assert code == 1 and not out
        assert_one_error(code, out, err, "no stack is up", "tes up")


def test_down_without_a_stack_has_nothing_to_stop(capsys, tes_home):
    code, out, _ = tes(capsys, "down")
    assert code == 0 and "nothing to stop" in out


def test_demo_refuses_bad_parameters_before_starting_anything(capsys, tes_home):
    code, out, err = tes(capsys, "demo", "--param", "training.steps=0")
    assert_one_error(code, out, err, "training.steps")
    assert not (tes_home / ".tes" / "stack.json").exists()


# --- a run ------------------------------------------------------------------------------------------------------------
def test_run_prints_the_report(in_run_home):
    _, run, printed = in_run_home
    assert f"# train-export-serve run `{run.name}`" in printed and "| precision | ok |" in printed


def test_report_of_the_last_run_and_of_a_named_run(capsys, in_run_home):
    _, run, _ = in_run_home
    code, last, _ = tes(capsys, "report")
    assert code == 0 and last.strip() == (run / "report.md").read_text().strip()  # piped: the markdown itself
    code, named, _ = tes(capsys, "report", str(run))
    assert code == 0 and named == last


def test_variants_is_a_table_of_every_variant(capsys, in_run_home):
    code, out, _ = tes(capsys, "variants")
    assert code == 0
    assert "policy max-throughput" in out and "vs FP32" in out
    rows = {line.split()[0]: line for line in out.splitlines() if line.strip().startswith(("fp32", "int8-dynamic"))}
    assert set(rows) == {"fp32", "int8-dynamic"} and "accepted" in rows["int8-dynamic"]
    assert "serves the plain name" in rows["fp32"]


def test_ledger_is_a_table_of_every_stage_with_its_notes(capsys, in_run_home):
    _, run, _ = in_run_home
    code, out, _ = tes(capsys, "ledger")
    assert code == 0
    stages = {line.split()[0] for line in out.splitlines() if line.startswith("  ") and line.strip()}
    assert {"train", "export", "precision", "deploy"} <= stages
    assert "J (estimated)" in out and "Prices:" in out and f"plot: {run / 'ledger.png'}" in out


def test_export_repository_writes_a_native_repository(capsys, in_run_home, tmp_path):
    code, out, err = tes(capsys, "export-repository", str(tmp_path / "native"), "--cpu")
    assert code == 0, err
    assert (tmp_path / "native" / "digits-cnn-fp32" / "1" / "model.onnx").is_file()
    assert "digits-cnn-int8-dynamic" in out and f"tritonserver --model-repository={tmp_path / 'native'}" in out


def test_demo_summary_shows_requests_to_paste(capsys, in_run_home):
    from flows.cli.stack_commands import _print_demo_summary

    _print_demo_summary({"triton": {"host": "127.0.0.1", "http_port": 8000}})
    out = capsys.readouterr().out
    curl = next(line for line in out.splitlines() if "curl" in line)
    assert "http://127.0.0.1:8000/v2/models/digits-cnn/infer" in curl
    body = json.loads(curl.split(" -d '")[1].rstrip("'"))
    assert body["inputs"][0]["name"] == "image" and body["inputs"][0]["shape"] == [1, 1, 8, 8]
    assert "infer digits-cnn --sample 0 --protocol grpc" in out


# --- commands that need Triton, with none there -----------------------------------------------------------------------
def test_infer_without_triton_says_so(capsys, in_run_home):
    assert_one_error(*tes(capsys, "infer", "digits-cnn", "--sample", "3"), "no Triton to talk to", "tes up")


def test_complete_without_triton_says_so(capsys, in_run_home, monkeypatch, tmp_path):
    from tritonclient.grpc import model_config_pb2 as mc

    from serving.repository import publish_version

    monkeypatch.setenv("TES_HOME", str(tmp_path))  # a byte model's version, enough to know its recipe
    publish_version(
        tmp_path / "model_repository",
        "gpt",
        mc.ModelConfig(name="gpt", backend="python"),
        lambda _: None,
        {"recipe": "stdlib-gpt", "options": TINY_GPT},
    )
    assert_one_error(*tes(capsys, "complete", "def fib(n):", "--model", "gpt"), "no Triton to talk to")


def test_bench_without_triton_says_so(capsys, in_run_home):
    assert_one_error(*tes(capsys, "bench", "digits-cnn"), "no Triton to benchmark")


# --- mistakes ---------------------------------------------------------------------------------------------------------
MISTAKES = [  # none needs a run or a deployed model
    (["run", "--param", "steps"], "expected key=value"),
    (["run", "--param", "training.steps=0", "--param", "serving.instance_count=0"], "training.steps"),
    (["run", "--params", "{bad"], "'--params': not JSON"),
    (["run", "--params", "[1, 2]"], "expected a JSON object"),
    (["up", "--http-port", "0"], "--http-port"),
    (["up", "--replicas", "0"], "--replicas"),
    (["up", "--s3-endpoint", "http://127.0.0.1:9000"], "only for an s3:// repository"),
    (["up", "--repository", "s3://Models/repo"], "bucket 'Models'"),
    (["run", "--param", "repository=s3://models//repo"], "repository: path segment ''"),
    (["infer", "digits-cnn", "--protocol", "ftp"], "'ftp' is not one of 'http', 'grpc'"),
    (["infer", "digits-cnn", "--text", "x", "--sample", "1"], "cannot go together"),
    (["infer", "digits-cnn", "--sample", "-1"], "--sample"),
    (["infer", "digits-cnn", "--input", "image=[1,"], "'--input': image: not JSON"),
    (["infer", "digits-cnn", "--input", "image"], "expected NAME=JSON"),
    (["infer", "digits-cnn", "--input", "image=[1]", "--dtype", "float99"], "not an array of float99"),
    (["infer", "digits-cnn", "--input", "image=[1]", "--url", "not a url"], "expected host:port"),
    (["infer", "no-such-model"], "model 'no-such-model' has no version"),
    (["infer", "../escape"], "is not allowed"),
    (["complete", "x", "--temperature", "-1"], "--temperature"),
    (["bench", "digits-cnn", "--concurrency", "1,x"], "'--concurrency': expected comma-separated whole numbers"),
    (["bench", "digits-cnn", "--concurrency", "0"], "above 0"),
    (["bench", "digits-cnn", "--rate", "fast"], "--rate"),
    (["bench", "digits-cnn", "--protocol", "ftp"], "'ftp' is not one of"),
    (["bench", "digits-cnn", "--p99-budget-ms", "0"], "p99_budget_ms"),
    (["bench", "digits-cnn", "--grpc-url", "host"], "'--grpc-url': expected host:port"),
    (["bench", "digits-cnn", "--url", "a:1", "--url", "b:1", "--grpc-url", "a:2"], "give one per --url"),
    (["report", "/no/such/run"], "run folder /no/such/run does not exist"),
    (["variants", "/no/such/run"], "does not exist"),
    (["ledger", "/no/such/run"], "does not exist"),
    (["export-repository", "out", "--run", "/no/such/run"], "does not exist"),
    (["export-repository", "out", "--target-tensorrt", "10.3.0.26"], "go together"),
    (["scaling", "--widths", "32,x"], "--widths"),
    (["scaling", "--steps", "0"], "--steps"),
    (["no-such-command"], "No such command"),
    (["report", "--no-such-option"], "No such option"),
    (["infer"], "Missing argument"),
]
MODEL_MISTAKES = [  # these need the deployed digits-cnn, to know what it takes
    (["infer", "digits-cnn", "--text", "def fib(n):"], "byte models like stdlib-gpt"),
    (["infer", "digits-cnn", "--sample", "100000"], "fewer than 100001 held-out samples"),
    (["complete", "x", "--model", "digits-cnn"], "byte models like stdlib-gpt"),
]


@pytest.mark.parametrize("args, says", MISTAKES, ids=[" ".join(args) for args, _ in MISTAKES])
def test_a_mistake_ends_in_one_error_line_and_no_traceback(capsys, tes_home, args, says):
    assert_one_error(*tes(capsys, *args), says)


@pytest.mark.parametrize("args, says", MODEL_MISTAKES, ids=[" ".join(args) for args, _ in MODEL_MISTAKES])
def test_a_request_the_model_cannot_take_ends_in_one_error_line(capsys, in_run_home, args, says):
    assert_one_error(*tes(capsys, *args), says)


@pytest.mark.parametrize("command", ["report", "variants", "ledger"])
def test_run_commands_before_any_run_say_how_to_make_one(capsys, tes_home, command):
    assert_one_error(*tes(capsys, command), "no run yet", "tes run")


def test_a_missing_file_of_a_run_is_one_error_line(capsys, in_run_home, tmp_path):
    _, run, _ = in_run_home
    broken = tmp_path / run.name
    broken.mkdir()
    (broken / "summary.json").write_text((run / "summary.json").read_text().replace(str(run), str(broken)))
    assert_one_error(*tes(capsys, "report", str(broken)), f"{broken / 'report.md'} does not exist")


# --- the library functions the commands call ------------------------------------------------------------------------
def test_newest_provenance_follows_the_alias_to_the_model_it_forwards_to(in_run_home):
    from serving.repository import newest_provenance

    home, run, _ = in_run_home
    provenance, version_dir = newest_provenance(home / "model_repository", "digits-cnn")
    assert version_dir == home / "model_repository" / "digits-cnn-fp32" / "1"
    assert provenance["recipe"] == "digits-cnn" and provenance["options"]["channels"] == TINY_DIGITS["channels"]
    with pytest.raises(RepositoryError, match="model 'nope' has no version"):
        newest_provenance(home / "model_repository", "nope")


def test_sample_inputs_are_held_out_samples_or_text_for_byte_models():
    from recipes import build_recipe
    from recipes.requests import sample_inputs

    digits, gpt = build_recipe("digits-cnn", TINY_DIGITS), build_recipe("stdlib-gpt", TINY_GPT)
    assert sample_inputs(digits, 2)["image"].shape == (1, 1, 8, 8)
    tokens = sample_inputs(gpt, text="x" * 40 + "end")["tokens"]
    assert tokens.shape == (1, TINY_GPT["block_size"]) and tokens.dtype == np.int64
    assert bytes(tokens[0, -3:].astype(np.uint8)) == b"end"  # the last block_size bytes
    with pytest.raises(RecipeError, match="byte models"):
        sample_inputs(digits, text="x")


def test_local_rebuild_without_tensorrt_raises_engine_mismatch_with_the_reason(in_run_home):
    from export.trt_engine import local_rebuild, unavailable_reason
    from flows.params import parse_params

    if unavailable_reason() is None:
        pytest.skip("TensorRT and a GPU are here")
    _, run, _ = in_run_home
    params = parse_params(TINY_RUN)
    rebuild = local_rebuild(run, params.build_recipe(), params.tensorrt, params.precision, 8)
    with pytest.raises(EngineMismatch, match=r"cannot rebuild the fp16 engine for compute capability 8\.0 here: "):
        rebuild("fp16", "8.0")


def test_a_run_from_an_older_version_still_prints_its_report_and_says_why_its_tables_cannot(capsys, tes_home):
    old = tes_home / "runs" / "old-run"
    old.mkdir(parents=True)
    (old / "summary.json").write_text(json.dumps({"run_id": "old-run", "stages": {}}))
    (old / "report.md").write_text("# an old report\n")
    code, out, _ = tes(capsys, "report", str(old))
    assert code == 0 and "an old report" in out
    for command in ("variants", "ledger"):
        code, out, err = tes(capsys, command, str(old))
        assert_one_error(code, out, err, "older version")
