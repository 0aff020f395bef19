"""The ``pogdiff`` command line: data, pretrain, encode, train, sample, evaluate, benchmark, demo."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from pogdiff.errors import Interrupted, PogdiffError, PogdiffWarning

DIFFUSERS_NAMES = ("Every option is also accepted with underscores (--output_dir, --train_batch_size, ...), and "
                   "diffusers' train_text_to_image.py names that differ are accepted too: "
                   "--pretrained_model_name_or_path, --train_data_dir, --rank, --validation_prompt.")


def _data_synth(args) -> None:
    from pogdiff.data.pretraining_corpus import write_pretraining_corpus
    from pogdiff.data.synth import write_dataset

    if args.preset == "pretrain":
        out = write_pretraining_corpus(args.out, people=args.people, images_per_person=args.images_per_person,
                                       seed=args.seed, size=args.resolution)
    else:
        out = write_dataset(args.out, preset=args.preset, seed=args.seed, size=args.resolution)
    print(f"wrote {out}")


def _data_paper(args) -> None:
    from pogdiff.data.paper_datasets import build_paper_dataset, load_captioner

    captioner = load_captioner(args.captioner, args.captioner_batch_size) if args.captioner else None
    out = build_paper_dataset(args.data_command, args.source_dir, args.out, preset=args.preset, seed=args.seed,
                              max_heldout=args.max_heldout, captioner=captioner)
    print(f"wrote {out}")


def _train(args) -> None:
    from pogdiff.training.train import train

    if getattr(args, "dry_run", False):
        _print_training_plan(args, "train")
        return
    out = train(train_config(args))
    print(f"run saved to {out}")


def _encode(args) -> None:
    from pogdiff.training.train import encode

    if getattr(args, "dry_run", False):
        _print_training_plan(args, "encode")
        return
    config = train_config(args)
    encoded = encode(config)
    cache = config.cache_dir or "the default cache folder (see --cache-dir)"
    print(f"encoded {len(encoded)} rows ({len(encoded.caption_table)} distinct captions) into {cache}; "
          f"`pogdiff train` with the same options reads them")


def _print_training_plan(args, command: str) -> None:
    from pogdiff.compare.dry_run import training_plan

    print(training_plan(train_config(args), command))


def train_config(args):
    """The TrainConfig of parsed ``pogdiff train`` arguments: a method's flags go into its method_options."""
    from pogdiff.objectives.losses import method_parameters
    from pogdiff.options import PAPER_PRESETS, TrainConfig, config_fields

    typed = vars(args)
    preset = PAPER_PRESETS.get(typed.get("preset"), {})
    if "num_train_epochs" in typed:  # typed epochs win over the preset's step count
        preset = {k: v for k, v in preset.items() if k != "max_train_steps"}
    values = {**preset, **{k: v for k, v in typed.items() if k in config_fields()}}
    values["data_dir"] = data_dir_of(typed)
    if "lora_target_modules" in values:
        values["lora_target_modules"] = tuple(values["lora_target_modules"])
    method = values.get("method", "pogdiff")
    values["method_options"] = {k: v for k, v in typed.items() if k in args.method_flags}
    wrong = [args.method_flags[k] for k in values["method_options"] if k not in method_parameters(method)]
    if wrong:
        raise PogdiffError(f"{', '.join(wrong)} does not apply to --method {method}; drop it or choose the method "
                           "it belongs to (see pogdiff train --help)")
    values["progress"] = not args.no_progress
    values.setdefault("output_dir", "")  # encode writes no run folder
    return TrainConfig(**values)


def data_dir_of(typed: dict) -> str:
    """DATA, or diffusers' --train_data_dir (both: they must name one folder, e.g. d1 and ./d1); '' with
    --dataset-name, which names the data instead."""
    from pogdiff.data.dataset import METADATA_FILE

    given = [typed[k] for k in ("data_dir", "train_data_dir") if typed.get(k)]
    if len({os.path.realpath(folder) for folder in given}) > 1:  # realpath: a symbolic link loop is no traceback
        raise PogdiffError(f"DATA {typed['data_dir']} and --train_data_dir {typed['train_data_dir']} name two "
                           "datasets; pass one of them")
    if not given and not typed.get("dataset_name"):
        prompts = typed.get("validation_prompts")
        if prompts and _is_file(Path(prompts[-1]) / METADATA_FILE):  # `--validation-prompts P d1` took DATA
            raise PogdiffError(f"no dataset: {prompts[-1]} was taken as a validation prompt; put DATA before "
                               "--validation-prompts or end the prompts with --")
        raise PogdiffError("no dataset: pass DATA (a folder with metadata.jsonl and images), --train_data_dir DATA "
                           "or --dataset-name FOLDER")
    return given[0] if given else ""


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # a prompt too long for a file name
        return False


