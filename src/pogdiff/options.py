"""What each command-line option allows: one table, checked when the command line is parsed.

A value out of range is refused by argparse before any work, on one line that names the
option and the allowed range (``pogdiff: error: argument --train-batch-size: 0 is out of
range; pass an integer >= 1``). The Python entry points (:func:`pogdiff.train.train`,
:func:`pogdiff.evaluation.evaluate.evaluate_runs`) check their arguments against the same
table with :func:`check_values`, and so does a benchmark row (``cbdm:tau=-1``).
"""

from __future__ import annotations

import argparse
import math
import sys
import textwrap
from dataclasses import dataclass
from typing import Any, Callable

from pogdiff.errors import PogdiffError

SEED_MAX = 2**32 - 1  # numpy and accelerate seed with 32 bits
TRAIN_TIMESTEPS = 1000  # both backbones' noise schedules: DDIM cannot take more steps than this
LR_SCHEDULERS = ("constant", "linear", "cosine", "cosine_with_restarts", "polynomial", "constant_with_warmup")
PREDICTION_TYPES = ("epsilon", "v_prediction")  # what the UNet predicts, as diffusers' --prediction_type
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
    """A str.format template whose only field is {name}, present at least once."""
    try:
        return "{name}" in text and isinstance(text.format(name=""), str)
    except (KeyError, IndexError, ValueError):
        return False


PROMPT_TEMPLATE = Rule(_is_prompt_template, "a prompt with {name} where each identity's name goes, e.g. "
                       "'A photo of {name}.' (write a literal brace twice: {{ }})",
                       problem="is not a template holding {name}")

RULES: dict[str, Rule] = {
    # every command
    "seed": integer(0, SEED_MAX), "seeds": integer(0, SEED_MAX),
    # train: model and data
    "lora_rank": integer(1), "lora_alpha": number(above=0),
    "resolution": integer(8, multiple_of=8, why="the UNet and the VAE halve it at each level"),
    "text_max_length": integer(1, 512, why="MiniLM reads at most 512 tokens"),
    "caption_dropout": number(0, 1, why="a probability"), "dataloader_num_workers": integer(0),
    "k": integer(1), "vae_latent_dim": integer(1),
    # train: optimisation and bookkeeping
    "train_batch_size": integer(1), "gradient_accumulation_steps": integer(1), "max_train_steps": integer(1),
    "num_train_epochs": integer(1),
    "learning_rate": number(above=0), "lr_scheduler": one_of(*LR_SCHEDULERS), "lr_warmup_steps": integer(0),
    "adam_beta1": BETA, "adam_beta2": BETA, "adam_epsilon": number(0), "adam_weight_decay": number(0),
    "max_grad_norm": number(above=0), "noise_offset": number(0),
    "prediction_type": one_of(*PREDICTION_TYPES), "report_to": one_of(*TRACKERS),
    "mixed_precision": HALF_PRECISION,
    "ema_decay": number(0, 1), "snr_gamma": number(above=0),
    "checkpointing_steps": integer(1), "checkpoints_total_limit": integer(1),
    "validation_steps": integer(1), "num_validation_images": integer(1),
    # method options (Eqs. 9, 11; CBDM; resampling)
    "a1": number(0, why="Eq. 9's exponents must be >= 0"), "a2": number(0, why="Eq. 9's exponents must be >= 0"),
    "a3": number(above=0, why="Eq. 11 needs a3 > 0: it divides by it"),
    "psi_txt_max_ratio": number(1), "tau": number(0), "density_max_ratio": number(1),
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
    from pogdiff.losses import METHODS

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
