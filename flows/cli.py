"""`tes`: the command line of train-export-serve.

    tes demo                      # tes up, then the default pipeline via `prefect deployment run --watch`
    tes up | tes down | tes status | tes env
    tes run --param recipe=digits-cnn --param training.steps=100      # in-process, no servers needed
    tes infer stdlib-gpt --text "def fib(n):" --protocol grpc
    tes complete "def fib(n):"
    tes report
    tes bench stdlib-gpt --thorough
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

from core import paths
from core.errors import TesError

DEFAULT_DEMO_MODEL = "stdlib-gpt"


def parse_param_args(pairs: list[str]) -> dict[str, Any]:
    """`key=value` pairs (value as JSON, else a string); dotted keys nest: `training.steps=50`."""
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise TesError(f"--param {pair!r}: expected key=value, for example --param training.steps=100")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        *parents, leaf = key.split(".")
        node = params
        for parent in parents:
            node = node.setdefault(parent, {})
            if not isinstance(node, dict):
                raise TesError(f"--param {pair!r}: {parent!r} is set both as a value and as a group")
        node[leaf] = value
    return params


def prefect_param_args(params: dict[str, Any]) -> list[str]:
    """The same parameters as `prefect deployment run` flags (one --param per top-level field)."""
    args = []
    for key, value in params.items():
        args += ["--param", f"{key}={value if isinstance(value, str) else json.dumps(value)}"]
    return args


# --- commands ------------------------------------------------------------------------------------------
def cmd_up(args: argparse.Namespace) -> int:
    from flows import stack

    state = stack.up(prefect_port=args.prefect_port, http_port=args.http_port, grpc_port=args.grpc_port, metrics_port=args.metrics_port)
    _print_stack(state)
    return 0


def cmd_down(_: argparse.Namespace) -> int:
    from flows import stack

    stack.down()
    return 0


def cmd_status(_: argparse.Namespace) -> int:
    from flows import stack
    from serving import client, triton

    state = stack.read()
    if not state:
        print("no stack is up: start it with `tes up`")
        return 1
    for part in ("prefect", "runner", "triton"):
        print(f"{part:8s} pid {state[part]['pid']:>7}  {'running' if triton.pid_alive(state[part]['pid']) else 'GONE'}")
    url = stack.triton_url("http")
    if url:
        for entry in client.model_states(url, stack.triton_admin_key()):
            print(f"model {entry.get('name')} version {entry.get('version', '-')}: {entry.get('state', 'UNAVAILABLE')} {entry.get('reason', '')}")
    return 0


def cmd_env(_: argparse.Namespace) -> int:
    from flows import stack

    state = stack.read()
    if not state:
        print("no stack is up: start it with `tes up`", file=sys.stderr)
        return 1
    for key, value in stack.prefect_env(state["prefect"]["api_url"]).items():
        print(f"export {key}={value}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from flows.params import parse_params
    from flows.pipeline import run_pipeline
    from flows.report import render_report

    params = parse_params({**json.loads(args.params or "{}"), **parse_param_args(args.param)})
    summary = run_pipeline(params)
    print(render_report(summary))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from flows import stack
    from flows.params import parse_params

    overrides = {**json.loads(args.params or "{}"), **parse_param_args(args.param)}
    parse_params(overrides)  # refuse bad parameters before starting anything
    state = stack.up()
    command = [str(Path(sys.executable).parent / "prefect"), "deployment", "run",
               f"{stack.FLOW_NAME}/{stack.DEPLOYMENT_NAME}", "--watch", *prefect_param_args(overrides)]
    print("\n$ prefect " + shlex.join(command[1:]) + "\n", flush=True)
    returncode = subprocess.call(command, env={**os.environ, **stack.prefect_env(state["prefect"]["api_url"])})
    if returncode != 0:
        print(f"\nthe flow run failed (exit code {returncode}); the runner's log is {paths.state_dir() / 'prefect-runner.log'}")
        return returncode
    _print_demo_summary(state)
    return 0


def _print_stack(state: dict) -> None:
    triton_state = state["triton"]
    print(f"Prefect API  {state['prefect']['api_url']}   (UI {state['prefect']['ui']})")
    print(f"Triton       HTTP {triton_state['host']}:{triton_state['http_port']}   gRPC {triton_state['host']}:{triton_state['grpc_port']}"
          f"   metrics {triton_state['host']}:{triton_state['metrics_port']}")
    print(f"Logs         {paths.state_dir()}")
    print("Stop it all with `tes down`; point the prefect CLI at it with `eval \"$(tes env)\"`.")


def _print_demo_summary(state: dict) -> None:
    from flows.pipeline import load_summary

    summary = load_summary()
    deploy = summary["stages"]["deploy"]["outputs"]
    model, host, http_port = deploy["model"], state["triton"]["host"], state["triton"]["http_port"]
    sample = _sample_request(model)
    body = json.dumps({"inputs": [{"name": name, "shape": list(array.shape), "datatype": _datatype(array),
                                   "data": [round(float(x), 4) if array.dtype.kind == "f" else int(x) for x in array.ravel()]}
                                  for name, array in sample.items()]})
    tes = str(Path(sys.executable).parent / "tes")
    print(f"\nRun outputs : {summary['run_dir']}")
    print(f"Report      : {summary['run_dir']}/report.md")
    print(f"Live model  : '{model}' version {deploy.get('ready_version', deploy['version'])} on Triton at {host}:{http_port}")
    print("\nQuery it over HTTP (KServe v2 JSON):")
    print(f"  curl -s -X POST http://{host}:{http_port}/v2/models/{model}/infer -H 'Content-Type: application/json' -d '{body}'")
    print("Query it over gRPC:")
    if "tokens" in sample:  # a byte model: show the completion loop
        print(f"  {tes} complete 'def fib(n):' --model {model} --protocol grpc")
    else:
        print(f"  {tes} infer {model} --sample 0 --protocol grpc")
    print(f"\nThe stack stays up; stop it with `{tes} down`.")


def _datatype(array) -> str:
    from tritonclient.utils import np_to_triton_dtype

    return np_to_triton_dtype(array.dtype)


def _recipe_of_model(model: str):
    """The recipe that produced the newest version of `model`, read from that version's manifest."""
    from serving import repository
    from recipes import build_recipe

    folder = repository.model_dir(paths.resolve("model_repository"), model)
    numbers = repository.versions(folder)
    if not numbers:
        raise TesError(f"model '{model}' has no version in {folder.parent}; run the pipeline first (tes run / tes demo)")
    manifest = json.loads((folder / str(numbers[-1]) / repository.VERSION_MANIFEST).read_text())
    provenance = manifest.get("provenance", {})
    return build_recipe(provenance["recipe"], provenance.get("options", {}))