def _pretrain(args) -> None:
    from pogdiff.training.pretraining import PRETRAINING, check_release_dir, previous_release_dir, write_release
    from pogdiff.options import TrainConfig, config_fields
    from pogdiff.training.train import train

    if getattr(args, "release_dir", None):
        check_release_dir(args.release_dir, args.output_dir)  # before hours of training, not after
    values = {**PRETRAINING, **{k: v for k, v in vars(args).items() if k in config_fields()}}
    out = train(TrainConfig(**values, progress=not args.no_progress))
    print(f"pretrained backbone saved to {out}")
    if getattr(args, "release_dir", None):
        replaced = Path(args.release_dir).exists()
        released = write_release(out, args.release_dir)
        kept = f"; the release it replaced is kept in {previous_release_dir(released)}" if replaced else ""
        print(f"released to {released}{kept}")


def _sample(args) -> None:
    from pogdiff.backbones.backbone import load_backbone
    from pogdiff.images import to_pil
    from pogdiff.training.ownership import SAMPLES
    from pogdiff.training.run_folder import RunFolder
    from pogdiff.backbones.sampling import generate_batches

    names = tuple(f"{i:04d}.png" for i in range(args.num_images))
    out = RunFolder(args.out, SAMPLES, "--out", outputs=names).check()  # before sampling, not after
    files = [out / name for name in names]
    backbone = load_backbone(args.run)
    written = 0
    for images in generate_batches(backbone, [args.prompt], args.num_images, args.num_inference_steps,
                                   args.guidance_scale, args.seed, progress=not args.no_progress):
        out.mkdir(parents=True, exist_ok=True)
        for image in images:  # as each batch is done: nothing is lost to a stop, memory does not grow
            to_pil(image).save(files[written])
            written += 1
    print(f"wrote {written} images to {out}")


def _evaluate(args) -> None:
    from pogdiff.evaluation.evaluate import evaluate_runs, format_table
    from pogdiff.evaluation.results_table import feature_spaces_text

    metrics = evaluate_runs(args.runs, args.data, args.out, num_images=args.num_images,
                            num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                            seed=args.seed, few_max_images=args.few_max_images, cache_dir=args.cache_dir,
                            progress=not args.no_progress, features=args.features, fd_features=args.fd_features,
                            sim_features=args.sim_features, samples=args.samples,
                            inception_weights=args.inception_weights, recall_threshold=args.recall_threshold,
                            identity_judge=args.identity_judge, face_detector=args.face_detector,
                            num_images_few=args.num_images_few, paper_protocol=args.paper_protocol,
                            max_identities=args.max_identities, prompt_template=args.prompt_template,
                            caption_column=args.caption_column, identity_column=args.identity_column,
                            image_column=args.image_column, dataset_name=args.dataset_name)
    if metrics is None:  # another process than the main one of `accelerate launch`: it sampled its share
        return
    print(f"{feature_spaces_text(metrics['feature_spaces'])}; id_acc by {metrics['identity_judge']}")
    print(format_table(metrics))
    print(f"metrics written to {Path(args.out) / 'metrics.json'}, report to {Path(args.out) / 'report.html'}")


def _demo(args) -> None:
    from pogdiff.compare.demo import run_demo

    run_demo(args.out, preset=args.preset, seed=args.seed, max_train_steps=args.max_train_steps,
             num_images=args.num_images, num_inference_steps=args.num_inference_steps, cache_dir=args.cache_dir,
             progress=not args.no_progress)


def _benchmark(args) -> None:
    from pogdiff.compare.comparison import DEFAULT_METHODS, DEFAULT_SEEDS, QUICK_SEEDS, budget_from, run_benchmark

    budget = budget_from(args.quick, args.preset, max_train_steps=args.max_train_steps,
                         train_batch_size=args.train_batch_size, learning_rate=args.learning_rate,
                         num_images=args.num_images, num_images_few=args.num_images_few,
                         num_inference_steps=args.num_inference_steps,
                         guidance_scale=args.guidance_scale, few_max_images=args.few_max_images,
                         max_identities=args.max_identities, from_scratch=args.from_scratch or None,
                         prompt_template=args.prompt_template, pretrained=args.pretrained, lora_rank=args.lora_rank,
                         lora_alpha=args.lora_alpha, resolution=args.resolution,
                         mixed_precision=args.mixed_precision,
                         gradient_accumulation_steps=args.gradient_accumulation_steps,
                         gradient_checkpointing=args.gradient_checkpointing or None, use_ema=args.use_ema or None,
                         fd_features=args.fd_features or args.features,
                         sim_features=args.sim_features or args.features, inception_weights=args.inception_weights,
                         identity_judge=args.identity_judge)
    seeds = args.seeds if args.seeds is not None else QUICK_SEEDS if args.quick else DEFAULT_SEEDS
    if args.dry_run:
        from pogdiff.compare.comparison import checked_cells
        from pogdiff.compare.dry_run import benchmark_plan

        print(benchmark_plan(*checked_cells(args.methods or DEFAULT_METHODS, seeds, budget, args.cache_dir), budget,
                             args.data, args.data_preset))
        return
    run_benchmark(args.out, args.methods or DEFAULT_METHODS, seeds, budget, data=args.data,
                  data_preset=args.data_preset, cache_dir=args.cache_dir, progress=not args.no_progress)


