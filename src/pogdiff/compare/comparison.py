"""``pogdiff benchmark``: every method compared, as in the paper's tables, on the same data, budget and seeds.

(The scripts in ``benchmarks/`` measure costs, time and memory, or run studies on top of
this module; this module compares methods.)

Each (method, seed) cell trains one run and evaluates it with :func:`evaluate_runs`
(sampling seeded by the same seed, so methods see the same noise); the cells are then
aggregated per method into a mean and a 95% Student-t interval over seeds, for every
numeric metric under All and Few, and each method is compared with vanilla seed by
seed on Few identity accuracy and Few similarity (paired 95% intervals). A finished
cell is never run again, so re-running the same command continues an interrupted benchmark.

Methods are named ``METHOD[+SAMPLER][:option=value,...]``: a loss of
:data:`pogdiff.objectives.losses.METHODS`, optionally a row sampler of :mod:`pogdiff.training.row_sampler`
(``pogdiff+balanced``, ``cbdm+balanced``; ``resample`` is ``vanilla+balanced``), and
constructor arguments of the method's loss (``cbdm:tau=0.5``,
``pogdiff:k=3,a2=10,psi_txt_max_ratio=2,neighbour_features=unet``) or the balanced
sampler's ``density_max_ratio``. The paper's Table 5 ablations have the short names in
:data:`ABLATIONS`.

Layout of the output folder::

    OUT/benchmark.json                 the settings; a re-run must use the same ones
    OUT/data/                          the embedded dataset, unless --data is given
    OUT/runs/NAME/seed-S/              training runs
    OUT/eval/NAME/seed-S/cell.json     a finished cell (plus samples and evaluate's metrics.json)
    OUT/metrics.json, benchmark.md, benchmark.html
"""

from __future__ import annotations

import html
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from pogdiff.backbones.backbone import pipeline_backbone_class
from pogdiff.compare.dry_run import describe_backbone
from pogdiff.data.dataset import FEW_MAX_IMAGES, load_dataset
from pogdiff.data.image_files import dataset_digest
from pogdiff.data.synth import write_dataset
from pogdiff.encode.cache import check_cache_dir
from pogdiff.errors import Interrupted, PogdiffError
from pogdiff.evaluation.evaluate import PROMPT, evaluate_runs
from pogdiff.evaluation.results_table import all_few_table, feature_spaces_text, html_table, markdown_table
from pogdiff.files import atomic_path, safe_stem, write_text_atomic
from pogdiff.objectives.losses import METHODS, method_parameters
from pogdiff.backbones.pretrained import local_pipeline_folder, pipeline_fingerprint
from pogdiff.processes import on_main_process, process_state
from pogdiff.options import PAPER_PRESETS, check_sampler, check_values
from pogdiff.training.ownership import BENCHMARK
from pogdiff.training.run_folder import RunFolder, is_finished
from pogdiff.backbones.shipped import SHIPPED_NAME, WEIGHTS_FILE, shipped_manifest
from pogdiff.training.train import TrainConfig, train

