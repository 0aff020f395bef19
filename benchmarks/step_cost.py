"""What a PoGDiff training step costs against a vanilla one: time and peak-memory ratios.

A step is what ``pogdiff train`` runs per batch: the method's loss from ``pogdiff.objectives.losses``
(PoGDiff adds a forward pass under the neighbour's caption, without autograd), backward,
AdamW. Both methods see the same latents, captions and neighbour tables (random).

- CPU: a tiny Stable Diffusion UNet (channels 32/64, cross-attention 32, 16 tokens;
  latents 4x16x16, i.e. 32x32 images), batch 8, float32. Time is CPU time of the process,
  the methods interleaved (run with OMP_NUM_THREADS=1); peak memory is the resident set
  above the set-up, each method in its own process.
- GPU, when ``torch.cuda.is_available()``: a UNet of Stable Diffusion v1.5's configuration
  with random weights, latents 4x64x64 (512x512 images), batch 8, fp32 weights under fp16
  and bf16 autocast (``--mixed-precision``); peak memory is ``torch.cuda.max_memory_allocated``.

Targets: PoGDiff/vanilla time <= 1.40 on the CPU, <= 1.35 on the GPU.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/step_cost.py [--steps 20] [--repeats 5]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import time

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from pogdiff.encode.loss_tables import loss_tables
from pogdiff.objectives.forward_process import DDPMProcess
from pogdiff.objectives.losses import METHODS, TrainBatch, neighbour_request
from pogdiff.objectives.neighbours import find_neighbours
from pogdiff.encode.encoded_dataset import EncodedDataset

TARGETS = {"cpu": 1.40, "cuda": 1.35}
ROWS = 64  # dataset rows the batches are drawn from


def tiny_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8)


def sd15_unet() -> UNet2DConditionModel:
    """Stable Diffusion v1.5's UNet config (runwayml/stable-diffusion-v1-5 unet/config.json); the
    other values are diffusers' defaults, which are SD v1.5's."""
    return UNet2DConditionModel(sample_size=64, cross_attention_dim=768)


SETTINGS = {"cpu": (tiny_unet, 16, 16, 32), "cuda": (sd15_unet, 64, 77, 768)}  # unet, latent size, tokens, text dim


class RandomNeighbours:
    """Neighbour tables of random features, in whatever space is asked for."""

    def neighbours(self, space: str, k: int):
        return find_neighbours(torch.randn(ROWS, 64), k)


class Bench:
    """One method's training step on random data, as in pogdiff.training.train."""

    def __init__(self, method: str, device: str, autocast_dtype: torch.dtype | None = None, batch: int = 8):
        make_unet, size, tokens, dim = SETTINGS["cuda" if device == "cuda" else "cpu"]
        torch.manual_seed(0)
        self.unet = make_unet().to(device).train()
        self.optimizer = torch.optim.AdamW(self.unet.parameters(), lr=1e-5)
        scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
        tables = EncodedDataset.of_rows(torch.randn(ROWS, tokens, dim), torch.randn(tokens, dim), torch.arange(ROWS) // 4,
                                torch.randn(ROWS), RandomNeighbours()).to(device)
        self.loss_fn = METHODS[method](DDPMProcess(scheduler), loss_tables(tables, neighbour_request(method, {})))
        self.tables, self.device, self.batch, self.size = tables, device, batch, size
        self.autocast_dtype = autocast_dtype
        self.scaler = torch.amp.GradScaler(device) if autocast_dtype == torch.float16 else None

    def denoiser(self, x_t, t, cond):
        return self.unet(x_t, t, encoder_hidden_states=cond, return_dict=False)[0]

    def step(self) -> None:
        rows = torch.randint(ROWS, (self.batch,), device=self.device)
        x0 = torch.randn(self.batch, 4, self.size, self.size, device=self.device)
        batch = TrainBatch(x0, self.tables.caption_states(rows), rows,
                           torch.zeros(self.batch, dtype=torch.bool, device=self.device))
        with torch.autocast(self.device, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            loss = self.loss_fn(self.denoiser, batch).mean()
        if self.scaler:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def seconds_per_step(self, steps: int) -> float:
        """GPU: wall time. CPU: this process's CPU time, which other processes on a shared machine
        disturb less than wall time (one thread: CPU time is the work done)."""
        if self.device == "cuda":
            torch.cuda.synchronize()
            clock = time.perf_counter
        else:
            clock = time.process_time
        start = clock()
        for _ in range(steps):
            self.step()
        if self.device == "cuda":
            torch.cuda.synchronize()
        return (clock() - start) / steps


def timed(device: str, steps: int, repeats: int, autocast_dtype=None) -> dict[str, float]:
    """Median seconds per step of each method, the two interleaved repeat by repeat."""
    benches = {m: Bench(m, device, autocast_dtype) for m in ("vanilla", "pogdiff")}
    for bench in benches.values():
        bench.seconds_per_step(2)  # warm-up: allocator, kernels, optimizer states
    times = {m: [] for m in benches}
    for _ in range(repeats):
        for method, bench in benches.items():
            times[method].append(bench.seconds_per_step(steps))
    return {m: statistics.median(t) for m, t in times.items()}


def rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def cpu_peak_memory_mb(method: str, steps: int) -> float:
    """Peak resident memory above the set-up while stepping, in a fresh process (Linux)."""
    out = subprocess.run([sys.executable, __file__, "--memory-of", method, "--steps", str(steps)],
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def print_cpu_peak_memory(method: str, steps: int) -> None:
    bench = Bench(method, "cpu")
    base = rss_mb()
    for _ in range(steps):
        bench.step()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base)


def cuda_peak_memory_gb(method: str, steps: int, autocast_dtype) -> float:
    bench = Bench(method, "cuda", autocast_dtype)
    torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        bench.step()
    peak = torch.cuda.max_memory_allocated() / 2**30
    del bench
    torch.cuda.empty_cache()
    return peak


def report(label: str, times: dict[str, float], memory: dict[str, float], unit: str, target: float) -> None:
    ratio = times["pogdiff"] / times["vanilla"]
    print(f"{label}\n  s/step   vanilla {times['vanilla']:.4f}  pogdiff {times['pogdiff']:.4f}  "
          f"ratio {ratio:.2f}x (target <= {target:.2f}x: {'met' if ratio <= target else 'NOT met'})\n"
          f"  peak {unit} vanilla {memory['vanilla']:.2f}  pogdiff {memory['pogdiff']:.2f}  "
          f"ratio {memory['pogdiff'] / memory['vanilla']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="steps per timed repeat (CPU)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--gpu-steps", type=int, default=10)
    parser.add_argument("--memory-of", choices=sorted(METHODS), help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.memory_of:
        return print_cpu_peak_memory(args.memory_of, args.steps)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s)")
    times = timed("cpu", args.steps, args.repeats)
    memory = {m: cpu_peak_memory_mb(m, args.steps) for m in ("vanilla", "pogdiff")}
    report("CPU, tiny SD UNet, latents 4x16x16, batch 8, fp32", times, memory, "MB above set-up", TARGETS["cpu"])
    if not torch.cuda.is_available():
        print("GPU: none available (torch.cuda.is_available() is False); SD v1.5 figures not measured")
        return
    print(f"GPU: {torch.cuda.get_device_name()}")
    dtypes = [torch.float16] + ([torch.bfloat16] if torch.cuda.is_bf16_supported() else [])
    for dtype in dtypes:
        times = timed("cuda", args.gpu_steps, args.repeats, dtype)
        memory = {m: cuda_peak_memory_gb(m, args.gpu_steps, dtype) for m in ("vanilla", "pogdiff")}
        report(f"GPU, SD v1.5 UNet (random weights), latents 4x64x64 (512x512), batch 8, {dtype} autocast",
               times, memory, "GiB allocated", TARGETS["cuda"])


if __name__ == "__main__":
    main()
