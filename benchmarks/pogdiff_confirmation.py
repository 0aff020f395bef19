"""Confirm PoGDiff's defaults on data the sensitivity study did not see (issue #13, second stage).

The study (benchmarks/pogdiff_sensitivity.py) chose the defaults on the medium preset at
generator seed 1 with seeds 0 1 2. This script runs the same rows on other data, seeds 3 4 5:

    medium      the medium preset, generator seed 0 (docs/results.md, medium table)
    small       the small preset, generator seed 0 (docs/results.md, small table)
    large       the large preset, generator seed 0, scored on a fixed sample of 40 of its 220
                identities (--max-identities: sampling all of them costs ~30 min a cell)
    medium-g2   the medium preset, generator seed 2

Rows: vanilla, cbdm, t2h, resample, and PoGDiff with today's defaults, uniform and balanced
batches, beside PoGDiff with the defaults it had before the study (OLD_DEFAULTS). Each dataset
is a ``pogdiff benchmark`` folder, OUT/<dataset>, so cells run one at a time and a stopped
confirmation continues where it stopped. OUT/confirmation.md gives, per dataset and row, the
paired difference from vanilla on Few id_acc and Few sim with its 95% interval, and the
verdict: win (interval above 0), loss (below 0) or tie; OUT/confirmation.png draws them. A second
table pairs pogdiff+balanced with resample: the same balanced rows, so it isolates PoGDiff's term.

OUT defaults to benchmarks/results/confirmation, where git keeps the settings, each finished cell's
cell.json and the reports (see .gitignore): docs/results.md's tables are re-derived from them with
--report, and a confirmation stopped by the end of a session continues in a fresh checkout at the
same path (each benchmark.json records its dataset's absolute path, and a folder refuses other settings).

    OMP_NUM_THREADS=2 PYTHONPATH=src nohup python benchmarks/pogdiff_confirmation.py &

``--report`` only summarises the cells finished so far.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from matplotlib.figure import Figure

from pogdiff.compare.comparison import (BASELINE, PAIRED_METRICS, Budget, cell_path, format_interval, paired_difference,
                                parse_method, run_benchmark, summarise_finished)
from pogdiff.data.synth import write_dataset
from pogdiff.evaluation.results_table import markdown_table
from pogdiff.files import atomic_path
from pogdiff.objectives.losses import method_parameters

OLD_DEFAULTS = "pogdiff:k=10,a2=1,psi_txt_max_ratio=10,neighbour_features=efficientnet-lite0"
ROWS = (BASELINE, "cbdm", "t2h", "resample", "pogdiff", "pogdiff+balanced", OLD_DEFAULTS)
SEEDS = (3, 4, 5)
SAME_ROWS = ("pogdiff+balanced", "resample")  # the same balanced rows with and without PoGDiff's second term
RESULTS = Path(__file__).parent / "results" / "confirmation"
DATASETS = {  # name: (preset, generator seed, identities scored; None = all)
    "medium": ("medium", 0, None),
    "small": ("small", 0, None),
    "large": ("large", 0, 40),
    "medium-g2": ("medium", 2, None),
}


def label(row: str, short: bool = False) -> str:
    if row != OLD_DEFAULTS:
        return row
    return "pogdiff, pre-study defaults" + ("" if short else f" ({OLD_DEFAULTS.partition(':')[2]})")


def defaults_were_changed() -> bool:
    """Whether PoGDiff's defaults differ from OLD_DEFAULTS (else the rows pogdiff and OLD_DEFAULTS are one)."""
    parameters = method_parameters("pogdiff")
    return any(parameters[key].default != value for key, value in parse_method(OLD_DEFAULTS).options.items())


def verdict(difference: dict | None) -> str:
    if difference is None or difference["half_width"] is None:
        return "–"
    low, high = difference["mean"] - difference["half_width"], difference["mean"] + difference["half_width"]
    return "win" if low > 0 else "loss" if high < 0 else "tie"


def dataset_folder(out: Path, name: str) -> Path:
    """The dataset, written once beside the benchmark folders (OUT/data/<name>)."""
    preset, generator_seed, _ = DATASETS[name]
    data = out / "data" / name
    if not (data / "synth.json").is_file():
        with atomic_path(data) as tmp:
            write_dataset(tmp, preset=preset, seed=generator_seed)
    return data


def summaries_by_dataset(out: Path, names: list[str], seeds: list[int]) -> dict[str, dict]:
    """{dataset: the benchmark's summary} over the cells finished so far ({} before vanilla's first cell)."""
    baseline = parse_method(BASELINE)
    return {name: summarise_finished(out / name, list(ROWS), seeds)
            if any(cell_path(out / name, baseline, seed).is_file() for seed in seeds) else {} for name in names}


