"""The ``pogdiff`` command line: data, train, sample, evaluate, demo."""

from __future__ import annotations

import argparse
import inspect
import sys
import warnings
from pathlib import Path

from pogdiff.errors import PogdiffError, PogdiffWarning


def _data_synth(args) -> None:
    from pogdiff.data.synth import write_dataset

    out = write_dataset(args.out, preset=args.preset, seed=args.seed, size=args.resolution)
    print(f"wrote {out}")


def _train(args) -> None:
    from pogdiff.losses import METHODS
    from pogdiff.train import PAPER_PRESETS, TrainConfig, config_fields, train

    typed = vars(args)
    values = {**PAPER_PRESETS.get(typed.get("preset"), {}),
              **{k: v for k, v in typed.items() if k in config_fields()}}
    accepted = inspect.signature(METHODS[values.get("method", "pogdiff")].__init__).parameters
    values["method_options"] = {k: v for k, v in typed.items() if k in accepted and k not in config_fields()}
    values["progress"] = not args.no_progress
    out = train(TrainConfig(**values))
    print(f"run saved to {out}")


def _sample(args) -> None:
    from pogdiff.backbone import load_backbone
    from pogdiff.evaluation.pictures import to_pil
    from pogdiff.sampling import generate

    backbone = load_backbone(args.run)
    images = generate(backbone, [args.prompt], args.num_images, args.num_inference_steps, args.guidance_scale,
                      args.seed, progress=not args.no_progress)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        to_pil(image).save(out / f"{i:04d}.png")
    print(f"wrote {len(images)} images to {out}")


def _evaluate(args) -> None:
    from pogdiff.evaluation.evaluate import evaluate_runs, format_table

    metrics = evaluate_runs(args.runs, args.data, args.out, num_images=args.num_images,
                            num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                            seed=args.seed, few_max_images=args.few_max_images, cache_dir=args.cache_dir,
                            progress=not args.no_progress)
    print(format_table(metrics))
    print(f"metrics written to {Path(args.out) / 'metrics.json'}")


def _demo(args) -> None:
    from pogdiff.demo import run_demo

    run_demo(args.out, preset=args.preset, seed=args.seed, max_train_steps=args.max_train_steps,
             num_images=args.num_images, cache_dir=args.cache_dir, progress=not args.no_progress)


