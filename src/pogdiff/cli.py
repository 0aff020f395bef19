"""The ``pogdiff`` command line: data, pretrain, train, sample, evaluate, benchmark, demo."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from pogdiff.errors import Interrupted, PogdiffError, PogdiffWarning


def _data_synth(args) -> None:
    from pogdiff.data.pretraining_corpus import write_pretraining_corpus
    from pogdiff.data.synth import write_dataset

    if args.preset == "pretrain":
        out = write_pretraining_corpus(args.out, people=args.people, images_per_person=args.images_per_person,
                                       seed=args.seed, size=args.resolution)
    else:
        out = write_dataset(args.out, preset=args.preset, seed=args.seed, size=args.resolution)
    print(f"wrote {out}")


def _train(args) -> None:
    from pogdiff.train import train

    out = train(train_config(args))
    print(f"run saved to {out}")


def train_config(args):
    """The TrainConfig of parsed ``pogdiff train`` arguments: a method's flags go into its method_options."""
    from pogdiff.losses import method_parameters
    from pogdiff.train import PAPER_PRESETS, TrainConfig, config_fields

    typed = vars(args)
    values = {**PAPER_PRESETS.get(typed.get("preset"), {}),
              **{k: v for k, v in typed.items() if k in config_fields()}}
    method = values.get("method", "pogdiff")
    values["method_options"] = {k: v for k, v in typed.items() if k in args.method_flags}
    wrong = [args.method_flags[k] for k in values["method_options"] if k not in method_parameters(method)]
    if wrong:
        raise PogdiffError(f"{', '.join(wrong)} does not apply to --method {method}; drop it or choose the method "
                           "it belongs to (see pogdiff train --help)")
    values["progress"] = not args.no_progress
    return TrainConfig(**values)


def _pretrain(args) -> None:
    from pogdiff.pretraining import PRETRAINING, check_release_dir, write_release
    from pogdiff.train import TrainConfig, config_fields, train

    if getattr(args, "release_dir", None):
        check_release_dir(args.release_dir)  # before hours of training, not after
    values = {**PRETRAINING, **{k: v for k, v in vars(args).items() if k in config_fields()}}
    out = train(TrainConfig(**values, progress=not args.no_progress))
    print(f"pretrained backbone saved to {out}")
    if getattr(args, "release_dir", None):
        print(f"released to {write_release(out, args.release_dir)}")


def _sample(args) -> None:
    from pogdiff.backbone import load_backbone
    from pogdiff.images import to_pil
    from pogdiff.sampling import generate

    out = Path(args.out)
    files = [out / f"{i:04d}.png" for i in range(args.num_images)]
    taken = [file for file in files if file.exists()]
    if taken:
        raise PogdiffError(f"{taken[0]}: already exists ({len(taken)} of the {len(files)} files to write do); "
                           "choose another --out, or move them away")
    backbone = load_backbone(args.run)
    images = generate(backbone, [args.prompt], args.num_images, args.num_inference_steps, args.guidance_scale,
                      args.seed, progress=not args.no_progress)
    out.mkdir(parents=True, exist_ok=True)
    for file, image in zip(files, images):
        to_pil(image).save(file)
    print(f"wrote {len(images)} images to {out}")


def _evaluate(args) -> None:
    from pogdiff.evaluation.evaluate import evaluate_runs, format_table

    metrics = evaluate_runs(args.runs, args.data, args.out, num_images=args.num_images,
                            num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                            seed=args.seed, few_max_images=args.few_max_images, cache_dir=args.cache_dir,
                            progress=not args.no_progress, features=args.features,
                            inception_weights=args.inception_weights, recall_threshold=args.recall_threshold,
                            identity_judge=args.identity_judge, face_detector=args.face_detector,
                            num_images_few=args.num_images_few, paper_protocol=args.paper_protocol,
                            max_identities=args.max_identities)
    print(f"fd, sim, recall in {metrics['feature_space']} features; id_acc by {metrics['identity_judge']}")
    print(format_table(metrics))
    print(f"metrics written to {Path(args.out) / 'metrics.json'}, report to {Path(args.out) / 'report.html'}")


def _demo(args) -> None:
    from pogdiff.demo import run_demo

    run_demo(args.out, preset=args.preset, seed=args.seed, max_train_steps=args.max_train_steps,
             num_images=args.num_images, num_inference_steps=args.num_inference_steps, cache_dir=args.cache_dir,
             progress=not args.no_progress)


