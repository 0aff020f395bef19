"""--compile: the UNet wrapped by accelerate's dynamo plugin trains, checkpoints and resumes as the eager one.

Inductor compiles for minutes on a CPU (benchmarks/pretrain_throughput.py measures it), so the runs here use
dynamo's "eager" backend: the same graph capture, wrapping and unwrapping, without the code generation.
"""

import pytest
import torch
from safetensors.torch import load_file

from pogdiff.training import train as train_module
from pogdiff.training.train import TrainConfig, train


def weights(run):
    return load_file(run / "unet" / "diffusion_pytorch_model.safetensors")


@pytest.fixture
def eager_backend(monkeypatch):
    plugins, real, compile_ = [], train_module.TorchDynamoPlugin, torch.compile

    def plugin(**kwargs):
        plugins.append(kwargs)
        return real(**{**kwargs, "backend": "eager"})

    def compiled(model, **kwargs):
        plugins.append(type(model).__name__)
        return compile_(model, **kwargs)

    monkeypatch.setattr(train_module, "TorchDynamoPlugin", plugin)
    monkeypatch.setattr(torch, "compile", compiled)
    return plugins


def test_a_compiled_run_trains_checkpoints_and_resumes_as_the_eager_one(toy_data, tmp_path, cache_dir, eager_backend):
    common = dict(method="pogdiff", max_train_steps=3, train_batch_size=4, checkpointing_steps=2, use_ema=True,
                  cache_dir=str(cache_dir), progress=False)
    eager = train(TrainConfig(str(toy_data), str(tmp_path / "eager"), **common))
    assert eager_backend == []
    compiled = train(TrainConfig(str(toy_data), str(tmp_path / "compiled"), compile=True, **common))
    # what a CPU gets (a GPU: reduce-overhead), and the UNet compiled by accelerate
    assert eager_backend == [{"backend": "inductor", "mode": "default"}, "UNet2DConditionModel"]
    a, b = weights(eager), weights(compiled)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert (compiled / "checkpoint-2" / "trained_weights.safetensors").is_file()

    (compiled / "pogdiff_run.json").unlink()  # as if killed after checkpoint-2
    for name in ("unet", "scheduler"):
        for file in (compiled / name).iterdir():
            file.unlink()
    train(TrainConfig(str(toy_data), str(compiled), compile=True, resume_from_checkpoint="latest", **common))
    c = weights(compiled)
    assert all(torch.equal(b[k], c[k]) for k in b)  # resumed exactly