DEFAULT_METHODS = ("vanilla", "cbdm", "t2h", "resample", "pogdiff")
DEFAULT_SEEDS = (0, 1, 2)
QUICK_SEEDS = (0, 1)
ABLATIONS = {  # Table 5: PoGDiff without one factor of psi (without y' altogether is vanilla)
    "pogdiff-no-psi-img": "pogdiff:use_psi_img=false",
    "pogdiff-no-psi-txt": "pogdiff:use_psi_txt=false",
}
BASELINE = "vanilla"
PAIRED_METRICS = (("few", "id_acc"), ("few", "sim"))  # what each method is compared with vanilla on, seed by seed
PAIRED_TITLE = f"Paired comparison with {BASELINE} on " + " and ".join(f"{k} {s.capitalize()}" for s, k in PAIRED_METRICS)
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Budget:
    """What every method gets: same backbone, steps, batch and learning rate, same sampling for evaluation."""

    max_train_steps: int = 300
    train_batch_size: int = 16
    learning_rate: float | None = None  # the backbone's default
    from_scratch: bool = False  # the small backbone from random weights instead of the shipped pretrained one
    num_images: int = 8
    num_images_few: int | None = None  # per Few identity (None: num_images); App. B draws 500
    num_inference_steps: int = 50
    guidance_scale: float | None = None
    few_max_images: int = FEW_MAX_IMAGES
    max_identities: int | None = None  # score a fixed stratified sample of the identities (None: all)
    prompt_template: str = PROMPT  # sampled for every identity, {name} replaced by its name
    # evaluate's feature spaces (None: its default) and identity judge
    fd_features: str | None = None
    sim_features: str | None = None
    inception_weights: str | None = None
    identity_judge: str = "auto"
    # a diffusers checkpoint (folder or hub id) instead of the small backbone, and how it is trained
    pretrained: str | None = None
    lora_rank: int | None = None
    lora_alpha: float | None = None
    resolution: int | None = None  # the backbone's own
    mixed_precision: str | None = None  # accelerate's setting
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    use_ema: bool = False

    def train_options(self) -> dict:
        """The fields of :class:`pogdiff.training.train.TrainConfig` this budget sets, for every cell alike."""
        return {name: value for name, value in asdict(self).items() if name in TRAINED_BY_BUDGET}


TRAINED_BY_BUDGET = ("max_train_steps", "train_batch_size", "learning_rate", "from_scratch", "pretrained", "lora_rank",
                     "lora_alpha", "resolution", "mixed_precision", "gradient_accumulation_steps",
                     "gradient_checkpointing", "use_ema")


QUICK = Budget(max_train_steps=20, train_batch_size=8, num_images=2, num_inference_steps=10)


SAMPLER_OPTIONS = {"density_max_ratio": TrainConfig.density_max_ratio}  # option -> default, balanced sampler only


@dataclass(frozen=True)
class MethodSpec:
    """One row of the table: a method, the constructor options it runs with, and the row sampler."""

    name: str
    method: str
    options: dict = field(default_factory=dict)
    sampler: str | None = None  # None: the method's own
    sampler_options: dict = field(default_factory=dict)

    @property
    def folder(self) -> str:
        return safe_stem(self.name)


def parse_method(text: str) -> MethodSpec:
    """``METHOD[+SAMPLER][:option=value,...]`` or an ablation name, checked against the loss's options."""
    head, _, options_text = ABLATIONS.get(text, text).partition(":")
    method, plus, sampler = head.partition("+")
    if method not in METHODS:
        raise PogdiffError(f"unknown method {text!r}; choose from {', '.join([*METHODS, *ABLATIONS])}, "
                           "optionally with a sampler and options as METHOD+SAMPLER:option=value,...")
    if plus:
        check_sampler(sampler, where=f"{text!r}: ")
    implied = METHODS[method].SAMPLER
    if plus and implied != "uniform" and sampler != implied:
        raise PogdiffError(f"{text!r}: {method} implies the {implied} sampler")
    balanced = (sampler or implied) == "balanced"
    parameters = {name: p.default for name, p in method_parameters(method).items()}
    allowed = {**parameters, **(SAMPLER_OPTIONS if balanced else {})}
    options, sampler_options = {}, {}
    for item in filter(None, options_text.split(",")):
        key, equals, value = item.partition("=")
        if key not in allowed or not equals:
            raise PogdiffError(f"{text!r}: {head} takes option=value with option one of "
                               f"{', '.join(allowed) or '(none)'}, got {item!r}")
        choices = METHODS[method].OPTION_CHOICES.get(key)
        if choices and value not in choices:
            raise PogdiffError(f"{text!r}: {key} takes one of {', '.join(choices)}, got {value!r}")
        (options if key in parameters else sampler_options)[key] = _parse_value(text, key, value, allowed[key])
    try:
        check_values({**options, **sampler_options})  # now, not when the cell's turn comes after hours of others
    except PogdiffError as error:
        raise PogdiffError(f"{text!r}: {error}") from None
    return MethodSpec(text, method, options, sampler or None, sampler_options)