def _sample_request(model: str, index: int = 0, text: str | None = None):
    import numpy as np

    recipe = _recipe_of_model(model)
    if text is not None:
        if recipe.inputs[0].dtype != "int64" or not hasattr(recipe.options, "block_size"):
            raise TesError(f"--text is for byte models like stdlib-gpt; model '{model}' takes {recipe.inputs[0]}")
        return {recipe.inputs[0].name: np.frombuffer(text.encode(), dtype=np.uint8).astype(np.int64)[None, -recipe.options.block_size:]}
    return list(recipe.eval_batches(1, max_samples=index + 1))[-1].inputs


def _url(args: argparse.Namespace) -> str:
    from flows import stack

    url = args.url or stack.triton_url(args.protocol)
    if not url:
        raise TesError("no Triton to talk to: start the stack with `tes up`, or pass --url host:port")
    return url


def cmd_infer(args: argparse.Namespace) -> int:
    import numpy as np

    from serving.client import infer

    if args.input:
        inputs = {}
        for pair in args.input:
            name, _, raw = pair.partition("=")
            inputs[name] = np.asarray(json.loads(raw), dtype=args.dtype)
    else:
        inputs = _sample_request(args.model, args.sample, args.text)
    outputs = infer(_url(args), args.model, inputs, args.protocol)
    for name, array in outputs.items():
        print(f"{name}: shape {list(array.shape)} dtype {array.dtype}")
        if array.ndim == 2:
            for row, logits in enumerate(array[:4]):
                top = np.argsort(logits)[::-1][:5]
                probabilities = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
                shown = ", ".join(f"{_label(int(k), array.shape[1])} p={probabilities[k]:.3f}" for k in top)
                print(f"  sample {row} top-5: {shown}")
        else:
            print(np.array2string(array, threshold=50))
    return 0


