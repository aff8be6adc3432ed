"""DeepSpeed ZeRO checkpoints resume on another number of processes, like DDP and FSDP2 ones:
real runs (gloo on CPU) resumed twice (ZeRO-2 on 1 process -> ZeRO-3 on 2 -> ZeRO-3 on 1), against
the uninterrupted 9-step run on one process that the other resume tests share; and bf16 ZeRO-3 on 2
processes resumed as ZeRO-1 on 1."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import COMMON, final_weights, losses, run
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from maescale import checkpoint
from maescale.config import load_config
from maescale.errors import CheckpointError
from maescale.metrics import read_metrics
from maescale.models import build_model
from maescale.train import pretrain

pytestmark = pytest.mark.deepspeed

# (ZeRO stage, processes, last step) of each run: ZeRO-2 resumes as ZeRO-3 on more processes, and
# ZeRO-3 resumes on fewer. One chain of runs, not one per case: most of a run is spent starting up.
CHAIN = [(2, 1, 3), (3, 2, 6), (3, 1, 9)]
TOTAL_STEPS = CHAIN[-1][2]  # as in the shared uninterrupted run
# In the warmup the weights move by ~4e-5 in the first 6 steps, while 2 processes differ from
# one by ~1e-6 (reduction order): a resume that lost the weights or the moments shows.
WEIGHT_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def resumed(tmp_path_factory) -> tuple[Path, list[str]]:
    """The run folder of the chain and the output of each of its runs."""
    out = tmp_path_factory.mktemp("zero") / "run"
    outputs = []
    for stage, processes, last_step in CHAIN:
        zero = [f"parallel.strategy=zero{stage}"]
        result = run(out, processes, *zero, steps=last_step)
        outputs.append(result.stdout + result.stderr)
    return out, outputs


def adam_moments_of_dcp_checkpoint(path: Path, scratch: Path) -> dict[str, dict[str, torch.Tensor]]:
    dcp_to_torch_save(path, scratch / "consolidated.pt")
    return torch.load(scratch / "consolidated.pt", weights_only=False)["optim"]["state"]


def test_zero_resumes_on_fewer_and_on_more_processes(straight_nine_steps_run, resumed, tmp_path):
    straight = straight_nine_steps_run
    out, outputs = resumed
    root = checkpoint.checkpoint_root(out)
    for (_, _, saved_at), (stage, processes, _), output in zip(CHAIN, CHAIN[1:], outputs[1:]):
        assert f"resumed from {root / checkpoint.step_name(saved_at)} at step {saved_at}" in output
        strategy = rf"zero{stage}: partitioned over {processes}, fp32 on {processes} process\(es\) \(cpu, gloo[^)]*\)"
        assert re.search(strategy, output), output[-2000:]
    assert [row["step"] for row in read_metrics(out)] == list(range(1, TOTAL_STEPS + 1))
    assert losses(out) == pytest.approx(losses(straight), rel=1e-4)
    reference = final_weights(straight)
    for key, value in final_weights(out).items():
        assert torch.allclose(value, reference[key], atol=WEIGHT_TOLERANCE, rtol=1e-4), key
    # the optimizer state went through every resume whole: AdamW's moments and step count
    final = checkpoint.latest(root)
    index = json.loads(checkpoint.zero_index_file(final).read_text())
    assert index["adam_step"] == TOTAL_STEPS
    expected = adam_moments_of_dcp_checkpoint(checkpoint.latest(checkpoint.checkpoint_root(straight)), tmp_path)
    assert set(index["parameters"]) == set(expected)
    for name in index["parameters"]:
        saved = load_file(checkpoint.zero_tensor_file(final, name))
        for key in checkpoint.ADAM_MOMENTS:
            scale = expected[name][key].abs().max()
            assert (saved[key] - expected[name][key]).abs().max() <= 1e-4 * scale, f"{name} {key}"


def test_a_zero_checkpoint_does_not_resume_under_another_strategy(resumed, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(resumed[0], out)  # the attempt rewrites the run's config.yaml
    with pytest.raises(CheckpointError, match="written with DeepSpeed"):
        pretrain(load_config(None, [*COMMON, f"output_dir={out}", "data.batch_size=16", "train.max_steps=12"]))


def test_a_damaged_zero_checkpoint_is_a_clear_error(resumed, tmp_path):
    out, _ = resumed
    damaged = tmp_path / checkpoint.CHECKPOINTS / checkpoint.step_name(TOTAL_STEPS)
    shutil.copytree(checkpoint.latest(checkpoint.checkpoint_root(out)), damaged)
    model = build_model("mae_vit_micro_patch4")
    weights = checkpoint.zero_tensor_file(damaged, "blocks.0.attn.qkv.weight")
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(damaged))} cannot be loaded .* delete "):
        checkpoint.load_model_weights(model, damaged)
    checkpoint.zero_index_file(damaged).unlink()
    with pytest.raises(CheckpointError, match=rf"{checkpoint.ZERO_INDEX} is missing or damaged"):
        checkpoint.load_model_weights(model, damaged)


def zero_checkpoint_tensors(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Each parameter's fp32 master and AdamW moments in a `zero/` checkpoint."""
    names = json.loads(checkpoint.zero_index_file(path).read_text())["parameters"]
    return {name: load_file(checkpoint.zero_tensor_file(path, name)) for name in names}


def distance(a: dict, b: dict, key: str) -> float:
    """Norm over the whole model of the difference of one kind of tensor (master, moment)."""
    return sum(((a[name][key] - b[name][key]).double() ** 2).sum() for name in a).sqrt().item()


def test_a_bf16_zero3_run_resumes_as_zero1_on_one_process(tmp_path):
    """bf16 keeps bf16 weights beside the fp32 masters: the masters and moments carry on, whole.

    1 and 2 processes differ by bf16 rounding of the gradients, so the resumed run is compared with
    the uninterrupted one relative to how far each tensor moved in the 3 steps after the resume:
    measured 0.013 of it (masters), 0.05 / 0.11 (moments). Resuming the masters from the bf16
    weights measured 0.26, zeroed moments moved the masters by 0.37.
    """
    bf16 = ["train.precision=bf16"]
    straight, out = tmp_path / "straight", tmp_path / "run"
    run(straight, 2, *bf16, "parallel.strategy=zero3", steps=6)
    run(out, 2, *bf16, "parallel.strategy=zero3", steps=3)
    result = run(out, 1, *bf16, "parallel.strategy=zero1", steps=6)
    assert "at step 3" in result.stdout + result.stderr and "zero1: partitioned over 1" in result.stdout
    assert losses(out)[:3] == losses(straight)[:3]
    assert losses(out)[3:] == pytest.approx(losses(straight)[3:], rel=2e-3)
    steps = checkpoint.checkpoint_root(straight)
    before, expected = (zero_checkpoint_tensors(steps / checkpoint.step_name(step)) for step in (3, 6))
    resumed = zero_checkpoint_tensors(checkpoint.latest(checkpoint.checkpoint_root(out)))
    bounds = {checkpoint.MASTER_WEIGHT: 0.1, "exp_avg": 0.25, "exp_avg_sq": 0.25}
    for key, bound in bounds.items():
        off, moved = distance(resumed, expected, key), distance(before, expected, key)
        assert off <= bound * moved, f"{key}: {off:.3g} off the uninterrupted run, which moved {moved:.3g}"