def build_parser() -> argparse.ArgumentParser:
    from pogdiff.options import OneLineErrorParser, accept_underscores, install_rules

    parser = OneLineErrorParser(prog="pogdiff", description=__doc__, epilog=docs("cli.md"))
    parser.add_argument("--version", action="version", version=f"pogdiff {installed_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    seed = argparse.ArgumentParser(add_help=False)
    seed.add_argument("--seed", type=int, default=0,
                      help="random seed of what the command draws: the people (data synth, demo), the initial "
                      "weights, batch order and noise (pretrain, train, demo), the sampling noise (sample, evaluate, "
                      "demo) (default: 0)")
    runtime = argparse.ArgumentParser(add_help=False)
    runtime.add_argument("--cache-dir",
                         help="where encoded datasets, latents and identity judges are cached (default: "
                         "$POGDIFF_CACHE, else $XDG_CACHE_HOME/pogdiff, else ~/.cache/pogdiff)")
    runtime.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_data_parser(sub, seed)
    add_pretrain_parser(sub, [seed, runtime])
    add_train_parser(sub, [seed, runtime])
    add_sample_parser(sub, [seed, runtime])
    add_evaluate_parser(sub, [seed, runtime])
    add_benchmark_parser(sub, [runtime])
    add_demo_parser(sub, [seed, runtime])
    return accept_underscores(install_rules(parser))


def installed_version() -> str:
    """pogdiff's version, as installed (importlib.metadata)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pogdiff")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def prompt_template_help() -> str:
    from pogdiff.evaluation.evaluate import PROMPT

    return ("prompt sampled for every identity, {name} replaced by its name: make it read like the training "
            f"captions (default: \"{PROMPT}\", the paper's App. B)")


JUDGE_HELP = ("id_acc judge: synth (CNN on fresh renders of a `pogdiff data synth` set), faces (dlib face descriptors, "
              "nearest identity; no face = wrong), features (nearest identity centroid in --sim-features); auto: "
              "synth when DATA/synth.json exists, else features")


def add_feature_space_options(parser: argparse.ArgumentParser, default: str | None) -> None:
    """The feature spaces of evaluate's metrics (fd apart from sim and recall), shared by evaluate and benchmark."""
    from pogdiff.evaluation.features import DEFAULT_FEATURES

    parser.add_argument("--features", default=default, metavar="SPACE",
                        help=f"feature space of fd, sim and recall: {DEFAULT_FEATURES} (offline), inception (with "
                        "--inception-weights), or a Hugging Face image model id or folder (CLIP, DINOv2, ViT/DINO, "
                        f"SigLIP), e.g. facebook/dinov2-base (default: {DEFAULT_FEATURES})")
    parser.add_argument("--fd-features", metavar="SPACE", help="feature space of fd alone, e.g. inception as in the "
                        "paper (default: --features)")
    parser.add_argument("--sim-features", metavar="SPACE", help="feature space of sim and recall (and of the features "
                        "judge and the look-alikes), e.g. facebook/dinov2-base as in the paper (default: --features)")
    parser.add_argument("--inception-weights", metavar="FILE", help="pt_inception-2015-12-05-6726825d.pth, for the "
                        "inception space (needs torch-fidelity: pip install 'pogdiff[inception]') (default: none)")


def docs(*pages: str) -> str:
    """A command's epilog: the pages of the repository's docs/ that describe it."""
    return f"Documentation: {', '.join(f'docs/{page}' for page in pages)} in the pogdiff repository."


def add_data_parser(sub, seed: argparse.ArgumentParser) -> None:
    from pogdiff.data.paper_datasets import DEFAULT_MAX_HELDOUT, PAPER_SIZES, SOURCES
    from pogdiff.data.synth import PRESETS

    data = sub.add_parser("data", help="datasets", epilog=docs("dataset-format.md", "cli.md")).add_subparsers(
        dest="data_command", required=True)
    synth = data.add_parser("synth", parents=[seed], help="write the embedded synthetic people dataset",
                            description="Write the embedded synthetic people dataset: by default the medium preset "
                            "(10 people, 30 down to 2 photos each), with heldout/ and synth.json.",
                            epilog=docs("dataset-format.md", "cli.md"))
    synth.add_argument("out", help="new, empty folder")
    synth.add_argument("--preset", choices=[*sorted(PRESETS), "pretrain"], default="medium",
                       help="long-tailed fine-tuning sets (small, medium, large) or the balanced, name-free "
                       "pretraining corpus (pretrain) (default: medium)")
    synth.add_argument("--resolution", type=int, default=32, help="image size in pixels (default: 32)")
    synth.add_argument("--people", type=int, default=5000, help="pretrain: people in the corpus (default: 5000)")
    synth.add_argument("--images-per-person", type=int, default=4, help="pretrain: images per person (default: 4)")
    synth.set_defaults(func=_data_synth)
    for name, source in SOURCES.items():  # the paper's sets from the public downloads
        sizes = PAPER_SIZES[name]
        default = max(sizes, key=lambda preset: sizes[preset][0])
        command = data.add_parser(
            name, parents=[seed], help=f"build the paper's {source.label} sets from the download",
            description=f"Sample the paper's long-tailed {source.label} set ("
            + ", ".join(f"{preset}: {n} identities / {m} images" for preset, (n, m) in sizes.items())
            + ") from the download, real names replaced by random first names (the mapping in OUT/names.json), "
            "the chosen people's other images in OUT/heldout.", epilog=docs("dataset-format.md", "cli.md"))
        command.add_argument("source_dir", metavar=f"{name.upper()}_DIR", help=f"the download's {source.layout}")
        command.add_argument("out", help="new, empty folder")
        command.add_argument("--preset", choices=list(sizes), default=default,
                             help=f"which of the paper's sets (default: {default})")
        command.add_argument("--max-heldout", type=int, default=DEFAULT_MAX_HELDOUT,
                             help="at most this many other images per chosen identity in OUT/heldout, 0 for none "
                             f"(default: {DEFAULT_MAX_HELDOUT})")
        command.add_argument("--captioner", metavar="MODEL",
                             help="transformers image-text-to-text model (folder or hub id; the paper used "
                             "LLaVA-1.6-7b) that describes each training image, on CUDA when there is one "
                             "(default: none, captions from the file's metadata)")
        command.add_argument("--captioner-batch-size", type=int, default=8,
                             help="images per captioner batch (default: 8)")
        command.set_defaults(func=_data_paper)


def add_pretrain_parser(sub, parents: list[argparse.ArgumentParser]) -> None:
    from pogdiff.options import ACCELERATE_PRECISION
    from pogdiff.training.pretraining import PRETRAINING
    from pogdiff.backbones.shipped import SHIPPED_DIR

    p = sub.add_parser("pretrain", parents=parents, argument_default=argparse.SUPPRESS,
                       help="pretrain the small backbone from random weights on `pogdiff data synth --preset pretrain`",
                       epilog=docs("pretrained-backbone.md", "cli.md"))
    p.add_argument("data_dir", metavar="DATA", help="the pretraining corpus (or any dataset folder)")
    p.add_argument("--output-dir", required=True, help="run folder to write")
    for name, what in (("train_batch_size", "batch size per device"), ("max_train_steps", "optimizer steps"),
                       ("learning_rate", "AdamW learning rate"), ("lr_warmup_steps", "linear warm-up steps"),
                       ("ema_decay", "EMA decay (with warm-up)"),
                       ("checkpointing_steps", "save the training state every N steps"),
                       ("checkpoints_total_limit", "keep at most this many checkpoints"),
                       ("text_max_length", "caption tokens the UNet attends to")):
        add_training_option(p, name, what, PRETRAINING[name])
    add_training_option(p, "resume_from_checkpoint", "'latest' or a checkpoint folder", "start afresh")
    p.add_argument("--from-shipped", dest="from_scratch", action="store_false",
                   help=f"continue from the shipped {SHIPPED_DIR.name} weights instead of random ones (a new "
                   "optimizer and EMA; a release's manifest keeps the earlier one under continued_from)")
    add_training_option(p, "mixed_precision", "fp16 (CUDA GPU) or bf16: frozen weights in half precision",
                        ACCELERATE_PRECISION)
    p.add_argument("--validation-prompts", nargs="+", metavar="PROMPT",
                   help="sample these prompts every --validation-steps into OUTPUT_DIR/validation (default: none)")
    for name in ("validation_steps", "compile", "overwrite"):
        add_training_option(p, name)
    p.add_argument("--release-dir", metavar="DIR", help="when done, write fp16 weights and a manifest there "
                   f"(the shipped backbone: src/pogdiff/weights/{SHIPPED_DIR.name}) (default: no release)")
    p.set_defaults(func=_pretrain)


def add_train_parser(sub, parents: list[argparse.ArgumentParser]) -> None:
    add_train_options(sub.add_parser(
        "train", parents=parents, help="fine-tune with a method", argument_default=argparse.SUPPRESS,
        description="Fine-tune the small backbone or a Stable Diffusion checkpoint with a method; write a run folder.",
        epilog=f"{DIFFUSERS_NAMES} "
        + docs("cli.md", "stable-diffusion.md", "pogdiff-options.md", "dataset-format.md")), _train)
    add_train_options(sub.add_parser(
        "encode", parents=parents, argument_default=argparse.SUPPRESS,
        help="encode a dataset's caches once (latents, caption states, text density, PoGDiff's neighbours)",
        description="Compute and cache everything `pogdiff train` with the same options reads, each process of "
        "`accelerate launch` encoding its share of the rows; a killed encode continues from its finished shards. "
        "train runs this itself when a cache is missing. Takes train's options (those that do not change the "
        "encoding, like --learning-rate, are accepted and ignored).", epilog=docs("scale.md", "cli.md")), _encode)


def add_train_options(t: argparse.ArgumentParser, func) -> None:
    """The options of `pogdiff train` (and of `pogdiff encode`, which takes the same): each TrainConfig field's, as
    :mod:`pogdiff.options` declares it, the command's own (--train-data-dir, --preset, --dry-run), then each
    method's (:func:`add_method_options`)."""
    from dataclasses import MISSING, fields, replace

    from pogdiff.options import BOOKS, PAPER_PRESETS, Declared, TrainConfig

    declarations = {f.name: (f.metadata["option"], f.default, f.type) for f in fields(TrainConfig)}
    output_dir, default, kind = declarations.pop("output_dir")
    output_dir = replace(output_dir, keywords={"required": True}) if func is _train else \
        replace(output_dir, help="ignored by encode", shown="none")
    listed_before = {  # --output-dir and the options that set no field, each listed before a field
        "dataset_name": {"train_data_dir": (Declared("DATA under diffusers' name", shown="DATA",
                                                     keywords={"metavar": "DATA"}), MISSING, "str")},
        "method": {"output_dir": (output_dir, default, kind)},
        "pretrained": {"preset": (Declared("the paper's Sec. 4.1 hyper-parameters (typed options still win)",
                                           shown="none", keywords={"choices": sorted(PAPER_PRESETS)}), MISSING, "str")},
        "report_to": {"dry_run": (Declared("print the rows, distinct captions, steps, images to sample, cache size on "
                                           "disk and an estimated time per measured GPU, then stop: nothing is "
                                           "encoded or written", group=BOOKS), False, "bool")},
    }
    groups = {None: t}
    for field_name, declaration in declarations.items():
        for name, (declared, default, kind) in [*listed_before.get(field_name, {}).items(), (field_name, declaration)]:
            add_declared(t, groups, name, declared, default, kind)
    t.set_defaults(func=func, method_flags=add_method_options(t))


def add_declared(parser: argparse.ArgumentParser, groups: dict, name: str, declared, default, kind: str) -> None:
    """Add the option ``name`` as ``declared`` (:class:`pogdiff.options.Declared`) to its group of ``parser``
    (``groups``: by title, made on first use), its help ending with its ``default`` or the one in words, what
    argparse reads from ``kind`` (a field's annotation, :func:`kind_keywords`)."""
    from dataclasses import MISSING

    from pogdiff.options import flag_name

    if declared.help is None:  # a field with no flag of its own
        return
    if declared.group not in groups:
        groups[declared.group] = parser.add_argument_group(declared.group)
    group = groups[declared.group]
    keywords = {**kind_keywords(kind), **declared.keywords}
    if callable(keywords.get("choices")):
        keywords["choices"] = keywords["choices"]()
    shown = declared.shown if declared.shown is not None else None if default is MISSING else default
    help = declared.help if shown is None or "action" in keywords else f"{declared.help} (default: {shown})"
    if declared.positional:
        group.add_argument(name, help=help, **keywords)
        return
    group.add_argument(flag_name(name), *declared.aliases, dest=name, help=help, **keywords)
    if declared.negation:
        group.add_argument(f"--no-{name}".replace("_", "-"), dest=name, action="store_false", help=declared.negation)


def kind_keywords(kind: str) -> dict:
    """What argparse reads for an option of type ``kind`` (an annotation, e.g. ``int | None``): a flag for a bool,
    one or more values for a tuple or list, an int or a float, else a string."""
    base = kind.split(" | ")[0]
    if base == "bool":
        return {"action": "store_true"}
    if base.startswith(("tuple[", "list[")):
        return {"nargs": "+"}
    return {"type": {"int": int, "float": float}[base]} if base in ("int", "float") else {}


def add_training_option(parser, name: str, help: str | None = None, shown=None) -> None:
    """TrainConfig's option ``name`` in another command (pretrain, benchmark): the flag, aliases, type and choices
    it is declared with; that command's ``help``, ending with its default ``shown`` (no ``help``: as declared)."""
    from dataclasses import MISSING, replace

    from pogdiff.options import TrainConfig

    field = TrainConfig.__dataclass_fields__[name]
    declared, default = field.metadata["option"], field.default
    if help is not None:
        declared, default = replace(declared, help=help, shown=shown), MISSING
    add_declared(parser, {declared.group: parser}, name, declared, default, field.type)


def add_method_options(parser: argparse.ArgumentParser) -> dict[str, str]:
    """One group per method: a flag for each option of its loss's constructor, with the constructor's
    default and the class's OPTION_HELP. Returns {option name: flag}; the option name is the flag's dest."""
    from pogdiff.objectives.losses import METHODS, method_parameters

    method_flags = {}
    for method, loss in METHODS.items():
        options = method_parameters(method)
        group = parser.add_argument_group(loss.OPTION_TITLE) if options else None
        for name, parameter in options.items():
            default, help = parameter.default, loss.OPTION_HELP[name]
            if isinstance(default, bool):
                flag = f"--no-{name.removeprefix('use_')}" if default else f"--{name}"
                kwargs = {"action": "store_false" if default else "store_true", "help": help}
            else:
                flag = f"--{name}"
                kwargs = {"type": type(default), "help": f"{help} (default: {default})",
                          "choices": loss.OPTION_CHOICES.get(name)}
            flag = loss.OPTION_FLAGS.get(name, flag.replace("_", "-"))
            group.add_argument(flag, dest=name, **kwargs)
            method_flags[name] = flag
    return method_flags


def add_sample_parser(sub, parents: list[argparse.ArgumentParser]) -> None:
    from pogdiff.backbones.shipped import SHIPPED_NAME

    s = sub.add_parser("sample", parents=parents, help="generate images from a run", epilog=docs("cli.md"))
    s.add_argument("run", help=f"run folder written by `pogdiff train`, {SHIPPED_NAME}, or any Stable Diffusion "
                   "pipeline folder")
    s.add_argument("--prompt", required=True, help="the prompt to draw, e.g. \"An image of Lukas.\"")
    s.add_argument("--num-images", type=int, default=4, help="images to generate (default: 4)")
    s.add_argument("--out", required=True, help="folder to write 0000.png, 0001.png, ... into (never overwritten)")
    s.add_argument("--num-inference-steps", type=int, default=50, help="DDIM steps (default: 50)")
    s.add_argument("--guidance-scale", type=float, help="classifier-free guidance (default: 3.0 small, 7.5 SD)")
    s.set_defaults(func=_sample)


def add_evaluate_parser(sub, parents: list[argparse.ArgumentParser]) -> None:
    from pogdiff.data.dataset import FEW_MAX_IMAGES
    from pogdiff.evaluation.evaluate import JUDGES, MAX_IDENTITIES_HELP, PROMPT
    from pogdiff.evaluation.features import DEFAULT_FEATURES

    e = sub.add_parser("evaluate", parents=parents, help="score runs (or folders of images) per identity, All and Few",
                       epilog=docs("evaluation.md", "cli.md"))
    e.add_argument("runs", nargs="*", metavar="RUN", help="run folders, or Stable Diffusion pipeline folders "
                   "(none when --samples is given)")
    e.add_argument("--samples", nargs="+", action="extend", default=[], metavar="DIR",
                   help="also score images that already exist, DIR/<identity>/*.png (docs/evaluation.md), each "
                   "labelled by its folder name; no model needed (default: none)")
    e.add_argument("--data", help="the dataset the runs were trained on (default: none: --dataset-name)")
    e.add_argument("--dataset-name", metavar="FOLDER", help="a local Hugging Face datasets folder instead of --data, "
                   "read as `pogdiff train --dataset-name` reads it (default: none: --data)")
    e.add_argument("--caption-column", default="text", help="metadata column holding the caption (default: text)")
    e.add_argument("--identity-column", default="identity",
                   help="metadata column holding the identity, which evaluate needs (default: identity)")
    e.add_argument("--image-column", default="file_name",
                   help="metadata column holding the image path (default: file_name)")
    e.add_argument("--out", required=True, help="folder to write metrics.json, report.html and the samples into")
    e.add_argument("--prompt-template", default=PROMPT, metavar="TEMPLATE", help=prompt_template_help())
    e.add_argument("--num-images", type=int, default=8, help="generated images per identity (default: 8; "
                   "the paper's App. B uses 100, 20 on large sets: see --paper-protocol)")
    e.add_argument("--num-images-few", type=int, help="generated images per Few identity (default: --num-images)")
    e.add_argument("--paper-protocol", action="store_true",
                   help="App. B sample counts: 100 per identity (20 with >= 500 training images), 500 per Few identity")
    e.add_argument("--num-inference-steps", type=int, default=50, help="DDIM steps (default: 50)")
    e.add_argument("--guidance-scale", type=float, help="classifier-free guidance (default: 3.0 small, 7.5 SD)")
    e.add_argument("--few-max-images", type=int, default=FEW_MAX_IMAGES,
                   help=f"Few = identities with at most this many training images (default: {FEW_MAX_IMAGES})")
    e.add_argument("--max-identities", type=int, metavar="N", help=f"{MAX_IDENTITIES_HELP} (default: all)")
    add_feature_space_options(e, default=DEFAULT_FEATURES)
    e.add_argument("--recall-threshold", type=float, default=0.9,
                   help="Eq. 17: cosine similarity that covers a training image (default: 0.9)")
    e.add_argument("--identity-judge", choices=JUDGES, default="auto", help=f"{JUDGE_HELP} (default: auto)")
    e.add_argument("--face-detector", choices=["hog", "cnn"], default="hog",
                   help="dlib detector of the faces judge (default: hog)")
    e.set_defaults(func=_evaluate)


def add_benchmark_parser(sub, parents: list[argparse.ArgumentParser]) -> None:
    from pogdiff.compare.comparison import ABLATIONS, DEFAULT_METHODS, QUICK, Budget
    from pogdiff.data.synth import PRESETS
    from pogdiff.evaluation.evaluate import JUDGES, MAX_IDENTITIES_HELP
    from pogdiff.objectives.losses import METHODS
    from pogdiff.options import ACCELERATE_PRECISION, PAPER_PRESETS

    full = Budget()
    b = sub.add_parser("benchmark", parents=parents,
                       help="every method x seed on one dataset and budget: tables with 95%% intervals",
                       description="Train and evaluate methods x seeds with one budget; write OUT/metrics.json, "
                       "OUT/benchmark.md and OUT/benchmark.html. Re-running the same command skips finished cells. "
                       "Without --data: the embedded small preset (2 people, 30 + 2 photos; --data-preset), not the "
                       "medium one of demo and data synth. With --pretrained, every cell fine-tunes that checkpoint; "
                       "under accelerate launch, each cell trains and samples on every process.", epilog=docs("results.md", "cli.md"))
    b.add_argument("--out", default="benchmark-out", help="benchmark folder (default: benchmark-out)")
    b.add_argument("--data", help="dataset folder (default: the embedded synthetic set of --data-preset, written into "
                   "OUT/data)")
    b.add_argument("--data-preset", choices=sorted(PRESETS), default="small", help="embedded set without --data "
                   "(default: small)")
    b.add_argument("--methods", nargs="+", metavar="METHOD",
                   help=f"rows: {', '.join(METHODS)}, the ablations {', '.join(ABLATIONS)}, or METHOD:option=value,... "
                   f"e.g. cbdm:tau=0.5 (default: {' '.join(DEFAULT_METHODS)})")
    b.add_argument("--seeds", nargs="+", type=int, metavar="SEED",
                   help="training and sampling seeds (default: 0 1 2; --quick: 0 1)")
    b.add_argument("--quick", action="store_true", help=f"smoke-test budget: {QUICK.max_train_steps} steps at batch "
                   f"{QUICK.train_batch_size}, {QUICK.num_images} images per identity, {QUICK.num_inference_steps} "
                   "DDIM steps; typed options still win")
    add_training_option(b, "max_train_steps", "optimizer steps of every run", full.max_train_steps)
    add_training_option(b, "train_batch_size", "batch size of every run", full.train_batch_size)
    add_training_option(b, "learning_rate", "AdamW learning rate of every run", "the backbone's")
    add_training_option(b, "from_scratch", "the small backbone from random weights instead of the shipped pretrained "
                        "one (the from-scratch regime of docs/results.md)")
    real = b.add_argument_group("a real backbone (docs/reproduce-the-paper.md); each option as in `pogdiff train`")
    add_training_option(real, "pretrained", "diffusers Stable Diffusion checkpoint every cell fine-tunes, a folder or "
                        "hub id; its files' sha256 is recorded, and a rerun on other weights is refused",
                        "the small backbone")
    real.add_argument("--preset", choices=sorted(PAPER_PRESETS), help="the paper's Sec. 4.1 budget: lr 1e-5, batch 8, "
                      "6,000 steps (paper-small) or 12,000 steps with 4 accumulation steps (paper-large); typed "
                      "options still win (default: none)")
    add_training_option(real, "lora_rank")
    add_training_option(real, "lora_alpha", "LoRA alpha", "the rank")
    add_training_option(real, "resolution", "training resolution", "the backbone's")
    add_training_option(real, "mixed_precision", "fp16 (CUDA GPU) or bf16: frozen weights in half precision in every "
                        "cell", ACCELERATE_PRECISION)
    add_training_option(real, "gradient_accumulation_steps", "micro-batches per optimizer step",
                        full.gradient_accumulation_steps)
    add_training_option(real, "gradient_checkpointing")
    add_training_option(real, "use_ema", "train with an EMA of the weights and evaluate it")
    b.add_argument("--dry-run", action="store_true", help="print the cells, steps, images to sample, cache size on "
                   "disk and an estimated time per measured GPU, then stop: nothing is trained or written")
    b.add_argument("--num-images", type=int, help=f"generated images per identity (default: {full.num_images})")
    b.add_argument("--num-images-few", type=int, help="generated images per Few identity (default: --num-images; "
                   "the paper's App. B draws 500)")
    b.add_argument("--num-inference-steps", type=int, help=f"DDIM steps (default: {full.num_inference_steps})")
    b.add_argument("--guidance-scale", type=float, help="classifier-free guidance (default: the backbone's)")
    b.add_argument("--few-max-images", type=int, help=f"Few = identities with at most this many training images "
                   f"(default: {full.few_max_images})")
    b.add_argument("--max-identities", type=int, metavar="N", help=f"{MAX_IDENTITIES_HELP} (default: all)")
    b.add_argument("--prompt-template", metavar="TEMPLATE", help=prompt_template_help())
    add_feature_space_options(b, default=None)
    b.add_argument("--identity-judge", choices=JUDGES, help=f"{JUDGE_HELP} (default: auto)")
    b.set_defaults(func=_benchmark)


def add_demo_parser(sub, parents: list[argparse.ArgumentParser]) -> None:
    from pogdiff.data.synth import PRESETS
    from pogdiff.compare.demo import DEMO_INFERENCE_STEPS, DEMO_STEPS

    m = sub.add_parser("demo", parents=parents, help="vanilla vs PoGDiff on the embedded medium preset",
                       description="Write the embedded medium preset (10 people, 30 down to 2 photos each), fine-tune "
                       "the shipped backbone with vanilla and with PoGDiff, score both per person, All and Few.",
                       epilog=docs("results.md", "cli.md"))
    m.add_argument("--out", default="demo-out", help="demo folder; run again, it reuses finished steps "
                   "(default: demo-out)")
    m.add_argument("--preset", choices=sorted(PRESETS), default="medium", help="the embedded set (default: medium)")
    m.add_argument("--max-train-steps", type=int, default=DEMO_STEPS,
                   help=f"optimizer steps of each run (default: {DEMO_STEPS})")
    m.add_argument("--num-images", type=int, default=8, help="generated images per person (default: 8)")
    m.add_argument("--num-inference-steps", type=int, default=DEMO_INFERENCE_STEPS,
                   help=f"DDIM steps, to fit 15 minutes; evaluate uses 50 (default: {DEMO_INFERENCE_STEPS})")
    m.set_defaults(func=_demo)


def main(argv: list[str] | None = None) -> int:
    try:
        return run(build_parser().parse_args(argv))
    except SystemExit as stop:  # argparse: an option refused (its one line is printed) or --help
        return stop.code
    except KeyboardInterrupt:  # before a run folder exists (a run's own says how to continue it)
        print("pogdiff: error: interrupted; run the command again", file=sys.stderr)
        return Interrupted.exit_code
    finally:
        end_process_group()


def end_process_group() -> None:
    """End the process group of `accelerate launch`, if a command started one (torch warns at exit otherwise)."""
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.destroy_process_group()


def run(args) -> int:
    """Run the parsed command; its errors and warnings become single lines on stderr."""
    with warnings.catch_warnings():
        warnings.simplefilter("default", PogdiffWarning)  # each distinct warning once
        shown = warnings.showwarning

        def show(message, category, *args, **kwargs):
            if issubclass(category, PogdiffWarning):
                print(f"pogdiff: warning: {message}", file=sys.stderr)
            else:
                shown(message, category, *args, **kwargs)

        warnings.showwarning = show
        try:
            args.func(args)
        except PogdiffError as error:
            print(f"pogdiff: error: {error}", file=sys.stderr)
            return error.exit_code
        except OSError as error:  # disk full, permissions, ...: the file and the reason, without a traceback
            where = f"{error.filename}: " if error.filename else ""
            print(f"pogdiff: error: {where}{error.strerror or error}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