def _parse_value(text: str, key: str, value: str, default):
    try:
        if isinstance(default, bool):
            return {"true": True, "false": False}[value.lower()]
        return type(default)(value) if default is not None else float(value)
    except (KeyError, ValueError):
        kind = "true or false" if isinstance(default, bool) else "an integer" if isinstance(default, int) else "a number"
        raise PogdiffError(f"{text!r}: {key} takes {kind}, got {value!r}") from None


def parse_methods(methods: list[str]) -> list[MethodSpec]:
    """Each row once (the first of equal names), in order."""
    return list({spec.name: spec for spec in map(parse_method, methods)}.values())


def cell_path(out: Path, spec: MethodSpec, seed: int) -> Path:
    """Where a finished (method, seed) cell's results are: written last, so its presence means done."""
    return out / "eval" / spec.folder / f"seed-{seed}" / "cell.json"


def run_benchmark(out: str | Path, methods: list[str] = DEFAULT_METHODS, seeds: list[int] = DEFAULT_SEEDS,
                  budget: Budget = Budget(), data: str | Path | None = None, data_preset: str = "small",
                  cache_dir: str | Path | None = None, progress: bool = True) -> dict:
    """Train and evaluate every (method, seed) cell not yet done; write metrics.json, benchmark.md and .html.

    Under ``accelerate launch`` every process runs this: each cell trains and samples on all of them, while
    the folder's settings, the cells' records and the reports are written by the main process alone.
    """
    out = Path(out)
    specs, seeds = checked_cells(methods, seeds, budget, cache_dir)
    if data:  # before benchmark.json is written: every cell's run folder would lie in the dataset
        RunFolder(out, BENCHMARK, "--out", data_dir=data).check_inputs_outside()
    state = process_state()

    def prepare_folder() -> tuple[dict, Path]:  # reads every byte of the checkpoint and data: once, not per process
        settings = benchmark_settings(budget, data, data_preset, cache_dir)
        check_settings(out, settings)
        return settings, Path(data) if data else embedded_dataset(out, data_preset)

    settings, data_dir = on_main_process(prepare_folder)
    start = time.time()
    cells = [(spec, seed) for seed in seeds for spec in specs]
    results: dict[str, dict[int, dict]] = {spec.name: {} for spec in specs}
    for number, (spec, seed) in enumerate(cells, 1):
        cell, fresh = run_cell(out, spec, seed, data_dir, budget, cache_dir, progress, settings["backbone"])
        took = ", ".join(f"{step} {s:.0f} s" for step, s in cell["seconds"].items()) if fresh else "done earlier"
        if state.is_main_process:
            print(f"[{number}/{len(cells)}] {spec.name}, seed {seed}: {took}", flush=True)
        results[spec.name][seed] = cell

    metrics = summarise(specs, seeds, results, settings)
    if state.is_main_process:
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        (out / "benchmark.md").write_text(markdown_report(metrics))
        (out / "benchmark.html").write_text(html_report(metrics))
        print(markdown_report(metrics))
        print(f"written: {out / 'metrics.json'}, {out / 'benchmark.md'}, {out / 'benchmark.html'}   "
              f"wall time of this invocation: {time.time() - start:.0f} s")
    return metrics


def checked_cells(methods: list[str], seeds: list[int], budget: Budget,
                  cache_dir: str | Path | None) -> tuple[list[MethodSpec], list[int]]:
    """The rows and the seeds, each once, with every option checked; nothing is read or written."""
    specs = parse_methods(methods)
    seeds = list(dict.fromkeys(seeds))
    if not specs or not seeds:
        raise PogdiffError("nothing to run: give at least one of --methods and one of --seeds")
    check_values({"prompt_template": budget.prompt_template}, command="benchmark")
    check_values(budget.train_options())
    check_cache_dir(cache_dir)
    return specs, seeds


