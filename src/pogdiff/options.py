"""Each option declared once, and what it allows: one table, checked when the command line is parsed.

Training options are the fields of :class:`TrainConfig`, each declared with :func:`option`: its flag, help,
default, ``--help`` group, range and whether a resumed run may change it; ``pogdiff train`` and ``pogdiff
encode`` list them (:func:`pogdiff.cli.add_train_options`) and :data:`RULES` holds their ranges, next to
those of the other commands' options.

A value out of range is refused by argparse before any work, on one line that names the
option and the allowed range (``pogdiff: error: argument --train-batch-size: 0 is out of
range; pass an integer >= 1``). The Python entry points (:func:`pogdiff.training.train.train`,
:func:`pogdiff.evaluation.evaluate.evaluate_runs`) check their arguments against the same
table with :func:`check_values`, and so does a benchmark row (``cbdm:tau=-1``).
"""

from __future__ import annotations

import argparse
import math
import sys
import textwrap
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Callable

from pogdiff.errors import PogdiffError
from pogdiff.processes import DEFAULT_TIMEOUT_S
from pogdiff.backbones.shipped import SHIPPED_NAME

SEED_MAX = 2**32 - 1  # numpy and accelerate seed with 32 bits
TRAIN_TIMESTEPS = 1000  # both backbones' noise schedules: DDIM cannot take more steps than this
LR_SCHEDULERS = ("constant", "linear", "cosine", "cosine_with_restarts", "polynomial", "constant_with_warmup")
PREDICTION_TYPES = ("epsilon", "v_prediction")  # what the UNet predicts, as diffusers' --prediction_type
# as diffusers' SD3/Flux scripts' --weighting_scheme (pogdiff.objectives.forward_process.FlowMatchingProcess)
WEIGHTING_SCHEMES = ("none", "logit_normal", "mode", "sigma_sqrt", "cosmap")
TRACKERS = ("tensorboard", "wandb")  # --report-to


@dataclass(frozen=True)
class Rule:
    """The values an option allows (``allows``), in words for the fix (``allowed``)."""

    allows: Callable[[Any], bool]
    allowed: str
    problem: str = "is out of range"

    def refusal(self, value, typed: str | None = None) -> str | None:
        """Why ``value`` (as the user ``typed`` it) is refused and what to pass instead; None when it is allowed."""
        if self.allows(value):
            return None
        return f"{value if typed is None else typed} {self.problem}; pass {self.allowed}"


def integer(low: int, high: int | None = None, multiple_of: int = 1, why: str = "") -> Rule:
    """An integer in [low, high] (no upper bound without ``high``), a multiple of ``multiple_of``."""
    if multiple_of > 1:
        allowed = f"a multiple of {multiple_of} >= {low}"
    else:
        allowed = f"an integer in [{low}, {high}]" if high is not None else f"an integer >= {low}"
    return Rule(lambda v: v >= low and (high is None or v <= high) and v % multiple_of == 0, _with_reason(allowed, why))


def number(low: float | None = None, high: float | None = None, above: float | None = None, why: str = "") -> Rule:
    """A finite float in [low, high] (one bound may be None), or above ``above`` (exclusive)."""
    if high is not None:
        bound = f" in [{low}, {high}]"
    elif low is not None:
        bound = f" >= {low}"
    else:
        bound = f" > {above}" if above is not None else ""
    return Rule(lambda v: math.isfinite(v) and (low is None or v >= low) and (high is None or v <= high)
                and (above is None or v > above), _with_reason("a finite number" + bound, why))


def one_of(*values: str) -> Rule:
    """One of the names ``values``."""
    return Rule(lambda v: v in values, "one of " + ", ".join(values), problem="is not a known name")


def _with_reason(allowed: str, why: str) -> str:
    return f"{allowed} ({why})" if why else allowed


def _cuda_visible() -> bool:
    import torch

    return torch.cuda.is_available()


BETA = Rule(lambda v: math.isfinite(v) and 0 <= v < 1, "a number in [0, 1) (an AdamW beta)")

HALF_PRECISION = Rule(lambda v: v != "fp16" or _cuda_visible(), "bf16 or no",
                      problem="needs a CUDA GPU, and none is visible")


def _is_prompt_template(text: str) -> bool:
    """A str.format template whose only field is {name}, present at least once (an escaped ``{{name}}`` is
    literal text: every identity would get the same prompt)."""
    try:
        return text.format(name="a") != text.format(name="b")
    except (AttributeError, KeyError, IndexError, ValueError):
        return False