def _label(index: int, classes: int) -> str:
    return repr(chr(index)) if classes == 256 else str(index)


def cmd_complete(args: argparse.Namespace) -> int:
    import numpy as np

    from serving.client import connect, infer

    recipe = _recipe_of_model(args.model)
    context = recipe.options.block_size
    url, rng = _url(args), np.random.default_rng(args.seed)
    text = bytearray(args.prompt.encode())
    client = connect(url, args.protocol)
    sys.stdout.write(args.prompt)
    try:
        for _ in range(args.max_bytes):
            tokens = np.frombuffer(bytes(text[-context:]), dtype=np.uint8).astype(np.int64)[None]
            logits = infer(url, args.model, {"tokens": tokens}, args.protocol, client=client)["logits"][0].astype(np.float64)
            if args.temperature <= 0:
                next_byte = int(logits.argmax())
            else:
                weights = np.exp((logits - logits.max()) / args.temperature)
                next_byte = int(rng.choice(len(weights), p=weights / weights.sum()))
            text.append(next_byte)
            sys.stdout.write(bytes([next_byte]).decode("utf-8", errors="replace"))
            sys.stdout.flush()
    finally:
        client.close()
    sys.stdout.write("\n")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from bench.stage import SHORT, THOROUGH, BenchmarkOptions, run_benchmark

    def numbers(text: str | None, kind: type) -> tuple | None:
        return tuple(kind(part) for part in text.split(",")) if text else None

    options = BenchmarkOptions(thorough=args.thorough, protocols=tuple(args.protocol or ("grpc", "http")),
                               concurrencies=numbers(args.concurrency, int), rates=numbers(args.rate, float),
                               p99_budget_ms=args.p99_budget_ms, sweep_configs=args.sweep_configs, apply_best=args.apply_best)
    preset = THOROUGH if args.thorough else SHORT
    total = len(options.protocols) * (len(options.concurrencies or preset["concurrencies"]) + len(options.rates or preset["rates"]))
    bar = tqdm(total=total, desc=f"bench {args.model}", unit="point")

    def progress(line: str) -> None:
        bar.write(line)
        if line.startswith("  "):  # a finished load point
            bar.update(1)

    try:
        summary = run_benchmark(args.model, options, http_url=args.url, grpc_url=args.grpc_url,
                                out_dir=Path(args.out) if args.out else None, progress=progress)
    finally:
        bar.close()
    print(Path(summary["outputs"]["markdown"]).read_text())
    print("outputs:", ", ".join(summary["outputs"].values()))
    return 0


def cmd_variants(args: argparse.Namespace) -> int:
    from export.variants import render_table
    from flows.pipeline import load_summary

    summary = load_summary(args.run)
    precision = summary["stages"].get("precision")
    if not precision or precision["status"] != "ok":
        raise TesError(f"run {summary['run_id']} has no precision stage")
    out = precision["outputs"]
    print(f"run {summary['run_id']}: policy {out['policy']}, `{out['selected']}` serves the plain model name\n")
    print(render_table(out["variants"], out["primary_metric"]))
    return 0


def cmd_ledger(args: argparse.Namespace) -> int:
    from accounting.stage import render_ledger
    from flows.pipeline import load_summary

    summary = load_summary(args.run)
    if "ledger" not in summary:
        raise TesError(f"run {summary['run_id']} has no ledger")
    print(render_ledger(json.loads(Path(summary["ledger"]["json"]).read_text())))
    print(f"plot: {summary['ledger']['plot']}")
    return 0


def cmd_scaling(args: argparse.Namespace) -> int:
    from accounting.scaling import scaling_sweep

    result = scaling_sweep(args.widths, args.steps, args.layers)
    print(f"plot: {result['plot']}\ndata: {result['json']}")
    return 0


