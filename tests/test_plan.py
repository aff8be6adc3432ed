"""`maescale plan`: state bytes by hand, sharding, activation bytes against an exact CPU measurement,
the simulated peak, the batches that fit, the recorded H200 peaks, and the command line."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import run_maescale
from storage_tracker import LiveStorageTracker

from maescale.models import MODEL_SPECS, build_model
from maescale.plan import (
    GIB,
    LOSS_SCALAR_BYTES,
    ActivationDtypes,
    Setup,
    block_saved_bytes_per_token,
    largest_fitting_batch,
    lookup_gpu,
    model_shape,
    outer_activation_bytes,
    shape_of,
    simulate_step,
)

REPO = Path(__file__).resolve().parents[1]
MICRO = "mae_vit_micro_patch4"
# A second small shape, so that no formula fits the micro model by accident.
OTHER = dict(mask_ratio=0.5, decoder_depth=2, decoder_embed_dim=48, decoder_num_heads=3)

# mae_vit_micro_patch4 by hand (width 64, 2 blocks, MLP 256, 32 px images, patch 4 -> 64 patches;
# decoder 32 wide, 1 block, MLP 128):
#   patch embedding 64*3*4*4 + 64 = 3136, cls 64, position table 65*64 = 4160 (frozen),
#   encoder block: norms 2*128, qkv 64*192 + 192, proj 64*64 + 64, fc1 64*256 + 256, fc2 256*64 + 64 = 49984,
#   final norm 128, decoder embedding 64*32 + 32 = 2080, mask token 32, decoder position table 65*32 = 2080
#   (frozen), decoder block: norms 2*64, qkv 32*96 + 96, proj 32*32 + 32, fc1 32*128 + 128, fc2 128*32 + 32
#   = 12704, decoder norm 64, prediction 32*48 + 48 = 1584.
MICRO_PARAMS = 3136 + 64 + 4160 + 2 * 49984 + 128 + 2080 + 32 + 2080 + 12704 + 64 + 1584
MICRO_TRAINABLE = MICRO_PARAMS - 4160 - 2080


def components(strategy: str, world: int, precision: str = "fp32", **setup) -> dict[str, int]:
    memory = simulate_step(model_shape(MICRO), Setup(strategy=strategy, world_size=world, precision=precision,
                                                     batch_size=1, **setup))
    return {key: memory.components[key] for key in ("parameters", "gradients", "optimizer", "master")}


def test_parameter_counts_and_state_bytes_match_a_hand_calculation():
    shape = model_shape(MICRO)
    assert (shape.params, shape.trainable) == (MICRO_PARAMS, MICRO_TRAINABLE) == (126000, 119760)
    p, t = MICRO_PARAMS, MICRO_TRAINABLE
    # DDP: fp32 weights, fp32 gradients of what is trained, AdamW's two fp32 moments; no master copy.
    assert components("ddp", 1) == dict(parameters=4 * p, gradients=4 * t, optimizer=8 * t, master=0)
    # bf16 under DDP is autocast: the state stays fp32.
    assert components("ddp", 1, "bf16") == components("ddp", 1)
    # DeepSpeed keeps bf16 module weights and gradients and an fp32 master partition.
    assert components("zero1", 2, "bf16") == dict(parameters=2 * p, gradients=2 * t, optimizer=4 * t, master=2 * t)
    # ...and the master partition even in fp32, where the module itself is fp32 (measured on CPU).
    assert components("zero2", 2) == dict(parameters=4 * p, gradients=2 * t, optimizer=4 * t, master=2 * t)


@pytest.mark.parametrize("strategy, sharded", [
    ("ddp", ()),
    ("zero1", ("optimizer", "master")),
    ("zero2", ("gradients", "optimizer", "master")),
    ("zero3", ("parameters", "gradients", "optimizer", "master")),
    ("fsdp2", ("parameters", "gradients", "optimizer")),
])
def test_sharding_divides_exactly_the_state_the_strategy_shards(strategy, sharded):
    whole, quarter = components(strategy, 1), components(strategy, 4)
    for key, value in whole.items():
        assert quarter[key] == (value // 4 if key in sharded else value), key


def test_hsdp_shards_over_the_group_and_offload_leaves_the_gpu():
    hsdp = components("hsdp", 8, replicate_degree=2)
    assert hsdp == components("fsdp2", 4)
    setup = Setup(strategy="fsdp2", world_size=4, precision="bf16", batch_size=8, cpu_offload=True)
    offloaded = simulate_step(model_shape(MICRO), setup)
    resident = simulate_step(model_shape(MICRO), replace(setup, cpu_offload=False))
    assert offloaded.at_peak["parameters"] == offloaded.at_peak["optimizer"] == 0
    assert offloaded.host == (4 + 4 + 8) * MICRO_TRAINABLE // 4 + 4 * (MICRO_PARAMS - MICRO_TRAINABLE) // 4
    assert offloaded.peak < resident.peak


# ----------------------------------------------------------------------------- activations, exactly

MODES = {  # name: (activation dtypes, autocast, model and images in bf16)
    "fp32": (ActivationDtypes(4, 4), False, False),
    "autocast": (ActivationDtypes(4, 2), True, False),
    # torch's CPU LayerNorm keeps its statistics in bf16 for bf16 weights and input (CUDA: fp32).
    "bf16": (ActivationDtypes(2, 2, norm_stats=2), False, True),
}


def test_tracker_counts_each_storage_at_its_size_when_counting():
    """FSDP2 frees its buffers by resizing their storage to 0 and allocates them again in place."""
    tracker = LiveStorageTracker()
    with tracker:
        buffer = torch.empty(1000)
    assert tracker.live_bytes() == 4000
    buffer.untyped_storage().resize_(0)
    assert tracker.live_bytes() == 0
    buffer.untyped_storage().resize_(400)
    assert tracker.live_bytes() == 400
    del buffer
    assert tracker.live_bytes() == 0


def measured_bytes(model, mode: str, checkpointing, batch: int = 2, backward: bool = False) -> tuple[int, int]:
    """(bytes alive after forward, peak so far) of the storages the step created; with `backward`,
    the peak covers backward too."""
    _, autocast, pure_bf16 = MODES[mode]
    model.activation_checkpointing = checkpointing
    images = torch.randn(batch, model.in_chans, *model.img_size, dtype=torch.bfloat16 if pure_bf16 else None)
    tracker = LiveStorageTracker([*model.parameters(), images], track_peak=backward)
    with tracker:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(images)[0]  # as the trainer and the benchmarks: the prediction is not kept
        after_forward = tracker.live_bytes()
        if backward:
            loss.backward()
    return after_forward, tracker.peak


def predicted_forward_bytes(model, mode: str, checkpointing, batch: int = 2) -> int:
    dtypes, autocast, _ = MODES[mode]
    shape = shape_of(model)
    total = LOSS_SCALAR_BYTES
    for block, count in ((shape.encoder, shape.depth), (shape.decoder, shape.decoder_depth)):
        total += count * batch * block.tokens * block_saved_bytes_per_token(block, dtypes, checkpointing)
    outer = outer_activation_bytes(shape, dtypes, images_cast=autocast)
    total += batch * (outer.stem + outer.bridge + outer.head)
    if autocast:  # bf16 weight copies saved for backward; checkpointed blocks recompute theirs
        total += 2 * shape.root_matmul_weights
        if not checkpointing:
            total += 2 * (shape.depth * shape.encoder.matmul_weights
                          + shape.decoder_depth * shape.decoder.matmul_weights)
    return total


@pytest.mark.parametrize("overrides", [{}, OTHER], ids=["micro", "other-shape"])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("checkpointing", [False, True, "selective"], ids=["none", "full", "selective"])
def test_activation_bytes_equal_what_autograd_keeps_after_forward(overrides, mode, checkpointing):
    torch.manual_seed(0)
    model = build_model(MICRO, **overrides)
    if MODES[mode][2]:
        model = model.bfloat16()
    measured, _ = measured_bytes(model, mode, checkpointing)
    assert measured == predicted_forward_bytes(model, mode, checkpointing)


def test_checkpointing_keeps_the_share_its_formula_says():
    """Per ViT-L block under bf16 autocast: full keeps the fp32 input only, selective two thirds."""
    block = model_shape("mae_vit_large_patch16").encoder
    none, full, selective = (block_saved_bytes_per_token(block, ActivationDtypes(4, 2), ac)
                             for ac in (False, True, "selective"))
    assert (none, full, selective) == (36944, 4 * 1024, 24640)


@pytest.mark.parametrize("checkpointing", [False, True, "selective"], ids=["none", "full", "selective"])
def test_simulated_peak_is_within_20_percent_of_the_exact_cpu_peak(checkpointing):
    """Backward's workspace is modelled, not exact: the simulated forward + backward peak (the
    parameters aside) against the largest live total the tracker saw."""
    torch.manual_seed(0)
    model = build_model(MICRO)
    _, measured_peak = measured_bytes(model, "fp32", checkpointing, batch=8, backward=True)
    setup = Setup(strategy="ddp", world_size=1, precision="fp32", batch_size=8,
                  activation_checkpointing=checkpointing, input_batches=0)
    memory = simulate_step(shape_of(model), setup)
    predicted = memory.peak - memory.at_peak["parameters"] - memory.at_peak["optimizer"]
    assert 0.8 < predicted / measured_peak < 1.2


# ----------------------------------------------------------------------------- recorded peaks, batches


def test_recorded_h200_peaks_are_predicted_within_20_percent():
    rows = [json.loads(line) for line in (REPO / "benchmarks/results/2026-11-26-h200.jsonl").read_text().splitlines()]
    for row in rows:
        setup = Setup(strategy="ddp", world_size=1, precision=row["precision"], batch_size=row["batch_size"],
                      input_batches=1)
        predicted = simulate_step(model_shape(row["model"]), setup).peak / GIB
        assert 0.8 < predicted / row["peak_memory_gib"] < 1.2, row


def test_recorded_cpu_memory_rows_are_predicted_as_measured():
    """benchmarks/memory.py's ViT-B rows (RSS following allocations): the live-tensor columns to 1%,
    the peak within 20%, through benchmarks/memory.py's reading of the saved output."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("memory_benchmark", REPO / "benchmarks/memory.py")
    plan_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plan_check)
    saved = plan_check.read_memory_output(REPO / "benchmarks/results/2026-12-02-memory-vit-b-mmap-threshold.txt")
    assert saved["rss_follows_live"] and set(saved["rows"]) == {"ddp", "fsdp2", "zero2", "zero3"}
    for strategy, measured in saved["rows"].items():
        predicted = plan_check.predict_cpu_row(saved["model"], saved["nproc"], strategy)
        for column in ("after_backward", "after_step"):
            assert abs(predicted[column] / measured[column] - 1) < 0.01, (strategy, column)
        assert abs(predicted["rss_growth"] / measured["rss_growth"] - 1) < 0.2, strategy