PROMPT_TEMPLATE = Rule(_is_prompt_template, "a prompt with {name} where each identity's name goes, e.g. "
                       "'A photo of {name}.' (write a literal brace twice: {{ }}, but {name} once: {{name}} "
                       "is the literal text {name})",
                       problem="is not a template holding {name}")

# --- training options: each declared once, as a field of TrainConfig ---

SAMPLERS = ("uniform", "balanced")  # --sampler: pogdiff.training.row_sampler
PRECISIONS = ("no", "fp16", "bf16")  # --mixed-precision
DEFAULT_MAX_TRAIN_STEPS = 500
ACCELERATE_PRECISION = "accelerate's setting (accelerate launch --mixed_precision, accelerate config), else no"
LORA, DATA, BUDGET, OPTIMIZER = "LoRA (with --pretrained)", "data", "steps and learning rate", "optimizer (AdamW)"
MODEL, BOOKS = "precision, memory and noise", "checkpoints, validation and logs"
FLOW = "flow-matching backbones (SD3, Flux)"
SAMPLER, TEXT_DENSITY = "row sampler (every method)", "text density (Eq. 10)"


@dataclass(frozen=True)
class Declared:
    """A training option's command line: its flag (``--`` and the field's name, hyphenated) and ``aliases``,
    ``help``, the ``group`` of ``--help`` it is listed in, the default in words where the field's own depends on
    the backbone (``shown``), its range (``rule``), whether a resumed run may change it (``resumable``), a
    ``--no-`` flag that sets it False (``negation``: its help), and further ``add_argument`` keywords
    (``choices``, a list or a function that returns one; ``metavar``, ``nargs``) beyond those its type implies.

    ``help=None``: no flag of its own in ``pogdiff train`` (--seed, --cache-dir and --no-progress are every
    command's); ``positional``: an argument without a flag (DATA)."""

    help: str | None
    aliases: tuple[str, ...] = ()
    group: str | None = None
    shown: str | None = None
    rule: Rule | None = None
    resumable: bool = False
    negation: str | None = None
    positional: bool = False
    keywords: dict = field(default_factory=dict)


def option(default: Any = MISSING, help: str | None = None, *, aliases: tuple[str, ...] = (), group: str | None = None,
           shown: str | None = None, rule: Rule | None = None, resumable: bool = False, negation: str | None = None,
           positional: bool = False, **keywords) -> Any:
    """A :class:`TrainConfig` field and its command line (:class:`Declared`), declared once."""
    declared = Declared(help, aliases, group, shown, rule, resumable, negation, positional, keywords)
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"option": declared})
    return field(default=default, metadata={"option": declared})


def method_names() -> list[str]:
    """--method's choices: the losses of :data:`pogdiff.objectives.losses.METHODS`."""
    from pogdiff.objectives.losses import METHODS

    return sorted(METHODS)


