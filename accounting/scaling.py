"""The scaling view: train a few stdlib-gpt sizes briefly and plot validation bits per byte against training FLOPs.

tes scaling                                   # 3 sizes, 150 steps each (about 2 minutes on 2 CPU cores)
tes scaling --widths 32,64,128,256 --steps 300
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from accounting.flops import six_n_d, tokens_per_step, training_step_flops
from core import paths
from core.files import atomic_write, atomic_write_json
from core.results import new_run_id
from recipes import build_recipe
from training.loop import TrainingConfig, train


def scaling_sweep(
    widths: list[int], steps: int, layers: int = 2, out_dir: Path | None = None, say: Callable[[str], None] = print
) -> dict:
    """One brief training per width; returns the points and writes `scaling.json` and `scaling.png`."""
    out_dir = out_dir or paths.resolve("runs") / "scaling" / new_run_id("stdlib-gpt")
    points = []
    for width in widths:
        recipe = build_recipe("stdlib-gpt", {"n_layer": layers, "n_embd": width, "n_head": max(1, width // 32)})
        config = TrainingConfig(steps=steps, eval_every=10**6, resume=False)
        result = train(recipe, config, out_dir / f"width-{width}", progress=False)
        model = recipe.build_model()
        trained = result.output
        flops = training_step_flops(recipe, model, config.batch_size) * trained.steps
        rule = six_n_d(model, tokens_per_step(recipe, config.batch_size) * trained.steps)
        point = {
            "n_layer": layers,
            "n_embd": width,
            "parameters": trained.parameters,
            "steps": trained.steps,
            "training_flops": flops,
            "six_n_d": rule,
            "seconds": result.seconds,
            "bits_per_byte": trained.validation["bits_per_byte"],
            "next_byte_accuracy": trained.validation["next_byte_accuracy"],
        }
        points.append(point)
        say(
            f"width {width:4d}: {point['parameters']:>9,} parameters, {flops:.3g} training FLOPs, "
            f"{point['bits_per_byte']:.3f} bits/byte in {result.seconds:.0f} s"
        )
    atomic_write_json(out_dir / "scaling.json", {"points": points})
    _plot(out_dir / "scaling.png", points)
    return {"points": points, "json": str(out_dir / "scaling.json"), "plot": str(out_dir / "scaling.png")}


def _plot(path: Path, points: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(5.5, 4))
    axes.plot([p["training_flops"] for p in points], [p["bits_per_byte"] for p in points], "o-")
    for p in points:
        axes.annotate(f"{p['parameters'] / 1e3:.0f}k", (p["training_flops"], p["bits_per_byte"]), fontsize=8)
    axes.set(
        xscale="log",
        xlabel="training FLOPs (counted)",
        ylabel="validation bits per byte",
        title="stdlib-gpt: loss vs compute",
    )
    axes.grid(alpha=0.3)
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=100, format="png"))
    plt.close(figure)