def benchmark_settings(budget: Budget, data: str | Path | None, data_preset: str, cache_dir: str | Path | None) -> dict:
    """What benchmark.json records: the data (and its content), the budget, the backbone's weights."""
    settings = {"data": str(Path(data).resolve()) if data else f"embedded synthetic '{data_preset}' preset, seed 0",
                "budget": asdict(budget), "backbone": backbone_weights(budget)}
    if data:  # a bad dataset fails here, before the folder is committed to these settings
        settings["data_content"] = dataset_digest(load_dataset(data), cache_dir)
    return settings


def summarise_finished(out: str | Path, methods: list[str], seeds: list[int]) -> dict:
    """The summary ``run_benchmark`` would write, over the cells of ``out`` finished so far (nothing runs)."""
    out = Path(out)
    specs = parse_methods(methods)
    results = {spec.name: {seed: json.loads(f.read_text()) for seed in seeds
                           if (f := cell_path(out, spec, seed)).is_file()} for spec in specs}
    done = [spec for spec in specs if results[spec.name]]
    if not any(spec.name == BASELINE for spec in done):
        raise PogdiffError(f"{out}: no finished {BASELINE} cell yet")
    settings = json.loads((out / "benchmark.json").read_text())
    return summarise(done, seeds, {spec.name: results[spec.name] for spec in done}, settings)


def backbone_weights(budget: Budget) -> dict:
    """The weights every cell starts from, as benchmark.json and each cell record them: other weights (a new
    release of the shipped backbone, another checkpoint at the same path) must not continue a benchmark."""
    if budget.pretrained:
        folder = local_pipeline_folder(budget.pretrained)
        pipeline_backbone_class(folder)  # a wrong model folder is refused now, not when the first cell loads it
        return {"name": budget.pretrained, "sha256": pipeline_fingerprint(folder)}
    if budget.from_scratch:
        return {"name": "random weights"}
    return {"name": SHIPPED_NAME, "sha256": shipped_manifest()["sha256"][WEIGHTS_FILE]}


def check_settings(out: Path, settings: dict) -> None:
    """Refuse to mix cells of different budgets, data or backbone weights in one folder."""
    path = out / "benchmark.json"
    if path.is_file():
        stored = json.loads(path.read_text())
        # a budget key newer than the folder was absent then: the folder ran with its default
        stored["budget"] = {**asdict(Budget()), **stored.get("budget", {})}
        stored.setdefault("backbone", settings["backbone"])  # a folder from before the weights were recorded
        if "data_content" in settings:  # (and from before the data's content was)
            stored.setdefault("data_content", settings["data_content"])
        if {**stored, "backbone": None} != {**settings, "backbone": None} or \
                stored["backbone"].get("sha256") != settings["backbone"].get("sha256"):
            changed = [k for k in settings["budget"] if stored["budget"].get(k) != settings["budget"][k]]
            if stored.get("data_content") != settings.get("data_content"):
                changed.append("the data's content: its metadata.jsonl or images changed since the cells were scored")
            if stored["backbone"].get("sha256") != settings["backbone"].get("sha256"):
                then, now = (" ".join(b.values()) for b in (stored["backbone"], settings["backbone"]))
                changed.append(f"backbone weights: {then} then, {now} now")
            what = ", ".join(changed) or "data"
            raise PogdiffError(f"{out}: holds a benchmark run with other settings ({what}); use the same settings "
                               "to continue it, or another --out")
        return
    folder = RunFolder(out, BENCHMARK, "--out")  # a new or empty folder, or one with only its mark
    folder.check()
    folder.create()
    path.write_text(json.dumps(settings, indent=2))


def embedded_dataset(out: Path, preset: str) -> Path:
    """The synthetic dataset in OUT/data, written once (into a temporary folder, then renamed)."""
    data = out / "data"
    if not (data / "synth.json").is_file():
        with atomic_path(data) as tmp:
            write_dataset(tmp, preset=preset, seed=0)
    return data