@dataclass
class TrainConfig:
    """Training options, named and meant as in diffusers' ``train_text_to_image.py``, each declared once: the
    field's default, and in :func:`option` its flag, help, ``--help`` group, range and whether a resume may change
    it; ``pogdiff train``/``encode`` (:func:`pogdiff.cli.add_train_options`), :data:`RULES` and
    :func:`pogdiff.training.train.options_to_keep` read them from here.

    ``None`` defaults depend on the backbone: the small CPU one (``pretrained=None``) or a
    diffusers checkpoint. ``PAPER_PRESETS`` hold Sec. 4.1's settings.
    """

    data_dir: str = option(help="folder with metadata.jsonl and images; or --train_data_dir, or --dataset-name",
                           resumable=True, positional=True, metavar="DATA", nargs="?")
    output_dir: str = option(help="run folder to write", resumable=True)
    # the data: the folder data_dir, or a Hugging Face `datasets` folder (pogdiff.data.hf_datasets)
    dataset_name: str | None = option(None, "a local Hugging Face datasets folder (written by save_to_disk, or an "
                                      "imagefolder) instead of DATA, converted once into the cache (needs pip install "
                                      "'pogdiff[datasets]' unless it holds metadata.jsonl)", shown="none: DATA",
                                      metavar="FOLDER")
    method: str = option("pogdiff", "training objective", choices=method_names)
    seed: int = option(0)  # every command's --seed (pogdiff.cli.build_parser), its range in RULES
    # backbone: a diffusers Stable Diffusion checkpoint (folder or hub id), else the small pixel model
    # (the shipped pretrained one, or random weights with from_scratch)
    pretrained: str | None = option(None, "diffusers checkpoint to fine-tune (Stable Diffusion 1.x/2.x, SDXL, SD3, "
                                    "Flux), a folder or hub id",
                                    aliases=("--pretrained_model_name_or_path",), metavar="PATH_OR_HUB_ID",
                                    shown=f"the small CPU backbone, pretrained and shipped as {SHIPPED_NAME}")
    from_scratch: bool = option(False, "the small CPU backbone from random weights instead of the shipped pretrained "
                                "one")
    prediction_type: str | None = option(None, "what the UNet learns to predict, registered on the noise scheduler "
                                         "and saved with the run", choices=PREDICTION_TYPES,
                                         shown="the checkpoint scheduler's, epsilon for SD v1.5 and the small backbone",
                                         rule=one_of(*PREDICTION_TYPES))
    lora_rank: int | None = option(None, "train LoRA adapters of this rank instead of the whole denoiser", group=LORA,
                                   aliases=("--rank",), metavar="R", shown="none: the whole denoiser", rule=integer(1))
    # as train_text_to_image_lora.py: the rank (scale 1)
    lora_alpha: float | None = option(None, "LoRA alpha: the adapters' output is scaled by alpha / rank", group=LORA,
                                      metavar="ALPHA", shown="the rank", rule=number(above=0))
    # None: the family's (pogdiff.backbones: LatentBackbone.lora_target_modules)
    lora_target_modules: tuple[str, ...] | None = option(
        None, "the denoiser's modules (names or name suffixes) that get adapters", group=LORA, metavar="MODULE",
        shown="what diffusers' LoRA script for the family targets: to_k to_q to_v to_out.0 for SD and SDXL")
    caption_column: str = option("text", "metadata column holding the caption", group=DATA)
    identity_column: str = option("identity", "metadata column holding the identity (Eq. 9 indicator, All/Few split)",
                                  group=DATA)
    image_column: str = option("file_name", "metadata column holding the image path", group=DATA)
    resolution: int | None = option(None, "training resolution", group=DATA,
                                    shown="the backbone's, 32 small, 512 SD v1.5",
                                    rule=integer(8, multiple_of=8, why="the UNet and the VAE halve it at each level"))
    center_crop: bool = option(True, "crop images at the centre (pogdiff's default; diffusers crops at random without "
                               "it)", group=DATA, negation="crop images at the top-left instead of the centre")
    random_flip: bool = option(False, "flip images horizontally at random (SD: the mirror image's latents are cached "
                               "too)", group=DATA)
    caption_dropout: float = option(0.1, "probability of the empty caption, for classifier-free guidance", group=DATA,
                                    rule=number(0, 1, why="a probability"))
    # pogdiff.data.image_files.decode_workers
    dataloader_num_workers: int | None = option(None, "processes decoding images while the dataset is encoded (0: "
                                                "the main process)", group=DATA, resumable=True,
                                                shown="the CPUs per local process, at most 8", rule=integer(0))
    # optimisation
    train_batch_size: int = option(16, "batch size per device", group=BUDGET, rule=integer(1))
    gradient_accumulation_steps: int = option(1, "micro-batches per optimizer step", group=BUDGET, rule=integer(1))
    max_train_steps: int | None = option(None, "optimizer steps", group=BUDGET, resumable=True, rule=integer(1),
                                         shown=f"{DEFAULT_MAX_TRAIN_STEPS}, or --num-train-epochs' worth")
    num_train_epochs: int | None = option(None, "passes over the dataset; sets --max-train-steps when it is not given",
                                          group=BUDGET, shown="none", resumable=True, rule=integer(1))
    learning_rate: float | None = option(None, "AdamW learning rate", group=BUDGET, rule=number(above=0),
                                         shown="1e-3 small, 1e-5 SD, 1e-4 SD LoRA")  # 1e-5: Sec. 4.1
    scale_lr: bool = option(False, "multiply the learning rate by the images per optimizer step (batch x processes x "
                            "accumulation), as diffusers' --scale_lr", group=BUDGET)
    lr_scheduler: str = option("constant", ", ".join(LR_SCHEDULERS), group=BUDGET, rule=one_of(*LR_SCHEDULERS))
    lr_warmup_steps: int = option(0, "warm-up steps of the learning-rate schedule", group=BUDGET, rule=integer(0))
    adam_beta1: float = option(0.9, "AdamW beta1", group=OPTIMIZER, rule=BETA)
    adam_beta2: float = option(0.999, "AdamW beta2", group=OPTIMIZER, rule=BETA)
    adam_epsilon: float = option(1e-8, "AdamW epsilon", group=OPTIMIZER, rule=number(0))
    adam_weight_decay: float = option(1e-2, "AdamW weight decay", group=OPTIMIZER, rule=number(0))
    max_grad_norm: float = option(1.0, "clip the gradient to this norm", group=OPTIMIZER, rule=number(above=0))
    use_8bit_adam: bool = option(False, "bitsandbytes' 8-bit AdamW: less optimizer memory on a GPU (pip install "
                                 "'pogdiff[bitsandbytes]')", group=OPTIMIZER)
    # None: accelerate's own setting
    mixed_precision: str | None = option(None, "fp16 (CUDA GPU only) or bf16: frozen weights in half precision, "
                                         "trained ones float32; the run records the precision it trained in",
                                         group=MODEL, choices=PRECISIONS, shown=ACCELERATE_PRECISION,
                                         resumable=True, rule=HALF_PRECISION)
    allow_tf32: bool = option(False, "TF32 matrix products on Ampere or newer GPUs: faster, slightly less precise",
                              group=MODEL, resumable=True)
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass: less memory, slower",
                                          group=MODEL, resumable=True)  # the same gradients
    compile: bool = option(False, "torch.compile the UNet (inductor; CUDA graphs on a GPU, where the small "
                           "backbone's steps are bound by kernel launches); on a CPU the first step takes minutes and "
                           "later ones are no faster", group=MODEL, resumable=True)  # accelerate's dynamo plugin
    use_ema: bool = option(False, "keep an exponential moving average of the weights and save it", group=MODEL)
    ema_decay: float = option(0.9999, "EMA decay (with warm-up)", group=MODEL, rule=number(0, 1))
    snr_gamma: float | None = option(None, "Min-SNR weighting gamma (5.0 is usual)", group=MODEL, shown="none: off",
                                     rule=number(above=0))
    noise_offset: float = option(0.0, "offset noise: each image and channel gets noise_offset x N(0, 1) added to its "
                                 "noise, as diffusers' --noise_offset (0.1 is usual; 0: off)", group=MODEL,
                                 rule=number(0))
    # flow-matching backbones (SD3, Flux): as diffusers' DreamBooth-LoRA scripts for them
    weighting_scheme: str | None = option(None, "how a flow-matching backbone (SD3, Flux) draws its timesteps and "
                                          "weights its loss", group=FLOW, choices=WEIGHTING_SCHEMES,
                                          shown="logit_normal SD3, none Flux", rule=one_of(*WEIGHTING_SCHEMES))
    logit_mean: float = option(0.0, "mean of the logit_normal timestep density", group=FLOW)
    logit_std: float = option(1.0, "std of the logit_normal timestep density", group=FLOW, rule=number(above=0))
    mode_scale: float = option(1.29, "scale of the mode timestep density", group=FLOW)
    max_sequence_length: int | None = option(None, "T5 tokens per caption (SD3, Flux); the cache holds this many "
                                             "states per distinct caption", group=FLOW,
                                             shown="77 SD3, 512 Flux",
                                             rule=integer(1, 512, why="the SD3 and Flux pipelines read at most 512"))
    # bookkeeping: what a resumed run may change
    checkpointing_steps: int | None = option(None, "save the training state every N steps", group=BOOKS,
                                             shown="none: no checkpoint", resumable=True, rule=integer(1))
    checkpoints_total_limit: int | None = option(None, "keep at most this many checkpoints", group=BOOKS,
                                                 shown="none: all", resumable=True, rule=integer(1))
    resume_from_checkpoint: str | None = option(None, "'latest' or a checkpoint folder of the run in --output-dir",
                                                group=BOOKS, shown="none: start afresh", resumable=True)
    validation_prompts: list[str] | None = option(None, "sample these prompts every --validation-steps into "
                                                  "OUTPUT_DIR/validation", group=BOOKS,
                                                  aliases=("--validation-prompt",), metavar="PROMPT", shown="none",
                                                  resumable=True)
    validation_steps: int = option(500, "steps between validation images", group=BOOKS, resumable=True,
                                   rule=integer(1))
    num_validation_images: int = option(4, "images per validation prompt", group=BOOKS, resumable=True,
                                        rule=integer(1))
    overwrite: bool = option(False, "replace a run already in --output-dir", group=BOOKS, resumable=True)
    report_to: str | None = option(None, "log loss, learning rate and validation images to this tracker (wandb: pip "
                                   "install 'pogdiff[wandb]')", group=BOOKS, choices=TRACKERS, shown="none",
                                   resumable=True, rule=one_of(*TRACKERS))
    logging_dir: str = option("logs", "the tracker's folder, under --output-dir", group=BOOKS, resumable=True)
    tracker_project_name: str = option("pogdiff", "the project name the tracker logs under", group=BOOKS,
                                       resumable=True)
    ddp_timeout: int = option(DEFAULT_TIMEOUT_S, "seconds a process of `accelerate launch` waits for the others (e.g. while "
                              "one builds the neighbour table)", group=BOOKS, resumable=True)
    log_rows: bool = option(False, "write OUTPUT_DIR/rows-rank<R>.jsonl: the rows each process trained on per "
                            "micro-step and digests of its tables and weights (checks multi-process runs)",
                            group=BOOKS, resumable=True)  # pogdiff.training.row_log
    # method: its loss's constructor options (pogdiff.objectives.losses, pogdiff.cli.add_method_options), and the row sampler
    method_options: dict = option({})
    sampler: str | None = option(None, "which rows a batch holds: uniform (an epoch shuffle) or balanced (every "
                                 "identity equally often; without identities, by inverse text density)",
                                 group=SAMPLER, choices=SAMPLERS, shown="uniform; balanced for resample")
    density_max_ratio: float = option(10.0, "balanced sampler without identities: clip inverse text-density weights "
                                      "to [1/r, r] x the median", group=SAMPLER, rule=number(1))
    vae_latent_dim: int = option(8, "latent size of the text-density VAE, Eq. 10", group=TEXT_DENSITY, rule=integer(1))
    # small backbone from scratch (the shipped one has its own): pogdiff pretrain's flags
    text_max_length: int = option(24, rule=integer(1, 512, why="MiniLM reads at most 512 tokens"))
    block_out_channels: tuple[int, ...] = option((32, 64, 64))
    cache_dir: str | None = option(None, resumable=True)  # every command's --cache-dir
    progress: bool = option(True, resumable=True)  # every command's --no-progress


