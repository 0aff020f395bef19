"""``pogdiff demo``: the whole chain on the embedded default, vanilla against PoGDiff.

Writes the medium synthetic people set (10 identities, 30 to 2 images each), trains the
small backbone with each method on the same data, budget and seed, samples
"An image of {name}." for every identity and prints the All/Few table. A finished
step (data, a trained run) is reused when the demo is run again into the same folder.
"""

from __future__ import annotations

import time
from pathlib import Path

from pogdiff.data.synth import write_dataset
from pogdiff.evaluation.evaluate import evaluate_runs, format_table
from pogdiff.evaluation.results_table import feature_spaces_text
from pogdiff.training.ownership import DEMO
from pogdiff.training.run_folder import RunFolder, is_finished
from pogdiff.training.train import TrainConfig, train

DEMO_METHODS = ("vanilla", "pogdiff")
# Sized so that `make demo`, install and identity judge included, ends within 15 minutes on
# 2 cores; `pogdiff evaluate` and the benchmark sample with App. B's 50 DDIM steps.
DEMO_STEPS = 300
DEMO_INFERENCE_STEPS = 25


def run_demo(out: str | Path = "demo-out", preset: str = "medium", seed: int = 0, max_train_steps: int = DEMO_STEPS,
             num_images: int = 8, num_inference_steps: int = DEMO_INFERENCE_STEPS,
             methods: tuple[str, ...] = DEMO_METHODS, cache_dir: str | None = None, progress: bool = True) -> dict:
    start = time.time()
    with RunFolder(out, DEMO, "--out").claimed() as out:  # a demo folder, or a new or empty one
        data = out / "data"
        if not (data / "synth.json").is_file():
            write_dataset(data, preset=preset, seed=seed)
        runs = []
        for method in methods:
            run = out / "runs" / method
            if not is_finished(run):
                train(TrainConfig(str(data), str(run), method=method, seed=seed, max_train_steps=max_train_steps,
                                  overwrite=True, cache_dir=cache_dir, progress=progress))
            runs.append(run)
        metrics = evaluate_runs(runs, data, out, num_images=num_images, num_inference_steps=num_inference_steps,
                                seed=seed, cache_dir=cache_dir, progress=progress, own_folder=True)
    print(f"\n{metrics['num_identities']['all']} identities, Few = {metrics['num_identities']['few']} with "
          f"<= {metrics['few_max_images']} training images; {num_images} samples each, DDIM "
          f"{metrics['num_inference_steps']} steps. {feature_spaces_text(metrics['feature_spaces'])}; "
          f"id_acc by the {metrics['identity_judge']}.\n")
    print(format_table(metrics))
    print(f"\nreport: {out / 'report.html'}   metrics: {out / 'metrics.json'}   samples: {out}/samples-*.png   "
          f"wall time: {time.time() - start:.0f} s")
    return metrics
