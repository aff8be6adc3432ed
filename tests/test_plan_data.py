"""`maescale plan`'s data line: the images/s the planned step consumes per GPU, the CPU loader cores
that takes at --loader-rate images/s per core, and whether --cores-per-gpu cores keep up."""

from __future__ import annotations

import math
import re
from dataclasses import replace

import pytest
from conftest import run_maescale

from maescale.plan import (
    CPU_LOADER_IMAGES_PER_CORE,
    Plan,
    Setup,
    data_feed,
    format_plan,
    lookup_gpu,
    plan,
)

MODEL, BATCH = "mae_vit_base_patch16", 256
PLAN = ("plan", "--gpu", "H100", "--world-size", "8", f"model.name={MODEL}", "train.precision=bf16",
        f"data.batch_size={BATCH}")
DATA_LINE = re.compile(r"^data: the step consumes ([\d,]+) images/s per GPU at (\d+)% MFU; a CPU loader core gives "
                       r"~([\d,]+) \(--loader-rate\), so each GPU needs ([\d,]+) loader cores", re.MULTILINE)


def printed_numbers(out: str) -> tuple[int, int, int]:
    """(images/s per GPU, images/s per loader core, loader cores per GPU) as the data line prints them."""
    match = DATA_LINE.search(out)
    assert match, out
    images, _, per_core, cores = (int(group.replace(",", "")) for group in match.groups())
    return images, per_core, cores


@pytest.fixture(scope="module")
def h100_plan() -> Plan:
    """What the CLI's PLAN arguments plan, through the Python API (ddp is the config's default)."""
    return plan(MODEL, Setup(strategy="ddp", world_size=8, precision="bf16", batch_size=BATCH), lookup_gpu("H100"),
                batches=())


def test_the_data_line_is_the_plans_own_step_time(h100_plan):
    p = h100_plan
    images, per_core, cores = printed_numbers(format_plan(p))
    assert images == round(BATCH / p.step_seconds) and p.step_seconds > 0
    assert per_core == CPU_LOADER_IMAGES_PER_CORE
    assert cores == math.ceil(BATCH / p.step_seconds / CPU_LOADER_IMAGES_PER_CORE)
    lines = format_plan(p).splitlines()
    step = next(i for i, line in enumerate(lines) if line.startswith("step: "))
    assert lines[step + 1].startswith("data: ")  # right after the step it follows from


def test_the_cli_prints_the_same_numbers_and_accumulation_does_not_change_them(h100_plan):
    out = run_maescale(*PLAN).stdout
    assert printed_numbers(out)[0] == round(BATCH / h100_plan.step_seconds)
    assert "at 35% MFU" in out
    # An optimizer step of 4 micro-batches takes 4 micro-batch steps: the same images/s.
    accumulated = run_maescale(*PLAN, "train.accum_iter=4").stdout
    assert printed_numbers(accumulated) == printed_numbers(out)


def test_the_mfu_scales_the_images_per_second():
    half = printed_numbers(run_maescale(*PLAN, "--mfu", "0.175").stdout)[0]
    full = printed_numbers(run_maescale(*PLAN, "--mfu", "0.35").stdout)[0]
    assert abs(2 * half - full) <= 1


def test_the_loader_rate_sets_the_cores_needed(h100_plan):
    rate = h100_plan.images_per_second
    for per_core in (150, 400):
        images, printed_rate, cores = printed_numbers(run_maescale(*PLAN, "--loader-rate", per_core).stdout)
        assert printed_rate == per_core and cores == math.ceil(rate / per_core)
    assert math.ceil(rate / 150) > math.ceil(rate / 400)  # so the two runs differ


def test_the_cores_per_gpu_flip_the_verdict(h100_plan):
    needed = data_feed(h100_plan).cores_needed
    too_few = run_maescale(*PLAN, "--cores-per-gpu", needed - 1).stdout
    enough = run_maescale(*PLAN, "--cores-per-gpu", needed).stdout
    assert f"needs {needed} loader cores, more than the {needed - 1} it has (--cores-per-gpu): data-bound unless " \
           "data.decode=gpu" in too_few
    assert f"needs {needed} loader cores of the {needed} it has (--cores-per-gpu): compute-bound" in enough
    assert "data-bound" not in enough and "compute-bound" not in too_few


def test_without_a_step_time_the_data_line_says_so(h100_plan):
    unknown = replace(h100_plan, peak_flops=None)
    [line] = [line for line in format_plan(unknown).splitlines() if line.startswith("data: ")]
    assert line.startswith("data: no step time for H100")
    assert f"~{CPU_LOADER_IMAGES_PER_CORE:,.0f} (--loader-rate)" in line and not re.search(r"needs|bound", line)
    assert data_feed(unknown).cores_needed is None and not data_feed(unknown).data_bound


@pytest.mark.parametrize("args, message", [
    (["--loader-rate", "0"], "the loader rate (--loader-rate) must be positive, got 0.0"),
    (["--cores-per-gpu", "0"], "the cores per GPU (--cores-per-gpu) must be at least 1, got 0"),
])
def test_bad_data_flags_are_a_one_line_error(args, message):
    result = run_maescale(*PLAN, *args, ok=False)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == f"maescale plan: error: {message}"


def test_with_device_decoding_the_line_counts_no_decoding_cores(h100_plan):
    out = run_maescale(*PLAN, "data.kind=folder", "data.path=/data", "data.decode=gpu").stdout
    line = next(line for line in out.splitlines() if line.startswith("data: "))
    assert f"consumes {round(BATCH / h100_plan.step_seconds):,} images/s per GPU" in line
    assert "loader cores only read file bytes" in line and "data-bound" not in line