def same_rows_difference(methods: dict) -> dict:
    """pogdiff+balanced minus resample, seed by seed, on each paired metric ({} until both have cells)."""
    row, baseline = (methods.get(name) for name in SAME_ROWS)
    if row is None or baseline is None:
        return {}
    return {f"{split}.{key}": paired_difference(row["seeds"], baseline["seeds"], (split, key), SAME_ROWS[1])
            for split, key in PAIRED_METRICS}


def with_verdict(difference: dict | None) -> str:
    return f"{format_interval(difference)} ({verdict(difference)})" if difference else "not run"


def summary(summaries: dict[str, dict], seeds: list[int]) -> str:
    header = ["row"]
    for name in summaries:
        header += [f"{name}: Δ {key} {split.capitalize()}" for split, key in PAIRED_METRICS]
    rows = {row: [label(row)] for row in ROWS if row != BASELINE}
    for s in summaries.values():
        for row, cells in rows.items():
            cells += [with_verdict(s.get("paired_vs_vanilla", {}).get(row, {}).get(f"{split}.{key}"))
                      for split, key in PAIRED_METRICS]
    same_rows = []
    for name, s in summaries.items():
        if differences := same_rows_difference(s.get("methods", {})):
            same_rows.append([name] + [with_verdict(differences[f"{split}.{key}"]) for split, key in PAIRED_METRICS])
    return (f"Paired differences from {BASELINE} (mean ± half-width of the 95% interval over seeds "
            f"{', '.join(map(str, seeds))}; win / loss = the interval lies above / below 0, else tie).\n\n"
            + markdown_table(header, list(rows.values()))
            + f"\n\nPoGDiff's term alone: {SAME_ROWS[0]} minus {SAME_ROWS[1]} (the same balanced rows), "
              "paired by seed.\n\n"
            + markdown_table(["dataset"] + [f"Δ {key} {split.capitalize()}" for split, key in PAIRED_METRICS],
                             same_rows))


def forest_plot(summaries: dict[str, dict]) -> Figure:
    """Each row's paired difference from vanilla with its 95% interval, per dataset, one panel per metric."""
    rows = [row for row in ROWS if row != BASELINE]
    paired = {name: s.get("paired_vs_vanilla", {}) for name, s in summaries.items()}
    figure = Figure(figsize=(6 * len(PAIRED_METRICS), 0.3 * len(rows) * len(paired) + 1.5), layout="constrained")
    for ax, (split, key) in zip(figure.subplots(1, len(PAIRED_METRICS), squeeze=False)[0], PAIRED_METRICS):
        labels, y = [], 0
        for name, differences in paired.items():
            for row in rows:
                difference = differences.get(row, {}).get(f"{split}.{key}")
                if difference is not None:
                    ax.errorbar(difference["mean"], y, xerr=difference["half_width"] or 0, fmt="o",
                                color={"win": "tab:blue", "loss": "tab:red"}.get(verdict(difference), "tab:gray"))
                labels.append(f"{name}: {label(row, short=True)}")
                y += 1
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel(f"Δ {key} {split.capitalize()} vs {BASELINE} (95% interval over seeds)")
    figure.suptitle("Confirmation on data the study did not see: blue = win, red = loss, grey = tie")
    return figure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(RESULTS), help="confirmation folder (one benchmark folder per dataset)")
    parser.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS),
                        help="in this order (default: all)")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--report", action="store_true", help="only summarise the cells finished so far")
    args = parser.parse_args()

    out = Path(args.out)
    if not args.report:
        if not defaults_were_changed():
            raise SystemExit("PoGDiff's defaults are still the ones before the study (OLD_DEFAULTS): set the "
                             "configuration benchmarks/pogdiff_sensitivity.py --report chose, then confirm it")
        for name in args.datasets:
            budget = replace(Budget(), max_identities=DATASETS[name][2])
            run_benchmark(out / name, methods=list(ROWS), seeds=args.seeds, budget=budget,
                          data=dataset_folder(out, name), cache_dir=args.cache_dir, progress=not args.no_progress)
    summaries = summaries_by_dataset(out, args.datasets, args.seeds)
    text = summary(summaries, args.seeds)
    (out / "confirmation.md").write_text(text + "\n")
    forest_plot(summaries).savefig(out / "confirmation.png", dpi=100)
    print(text)


if __name__ == "__main__":
    main()
