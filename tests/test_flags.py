"""Command-line names and flags (issue 29): diffusers' option names, the flags a diffusers or kohya user
looks for, each doing what it says, --prompt-template, and --help everywhere.
"""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import types

import pytest
import torch
from PIL import Image
from test_scale import SRC
from test_stable_diffusion import sd_data, tiny_sd  # noqa: F401 (fixtures)

from pogdiff.backbones.backbone import load_backbone
from pogdiff.backbones.stable_diffusion import StableDiffusionBackbone
from pogdiff.cli import build_parser, main, train_config
from pogdiff.data.dataset import load_dataset
from pogdiff.objectives.losses import VanillaLoss
from pogdiff.training.train import TrainConfig, train_steps

DOCS = SRC.parent / "docs"


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code, err, *expected):
    assert code == 2 and err.startswith("pogdiff: error: ") and len(err.strip().splitlines()) == 1, err
    for text in expected:
        assert text in err, err


def run_info(run):
    return json.loads((run / "pogdiff_run.json").read_text())


def small_train(toy_data, out, cache_dir, *options):
    """A 1-step vanilla run of the shipped small backbone on the toy set, options appended."""
    return ["train", toy_data, "--output-dir", out, "--method", "vanilla", "--max-train-steps", 1,
            "--train-batch-size", 4, "--cache-dir", cache_dir, "--no-progress", *options]


# --- diffusers' option names ---

def test_the_diffusers_command_line_of_issue_29_runs(tiny_sd, sd_data, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "train", sd_data, "--pretrained_model_name_or_path", tiny_sd, "--output_dir", out,
                           "--train_batch_size", 2, "--max_train_steps", 1, "--rank", 4, "--mixed_precision", "bf16",
                           "--cache_dir", tmp_path / "cache", "--no_progress")
    assert code == 0, err
    info = run_info(out)
    assert info["mixed_precision"] == "bf16" and info["steps"] == 1
    assert info["lora_rank"] == 4 and info["config"]["train_batch_size"] == 2
    assert (out / "pytorch_lora_weights.safetensors").is_file()


DIFFUSERS_NAMES = [  # (diffusers' spelling, pogdiff's, the TrainConfig field and value both give)
    (["--train_data_dir", "D"], ["D"], "data_dir", "D"),
    (["D", "--pretrained_model_name_or_path", "sd"], ["D", "--pretrained", "sd"], "pretrained", "sd"),
    (["D", "--rank", "8"], ["D", "--lora-rank", "8"], "lora_rank", 8),
    (["D", "--validation_prompt", "a b"], ["D", "--validation-prompts", "a b"], "validation_prompts", ["a b"]),
    (["D", "--validation_prompts", "a", "b"], ["D", "--validation-prompts", "a", "b"], "validation_prompts",
     ["a", "b"]),
    (["D", "--gradient_accumulation_steps", "3"], ["D", "--gradient-accumulation-steps", "3"],
     "gradient_accumulation_steps", 3),
    (["D", "--learning_rate", "1e-4"], ["D", "--learning-rate", "1e-4"], "learning_rate", 1e-4),
    (["D", "--resume_from_checkpoint", "latest"], ["D", "--resume-from-checkpoint", "latest"],
     "resume_from_checkpoint", "latest"),
    (["D", "--checkpointing_steps", "5"], ["D", "--checkpointing-steps", "5"], "checkpointing_steps", 5),
    (["D", "--dataloader_num_workers", "2"], ["D", "--dataloader-num-workers", "2"], "dataloader_num_workers", 2),
    (["D", "--center_crop"], ["D"], "center_crop", True),
    (["D", "--random_flip"], ["D", "--random-flip"], "random_flip", True),
    (["D", "--snr_gamma", "5"], ["D", "--snr-gamma", "5"], "snr_gamma", 5.0),
    (["D", "--adam_weight_decay", "0"], ["D", "--adam-weight-decay", "0"], "adam_weight_decay", 0.0),
    (["D", "--max_grad_norm", "2"], ["D", "--max-grad-norm", "2"], "max_grad_norm", 2.0),
    (["D", "--num_train_epochs", "3"], ["D", "--num-train-epochs", "3"], "num_train_epochs", 3),
    (["D", "--report_to", "tensorboard"], ["D", "--report-to", "tensorboard"], "report_to", "tensorboard"),
]