def _benchmark(args) -> None:
    from pogdiff.comparison import DEFAULT_METHODS, DEFAULT_SEEDS, QUICK_SEEDS, budget_from, run_benchmark

    budget = budget_from(args.quick, max_train_steps=args.max_train_steps, train_batch_size=args.train_batch_size,
                         learning_rate=args.learning_rate, num_images=args.num_images,
                         num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                         few_max_images=args.few_max_images, max_identities=args.max_identities,
                         from_scratch=args.from_scratch or None)
    seeds = args.seeds if args.seeds is not None else QUICK_SEEDS if args.quick else DEFAULT_SEEDS
    run_benchmark(args.out, args.methods or DEFAULT_METHODS, seeds, budget, data=args.data, preset=args.preset,
                  cache_dir=args.cache_dir, progress=not args.no_progress)


def build_parser() -> argparse.ArgumentParser:
    from pogdiff.options import OneLineErrorParser, install_rules

    parser = OneLineErrorParser(prog="pogdiff", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    seed = argparse.ArgumentParser(add_help=False)
    seed.add_argument("--seed", type=int, default=0)
    runtime = argparse.ArgumentParser(add_help=False)
    runtime.add_argument("--cache-dir",
                         help="where encoded datasets, latents and identity judges are cached (default "
                         "$POGDIFF_CACHE, else $XDG_CACHE_HOME/pogdiff, else ~/.cache/pogdiff)")
    runtime.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_data_parser(sub, seed)
    add_pretrain_parser(sub, [seed, runtime])
    add_train_parser(sub, [seed, runtime])
    add_sample_parser(sub, [seed, runtime])
    add_evaluate_parser(sub, [seed, runtime])
    add_benchmark_parser(sub, [runtime])
    add_demo_parser(sub, [seed, runtime])
    return install_rules(parser)


def add_data_parser(sub, seed: argparse.ArgumentParser) -> None:
    from pogdiff.data.synth import PRESETS

    data = sub.add_parser("data", help="datasets").add_subparsers(dest="data_command", required=True)
    synth = data.add_parser("synth", parents=[seed], help="write the embedded synthetic people dataset")
    synth.add_argument("out", help="new, empty folder")
    synth.add_argument("--preset", choices=[*sorted(PRESETS), "pretrain"], default="medium",
                       help="long-tailed fine-tuning sets (small, medium, large) or the balanced, name-free "
                       "pretraining corpus (pretrain)")
    synth.add_argument("--resolution", type=int, default=32)
    synth.add_argument("--people", type=int, default=5000, help="pretrain: people in the corpus (default: 5000)")
    synth.add_argument("--images-per-person", type=int, default=4, help="pretrain: images per person (default: 4)")
    synth.set_defaults(func=_data_synth)


def add_pretrain_parser(sub, parents: list[argparse.ArgumentParser]) -> None:
    from pogdiff.pretraining import PRETRAINING
    from pogdiff.shipped import SHIPPED_DIR

    p = sub.add_parser("pretrain", parents=parents, argument_default=argparse.SUPPRESS,
                       help="pretrain the small backbone from random weights on `pogdiff data synth --preset pretrain`")
    p.add_argument("data_dir", metavar="DATA", help="the pretraining corpus (or any dataset folder)")
    p.add_argument("--output-dir", required=True, help="run folder to write")
    for flag, kind, what in (("--train-batch-size", int, "batch size per device"),
                             ("--max-train-steps", int, "optimizer steps"),
                             ("--learning-rate", float, "AdamW learning rate"),
                             ("--lr-warmup-steps", int, "linear warm-up steps"),
                             ("--ema-decay", float, "EMA decay (with warm-up)"),
                             ("--checkpointing-steps", int, "save the training state every N steps"),
                             ("--checkpoints-total-limit", int, "keep at most this many checkpoints"),
                             ("--text-max-length", int, "caption tokens the UNet attends to")):
        p.add_argument(flag, type=kind, help=f"{what} (default: {PRETRAINING[flag[2:].replace('-', '_')]})")
    p.add_argument("--resume-from-checkpoint", help="'latest' or a checkpoint folder")
    p.add_argument("--from-shipped", dest="from_scratch", action="store_false",
                   help=f"continue from the shipped {SHIPPED_DIR.name} weights instead of random ones (a new "
                   "optimizer and EMA; a release's manifest keeps the earlier one under continued_from)")
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], help="on a GPU")
    p.add_argument("--validation-prompts", nargs="+", metavar="PROMPT",
                   help="sample these prompts every --validation-steps into OUTPUT_DIR/validation")
    p.add_argument("--validation-steps", type=int, help="steps between validation grids")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --output-dir")
    p.add_argument("--release-dir", metavar="DIR", help="when done, write fp16 weights and a manifest there "
                   f"(the shipped backbone: src/pogdiff/weights/{SHIPPED_DIR.name})")
    p.set_defaults(func=_pretrain)


