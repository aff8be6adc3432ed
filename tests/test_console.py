"""What a user sees on the console: progress and results, each notice on one line, no Python
warning lines (the uninformative third-party ones are silenced, the rest are one line each)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from maescale.__main__ import _one_line_warning

REPO = Path(__file__).resolve().parents[1]
RUN = ["model.name=mae_vit_micro_patch4", "data.batch_size=8", "data.num_workers=0", "schedule.epochs=1",
       "schedule.warmup_epochs=0", "train.log_every=1", "checkpoint.every_steps=2"]


def maescale(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "maescale", *map(str, args)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def notice_lines(stderr: str) -> list[str]:
    """stderr without the progress bars (tqdm redraws them with carriage returns)."""
    lines = [part.strip() for line in stderr.splitlines() for part in line.split("\r")]
    return [line for line in lines if line and "|" not in line]


@pytest.fixture
def folder_with_a_bad_file(tmp_path) -> tuple[Path, Path]:
    root = tmp_path / "images"
    for index in range(16):
        folder = root / f"class_{index % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 40), (index * 15, 80, 160)).save(folder / f"{index:02d}.jpg")
    bad = root / "class_0" / "00.jpg"
    bad.write_bytes(b"not a jpeg")
    return root, bad


def test_pretrain_resume_and_visualize_print_no_warning_lines(tmp_path, folder_with_a_bad_file):
    root, bad = folder_with_a_bad_file
    out = tmp_path / "run"
    data = ["data.kind=folder", f"data.path={root}"]
    first = maescale("pretrain", f"output_dir={out}", *RUN, *data, "train.max_steps=2")
    # The unreadable file is read by the training loader and the figure images: one notice.
    assert notice_lines(first.stderr) == [f"WARNING: unreadable image {bad}: replaced by another readable picture"]
    resumed = maescale("pretrain", f"output_dir={out}", *RUN, *data)  # loads the step-2 checkpoint
    assert "resumed from" in resumed.stdout + resumed.stderr
    drawn = maescale("visualize", "--ckpt", out / "checkpoints" / "step_00000002", "--out", tmp_path / "f.png")
    for result in (first, resumed, drawn):
        assert "Warning" not in result.stderr and "warn(" not in result.stderr, result.stderr[-3000:]
        assert "torch.distributed is disabled" not in result.stderr


def test_a_compiled_run_prints_no_toolchain_notice(tmp_path):
    result = maescale("pretrain", f"output_dir={tmp_path / 'run'}", *RUN, "train.compile=true", "train.max_steps=1")
    assert "No CUDA runtime" not in result.stderr and "Warning" not in result.stderr, result.stderr[-3000:]


def test_a_warning_that_is_shown_takes_one_line():
    line = _one_line_warning(UserWarning("something odd"), UserWarning, "/x/y/lib.py", 12, "    return func(*args)")
    assert line == "UserWarning: something odd (lib.py:12)"