@pytest.mark.parametrize("diffusers, pogdiff, field, value", DIFFUSERS_NAMES,
                         ids=[next(a for a in c[0] if a.startswith("--")) for c in DIFFUSERS_NAMES])
def test_diffusers_names_mean_what_pogdiff_names_mean(diffusers, pogdiff, field, value, tmp_path):
    def config(argv):
        return train_config(build_parser().parse_args(["train", *argv, "--output-dir", str(tmp_path)]))

    assert getattr(config(diffusers), field) == getattr(config(pogdiff), field) == value


@pytest.mark.parametrize("abbreviated, value", [("--lora", 4), ("--out", "run")])
def test_options_are_never_abbreviated(abbreviated, value, toy_data, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, "train", toy_data, "--output-dir", "run", abbreviated, value)
    assert_one_line_error(code, err, f"unrecognized arguments: {abbreviated}")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("option, value, allowed", [
    ("--adam-beta1", "1", "a number in [0, 1)"), ("--adam-beta2", "-0.1", "a number in [0, 1)"),
    ("--adam-epsilon", "-1", "a finite number >= 0"), ("--adam-weight-decay", "-1", "a finite number >= 0"),
    ("--max-grad-norm", "0", "a finite number > 0"), ("--noise-offset", "-0.1", "a finite number >= 0"),
    ("--num-train-epochs", "0", "an integer >= 1"), ("--lora-alpha", "0", "a finite number > 0"),
    ("--dataloader-num-workers", "-1", "an integer >= 0"),
])
def test_new_option_values_out_of_range_are_refused_when_parsed(option, value, allowed, capsys):
    code, _, err = run_cli(capsys, "train", "DATA", "--output-dir", "run", option, value)
    assert_one_line_error(code, err, f"argument {option}: {value} is out of range; pass {allowed}")


@pytest.mark.parametrize("argv, expected", [
    (["--output-dir", "out"], "no dataset: pass DATA"),
    (["A", "--train_data_dir", "B", "--output-dir", "out"], "name two datasets"),
], ids=["no data", "two datasets"])
def test_the_dataset_is_named_once(argv, expected, capsys):
    assert_one_line_error(*run_cli(capsys, "train", *argv)[::2], expected)


# --- mixed precision: unset means accelerate's ---