def add_train_parser(sub, parents: list[argparse.ArgumentParser]) -> None:
    from pogdiff.losses import METHODS
    from pogdiff.row_sampler import SAMPLERS
    from pogdiff.shipped import SHIPPED_NAME
    from pogdiff.train import PAPER_PRESETS, TrainConfig

    t = sub.add_parser("train", parents=parents, help="fine-tune with a method", argument_default=argparse.SUPPRESS)
    defaults = TrainConfig("", "")

    def option(name, help, group=t, **kwargs):
        field = name.lstrip("-").replace("-", "_")
        default = getattr(defaults, field, None)
        shown = f" (default: {default})" if default not in (None, False) and "action" not in kwargs else ""
        return group.add_argument(name, help=help + shown, **kwargs)

    t.add_argument("data_dir", metavar="DATA", help="folder with metadata.jsonl and images")
    t.add_argument("--output-dir", required=True, help="run folder to write")
    option("--method", "training objective", choices=sorted(METHODS))
    option("--preset", "the paper's Sec. 4.1 hyper-parameters (typed options still win)", choices=sorted(PAPER_PRESETS))
    option("--pretrained", "diffusers Stable Diffusion checkpoint to fine-tune, a folder or hub id "
           f"(default: the small CPU backbone, pretrained and shipped as {SHIPPED_NAME})", metavar="PATH_OR_HUB_ID")
    option("--from-scratch", "the small CPU backbone from random weights instead of the shipped pretrained one",
           action="store_true")
    option("--lora-rank", "train LoRA adapters of this rank on the UNet's attention instead of the whole UNet",
           type=int, metavar="R")
    option("--caption-column", "metadata column holding the caption")
    option("--identity-column", "metadata column holding the identity (Eq. 9 indicator, All/Few split)")
    option("--image-column", "metadata column holding the image path")
    option("--resolution", "training resolution (default: the backbone's, 32 small, 512 SD v1.5)", type=int)
    option("--no-center-crop", "crop images at the top-left instead of the centre",
           dest="center_crop", action="store_false")
    option("--random-flip", "flip images horizontally at random (SD: the mirror image's latents are cached too)",
           action="store_true")
    option("--caption-dropout", "probability of the empty caption, for classifier-free guidance", type=float)
    option("--train-batch-size", "batch size per device", type=int)
    option("--gradient-accumulation-steps", "micro-batches per optimizer step", type=int)
    option("--max-train-steps", "optimizer steps", type=int)
    option("--learning-rate", "AdamW learning rate (default: 1e-3 small, 1e-5 SD, 1e-4 SD LoRA)", type=float)
    option("--lr-scheduler", "constant, linear, cosine, cosine_with_restarts, polynomial, constant_with_warmup")
    option("--lr-warmup-steps", "warm-up steps of the learning-rate schedule", type=int)
    option("--mixed-precision", "fp16/bf16 on a GPU: frozen weights in half precision, trained ones float32",
           choices=["no", "fp16", "bf16"])
    option("--gradient-checkpointing", "recompute activations in the backward pass: less memory, slower",
           action="store_true")
    option("--use-ema", "keep an exponential moving average of the weights and save it", action="store_true")
    option("--ema-decay", "EMA decay (with warm-up)", type=float)
    option("--snr-gamma", "Min-SNR weighting gamma (5.0 is usual)", type=float)
    option("--checkpointing-steps", "save the training state every N steps", type=int)
    option("--checkpoints-total-limit", "keep at most this many checkpoints", type=int)
    option("--resume-from-checkpoint", "'latest' or a checkpoint folder")
    option("--validation-prompts", "sample these prompts every --validation-steps into OUTPUT_DIR/validation",
           nargs="+", metavar="PROMPT")
    option("--validation-steps", "steps between validation grids", type=int)
    option("--num-validation-images", "images per validation prompt", type=int)
    option("--overwrite", "replace a run already in --output-dir", action="store_true")
    option("--report-to", "log to this tracker under OUTPUT_DIR/logs", choices=["tensorboard"])
    option("--log-rows", "write OUTPUT_DIR/rows-rank<R>.jsonl: the rows each process trained on per micro-step and "
           "digests of its tables and weights (checks multi-process runs)", action="store_true")
    sampler = t.add_argument_group("row sampler (every method)")
    option("--sampler", "which rows a batch holds: uniform (an epoch shuffle) or balanced (every identity equally "
           "often; without identities, by inverse text density) (default: uniform; balanced for resample)",
           group=sampler, choices=SAMPLERS)
    option("--density-max-ratio", "balanced sampler without identities: clip inverse text-density weights to "
           "[1/r, r] x the median", group=sampler, type=float)
    encoded = t.add_argument_group("text density (Eq. 10)")
    option("--vae-latent-dim", "latent size of the text-density VAE, Eq. 10", group=encoded, type=int)
    t.set_defaults(func=_train, method_flags=add_method_options(t))


