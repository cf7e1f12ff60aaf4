"""`tes infer | complete | bench`: requests to a served model, and its benchmark."""

from __future__ import annotations

import codecs
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from core.errors import RepositoryError, TesError
from flows.cli import output, rundata
from flows.cli.arguments import Protocol, ProtocolOption, UrlOption, host_port, input_tensors, number_list, option

DEFAULT_DEMO_MODEL = "stdlib-gpt"
ModelArgument = Annotated[
    str, typer.Argument(metavar="MODEL", show_default=False, help="The served model's name, e.g. stdlib-gpt.")
]


def recipe_of_model(model: str):
    """The recipe that produced the served version of `model` in the stack's repository (a folder or S3), else the
    project's `model_repository`."""
    from flows import stack
    from recipes import build_recipe
    from serving.targets import open_target

    provenance, version_dir = open_target(stack.repository() or stack.DEFAULT_REPOSITORY).provenance(model)
    if "recipe" not in provenance:
        raise RepositoryError(f"{version_dir} does not record the recipe it was made with; deploy it again (tes run)")
    return build_recipe(provenance["recipe"], provenance.get("options", {}))


def triton_url(protocol: Protocol, url: str | None) -> str:
    from flows import stack

    found = host_port(url) or stack.triton_url(protocol.value)
    if not found:
        raise TesError("no Triton to talk to: start the stack with `tes up`, or pass --url host:port")
    return found


Text = Annotated[
    Optional[str], option("Text: through the model's own tokenizer, or as bytes for byte models.", show_default=False)
]
Sample = Annotated[
    Optional[int], typer.Option(min=0, show_default="0", help="A held-out sample of the recipe, by number.")
]
Inputs = Annotated[
    Optional[list[str]], option("A raw input tensor as a JSON array (repeatable).", "NAME=JSON", False, "--input")
]
Dtype = Annotated[str, option("The numpy dtype of --input arrays.")]


def infer(
    model: ModelArgument,
    text: Text = None,
    sample: Sample = None,
    input_: Inputs = None,
    dtype: Dtype = "float32",
    protocol: ProtocolOption = Protocol.http,
    url: UrlOption = None,
) -> None:
    """Send one request to a served model; print each output (top-5 classes of (batch, classes) outputs)."""
    from recipes.requests import sample_inputs
    from serving.client import infer as send

    given = [
        name for name, value in (("--text", text), ("--sample", sample), ("--input", input_)) if value not in (None, [])
    ]
    if len(given) > 1:
        raise TesError(f"{' and '.join(given)} cannot go together: a request comes from one of them")
    inputs = input_tensors(input_, dtype) if input_ else sample_inputs(recipe_of_model(model), sample or 0, text)
    _print_outputs(send(triton_url(protocol, url), model, inputs, protocol.value))


def _print_outputs(outputs: dict) -> None:
    import numpy as np

    for name, array in outputs.items():
        output.say(f"{name}: shape {list(array.shape)} dtype {array.dtype}")
        if array.ndim != 2:
            output.say(np.array2string(array, threshold=50))
            continue
        rows = []
        for row, logits in enumerate(array[:4]):
            shifted = np.exp(logits - logits.max())
            probabilities = shifted / shifted.sum()  # softmax over the classes of one sample
            top = np.argsort(logits)[::-1][:5]
            rows.append([str(row)] + [f"{_label(int(k), array.shape[1])} p={probabilities[k]:.3f}" for k in top])
        output.table(["sample", "1st", "2nd", "3rd", "4th", "5th"], rows)


def _label(index: int, classes: int) -> str:
    return repr(chr(index)) if classes == 256 else str(index)


Prompt = Annotated[
    str, typer.Argument(metavar="PROMPT", show_default=False, help="The code to continue, e.g. 'def fib(n):'.")
]
ByteModel = Annotated[str, option("A served byte model, or a causal LM brought with its tokenizer.")]
MaxBytes = Annotated[
    int, typer.Option(min=0, help="How many bytes (tokens, for a tokenizer model) to add, one request each.")
]
Temperature = Annotated[float, typer.Option(min=0.0, help="Sampling temperature; 0: always the most likely byte.")]
Seed = Annotated[int, option("Seed of the sampling.")]


def complete(
    prompt: Prompt,
    model: ByteModel = DEFAULT_DEMO_MODEL,
    max_bytes: MaxBytes = 80,
    temperature: Temperature = 0.7,
    seed: Seed = 0,
    protocol: ProtocolOption = Protocol.http,
    url: UrlOption = None,
) -> None:
    """Complete text with a served stdlib-gpt (one request per byte) or a causal LM brought with its tokenizer
    (`hf:` with task causal-lm: one request per token)."""
    from recipes.requests import byte_context, has_tokenizer
    from serving.client import complete_bytes

    recipe = recipe_of_model(model)
    if has_tokenizer(recipe):
        _complete_with_tokenizer(
            recipe, prompt, model, max_bytes, temperature, seed, triton_url(protocol, url), protocol
        )
        return
    context = byte_context(recipe)
    stream = complete_bytes(
        triton_url(protocol, url), model, prompt.encode(), context, protocol.value, max_bytes, temperature, seed
    )
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a character may take several bytes
    sys.stdout.write(prompt)
    try:
        for byte in stream:
            sys.stdout.write(decoder.decode(bytes([byte])))
            sys.stdout.flush()
    finally:
        sys.stdout.write(decoder.decode(b"", final=True) + "\n")
        sys.stdout.flush()