def test_accelerate_launch_mixed_precision_is_not_overridden(toy_data, tmp_path, cache_dir):
    """`accelerate launch --mixed_precision bf16` without --mixed-precision trains in bf16, as the run records."""
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(SRC)}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
              "--mixed_precision", "bf16", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1",
              "-m", "pogdiff.cli", *small_train(toy_data, run, cache_dir)]
    done = subprocess.run([str(a) for a in launch], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    info = run_info(run)
    assert info["mixed_precision"] == "bf16" and info["config"]["mixed_precision"] is None


def test_unset_precision_is_accelerates_and_a_typed_one_wins(toy_data, tmp_path, cache_dir, capsys, monkeypatch):
    assert run_cli(capsys, *small_train(toy_data, tmp_path / "plain", cache_dir))[0] == 0
    assert run_info(tmp_path / "plain")["mixed_precision"] == "no"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what accelerate launch and accelerate config set
    assert run_cli(capsys, *small_train(toy_data, tmp_path / "typed", cache_dir, "--mixed-precision", "no"))[0] == 0
    assert run_info(tmp_path / "typed")["mixed_precision"] == "no"
    if not torch.cuda.is_available():
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
        code, _, err = run_cli(capsys, *small_train(toy_data, tmp_path / "fp16", cache_dir))
        assert_one_line_error(code, err, "accelerate's mixed precision is fp16", "--mixed-precision bf16 or no")
        assert not (tmp_path / "fp16").exists()


# --- the flags diffusers and kohya users look for ---

def test_optimizer_flags_reach_adamw(toy_data, tmp_path, cache_dir, capsys):
    """--adam-*, --scale-lr and --allow-tf32, read back from the optimizer state of a checkpoint."""
    run = tmp_path / "run"
    tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        code, _, err = run_cli(capsys, *small_train(
            toy_data, run, cache_dir, "--max-train-steps", 2, "--checkpointing-steps", 1, "--adam-beta1", 0.8,
            "--adam-beta2", 0.95, "--adam-epsilon", 1e-6, "--adam-weight-decay", 0.05, "--max-grad-norm", 0.5,
            "--learning-rate", 1e-4, "--scale-lr", "--allow-tf32"))
        assert code == 0, err
        assert torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    (group,) = torch.load(run / "checkpoint-1" / "optimizer.bin", weights_only=True)["param_groups"]
    assert group["betas"] == (0.8, 0.95) and group["eps"] == 1e-6 and group["weight_decay"] == 0.05
    assert group["initial_lr"] == pytest.approx(4e-4)  # 1e-4 x batch 4 x 1 process x accumulation 1
    config = run_info(run)["config"]
    assert config["learning_rate"] == pytest.approx(4e-4) and config["max_grad_norm"] == 0.5


def test_noise_offset_shifts_each_channel_of_the_noise_by_a_constant():
    from diffusers import DDPMScheduler

    from pogdiff.objectives.forward_process import DDPMProcess

    scheduler = DDPMScheduler(num_train_timesteps=100)
    x0 = torch.randn(3, 4, 8, 8)
    noise = {}
    for offset in (0.0, 0.5):
        torch.manual_seed(0)
        noise[offset] = VanillaLoss(DDPMProcess(scheduler), None, noise_offset=offset).diffuse(x0)[2]
    shift = noise[0.5] - noise[0.0]
    assert shift.abs().min() > 0 and torch.allclose(shift, shift[:, :, :1, :1].expand_as(shift))
    torch.manual_seed(0)
    torch.randn_like(x0)
    assert torch.allclose(shift, 0.5 * torch.randn(3, 4, 1, 1).expand_as(shift))  # diffusers' draw


def test_noise_offset_and_prediction_type_are_trained_with_and_saved(toy_data, tmp_path, cache_dir, capsys):
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, *small_train(toy_data, run, cache_dir, "--prediction-type", "v_prediction",
                                                "--noise-offset", 0.1))
    assert code == 0, err
    saved = json.loads((run / "scheduler" / "scheduler_config.json").read_text())
    assert saved["prediction_type"] == "v_prediction"
    assert load_backbone(run).scheduler.config.prediction_type == "v_prediction"
    assert run_info(run)["config"]["noise_offset"] == 0.1