def add_method_options(parser: argparse.ArgumentParser) -> dict[str, str]:
    """One group per method: a flag for each option of its loss's constructor, with the constructor's
    default and the class's OPTION_HELP. Returns {option name: flag}; the option name is the flag's dest."""
    from pogdiff.losses import METHODS, method_parameters

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
    s = sub.add_parser("sample", parents=parents, help="generate images from a run")
    s.add_argument("run", help="run folder written by `pogdiff train`, or any Stable Diffusion pipeline folder")
    s.add_argument("--prompt", required=True)
    s.add_argument("--num-images", type=int, default=4)
    s.add_argument("--out", required=True)
    s.add_argument("--num-inference-steps", type=int, default=50)
    s.add_argument("--guidance-scale", type=float, help="classifier-free guidance (default: 3.0 small, 7.5 SD)")
    s.set_defaults(func=_sample)


def add_evaluate_parser(sub, parents: list[argparse.ArgumentParser]) -> None:
    from pogdiff.data.dataset import FEW_MAX_IMAGES
    from pogdiff.evaluation.evaluate import JUDGES, MAX_IDENTITIES_HELP
    from pogdiff.evaluation.features import DEFAULT_FEATURES

    e = sub.add_parser("evaluate", parents=parents, help="score runs per identity, All and Few")
    e.add_argument("runs", nargs="+", metavar="RUN", help="run folders, or Stable Diffusion pipeline folders")
    e.add_argument("--data", required=True, help="the dataset the runs were trained on")
    e.add_argument("--out", required=True)
    e.add_argument("--num-images", type=int, default=8, help="generated images per identity (default: 8; "
                   "the paper's App. B uses 100, 20 on large sets: see --paper-protocol)")
    e.add_argument("--num-images-few", type=int, help="generated images per Few identity (default: --num-images)")
    e.add_argument("--paper-protocol", action="store_true",
                   help="App. B sample counts: 100 per identity (20 with >= 500 training images), 500 per Few identity")
    e.add_argument("--num-inference-steps", type=int, default=50)
    e.add_argument("--guidance-scale", type=float)
    e.add_argument("--few-max-images", type=int, default=FEW_MAX_IMAGES,
                   help=f"Few = identities with at most this many training images (default: {FEW_MAX_IMAGES})")
    e.add_argument("--max-identities", type=int, metavar="N", help=MAX_IDENTITIES_HELP)
    e.add_argument("--features", default=DEFAULT_FEATURES, metavar="SPACE",
                   help=f"feature space of fd, sim and recall: {DEFAULT_FEATURES} (default, offline), inception "
                   "(with --inception-weights), or a Hugging Face image model id or folder, e.g. facebook/dinov2-base")
    e.add_argument("--inception-weights", metavar="FILE", help="pt_inception-2015-12-05-6726825d.pth, for --features "
                   "inception (needs torch-fidelity: pip install 'pogdiff[inception]')")
    e.add_argument("--recall-threshold", type=float, default=0.9,
                   help="Eq. 17: cosine similarity that covers a training image (default: 0.9)")
    e.add_argument("--identity-judge", choices=JUDGES, default="auto",
                   help="id_acc judge: synth (CNN on fresh renders of a `pogdiff data synth` set), faces (dlib face "
                   "descriptors, nearest identity; no face = wrong), features (nearest identity centroid in --features); "
                   "auto: synth when DATA/synth.json exists, else features")
    e.add_argument("--face-detector", choices=["hog", "cnn"], default="hog", help="dlib detector of the faces judge")
    e.set_defaults(func=_evaluate)