# Sec. 4.1: lr 1e-5; large sets 12,000 steps at 8 x 4; small/medium 6,000 steps at 8 x 1.
PAPER_PRESETS = {
    "paper-large": {"learning_rate": 1e-5, "train_batch_size": 8, "gradient_accumulation_steps": 4,
                    "max_train_steps": 12000},
    "paper-small": {"learning_rate": 1e-5, "train_batch_size": 8, "gradient_accumulation_steps": 1,
                    "max_train_steps": 6000},
}


def train_options() -> dict[str, Declared]:
    """Every TrainConfig field (in order) with its declaration."""
    return {f.name: f.metadata["option"] for f in fields(TrainConfig)}


def config_fields() -> set[str]:
    """The names of TrainConfig's fields."""
    return set(train_options())


# Options a resumed run may change: how long it runs, what it logs and saves, where it caches, and how it computes
# the same steps (gradient checkpointing, torch.compile).
RESUMABLE_CHANGES = frozenset(name for name, declared in train_options().items() if declared.resumable)


def check_sampler(sampler: str, where: str = "") -> None:
    """Refuse a row sampler that is not one of SAMPLERS (``where``: what names it, e.g. a benchmark row)."""
    if sampler not in SAMPLERS:
        raise PogdiffError(f"{where}unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")