def test_prediction_type_is_saved_with_a_stable_diffusion_run(tiny_sd, sd_data, tmp_path, capsys):
    full, lora = tmp_path / "full", tmp_path / "lora"
    common = [sd_data, "--pretrained", tiny_sd, "--method", "vanilla", "--max-train-steps", 1, "--train-batch-size", 4,
              "--prediction-type", "v_prediction", "--cache-dir", tmp_path / "cache", "--no-progress"]
    assert run_cli(capsys, "train", *common, "--output-dir", full)[0] == 0
    assert json.loads((full / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "v_prediction"
    assert run_cli(capsys, "train", *common, "--output-dir", lora, "--lora-rank", 2)[0] == 0
    assert load_backbone(lora).scheduler.config.prediction_type == "v_prediction"  # the base's says epsilon


def lora_scaling(unet):
    """The scale of each LoRA layer's one adapter (named 'default' when added, 'default_0' when loaded)."""
    return {name: scale for name, module in unet.named_modules() if hasattr(module, "scaling")
            for scale in module.scaling.values()}


def test_lora_alpha_and_target_modules_shape_the_adapters(tiny_sd, sd_data, tmp_path, capsys):
    backbone = StableDiffusionBackbone.from_pretrained(tiny_sd, 4, 8.0, ("to_q", "to_v"))
    scaling = lora_scaling(backbone.denoiser)
    assert scaling and set(scaling.values()) == {2.0}  # alpha / rank
    assert {name.rsplit(".", 1)[-1] for name in scaling} == {"to_q", "to_v"}
    assert set(lora_scaling(StableDiffusionBackbone.from_pretrained(tiny_sd, 4).denoiser).values()) == {1.0}

    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", sd_data, "--pretrained", tiny_sd, "--output-dir", run,
                           "--method", "vanilla", "--max-train-steps", 1, "--train-batch-size", 4, "--rank", 4,
                           "--lora-alpha", 8, "--lora-target-modules", "to_q", "to_v",
                           "--cache-dir", tmp_path / "cache", "--no-progress")
    assert code == 0, err
    assert run_info(run)["lora_alpha"] == 8 and run_info(run)["lora_target_modules"] == ["to_q", "to_v"]
    assert lora_scaling(load_backbone(run).denoiser) == scaling  # the alpha travels with the saved adapters


@pytest.mark.parametrize("options, expected", [
    (["--lora-target-modules", "nothing_like_this"], "--lora-target-modules nothing_like_this"),
    (["--lora-target-modules", "to_q", "nonsense"], "--lora-target-modules nonsense: no module of the UNet"),
    (["--lora-alpha", 0], "argument --lora-alpha: 0 is out of range"),
], ids=["unknown module", "one unknown module among known ones", "alpha 0"])
def test_bad_lora_options_are_one_line(options, expected, tiny_sd, sd_data, tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", sd_data, "--pretrained", tiny_sd, "--output-dir", tmp_path / "run",
                           "--rank", 4, *options, "--no-progress")
    assert_one_line_error(code, err, expected)


def test_lora_options_need_lora(toy_data, tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", toy_data, "--output-dir", tmp_path / "run", "--lora-alpha", 8)
    assert_one_line_error(code, err, "--lora-alpha shapes LoRA adapters: pass --lora-rank R too")


def test_num_train_epochs_sets_the_steps(toy_data, tmp_path, cache_dir, capsys):
    code, _, err = run_cli(capsys, "train", toy_data, "--output-dir", tmp_path / "run", "--method", "vanilla",
                           "--num-train-epochs", 1, "--train-batch-size", 10, "--cache-dir", cache_dir, "--no-progress")
    assert code == 0, err
    assert run_info(tmp_path / "run")["steps"] == run_info(tmp_path / "run")["config"]["max_train_steps"] == 2
    config = TrainConfig("", "", num_train_epochs=3, gradient_accumulation_steps=2)
    assert train_steps(config, 21, 4) == 3 * 3  # ceil(ceil(21 / 4) / 2) optimizer steps an epoch
    assert train_steps(TrainConfig("", "", num_train_epochs=3, max_train_steps=7), 21, 4) == 7  # steps win
    assert train_steps(TrainConfig("", ""), 21, 4) == 500


@pytest.mark.parametrize("options, package, extra", [
    (["--report-to", "wandb"], "wandb", "pogdiff[wandb]"),
    (["--use-8bit-adam"], "bitsandbytes", "pogdiff[bitsandbytes]"),
], ids=["wandb", "bitsandbytes"])
def test_an_absent_optional_package_is_one_line_naming_the_install(options, package, extra, toy_data, tmp_path,
                                                                    capsys):
    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed")
    code, _, err = run_cli(capsys, "train", toy_data, "--output-dir", tmp_path / "run", *options)
    assert_one_line_error(code, err, f"needs the {package} package", f"pip install '{extra}'")
    assert not (tmp_path / "run").exists()


# --- --dataset-name ---

def test_dataset_name_reads_an_imagefolder_with_metadata_jsonl(toy_data, tmp_path, cache_dir, capsys):
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--dataset_name", toy_data, "--output-dir", run, "--method", "vanilla",
                           "--max-train-steps", 1, "--train-batch-size", 4, "--cache-dir", cache_dir, "--no-progress")
    assert code == 0, err
    assert run_info(run)["config"]["data_dir"] == str(toy_data)


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None, reason="datasets is installed")
def test_dataset_name_without_the_datasets_package_is_one_line(tmp_path, capsys):
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "state.json").write_text("{}")  # what Dataset.save_to_disk writes, with dataset_info.json and arrow files
    code, _, err = run_cli(capsys, "train", "--dataset-name", saved, "--output-dir", tmp_path / "run")
    assert_one_line_error(code, err, "needs the datasets package", "pip install 'pogdiff[datasets]'")