def test_largest_fitting_batch_is_where_the_peak_crosses_the_budget():
    shape = model_shape("mae_vit_base_patch16")
    setup = Setup(strategy="fsdp2", world_size=8, batch_size=1)
    budget = 20 * GIB
    largest = largest_fitting_batch(shape, setup, budget)
    assert simulate_step(shape, replace(setup, batch_size=largest)).peak <= budget
    assert simulate_step(shape, replace(setup, batch_size=largest + 1)).peak > budget
    assert largest_fitting_batch(shape, setup, 0.1 * GIB) == 0
    # Checkpointing buys batch; so does sharding.
    assert largest_fitting_batch(shape, replace(setup, activation_checkpointing=True), budget) > 2 * largest
    assert largest_fitting_batch(model_shape("mae_vit_7b_patch14"), Setup(strategy="ddp"), 80 * GIB) == 0


# ----------------------------------------------------------------------------- command line


LARGE = ("model.name=mae_vit_large_patch16", "train.precision=bf16")


def test_plan_prints_the_breakdown_step_time_and_fitting_batches():
    out = run_maescale("plan", "--gpu", "A100-40GB", "--world-size", "8", *LARGE, "parallel.strategy=fsdp2",
                       "data.batch_size=256", "parallel.activation_checkpointing=selective").stdout
    for text in ("329.5 M parameters", "50 visible tokens", "197 tokens", "fsdp2: shard 8, bf16 on 8 GPU(s)",
                 "parameters (fp32, 1/8 of it)", "AdamW moments (fp32, 1/8 of it)", "gathered weights",
                 "activations: encoder, 24 blocks x 50 tokens", "peak (allocated)",
                 "at 35% of 312 TFLOP/s", "batches per GPU that fit: 8 16 32"):
        assert text in out, text