RULES: dict[str, Rule] = {
    # every command
    "seed": integer(0, SEED_MAX), "seeds": integer(0, SEED_MAX),
    # train and encode: each TrainConfig field's own (its flag, e.g. --lora-rank, in benchmark and pretrain too)
    **{name: declared.rule for name, declared in train_options().items() if declared.rule is not None},
    # method options (Eqs. 8, 9, 11; CBDM)
    "k": integer(1),
    "a1": number(0, why="Eq. 9's exponents must be >= 0"), "a2": number(0, why="Eq. 9's exponents must be >= 0"),
    "a3": number(above=0, why="Eq. 11 needs a3 > 0: it divides by it"),
    "psi_txt_max_ratio": number(1), "tau": number(0),
    # sampling and evaluation
    "num_images": integer(1), "num_images_few": integer(1), "few_max_images": integer(1),
    "max_identities": integer(1),
    "num_inference_steps": integer(1, TRAIN_TIMESTEPS, why="DDIM steps, at most the training timesteps"),
    "guidance_scale": number(0), "recall_threshold": number(-1, 1, why="a cosine similarity"),
    "prompt_template": PROMPT_TEMPLATE,
    # data agedb, digiface, vggface2
    "max_heldout": integer(0), "captioner_batch_size": integer(1),
}