@pytest.mark.parametrize("argv, expected", [
    (["--dataset-name", "no/such/folder"], "not a folder; pogdiff reads local datasets only"),
    (["DATA", "--dataset-name", "DATA"], "both name the dataset"),
], ids=["not a folder", "DATA too"])
def test_bad_dataset_names_are_one_line(argv, expected, toy_data, tmp_path, capsys):
    argv = [str(toy_data) if a == "DATA" else a for a in argv]
    assert_one_line_error(*run_cli(capsys, "train", *argv, "--output-dir", tmp_path / "run")[::2], expected)


class FakeClassLabel:
    def __init__(self, names):
        self.names = names

    def int2str(self, value):
        return self.names[value]


class FakeImage:
    pass


def fake_datasets_module(rows, features):
    """What hf_datasets uses of the datasets package: load_from_disk, Image and ClassLabel features."""
    class Dataset(list):
        pass

    dataset = Dataset(rows)
    dataset.features = features
    return types.SimpleNamespace(load_from_disk=lambda path: {"train": dataset}, Image=FakeImage,
                                 ClassLabel=FakeClassLabel)


def test_a_saved_dataset_is_converted_once_into_the_cache(tmp_path, monkeypatch):
    from pogdiff.data.hf_datasets import dataset_folder

    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "dataset_dict.json").write_text('{"splits": ["train"]}')
    colours = {"Anna": (220, 40, 40), "Bruno": (40, 200, 60)}
    rows = [{"image": Image.new("RGB", (32, 32), colours[name]), "text": f"An image of {name}.", "label": label,
             "extra": [1, 2]} for label, name in enumerate(colours) for _ in range(3)]
    features = {"image": FakeImage(), "text": "string", "label": FakeClassLabel(list(colours)), "extra": "list"}
    monkeypatch.setitem(sys.modules, "datasets", fake_datasets_module(rows, features))

    folder = dataset_folder(saved, cache_dir=tmp_path / "cache")
    assert folder.parent == tmp_path / "cache" / "datasets"
    dataset = load_dataset(folder, identity_column="label")
    assert dataset.identity_counts() == {"Anna": 3, "Bruno": 3}
    first = json.loads((folder / "metadata.jsonl").read_text().splitlines()[0])
    assert first == {"file_name": "images/000000.png", "text": "An image of Anna.", "label": "Anna"}
    assert Image.open(folder / first["file_name"]).getpixel((0, 0)) == colours["Anna"]
    monkeypatch.delitem(sys.modules, "datasets")  # converted once: read from the cache without the package
    assert dataset_folder(saved, cache_dir=tmp_path / "cache") == folder


def test_a_real_saved_dataset_trains(toy_data, tmp_path, cache_dir, capsys):
    datasets = pytest.importorskip("datasets")
    rows = [json.loads(line) for line in (toy_data / "metadata.jsonl").read_text().splitlines()]
    table = datasets.Dataset.from_dict({"image": [str(toy_data / r["file_name"]) for r in rows],
                                        "text": [r["text"] for r in rows], "identity": [r["identity"] for r in rows]})
    table.cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "saved"))
    code, _, err = run_cli(capsys, "train", "--dataset-name", tmp_path / "saved", "--output-dir", tmp_path / "run",
                           "--method", "vanilla", "--max-train-steps", 1, "--train-batch-size", 4,
                           "--cache-dir", cache_dir, "--no-progress")
    assert code == 0, err


# --- --prompt-template ---

