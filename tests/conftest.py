import contextlib
import importlib.util
import io
import os
import subprocess
from pathlib import Path

import pytest
import torch
from PIL import Image

# Tests share 2 cores with data workers (and, under pytest-xdist, with the other worker): keep
# intra-op threads low and results repeatable.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_RUN = [
    "model.name=mae_vit_micro_patch4",
    "data.kind=synthetic",
    "data.synthetic_size=512",
    "data.batch_size=16",
    "data.num_workers=0",
    "schedule.epochs=4",
    "schedule.warmup_epochs=1",
    "train.log_every=1",
    "checkpoint.every_steps=4",
]


def run_maescale(*args, ok: bool = True) -> subprocess.CompletedProcess:
    """`maescale *args` called in this process (no interpreter start-up, torch imported once):
    its exit code and what it printed. With `ok`, fails the test unless it exits 0. Faults that
    need a process of their own (kills, signals, warnings at import) start one instead."""
    from maescale.__main__ import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as exit_:  # argparse's own errors
            code = exit_.code
    result = subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())
    if ok:
        assert code == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def maescale_printed(*args) -> str:
    """What a successful `maescale *args` (in this process) printed, stdout then stderr."""
    result = run_maescale(*args)
    return result.stdout + result.stderr


@pytest.fixture
def tiny_overrides(tmp_path):
    """Overrides for a seconds-long CPU run writing into a fresh folder."""
    return [f"output_dir={tmp_path / 'run'}", *TINY_RUN]


def _save_jpeg(path: Path, size, seed: int, mode="RGB"):
    generator = torch.Generator().manual_seed(seed)
    channels = {"RGB": 3, "L": 1, "CMYK": 4}[mode]
    pixels = torch.randint(0, 256, (size[1], size[0], channels), dtype=torch.uint8, generator=generator)
    array = pixels.squeeze(-1).numpy() if channels == 1 else pixels.numpy()
    Image.fromarray(array, mode=mode).save(path, format="JPEG", quality=90)


def write_mixed_image_folder(root: Path) -> Path:
    """root/{cat,dog,emu}/ with good images of many kinds (greyscale, CMYK, 16-bit PNG, palette,
    1x1 pixel) and three unreadable files (truncated JPEG, text file, zero bytes): BAD_FILES."""
    for name in ("cat", "dog", "emu"):
        (root / name).mkdir(parents=True)
    _save_jpeg(root / "cat" / "a_rgb.jpg", (40, 30), 1)
    _save_jpeg(root / "cat" / "b_grey.jpg", (33, 47), 2, mode="L")
    _save_jpeg(root / "cat" / "c_big.jpg", (96, 64), 3)
    truncated = (root / "cat" / "c_big.jpg").read_bytes()
    (root / "cat" / "b_truncated.jpg").write_bytes(truncated[: len(truncated) // 2])
    _save_jpeg(root / "cat" / "d_cmyk.JPG", (50, 50), 4, mode="CMYK")
    (root / "dog" / "a_empty.jpg").write_bytes(b"")
    # Last in its class, so its substitute (after another bad file) is a dog.
    (root / "cat" / "e_text.jpg").write_text("this is not an image\n")
    deep = Image.fromarray((torch.full((20, 30), 40000, dtype=torch.int32)).numpy().astype("uint16"))
    deep.save(root / "dog" / "c_deep.png")
    Image.new("RGB", (1, 1), (200, 10, 10)).save(root / "dog" / "d_tiny.png")
    Image.new("P", (17, 9), 3).save(root / "dog" / "e_palette.bmp")
    (root / "dog" / "notes.txt").write_text("ignored: not an image extension")
    _save_jpeg(root / "emu" / "a.jpeg", (64, 48), 5)
    _save_jpeg(root / "emu" / "b.webp.jpg", (25, 70), 6)
    return root


BAD_FILES = ("cat/b_truncated.jpg", "cat/e_text.jpg", "dog/a_empty.jpg")


@pytest.fixture(scope="session")
def straight_nine_steps_run(tmp_path_factory) -> Path:
    """One uninterrupted 9-step run on one process (test_distributed.COMMON), the reference of
    every resume test: made once per session."""
    from test_distributed import run

    out = tmp_path_factory.mktemp("straight") / "run"
    run(out, 1, steps=9)
    return out


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU; skipped, with the reason, where there is none")
    config.addinivalue_line("markers",
                            "deepspeed: runs DeepSpeed on the CPU; skipped, with the reason, where it cannot")


def _deepspeed_skip_reason() -> str | None:
    if importlib.util.find_spec("deepspeed") is None:
        return "deepspeed is not installed (pip install 'maescale[deepspeed]')"
    if torch.cuda.is_available():  # parallel.build_accelerator refuses DeepSpeed on the gloo fallback
        return "the DeepSpeed tests run on the CPU, which Accelerate does not allow DeepSpeed where a GPU is present"
    return None


# The modules that take longest (minutes of real Slurm jobs, 2-process runs, FFCV betons), first:
# pytest-xdist hands modules to workers in collection order, so a long one started last would
# leave the other workers idle at the end.
LONGEST_MODULES = ("test_slurm.py", "test_distributed.py", "test_faults.py", "test_ffcv.py", "test_matrix.py")


def _longest_first(item) -> int:
    name = item.path.name
    return LONGEST_MODULES.index(name) if name in LONGEST_MODULES else len(LONGEST_MODULES)


def pytest_collection_modifyitems(config, items):
    items.sort(key=_longest_first)  # stable: each module's tests keep their order
    reasons = {
        "cuda": None if torch.cuda.is_available() else "needs a CUDA GPU: none on this machine",
        "deepspeed": _deepspeed_skip_reason(),
    }
    for item in items:
        for marker, reason in reasons.items():
            if reason and marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))