def run_cell(out: Path, spec: MethodSpec, seed: int, data_dir: Path, budget: Budget,
             cache_dir: str | Path | None, progress: bool, backbone: dict) -> tuple[dict, bool]:
    """Train (unless the run is finished) and evaluate one (method, seed); a finished cell is read back.

    Returns the cell's results and whether anything ran now. ``backbone`` (:func:`backbone_weights`) is
    recorded in the cell.
    """
    run = out / "runs" / spec.folder / f"seed-{seed}"
    cell_file = cell_path(out, spec, seed)
    evaluation = cell_file.parent
    if cell_file.is_file():
        return json.loads(cell_file.read_text()), False
    seconds = {}
    if not is_finished(run):
        on_main_process(lambda: shutil.rmtree(run, ignore_errors=True))  # an interrupted run: start it again
        began = time.time()
        try:
            train(TrainConfig(str(data_dir), str(run), method=spec.method, method_options=dict(spec.options),
                              seed=seed, sampler=spec.sampler, **spec.sampler_options, **budget.train_options(),
                              cache_dir=str(cache_dir) if cache_dir else None, progress=progress))
        except Interrupted:  # train's own advice (--overwrite, --resume-from-checkpoint) is not a benchmark's
            raise Interrupted(f"{out}: interrupted while training {spec.folder}, seed {seed}; run the same command "
                              "again to continue (finished cells are kept, this one starts again)") from None
        seconds["train"] = round(time.time() - began, 1)
    began = time.time()
    metrics = evaluate_runs([run], data_dir, evaluation, num_images=budget.num_images,
                            num_images_few=budget.num_images_few,
                            num_inference_steps=budget.num_inference_steps, guidance_scale=budget.guidance_scale,
                            seed=seed, few_max_images=budget.few_max_images, max_identities=budget.max_identities,
                            cache_dir=cache_dir, progress=progress, prompt_template=budget.prompt_template,
                            fd_features=budget.fd_features, sim_features=budget.sim_features,
                            inception_weights=budget.inception_weights, identity_judge=budget.identity_judge,
                            own_folder=True)
    seconds["evaluate"] = round(time.time() - began, 1)

    def write_cell() -> dict:
        (result,) = metrics["methods"].values()
        cell = {"method": spec.method, "options": spec.options, "sampler": spec.sampler,
                "sampler_options": spec.sampler_options, "seed": seed, "label": next(iter(metrics["methods"])),
                "backbone": backbone, "all": result["all"], "few": result["few"],
                "per_identity": result["per_identity"], "seconds": seconds,
                "identity_judge": metrics["identity_judge"], "feature_spaces": metrics["feature_spaces"],
                "num_identities": metrics["num_identities"],
                "identity_sample": metrics["identity_sample"],
                "calibration": {label: {"all": row["all"], "few": row["few"]}
                                for label, row in metrics["calibration"].items()}}
        write_text_atomic(cell_file, json.dumps(cell, indent=2))
        return cell

    return on_main_process(write_cell), True


def mean_interval(values: list[float], confidence: float = CONFIDENCE) -> dict:
    """Mean and the half-width of its Student-t confidence interval over ``values`` (None for one value)."""
    from scipy.stats import t as student_t

    n = len(values)
    mean = sum(values) / n
    half_width = None
    if n > 1:
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
        half_width = float(student_t.ppf((1 + confidence) / 2, n - 1)) * sd / math.sqrt(n)
    return {"mean": mean, "half_width": half_width, "n": n}


