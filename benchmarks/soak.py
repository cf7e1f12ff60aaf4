"""Soak the served stdlib-gpt (demo size) under steady load and report lost, wrong and memory figures.

    .venv/bin/python benchmarks/soak.py --seconds 180 --concurrency 4 --protocol grpc

Starts its own Triton on free loopback ports, serves a demo-size stdlib-gpt (random weights: correctness is
checked against ONNX Runtime on the same file, so training does not matter here), checks every response, and
stops everything. The figures go into docs/reliability.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.soak import soak  # noqa: E402
from core.runtimes import open_session  # noqa: E402
from export.onnx_export import ExportConfig, export_onnx  # noqa: E402
from recipes import build_recipe  # noqa: E402
from serving import client, repository, triton  # noqa: E402
from serving.repository import ServingConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=180)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    parser.add_argument("--json", help="also write the report here")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="tes-soak-"))
    recipe = build_recipe("stdlib-gpt", {})
    torch.manual_seed(0)
    onnx_path = export_onnx(recipe, recipe.build_model(), work, ExportConfig()).output.onnx
    session = open_session(onnx_path)
    cases = [(b.inputs, session.run(None, b.inputs)[0]) for b in recipe.eval_batches(1, max_samples=64)]
    server = triton.start(work / "repo", work / "triton")
    try:
        repository.write_version(server.repository, "stdlib-gpt", onnx_path, ServingConfig(max_batch_size=8))
        client.load_model(server.http_url, "stdlib-gpt")
        url = server.grpc_url if args.protocol == "grpc" else server.http_url
        report = soak(url, args.protocol, "stdlib-gpt", cases, args.seconds, args.concurrency, server_pid=server.pid)
    finally:
        triton.stop(server.pid)
    samples = report.rss_mb_samples
    minute = min(60, len(samples) // 2)
    print(
        f"soak: {args.seconds:.0f} s, {args.protocol}, concurrency {args.concurrency}, stdlib-gpt demo size, 1 x 128 "
        "bytes per request"
    )
    print(
        f"requests {report.requests}, errors {report.errors}, wrong answers {report.wrong}, "
        f"{report.requests / args.seconds:.0f} requests/s"
    )
    print(
        f"server memory (tritonserver + Python-backend stub): first {minute} s peak {max(samples[:minute]):.0f} MB, "
        f"last {minute} s peak {max(samples[-minute:]):.0f} MB, overall peak {report.peak_rss_mb:.0f} MB"
    )
    if report.first_errors:
        print("first problems:", *report.first_errors, sep="\n  ")
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2))


if __name__ == "__main__":
    main()