def _local_rebuild(run_dir: Path, params, recipe) -> Callable[[str, str], Path]:
    """Rebuild (and verify) an engine of this run on this machine's GPU, which must have the asked capability."""
    from core.results import Status
    from export import trt_engine
    from serving.native_repository import EngineMismatch

    def rebuild(precision: str, capability: str) -> Path:
        reason = trt_engine.unavailable_reason()
        if reason:
            raise EngineMismatch(f"cannot rebuild the {precision} engine for compute capability {capability} here: {reason}")
        import torch

        here = "{}.{}".format(*torch.cuda.get_device_capability(0))
        if here != capability:
            raise EngineMismatch(f"cannot rebuild the {precision} engine for compute capability {capability} here: this GPU "
                                 f"is {here}; run export-repository --rebuild on a GPU of {capability}, or pass its engines with --engine-dir")
        variants = json.loads((run_dir / "precision" / "variants.json").read_text())
        config = params.tensorrt.model_copy(update={"precision": precision, "enabled": True})
        result = trt_engine.run_stage(recipe, run_dir / "export" / "model.onnx", variants, run_dir / "tensorrt" / f"sm{capability.replace('.', '')}",
                                      config, params.precision, max(1, params.serving_config(recipe).max_batch_size))
        if result.status is not Status.OK:
            raise EngineMismatch(f"rebuilding the {precision} engine for {capability} {result.status.value}: {result.reason}")
        return Path(result.outputs["folder"])

    return rebuild