def _complete_with_tokenizer(recipe, prompt, model, max_tokens, temperature, seed, url, protocol) -> None:
    """Token by token through the model's tokenizer; the text printed is the decoded whole, so a character made of
    several tokens comes out once it is complete."""
    from serving.client import complete_tokens

    tokenizer, inputs = recipe.tokenizer(), recipe.text_inputs(prompt)
    prompt_ids = [int(t) for t in inputs["input_ids"][0]]
    context = recipe.inputs[0].ranges[0][2] if recipe.inputs[0].ranges else len(prompt_ids)
    printed, generated = tokenizer.decode(prompt_ids, skip_special_tokens=True), []
    sys.stdout.write(printed)
    try:
        for token in complete_tokens(url, model, inputs, protocol.value, max_tokens, temperature, seed, context):
            generated.append(token)
            text = tokenizer.decode(prompt_ids + generated, skip_special_tokens=True)
            if not text.endswith("\ufffd"):  # wait for the rest of a character split across tokens
                sys.stdout.write(text[len(printed) :])
                printed = text
            sys.stdout.flush()
    finally:
        sys.stdout.write("\n")
        sys.stdout.flush()


HttpUrl = Annotated[
    Optional[list[str]],
    option(
        "Triton's HTTP endpoint; repeat for replicas (requests round robin); default: every replica of the stack.",
        "HOST:PORT",
        False,
    ),
]
GrpcUrl = Annotated[
    Optional[list[str]], option("Its gRPC endpoint; one per --url, in order; default: the stack's.", "HOST:PORT", False)
]
Protocols = Annotated[Optional[list[Protocol]], option("Repeat for both.", show_default="grpc, http")]
Thorough = Annotated[bool, option("Concurrency 1..32, Poisson rates, 3 s windows.", flag="--thorough")]
Concurrencies = Annotated[Optional[str], option("Comma-separated, e.g. 1,2,4,8.", "LIST", "1,4; thorough: 1..32")]
Rates = Annotated[
    Optional[str],
    option("Comma-separated Poisson request rates per second, e.g. 50,100,200.", "LIST", "none; thorough: 25..400"),
]
P99Budget = Annotated[float, option("The open-loop result is the highest rate whose p99 stays under this.")]
SweepConfigs = Annotated[bool, option("Try dynamic batching, queue delays, instance counts.", flag="--sweep-configs")]
ApplyBest = Annotated[bool, option("Deploy the best configuration found.", flag="--apply-best")]
OutFolder = Annotated[Optional[str], option("Output folder.", "FOLDER", "runs/benchmarks/<time>-<model>")]


def bench(
    model: ModelArgument,
    url: HttpUrl = None,
    grpc_url: GrpcUrl = None,
    protocol: Protocols = None,
    thorough: Thorough = False,
    concurrency: Concurrencies = None,
    rate: Rates = None,
    p99_budget_ms: P99Budget = 50.0,
    sweep_configs: SweepConfigs = False,
    apply_best: ApplyBest = False,
    out: OutFolder = None,
) -> None:
    """Benchmark a served model: in-process baselines, concurrency and Poisson-rate sweeps, plots."""
    from bench.stage import SHORT, THOROUGH, BenchmarkOptions, run_benchmark
    from flows import stack

    protocols = tuple(p.value for p in protocol) if protocol else ("grpc", "http")
    options = BenchmarkOptions(
        thorough=thorough,
        protocols=protocols,
        concurrencies=number_list(concurrency, int, "--concurrency"),
        rates=number_list(rate, float, "--rate"),
        p99_budget_ms=p99_budget_ms,
        sweep_configs=sweep_configs,
        apply_best=apply_best,
    )
    preset = THOROUGH if thorough else SHORT
    points = len(protocols) * (
        len(options.concurrencies or preset["concurrencies"]) + len(options.rates or preset["rates"])
    )
    endpoint = stack.endpoints(
        [host_port(one) for one in url or []], [host_port(one, "--grpc-url") for one in grpc_url or []]
    )
    if endpoint is None:
        raise TesError("no Triton to benchmark: start the stack with `tes up`, or pass --url host:port")
    with output.progress_bar(points, f"bench {model}") as report:
        result = run_benchmark(model, options, endpoint, out_dir=Path(out) if out else None, progress=report)
    markdown, files = rundata.benchmark_outputs(result)
    output.markdown(markdown)
    output.say("outputs: " + ", ".join(files))
