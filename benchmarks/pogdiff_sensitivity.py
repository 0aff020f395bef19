"""PoGDiff's sensitivity to its knobs (issue #13): k, a2, the psi_txt clip and the neighbour space.

The tuning stage trains every combination of

    k in {1, 3, 10} (Eq. 8) x a2 in {1, 4, 10} (Eq. 9) x psi_txt_max_ratio in {2, 10} (Eq. 11)
    x neighbour_features in {efficientnet-lite0, unet}

plus vanilla, seeds 0 1 2, on ONE tuning dataset (the medium preset at generator seed 1,
written beside OUT as OUT-data; docs/results.md's tables use generator seed 0, and the
pretraining corpus excludes seeds 0-9), with the default benchmark budget on the shipped
pretrained backbone. It is ``pogdiff benchmark`` with these rows, so it runs one cell at a
time and an interrupted study continues where it stopped. Defaults are chosen from this
table only, and confirmed afterwards on data not used here.

    OMP_NUM_THREADS=2 PYTHONPATH=src nohup python benchmarks/pogdiff_sensitivity.py --out study-tune &

Prints the configurations ranked by Few id_acc, then Few sim (mean over the seeds done so
far, with each one's paired difference from vanilla), and writes OUT/sensitivity.md and
OUT/sensitivity.png (the paired differences as k x a2 heat maps, one per clip and space);
``--report`` does only that, from the cells finished so far (while the study runs, too).

The defaults are the configuration this rule picks (fixed on 2026-11-27, after seed 0 and
before seeds 1 and 2 had run; see ``choose``): among the configurations whose mean paired
Few sim difference from vanilla is at least -SIM_TOLERANCE x (Few sim of real held-out
images - Few sim of the look-alike), the one with the largest mean paired Few id_acc
difference; ties go to the larger Few sim difference. A configuration may not buy identity
accuracy with images that drift towards another person's look; the tolerance is a fraction
of what the calibration rows say separates the right person from a look-alike on this data.
If even that one does not beat vanilla's Few id_acc, the report says so: the default is then
the least harmful setting, not a recommendation over vanilla.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path
from statistics import fmean

from matplotlib.figure import Figure

from pogdiff.compare.comparison import BASELINE, format_interval, parse_method, run_benchmark, summarise_finished
from pogdiff.data.synth import write_dataset
from pogdiff.files import atomic_path

K = (1, 3, 10)
A2 = (1, 4, 10)
PSI_TXT_MAX_RATIO = (2, 10)
SPACES = ("efficientnet-lite0", "unet")
TUNING_PRESET, TUNING_GENERATOR_SEED = "medium", 1
SIM_TOLERANCE = 0.2
SEEDS = (0, 1, 2)  # the defaults are chosen only over all of them


def grid() -> list[str]:
    return [f"pogdiff:k={k},a2={a2},psi_txt_max_ratio={r},neighbour_features={space}"
            for space, k, a2, r in itertools.product(SPACES, K, A2, PSI_TXT_MAX_RATIO)]


def diagnostics(out: Path, name: str, seeds) -> str:
    """Minority rows' share of other-identity y', their mean psi, and the space's separation (psi_summary.json)."""
    run = out / "runs" / parse_method(name).folder
    summaries = [json.loads(f.read_text()) for seed in seeds if (f := run / f"seed-{seed}" / "psi_summary.json").is_file()]
    if not summaries:
        return " | | "
    return (f"{fmean([s['minority']['other_identity_share']['mean'] for s in summaries]):.2f} | "
            f"{fmean([s['minority']['psi']['mean'] for s in summaries]):.2f} | "
            f"{fmean([s['neighbour_features']['separation'] for s in summaries]):.3f}")