def add_benchmark_parser(sub, parents: list[argparse.ArgumentParser]) -> None:
    from pogdiff.comparison import ABLATIONS, DEFAULT_METHODS, QUICK, Budget
    from pogdiff.data.synth import PRESETS
    from pogdiff.evaluation.evaluate import MAX_IDENTITIES_HELP
    from pogdiff.losses import METHODS

    full = Budget()
    b = sub.add_parser("benchmark", parents=parents,
                       help="every method x seed on one dataset and budget: tables with 95%% intervals",
                       description="Train and evaluate methods x seeds with one budget; write OUT/metrics.json, "
                       "OUT/benchmark.md and OUT/benchmark.html. Re-running the same command skips finished cells.")
    b.add_argument("--out", default="benchmark-out", help="benchmark folder (default: benchmark-out)")
    b.add_argument("--data", help="dataset folder (default: the embedded synthetic set, written into OUT/data)")
    b.add_argument("--preset", choices=sorted(PRESETS), default="small", help="embedded set without --data "
                   "(default: small)")
    b.add_argument("--methods", nargs="+", metavar="METHOD",
                   help=f"rows: {', '.join(METHODS)}, the ablations {', '.join(ABLATIONS)}, or METHOD:option=value,... "
                   f"e.g. cbdm:tau=0.5 (default: {' '.join(DEFAULT_METHODS)})")
    b.add_argument("--seeds", nargs="+", type=int, metavar="SEED",
                   help="training and sampling seeds (default: 0 1 2; --quick: 0 1)")
    b.add_argument("--quick", action="store_true", help=f"smoke-test budget: {QUICK.max_train_steps} steps at batch "
                   f"{QUICK.train_batch_size}, {QUICK.num_images} images per identity, {QUICK.num_inference_steps} "
                   "DDIM steps; typed options still win")
    b.add_argument("--max-train-steps", type=int, help=f"(default: {full.max_train_steps})")
    b.add_argument("--train-batch-size", type=int, help=f"(default: {full.train_batch_size})")
    b.add_argument("--learning-rate", type=float, help="(default: the backbone's)")
    b.add_argument("--from-scratch", action="store_true", help="the small backbone from random weights instead of "
                   "the shipped pretrained one (the from-scratch regime of the README's tables)")
    b.add_argument("--num-images", type=int, help=f"generated images per identity (default: {full.num_images})")
    b.add_argument("--num-inference-steps", type=int, help=f"DDIM steps (default: {full.num_inference_steps})")
    b.add_argument("--guidance-scale", type=float, help="classifier-free guidance (default: the backbone's)")
    b.add_argument("--few-max-images", type=int, help=f"Few = identities with at most this many training images "
                   f"(default: {full.few_max_images})")
    b.add_argument("--max-identities", type=int, metavar="N", help=MAX_IDENTITIES_HELP)
    b.set_defaults(func=_benchmark)


def add_demo_parser(sub, parents: list[argparse.ArgumentParser]) -> None:
    from pogdiff.data.synth import PRESETS
    from pogdiff.demo import DEMO_INFERENCE_STEPS, DEMO_STEPS

    m = sub.add_parser("demo", parents=parents, help="vanilla vs PoGDiff on the embedded default")
    m.add_argument("--out", default="demo-out")
    m.add_argument("--preset", choices=sorted(PRESETS), default="medium")
    m.add_argument("--max-train-steps", type=int, default=DEMO_STEPS)
    m.add_argument("--num-images", type=int, default=8)
    m.add_argument("--num-inference-steps", type=int, default=DEMO_INFERENCE_STEPS,
                   help=f"DDIM steps (default {DEMO_INFERENCE_STEPS}, to fit 15 minutes; evaluate uses 50)")
    m.set_defaults(func=_demo)


def main(argv: list[str] | None = None) -> int:
    try:
        return run(build_parser().parse_args(argv))
    except SystemExit as stop:  # argparse: an option refused (its one line is printed) or --help
        return stop.code
    except KeyboardInterrupt:  # before a run folder exists (a run's own says how to continue it)
        print("pogdiff: error: interrupted; run the command again", file=sys.stderr)
        return Interrupted.exit_code


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