def _numeric(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def aggregate(per_seed: dict[int, dict]) -> dict:
    """Every numeric metric under ``all`` and ``few``, over seeds: {split: {key: mean_interval or None}}."""
    summary = {}
    for split in ("all", "few"):
        summary[split] = {}
        for key in dict.fromkeys(k for cell in per_seed.values() for k in cell[split]):
            seen = [cell[split].get(key) for cell in per_seed.values()]
            values = [v for v in seen if _numeric(v)]
            if values or all(v is None for v in seen):  # None: no Few identities; other types are not metrics
                summary[split][key] = mean_interval(values) if values else None
    return summary


def paired_difference(per_seed: dict[int, dict], baseline: dict[int, dict], metric: tuple[str, str],
                      baseline_name: str = BASELINE) -> dict | None:
    """Per seed ``method - baseline`` on one metric, with its mean and interval over the seeds both have."""
    split, key = metric
    diffs = {seed: cell[split][key] - baseline[seed][split][key] for seed, cell in per_seed.items()
             if seed in baseline and _numeric(cell[split].get(key)) and _numeric(baseline[seed][split].get(key))}
    if not diffs:
        return None
    return {"metric": f"{split}.{key}", "baseline": baseline_name, "per_seed": diffs,
            **mean_interval(list(diffs.values()))}


def summarise(specs: list[MethodSpec], seeds: list[int], results: dict[str, dict[int, dict]], settings: dict) -> dict:
    methods = {}
    for spec in specs:
        cells = results[spec.name]
        first = next(iter(cells.values()))
        methods[spec.name] = {"method": spec.method, "options": spec.options, "sampler": spec.sampler,
                              "sampler_options": spec.sampler_options, "label": first["label"],
                              **aggregate(cells),
                              "seeds": {seed: {"all": c["all"], "few": c["few"], "seconds": c["seconds"]}
                                        for seed, c in cells.items()}}
    baseline = next((results[s.name] for s in specs if s.name == BASELINE), None)
    paired = {} if baseline is None else {
        s.name: {f"{split}.{key}": paired_difference(results[s.name], baseline, (split, key))
                 for split, key in PAIRED_METRICS}
        for s in specs if s.name != BASELINE}
    any_cell = next(iter(results[specs[0].name].values()))
    # Real images scored as if generated: the same in every cell (no training, no sampling), so one value each.
    calibration = {label: aggregate({0: row}) for label, row in any_cell.get("calibration", {}).items()}
    return {"settings": settings, "seeds": seeds, "confidence": CONFIDENCE,
            "identity_judge": any_cell["identity_judge"], "feature_spaces": any_cell.get("feature_spaces"),
            "num_identities": any_cell["num_identities"],
            "identity_sample": any_cell.get("identity_sample"),
            "methods": methods, "calibration": calibration, "paired_vs_vanilla": paired}


def format_interval(summary: dict | None, digits: int = 3) -> str:
    if summary is None:
        return "–"
    if summary["half_width"] is None:
        return f"{summary['mean']:.{digits}f}"
    return f"{summary['mean']:.{digits}f} ± {summary['half_width']:.{digits}f}"


def paired_rows(metrics: dict) -> tuple[list[str], list[list[str]]]:
    header = ["method"]
    for split, key in PAIRED_METRICS:
        header += [f"Δ {key} {split.capitalize()} (mean ± half-width)", "per seed"]
    rows = []
    for name, by_metric in metrics["paired_vs_vanilla"].items():
        row = [name]
        for p in by_metric.values():
            row += [format_interval(p), "–" if p is None else ", ".join(f"{s}: {d:+.3f}" for s, d in p["per_seed"].items())]
        rows.append(row)
    return header, rows


def describe(metrics: dict) -> str:
    s, b = metrics["settings"], metrics["settings"]["budget"]
    ids = metrics["num_identities"]
    guidance = b["guidance_scale"] if b["guidance_scale"] is not None else "backbone default"
    weights = s.get("backbone", {})  # its sha256 is not recorded in folders older than the record
    backbone = describe_backbone(b.get("pretrained"), b.get("lora_rank"), b.get("from_scratch")) + \
        (f" (sha256 {weights['sha256'][:12]})" if "sha256" in weights else "")
    lr = b["learning_rate"] if b["learning_rate"] is not None else "backbone default"
    accumulated = f" x {b['gradient_accumulation_steps']} accumulated" if b.get("gradient_accumulation_steps", 1) > 1 else ""
    extras = "".join(f", {text}" for text in (
        b.get("resolution") and f"{b['resolution']} px", b.get("mixed_precision") and f"{b['mixed_precision']} mixed precision",
        b.get("use_ema") and "EMA weights") if text)
    few_images = f" ({b['num_images_few']} per Few identity)" if b.get("num_images_few") else ""
    spaces = f", {feature_spaces_text(metrics['feature_spaces'])}" if metrics.get("feature_spaces") else ""
    sample = metrics.get("identity_sample")
    scored = (f"a fixed sample of {ids['all']} of its {sample['of']} identities, stratified by training images, "
              f"Few = {ids['few']} of {sample['few_of']}" if sample else f"{ids['all']} identities, Few = {ids['few']}")
    return (f"Data: {s['data']} ({scored} with <= {b['few_max_images']} training "
            f"images). Same budget for every method: {backbone} backbone, {b['max_train_steps']} steps, batch "
            f"{b['train_batch_size']}{accumulated}, lr {lr}{extras}. Evaluation: {b['num_images']} images per identity"
            f"{few_images} of the prompt "
            f"\"{b.get('prompt_template', PROMPT)}\", DDIM "
            f"{b['num_inference_steps']} steps, guidance {guidance}, judge {metrics['identity_judge']}{spaces}. "
            f"Seeds {', '.join(map(str, metrics['seeds']))}: mean ± half-width of the "
            f"{metrics['confidence']:.0%} Student-t interval over seeds.")


def results_rows(metrics: dict) -> dict:
    """The table's rows: every method, then the calibration rows (real images scored as if generated)."""
    return {**metrics["methods"], **metrics.get("calibration", {})}


CALIBRATION_NOTE = ("Calibration rows: real (held-out) = each identity's held-out images scored as if generated "
                    "(a perfect generator); real (look-alike) = the images of the identity with the nearest "
                    "centroid, scored against this one (the wrong, similar person).")


def markdown_report(metrics: dict) -> str:
    parts = ["# pogdiff benchmark", "", describe(metrics), "",
             markdown_table(*all_few_table(results_rows(metrics), format_interval)), "", CALIBRATION_NOTE]
    if metrics["paired_vs_vanilla"]:
        parts += ["", f"{PAIRED_TITLE}, seed by seed (a seed fixes the initial weights, the batch order except "
                  "under the balanced sampler, and the sampling noise):", "",
                  markdown_table(*paired_rows(metrics))]
    return "\n".join(parts) + "\n"


def html_report(metrics: dict) -> str:
    paired = ""
    if metrics["paired_vs_vanilla"]:
        paired = f"<h2>{html.escape(PAIRED_TITLE)}</h2>" + html_table(*paired_rows(metrics))
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
             "th,td{border:1px solid #999;padding:4px 10px;text-align:right}"
             "td:first-child,th:first-child{text-align:left}th{background:#eee}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>pogdiff benchmark</title>"
            f"<style>{style}</style></head><body><h1>pogdiff benchmark</h1><p>{html.escape(describe(metrics))}</p>"
            f"{html_table(*all_few_table(results_rows(metrics), format_interval))}"
            f"<p>{html.escape(CALIBRATION_NOTE)}</p>{paired}</body></html>\n")


def budget_from(quick: bool, preset: str | None = None, **typed) -> Budget:
    """The default or --quick budget, then the paper's ``preset`` (:data:`pogdiff.options.PAPER_PRESETS`), with the
    options given on the command line winning. Local files and folders are recorded by their absolute paths."""
    for path in ("pretrained", "inception_weights", "fd_features", "sim_features"):  # a folder, or a hub id
        if typed.get(path) and Path(typed[path]).exists():
            typed[path] = str(Path(typed[path]).resolve())
    given = {k: v for k, v in typed.items() if v is not None}
    return replace(QUICK if quick else Budget(), **{**PAPER_PRESETS.get(preset, {}), **given})
