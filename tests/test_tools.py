"""Figures, the visualize and bench commands, FLOP accounting (training on a folder of JPEGs and
visualize on it: tests/test_matrix.py)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from maescale.bench import bench_train_step
from maescale.metrics import device_peak_flops, mae_train_flops_per_image
from maescale.models import build_model
from maescale.viz import denormalize_prediction, fill_from_visible, reconstruction_panels

REPO = Path(__file__).resolve().parents[1]


def test_fill_from_visible_keeps_visible_and_averages_neighbours():
    grid = 3
    values = torch.arange(9.0).view(1, 9)
    visible = torch.ones(1, 9, dtype=torch.bool)
    visible[0, 4] = False  # centre hidden: estimate = mean of its 8 neighbours
    filled = fill_from_visible(values, visible, grid)
    assert torch.equal(filled[0, visible[0]], values[0, visible[0]])
    assert filled[0, 4] == pytest.approx((36 - 4) / 8)
    corner_only = torch.zeros(1, 9, dtype=torch.bool)
    corner_only[0, 0] = True  # far cells are reached by growing the known region
    assert torch.allclose(fill_from_visible(values, corner_only, grid), torch.zeros(1, 9))
    with pytest.raises(ValueError, match="no visible patch"):
        fill_from_visible(values, torch.zeros(1, 9, dtype=torch.bool), grid)


def test_denormalize_recovers_visible_patches_exactly():
    torch.manual_seed(0)
    target = torch.randn(2, 16, 12)
    mask = (torch.rand(2, 16) > 0.5).float()
    mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
    perfect = (target - mean) / (var + 1e-6).sqrt()
    pixels = denormalize_prediction(perfect, target, mask, grid=4)
    visible = mask == 0
    assert torch.allclose(pixels[visible], target[visible], atol=1e-5)
    # masked patches must not use their own statistics: changing a hidden patch's pixels
    # leaves its de-normalised prediction unchanged
    hidden = mask.nonzero()[0].tolist()
    changed = target.clone()
    changed[hidden[0], hidden[1]] += 5.0
    again = denormalize_prediction(perfect, changed, mask, grid=4)
    assert torch.equal(again[hidden[0], hidden[1]], pixels[hidden[0], hidden[1]])


def test_reconstruction_panels_shapes_and_visible_paste():
    torch.manual_seed(0)
    model = build_model("mae_vit_micro_patch4", norm_pix_loss=False).eval()
    images = torch.randn(3, 3, 32, 32)
    panels = reconstruction_panels(model, images, seed=1)
    assert list(panels) == ["original", "masked", "reconstruction", "reconstruction + visible"]
    for panel in panels.values():
        assert panel.shape == (3, 32, 32, 3) and 0 <= panel.min() and panel.max() <= 1
    # where the masked panel shows the image, the pasted reconstruction shows it too
    same = (panels["masked"] == panels["original"]).all(-1)
    assert same.float().mean() > 0.2
    assert torch.equal(panels["reconstruction + visible"][same], panels["original"][same])
    assert torch.equal(panels["masked"], reconstruction_panels(model, images, seed=1)["masked"])  # fixed mask seed


@pytest.mark.parametrize(
    "name, gflops", [("mae_vit_base_patch16", 58.7), ("mae_vit_large_patch16", 124.5), ("mae_vit_huge_patch14", 291.4)]
)
def test_training_flops_match_the_hand_calculation(name, gflops):
    with torch.device("meta"):
        model = build_model(name)
    assert mae_train_flops_per_image(model) / 1e9 == pytest.approx(gflops, abs=0.05)


def test_masking_saves_flops_as_the_paper_reports():
    """He et al. 2021, section 5: the encoder without mask tokens needs 3.3x fewer FLOPs (ViT-L)."""
    with torch.device("meta"):
        model = build_model("mae_vit_large_patch16")
    ratio = mae_train_flops_per_image(model, mask_ratio=0.0) / mae_train_flops_per_image(model)
    assert 3.0 < ratio < 3.5


def test_peak_table():
    assert device_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert device_peak_flops("cpu") is None


def test_bench_runs_and_reports():
    result = bench_train_step("mae_vit_micro_patch4", batch_size=4, steps=2, warmup=1, device="cpu")
    assert result["images_per_sec"] > 0 and result["step_time_ms"] > 0 and result["tflops"] > 0
    assert result["mfu"] is None and result["peak_memory_gib"] is None
    assert torch.isfinite(torch.tensor(result["final_loss"]))


def test_throughput_script_prints_a_table():
    out = subprocess.run(
        [sys.executable, "benchmarks/throughput.py", "--models", "mae_vit_micro_patch4", "--batch-sizes", "2",
         "--steps", "1", "--warmup", "1", "--device", "cpu"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("| model") and lines[2].startswith("| mae_vit_micro_patch4 | cpu | 2 | fp32 | off |")


def test_visualize_names_a_missing_checkpoint(tmp_path):
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "maescale",
            "visualize",
            "--ckpt",
            str(tmp_path / "nope"),
            "--out",
            str(tmp_path / "f.png"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cli.returncode == 2
    assert "nope" in cli.stderr and "Traceback" not in cli.stderr