def build_parser() -> argparse.ArgumentParser:
    from pogdiff.data.synth import PRESETS
    from pogdiff.losses import METHODS
    from pogdiff.train import PAPER_PRESETS, TrainConfig

    d = TrainConfig("", "")
    parser = argparse.ArgumentParser(prog="pogdiff", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--cache-dir", help="where encoder tables and judges are cached (default ~/.cache/pogdiff)")
    common.add_argument("--no-progress", action="store_true", help="no progress bars")

    data = sub.add_parser("data", help="datasets").add_subparsers(dest="data_command", required=True)
    synth = data.add_parser("synth", help="write the embedded synthetic people dataset")
    synth.add_argument("out", help="new, empty folder")
    synth.add_argument("--preset", choices=sorted(PRESETS), default="medium")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--resolution", type=int, default=32)
    synth.set_defaults(func=_data_synth)

    t = sub.add_parser("train", parents=[common], help="fine-tune with a method",
                       argument_default=argparse.SUPPRESS)

    def option(name, help, **kwargs):
        field = name.lstrip("-").replace("-", "_")
        default = getattr(d, field, None)
        shown = f" (default: {default})" if default not in (None, False) and "action" not in kwargs else ""
        return t.add_argument(name, help=help + shown, **kwargs)

    t.add_argument("data_dir", metavar="DATA", help="folder with metadata.jsonl and images")
    t.add_argument("--output-dir", required=True, help="run folder to write")
    option("--method", "training objective", choices=sorted(METHODS))
    option("--preset", "the paper's Sec. 4.1 hyper-parameters (typed options still win)", choices=sorted(PAPER_PRESETS))
    option("--caption-column", "metadata column holding the caption")
    option("--identity-column", "metadata column holding the identity (Eq. 9 indicator, All/Few split)")
    option("--image-column", "metadata column holding the image path")
    option("--resolution", "training resolution", type=int)
    option("--no-center-crop", "crop images at the top-left instead of the centre",
           dest="center_crop", action="store_false")
    option("--random-flip", "flip images horizontally at random", action="store_true")
    option("--caption-dropout", "probability of the empty caption, for classifier-free guidance", type=float)
    option("--train-batch-size", "batch size per device", type=int)
    option("--gradient-accumulation-steps", "micro-batches per optimizer step", type=int)
    option("--max-train-steps", "optimizer steps", type=int)
    option("--learning-rate", "AdamW learning rate", type=float)
    option("--lr-scheduler", "constant, linear, cosine, cosine_with_restarts, polynomial, constant_with_warmup")
    option("--lr-warmup-steps", "warm-up steps of the learning-rate schedule", type=int)
    option("--mixed-precision", "fp16/bf16 on a GPU", choices=["no", "fp16", "bf16"])
    option("--use-ema", "keep an exponential moving average of the weights and save it", action="store_true")
    option("--ema-decay", "EMA decay (with warm-up)", type=float)
    option("--snr-gamma", "Min-SNR weighting gamma (5.0 is usual)", type=float)
    option("--checkpointing-steps", "save the training state every N steps", type=int)
    option("--checkpoints-total-limit", "keep at most this many checkpoints", type=int)
    option("--resume-from-checkpoint", "'latest' or a checkpoint folder")
    option("--overwrite", "replace a run already in --output-dir", action="store_true")
    option("--report-to", "log to this tracker under OUTPUT_DIR/logs", choices=["tensorboard"])
    option("--log-rows", "write OUTPUT_DIR/rows-rank<R>.jsonl: the rows each process trained on per step and "
           "digests of its tables and weights (checks multi-process runs)", action="store_true")
    pog = t.add_argument_group("PoGDiff (Sec. 3.2)")
    pog.add_argument("--k", type=int, help=f"neighbours per image, Eq. 8 (default: {d.k})")
    pog.add_argument("--a1", type=float, help="Eq. 9 exponent for the same identity (default: 1.0)")
    pog.add_argument("--a2", type=float, help="Eq. 9 extra exponent for another identity (default: 1.0)")
    pog.add_argument("--a3", type=float, help="Eq. 11 scale of the inverse text density (default: 1.0)")
    pog.add_argument("--psi-txt-max-ratio", type=float, help="clip psi_txt to [1/r, r] x the median (default: 10)")
    pog.add_argument("--no-psi-img", dest="use_psi_img", action="store_false", help="ablation: psi_img = 1")
    pog.add_argument("--no-psi-txt", dest="use_psi_txt", action="store_false", help="ablation: psi_txt = 1")
    pog.add_argument("--target-grad", action="store_true", help="let gradient flow through eps(x_t, y')")
    pog.add_argument("--vae-latent-dim", type=int, help=f"text-density VAE, Eq. 10 (default: {d.vae_latent_dim})")
    t.set_defaults(func=_train)

    s = sub.add_parser("sample", parents=[common], help="generate images from a run")
    s.add_argument("run", help="run folder written by `pogdiff train`")
    s.add_argument("--prompt", required=True)
    s.add_argument("--num-images", type=int, default=4)
    s.add_argument("--out", required=True)
    s.add_argument("--num-inference-steps", type=int, default=50)
    s.add_argument("--guidance-scale", type=float, help="classifier-free guidance (default: 3.0 small, 7.5 SD)")
    s.set_defaults(func=_sample)

    e = sub.add_parser("evaluate", parents=[common], help="score runs per identity, All and Few")
    e.add_argument("runs", nargs="+", metavar="RUN")
    e.add_argument("--data", required=True, help="the dataset the runs were trained on")
    e.add_argument("--out", required=True)
    e.add_argument("--num-images", type=int, default=8, help="generated images per identity")
    e.add_argument("--num-inference-steps", type=int, default=50)
    e.add_argument("--guidance-scale", type=float)
    e.add_argument("--few-max-images", type=int, default=5, help="Few = identities with at most this many images")
    e.set_defaults(func=_evaluate)

    m = sub.add_parser("demo", parents=[common], help="vanilla vs PoGDiff on the embedded default")
    m.add_argument("--out", default="demo-out")
    m.add_argument("--preset", choices=sorted(PRESETS), default="medium")
    m.add_argument("--max-train-steps", type=int, default=500)
    m.add_argument("--num-images", type=int, default=8)
    m.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
            return 2
        except OSError as error:  # disk full, permissions, ...: the file and the reason, without a traceback
            where = f"{error.filename}: " if error.filename else ""
            print(f"pogdiff: error: {where}{error.strerror or error}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