def test_plan_sweep_has_a_row_per_model():
    out = run_maescale("plan", "--sweep", "--gpu", "H200", "parallel.strategy=zero3", "--world-size", "16").stdout
    rows = [line for line in out.splitlines() if line.startswith("| mae_")]
    assert [row.split("|")[1].strip() for row in rows] == list(MODEL_SPECS)


@pytest.mark.parametrize("args, message", [
    (["model.name=mae_vit_huge_patch16"], "unknown model 'mae_vit_huge_patch16'. Did you mean 'mae_vit_huge_patch14'?"),
    (["--world-size", "8", "parallel.strategy=hsdp", "parallel.replicate_degree=3"],
     "parallel.replicate_degree=3 does not divide the 8 processes"),
    (["parallel.cpu_offload=true"], "parallel.cpu_offload needs parallel.strategy=fsdp2 or hsdp (got ddp)"),
    (["parallel.strategy=deepspeed"], "parallel.strategy=deepspeed: the ZeRO stage is part of the name"),
    (["--strategy", "zero3"], "--strategy is now the config key parallel.strategy"),
    (["--model", "mae_vit_base_patch16"], "--model is now the config key model.name"),
    (["--gpu-memory", "0"], "--gpu-memory must be positive"),
    (["--gpu", "B200"], "unknown GPU 'B200'; known: H200, H100"),
])
def test_bad_input_is_a_one_line_error(args, message):
    result = run_maescale("plan", *args, ok=False)
    assert result.returncode == 2 and result.stdout == ""
    err = result.stderr
    assert len(err.strip().splitlines()) == 1 and err.startswith("maescale plan: error: ") and message in err