def ranking(metrics: dict, out: Path) -> str:
    methods, paired = metrics["methods"], metrics["paired_vs_vanilla"]
    rows = sorted(methods.items(), key=lambda item: (-item[1]["few"]["id_acc"]["mean"],
                                                      -item[1]["few"]["sim"]["mean"]))
    lines = ["| row | seeds | id_acc Few | sim Few | id_acc All | fd Few | Δ id_acc Few vs vanilla | "
             "Δ sim Few vs vanilla | y' other (minority rows) | psi (minority rows) | separation |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in rows:
        differences = paired.get(name, {})
        lines.append(f"| {name} | {len(m['seeds'])} | {format_interval(m['few']['id_acc'])} | "
                     f"{format_interval(m['few']['sim'])} | {format_interval(m['all']['id_acc'])} | "
                     f"{format_interval(m['few']['fd'], 1)} | "
                     f"{format_interval(differences['few.id_acc']) if differences else ''} | "
                     f"{format_interval(differences['few.sim']) if differences else ''} | "
                     f"{diagnostics(out, name, m['seeds'])} |")
    return "\n".join(lines)


def choose(metrics: dict, seeds: list[int]) -> str:
    """The selection rule of the module docstring, applied to the rows that have every seed."""
    calibration = metrics["calibration"]
    gap = calibration["real (held-out)"]["few"]["sim"]["mean"] - calibration["real (look-alike)"]["few"]["sim"]["mean"]
    tolerance = SIM_TOLERANCE * gap
    complete = {name: d for name, d in metrics["paired_vs_vanilla"].items()
                if len(metrics["methods"][name]["seeds"]) == len(seeds)}
    eligible = {name: d for name, d in complete.items() if d["few.sim"]["mean"] >= -tolerance}
    header = (f"Selection rule: mean paired Few sim difference >= -{tolerance:.3f} ({SIM_TOLERANCE} x the held-out "
              f"vs look-alike Few sim gap {gap:.3f}), then the largest mean paired Few id_acc difference. "
              f"{len(complete)} of {len(grid())} configurations have all {len(seeds)} seeds; "
              f"{len(eligible)} of them pass the sim bound.")
    if not eligible:
        return header
    best = max(eligible, key=lambda name: (eligible[name]["few.id_acc"]["mean"], eligible[name]["few.sim"]["mean"]))
    if not set(SEEDS) <= set(seeds):
        verdict = f"Provisional (seeds {', '.join(map(str, seeds))}, not the study's {', '.join(map(str, SEEDS))})"
    elif len(complete) < len(grid()):
        verdict = "Provisional (not every configuration has every seed)"
    else:
        verdict = "Chosen"
    caveat = "" if eligible[best]["few.id_acc"]["mean"] > 0 else (
        " No eligible configuration beats vanilla's Few id_acc: this is the least harmful setting.")
    return (f"{header}\n\n{verdict}: `{best}` (Δ Few id_acc {format_interval(eligible[best]['few.id_acc'])}, "
            f"Δ Few sim {format_interval(eligible[best]['few.sim'])}).{caveat}")


def heat_maps(metrics: dict) -> Figure:
    """Mean paired difference from vanilla on Few id_acc and Few sim over k x a2, one panel per (space, clip)."""
    paired = metrics["paired_vs_vanilla"]
    panels = list(itertools.product(SPACES, PSI_TXT_MAX_RATIO))
    figure = Figure(figsize=(3.2 * len(panels), 6), layout="constrained")
    axes = figure.subplots(2, len(panels), squeeze=False)
    for row, (metric, limit) in enumerate((("few.id_acc", 0.3), ("few.sim", 0.15))):
        for column, (space, ratio) in enumerate(panels):
            ax = axes[row][column]
            values = [[paired.get(f"pogdiff:k={k},a2={a2},psi_txt_max_ratio={ratio},neighbour_features={space}",
                                  {}).get(metric) for a2 in A2] for k in K]
            grid_values = [[float("nan") if v is None else v["mean"] for v in line] for line in values]
            image = ax.imshow(grid_values, cmap="RdBu", vmin=-limit, vmax=limit)
            for i, line in enumerate(values):
                for j, v in enumerate(line):
                    dark = v is not None and abs(v["mean"]) > 0.6 * limit
                    ax.text(j, i, "–" if v is None else f"{v['mean']:+.3f}\n{v['n']} seed{'s' * (v['n'] > 1)}",
                            ha="center", va="center", fontsize=8, color="white" if dark else "black")
            ax.set_xticks(range(len(A2)), [f"a2={a2}" for a2 in A2])
            ax.set_yticks(range(len(K)), [f"k={k}" for k in K])
            ax.set_title(f"{space}, clip {ratio}", fontsize=9)
        figure.colorbar(image, ax=axes[row].tolist(), label=f"Δ {metric} vs vanilla")
    figure.suptitle("PoGDiff's sensitivity on the tuning data: paired difference from vanilla (blue = better)")
    return figure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="study-tune", help="study folder (a pogdiff benchmark folder)")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--report", action="store_true", help="only rank the cells finished so far")
    args = parser.parse_args()

    out = Path(args.out)
    if args.report:
        metrics = summarise_finished(out, [BASELINE, *grid()], args.seeds)
    else:
        data = out.parent / f"{out.name}-data"  # beside OUT: a benchmark folder holds only what the benchmark wrote
        if not (data / "synth.json").is_file():
            with atomic_path(data) as tmp:
                write_dataset(tmp, preset=TUNING_PRESET, seed=TUNING_GENERATOR_SEED)
        metrics = run_benchmark(out, methods=[BASELINE, *grid()], seeds=args.seeds, data=data,
                                cache_dir=args.cache_dir, progress=not args.no_progress)
    table = ranking(metrics, out) + "\n\n" + choose(metrics, args.seeds)
    (out / "sensitivity.md").write_text(
        f"Tuning data: {TUNING_PRESET} preset, generator seed {TUNING_GENERATOR_SEED}; seeds {args.seeds}; "
        "rows ranked by Few id_acc, then Few sim (mean ± half-width of the 95% interval over seeds; "
        "Δ = paired difference from vanilla, seed by seed).\n\n" + table + "\n")
    heat_maps(metrics).savefig(out / "sensitivity.png", dpi=100)
    print(table)


if __name__ == "__main__":
    main()