def cmd_export_repository(args: argparse.Namespace) -> int:
    from flows.params import parse_params
    from flows.pipeline import load_summary
    from serving.native_repository import EngineTarget, export_repository

    summary = load_summary(args.run)
    run_dir = Path(summary["run_dir"])
    params = parse_params(json.loads((run_dir / "manifest.json").read_text())["params"])
    recipe = params.build_recipe()
    target = None
    if args.target_tensorrt or args.target_cc:
        if not (args.target_tensorrt and args.target_cc):
            raise TesError("--target-tensorrt and --target-cc go together: the serving Triton's TensorRT version and its GPUs' "
                           "compute capabilities, e.g. --target-tensorrt 10.3.0.26 --target-cc 8.0,9.0")
        target = EngineTarget(args.target_tensorrt, tuple(cc.strip() for cc in args.target_cc.split(",") if cc.strip()))
    exported = export_repository(run_dir, Path(args.out), args.model or params.triton_model_name, params.serving_config(recipe),
                                 gpu=not args.cpu, target=target, include_engines=not args.no_engines,
                                 rebuild=_local_rebuild(run_dir, params, recipe) if args.rebuild else None,
                                 engine_dirs=[Path(d) for d in args.engine_dir])
    for version in exported.versions:
        print(f"{version.model_name} version {version.version}: {version.path}")
    for line in exported.left_out:
        print(f"left out: {line}")
    server_args = "".join(f" {arg}" for arg in exported.server_args)
    print(f"\nServe it with a Triton that has the onnxruntime and tensorrt backends, e.g. an NGC container:\n"
          f"  tritonserver --model-repository={Path(args.out).resolve()}{server_args}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from flows.pipeline import load_summary

    summary = load_summary(args.run)
    print((Path(summary["run_dir"]) / "report.md").read_text())
    return 0


# --- parser --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tes", description="train-export-serve: train -> ONNX -> Triton, orchestrated by Prefect")
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="start the Prefect server, the deployment runner and Triton")
    for flag in ("--prefect-port", "--http-port", "--grpc-port", "--metrics-port"):
        up.add_argument(flag, type=int, default=None, help="default: the usual port if free, else a free one")
    up.set_defaults(handler=cmd_up)
    commands.add_parser("down", help="stop everything `tes up` started").set_defaults(handler=cmd_down)
    commands.add_parser("status", help="what is running and which models are loaded").set_defaults(handler=cmd_status)
    commands.add_parser("env", help="print the exports that point the prefect CLI at the stack").set_defaults(handler=cmd_env)

    for name, handler, text in (("run", cmd_run, "run the pipeline in-process (no servers needed)"),
                                ("demo", cmd_demo, "tes up, then the pipeline through `prefect deployment run --watch`")):
        command = commands.add_parser(name, help=text)
        command.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                             help="a pipeline parameter; value as JSON, dotted keys nest (training.steps=50)")
        command.add_argument("--params", default=None, help="all parameters as one JSON object")
        command.set_defaults(handler=handler)

    infer = commands.add_parser("infer", help="send one request to a served model")
    infer.add_argument("model")
    source = infer.add_mutually_exclusive_group()
    source.add_argument("--text", help="for byte models: the context as text")
    source.add_argument("--sample", type=int, default=0, help="held-out sample number from the model's recipe (default 0)")
    source.add_argument("--input", action="append", metavar="NAME=JSON", help="a raw input tensor as a JSON array")
    infer.add_argument("--dtype", default="float32", help="dtype of --input arrays")
    complete = commands.add_parser("complete", help="complete code with a served stdlib-gpt, one byte per request")
    complete.add_argument("prompt")
    complete.add_argument("--model", default=DEFAULT_DEMO_MODEL)
    complete.add_argument("--max-bytes", type=int, default=80)
    complete.add_argument("--temperature", type=float, default=0.7, help="sampling temperature; 0: greedy")
    complete.add_argument("--seed", type=int, default=0)
    for command, handler in ((infer, cmd_infer), (complete, cmd_complete)):
        command.add_argument("--protocol", choices=("http", "grpc"), default="http")
        command.add_argument("--url", default=None, help="host:port of Triton for that protocol; default: the stack's")
        command.set_defaults(handler=handler)

    bench = commands.add_parser("bench", help="benchmark a served model: baselines, concurrency and Poisson-rate sweeps, plots")
    bench.add_argument("model")
    bench.add_argument("--url", help="host:port of Triton's HTTP endpoint; default: the stack's")
    bench.add_argument("--grpc-url", help="host:port of its gRPC endpoint; default: the stack's")
    bench.add_argument("--protocol", action="append", choices=("grpc", "http"), help="repeat for both (default)")
    bench.add_argument("--thorough", action="store_true", help="concurrency 1..32, Poisson rates, 3 s windows")
    bench.add_argument("--concurrency", help="comma-separated, e.g. 1,2,4,8")
    bench.add_argument("--rate", help="comma-separated Poisson request rates per second, e.g. 50,100,200")
    bench.add_argument("--p99-budget-ms", type=float, default=50.0)
    bench.add_argument("--sweep-configs", action="store_true", help="try dynamic batching, queue delays, instance counts")
    bench.add_argument("--apply-best", action="store_true", help="deploy the best configuration found")
    bench.add_argument("--out", help="output folder; default runs/benchmarks/<time>-<model>")
    bench.set_defaults(handler=cmd_bench)

    export = commands.add_parser("export-repository", help="write a native (onnxruntime_onnx / tensorrt_plan) repository from a run")
    export.add_argument("out", help="the repository folder to write")
    export.add_argument("--run", default=None, help="the run folder (default: the last run)")
    export.add_argument("--model", default=None, help="model name prefix (default: the run's)")
    export.add_argument("--cpu", action="store_true", help="KIND_CPU instance groups instead of KIND_GPU")
    export.add_argument("--target-tensorrt", help="the serving Triton's TensorRT version, e.g. 10.3.0.26 (needed when the run has engines)")
    export.add_argument("--target-cc", help="its GPUs' compute capabilities, comma-separated, e.g. 8.0,9.0")
    export.add_argument("--no-engines", action="store_true", help="export the ONNX models only")
    export.add_argument("--rebuild", action="store_true", help="rebuild engines missing for a target capability on this machine's GPU")
    export.add_argument("--engine-dir", action="append", default=[], help="an engine folder built elsewhere for this run (repeatable)")
    export.set_defaults(handler=cmd_export_repository)

    scaling = commands.add_parser("scaling", help="train a few stdlib-gpt sizes briefly; plot bits per byte vs training FLOPs")
    scaling.add_argument("--widths", type=int, nargs="+", default=[32, 64, 128])
    scaling.add_argument("--steps", type=int, default=150)
    scaling.add_argument("--layers", type=int, default=2)
    scaling.set_defaults(handler=cmd_scaling)

    for name, handler, text in (("report", cmd_report, "print a run's report (default: the last run)"),
                                ("variants", cmd_variants, "print a run's precision-variant table (default: the last run)"),
                                ("ledger", cmd_ledger, "print a run's compute and energy ledger (default: the last run)")):
        command = commands.add_parser(name, help=text)
        command.add_argument("run", nargs="?", default=None, help="the run folder")
        command.set_defaults(handler=handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except TesError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