def test_a_custom_gpu_memory_changes_what_fits():
    assert lookup_gpu("H100", 94).memory_gib == 94

    def largest(*args: str) -> int:
        out = run_maescale("plan", "model.name=mae_vit_base_patch16", *args).stdout
        return int(out.rsplit("largest: ", 1)[1].split()[0])

    small, h100 = largest("--gpu-memory", "20"), largest("--gpu", "H100")
    assert 0 < small < h100


def test_plan_of_fsdp2_on_one_gpu_is_the_whole_model_the_trainer_runs():
    args = ("--world-size", "1", "model.name=mae_vit_base_patch16", "data.batch_size=32", "train.precision=bf16")
    fsdp2 = run_maescale("plan", *args, "parallel.strategy=fsdp2").stdout
    ddp = run_maescale("plan", *args, "parallel.strategy=ddp").stdout
    assert "fsdp2: whole model (shard degree 1), bf16 autocast on 1 GPU(s)" in fsdp2
    assert fsdp2.replace("fsdp2:", "ddp:") == ddp
    offloaded = run_maescale("plan", *args, "parallel.strategy=fsdp2", "parallel.cpu_offload=true").stdout
    assert "fsdp2: shard 1, CPU offload, bf16 on 1 GPU(s)" in offloaded


def test_plan_reads_the_recipe_and_its_overrides():
    """--config + overrides plan what pretrain runs: the recipe's model, batch, precision and layout."""
    recipe = run_maescale("plan", "--config", "configs/pretrain/vit_1b.yaml", "--world-size", "16").stdout
    assert recipe.startswith("mae_vit_1b_patch14:") and "fsdp2: shard 16, bf16 on 16 GPU(s)" in recipe
    hsdp = run_maescale("plan", "--world-size", "16", "--config", "configs/pretrain/vit_1b.yaml",
                        "parallel.strategy=hsdp", "model.img_size=112").stdout
    assert "hsdp: shard 8 x replicate 2" in hsdp and "on 65 visible tokens" not in hsdp