def test_evaluate_samples_and_records_the_prompt_template(small_synth, tmp_path, capsys, monkeypatch):
    from pogdiff.evaluation import samples as samples_module

    data, cache = small_synth
    template, out, prompts = "A portrait of {name}, smiling.", tmp_path / "eval", []
    sample_rows = samples_module.sample_rows

    def spy(backbone, asked, *args, **kwargs):
        prompts.extend(asked)
        return sample_rows(backbone, asked, *args, **kwargs)

    monkeypatch.setattr(samples_module, "sample_rows", spy)
    code, _, err = run_cli(capsys, "evaluate", "pogdiff-small-people", "--data", data, "--out", out,
                           "--prompt-template", template, "--num-images", 1, "--num-inference-steps", 2,
                           "--identity-judge", "features", "--cache-dir", cache, "--no-progress")
    assert code == 0, err
    assert prompts and all(p.startswith("A portrait of ") and p.endswith(", smiling.") for p in prompts)
    assert json.loads((out / "metrics.json").read_text())["prompt_template"] == template
    assert "A portrait of {name}, smiling." in (out / "report.html").read_text()


@pytest.mark.parametrize("command", ["evaluate RUN --data D --out O", "benchmark"])
@pytest.mark.parametrize("template", ["An image of a person.", "An image of {person}.", "A photo of {{name}}."])
def test_a_prompt_template_without_name_is_one_line(command, template, capsys):
    code, _, err = run_cli(capsys, *command.split(), "--prompt-template", template)
    assert_one_line_error(code, err, "argument --prompt-template", "is not a template holding {name}")


def test_a_template_that_pushes_the_name_past_the_last_token_is_one_line(small_synth, tmp_path, capsys,
                                                                          monkeypatch):
    from pogdiff.evaluation import samples as samples_module

    data, cache = small_synth
    sampled = []
    monkeypatch.setattr(samples_module, "sample_rows", lambda *args, **kwargs: sampled.append(args) or iter(()))
    template = "A " + "very " * 60 + "old photo of {name}."  # the shipped backbone's text encoder reads 56 tokens
    code, _, err = run_cli(capsys, "evaluate", "pogdiff-small-people", "--data", data, "--out", tmp_path / "eval",
                           "--prompt-template", template, "--num-images", 1, "--num-inference-steps", 2,
                           "--identity-judge", "features", "--cache-dir", cache, "--no-progress")
    assert_one_line_error(code, err, "--prompt-template", "same prompt once cut to the text encoder's 56 tokens")
    assert not sampled


def test_benchmark_records_the_prompt_template(tmp_path):
    from pogdiff.compare.comparison import Budget, describe

    budget = Budget(prompt_template="A photo of {name}.")
    metrics = {"settings": {"data": "d", "budget": vars(budget)}, "num_identities": {"all": 2, "few": 1},
               "identity_judge": "synth", "seeds": [0], "confidence": 0.95}
    assert 'prompt "A photo of {name}."' in describe(metrics)
    assert build_parser().parse_args(["benchmark", "--prompt-template", "A photo of {name}."]).prompt_template == \
        "A photo of {name}."


# --- --help ---

def subcommands(parser, prefix=()):
    """(command words, parser) of every subcommand, nested ones (data synth) included."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, subparser in action.choices.items():
                yield (*prefix, name), subparser
                yield from subcommands(subparser, (*prefix, name))


def test_every_option_has_help_with_its_default_and_every_command_its_docs(capsys):
    commands = list(subcommands(build_parser()))
    assert {" ".join(words) for words, _ in commands} >= {"data synth", "pretrain", "train", "encode", "sample",
                                                          "evaluate", "benchmark", "demo"}
    for words, parser in commands:
        pages = [word.rstrip(",.") for word in (parser.epilog or "").split() if word.startswith("docs/")]
        assert pages and all((DOCS.parent / page).is_file() for page in pages), (words, parser.epilog)
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            name = f"{' '.join(words)} {action.option_strings or action.dest}"
            assert action.help and len(action.help) > 10, name
            takes_value = action.option_strings and action.nargs != 0 and not action.required
            assert not takes_value or "(default: " in action.help, name
        assert main([*words, "--help"]) == 0
    out = capsys.readouterr().out
    assert "--train_batch_size" in out and "--pretrained_model_name_or_path" in out


@pytest.mark.parametrize("command, preset", [("demo", "medium"), ("data synth", "medium"), ("benchmark", "small")])
def test_help_says_which_embedded_preset(command, preset, capsys):
    assert main([*command.split(), "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"the embedded {preset} preset" in out or f"{preset} preset" in out
    assert f"(default: {preset})" in out