COMMAND_RULES: dict[str, dict[str, Rule]] = {
    "data synth": {"resolution": integer(8, why="the portraits need 8 pixels"),
                   "people": integer(2), "images_per_person": integer(1)},
}


def rule_for(command: str, dest: str) -> Rule | None:
    return COMMAND_RULES.get(command, {}).get(dest) or RULES.get(dest)


def check_values(values: dict[str, Any], command: str = "train") -> None:
    """Refuse the first value (None: not given) that its option's rule does not allow, naming the option."""
    for dest, value in values.items():
        rule = rule_for(command, dest)
        refusal = rule.refusal(value) if rule is not None and value is not None else None
        if refusal:
            raise PogdiffError(f"{flag_name(dest)}: {refusal}")


def flag_name(dest: str) -> str:
    """The command-line flag of an option (a method option may have its own, e.g. tau: --cbdm-tau)."""
    from pogdiff.objectives.losses import METHODS

    for loss in METHODS.values():
        if dest in loss.OPTION_FLAGS:
            return loss.OPTION_FLAGS[dest]
    return "--" + dest.replace("_", "-")


class HelpFormatter(argparse.HelpFormatter):
    """``--help`` naming an option's value once after all its names (``--pretrained,
    --pretrained_model_name_or_path PATH``), its lines never broken at a hyphen (``docs/stable-diffusion.md``)."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(self._whitespace_matcher.sub(" ", text).strip(), width, break_on_hyphens=False)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return textwrap.fill(self._whitespace_matcher.sub(" ", text).strip(), width, initial_indent=indent,
                             subsequent_indent=indent, break_on_hyphens=False)

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not action.option_strings:
            return super()._format_action_invocation(action)
        names = ", ".join(action.option_strings)
        if action.nargs == 0:
            return names
        return f"{names} {self._format_args(action, self._get_default_metavar_for_optional(action))}"


class OneLineErrorParser(argparse.ArgumentParser):
    """Parse errors as every other error: one line ``pogdiff: error: ...; <fix>``, exit code 2, no usage block.

    Options are never abbreviated (``--lora`` is not ``--lora-rank``): an option pogdiff does not have is an error.
    """

    def __init__(self, *args, allow_abbrev: bool = False, formatter_class=HelpFormatter, **kwargs):
        super().__init__(*args, allow_abbrev=allow_abbrev, formatter_class=formatter_class, **kwargs)

    def error(self, message: str):
        fix = "" if ";" in message else f"; see {self.prog} --help"
        print(f"pogdiff: error: {message}{fix}", file=sys.stderr)
        sys.exit(2)


def install_rules(parser: argparse.ArgumentParser, command: str = "") -> argparse.ArgumentParser:
    """Give every option of ``parser`` and its subcommands that has a rule a type that checks it."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, subparser in action.choices.items():
                install_rules(subparser, f"{command} {name}".strip())
            continue
        rule = rule_for(command, action.dest)
        if rule is not None and not hasattr(action.type, "rule"):
            action.type = _checked(action.type or str, rule)
    return parser


def accept_underscores(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Accept every ``--long-option`` of ``parser`` and its subcommands as ``--long_option`` too, the spelling of
    diffusers' training scripts (``--output_dir``, ``--train_batch_size``).

    The underscore spelling is only looked up: ``--help`` and the errors name the option as pogdiff spells it.
    """
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                accept_underscores(subparser)
            continue
        for name in [s for s in action.option_strings if s.startswith("--")]:
            parser._option_string_actions.setdefault("--" + name[2:].replace("-", "_"), action)
    return parser


def _checked(convert: Callable[[str], Any], rule: Rule) -> Callable[[str], Any]:
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            kind = {int: "an integer", float: "a number"}.get(convert, "a valid value")
            raise argparse.ArgumentTypeError(f"{text} is not {kind}; pass {rule.allowed}") from None
        refusal = rule.refusal(value, typed=text)
        if refusal:
            raise argparse.ArgumentTypeError(refusal)
        return value

    parse.rule = rule
    return parse


def option_defaults() -> dict:
    """Each training option's default, as JSON would hold it (what a checkpoint record of a version without the
    option means by leaving it out)."""
    return {f.name: list(f.default) if isinstance(f.default, tuple) else f.default
            for f in fields(TrainConfig) if f.default is not MISSING}
