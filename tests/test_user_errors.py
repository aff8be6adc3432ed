"""Every user error ends a command with one line, `maescale <command>: error: ...`, and exit code 2,
before any work: a table of bad inputs run through the CLI in this process, and real subprocesses
for the exit code and for missing optional extras (deepspeed, ffcv made unimportable for real)."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from maescale.__main__ import main
from maescale.data.ffcv_compat import ffcv_available
from maescale.models import build_model

REPO = Path(__file__).resolve().parents[1]
MICRO = "mae_vit_micro_patch4"
SMALL_RUN = [f"model.name={MICRO}", "data.synthetic_size=32", "data.batch_size=8", "data.num_workers=0"]
NEEDS_FFCV = pytest.mark.skipif(not ffcv_available(), reason="ffcv is not installed (pip install 'maescale[ffcv]')")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Bad and good inputs on disk, by name; `{name}` in a case's arguments becomes its path."""
    root = tmp_path_factory.mktemp("inputs")
    paths = {"root": root, "out": root / "out"}
    paths["bad_yaml"] = root / "bad.yaml"
    paths["bad_yaml"].write_text("data:\n  kind: folder\n   path: [unclosed\n")
    paths["list_yaml"] = root / "list.yaml"
    paths["list_yaml"].write_text("- data.kind=folder\n")
    paths["no_images"] = root / "no_images"
    (paths["no_images"] / "cats").mkdir(parents=True)
    (paths["no_images"] / "cats" / "notes.txt").write_text("not an image")
    paths["train_only"] = root / "train_only"
    (paths["train_only"] / "train" / "cats").mkdir(parents=True)
    Image.new("RGB", (40, 40), (90, 20, 200)).save(paths["train_only"] / "train" / "cats" / "a.jpg")
    paths["text_pth"] = root / "notes.pth"
    paths["text_pth"].write_text("these are not weights\n")
    paths["junk_safetensors"] = root / "junk.safetensors"
    paths["junk_safetensors"].write_bytes(b"\x00\x01 definitely not safetensors")
    paths["micro_pth"] = root / "micro.pth"
    torch.save({"model": build_model(MICRO).state_dict()}, paths["micro_pth"])
    paths["a_file"] = root / "a_file"
    paths["a_file"].write_text("a file where a folder is expected")
    return paths


# (command and arguments, a piece of the expected message); `{name}` is a path from `files`.
CASES = [
    # config files, overrides and values
    (["pretrain", "optim.bl=1e-4"], "did you mean optim.blr?"),
    (["pretrain", "data.batch_size=many"], "data.batch_size must be int"),
    (["pretrain", "data.kind=tfrecord"], "data.kind must be one of"),
    (["pretrain", "model.mask_ratio=1.5"], "model.mask_ratio must be in (0, 1)"),
    (["pretrain", "--config", "{root}/missing.yaml"], "config file not found"),
    (["pretrain", "--config", "{bad_yaml}"], "not valid YAML at line 3"),
    (["pretrain", "--config", "{list_yaml}"], "top level must be a mapping"),
    (["pretrain", "optim.blr"], "must look like key=value"),
    (["pretrain", "data.path=[unclosed"], "not valid YAML"),
    (["pretrain", "optim=3"], "is a section"),
    (["pretrain", "model.img_size=30", "model.patch_size=4"], "not divisible"),
    (["pretrain", "monitor.k=0"], "monitor.k must be positive"),
    (
        ["pretrain", *SMALL_RUN, "output_dir={out}", "model.name=mae_vit_bse_patch16"],
        "Did you mean 'mae_vit_base_patch16'?",
    ),
    # data
    (["pretrain", "data.kind=folder"], "data.path is required when data.kind=folder"),
    (
        ["pretrain", *SMALL_RUN, "output_dir={out}", "data.kind=folder", "data.path={root}/nowhere"],
        "image folder not found",
    ),
    (["pretrain", *SMALL_RUN, "output_dir={out}", "data.kind=folder", "data.path={no_images}"], "no images"),
    (["pretrain", *SMALL_RUN, "output_dir={out}", "data.synthetic_size=4"], "an epoch would have no full batch"),
    (["pretrain", *SMALL_RUN, "output_dir={a_file}"], "is not writable"),
    (["pretrain", *SMALL_RUN, "output_dir={out}", "checkpoint.resume={root}/no_step"], "no such checkpoint folder"),
    pytest.param(
        ["pretrain", *SMALL_RUN, "output_dir={out}", "data.kind=ffcv", "data.path={root}"],
        "train.beton",
        marks=NEEDS_FFCV,
    ),
    (["pretrain", "data.kind=ffcv", "data.path=x", "data.ffcv_order=quasi_random"], "needs data.ffcv_os_cache=false"),
    # evaluation
    (["knn", "knn.kk=3"], "did you mean knn.k?"),
    (["knn"], "encoder.model is required when encoder.ckpt is null"),
    (["knn", "encoder.ckpt={root}/nothing_here"], "no such checkpoint folder or weights file"),
    (["knn", "output_dir={out}", "encoder.model=mae_vit_tiny", "data.kind=synthetic"], "unknown model 'mae_vit_tiny'"),
    (
        [
            "knn",
            "output_dir={out}",
            f"encoder.model={MICRO}",
            "data.kind=folder",
            "data.path={train_only}",
            "data.num_workers=0",
        ],
        "split folder not found",
    ),
    (
        ["linprobe", "output_dir={out}", f"encoder.model={MICRO}", *SMALL_RUN[1:], "linprobe.batch_size=4096"],
        "exceeds the",
    ),
    (["finetune", f"encoder.model={MICRO}", "data.batch_size=7"], "must be even"),
    # weights files, models, checkpoint folders
    (["import", "--weights", "{micro_pth}", "--model", "mae_vit_mikro_patch4", "--out", "{out}"], "unknown model"),
    (["import", "--weights", "{text_pth}", "--model", MICRO, "--out", "{out}"], "not a tensors-only torch file"),
    (["import", "--weights", "{junk_safetensors}", "--model", MICRO, "--out", "{out}"], "not a safetensors file"),
    (["import", "--weights", "{root}/absent.pth", "--model", MICRO, "--out", "{out}"], "weights file not found"),
    (["import", "--weights", "{micro_pth}", "--model", "mae_vit_tiny_patch4", "--out", "{out}"], "does not fit"),
    (["export", "--ckpt", "{root}/no_step", "--out", "{root}/x.safetensors"], "no_step"),
    (["visualize", "--ckpt", "{root}/no_step", "--out", "{root}/f.png"], "no_step"),
    (["write-beton", "--src", "{root}", "--out", "{root}/x.beton", "--jpeg-quality", "0"], "--jpeg-quality must be in"),
    pytest.param(
        ["write-beton", "--src", "{root}/nowhere", "--out", "{root}/x.beton"],
        "image folder not found",
        marks=NEEDS_FFCV,
    ),
    pytest.param(["write-beton", "--src", "{no_images}", "--out", "{root}/x.beton"], "no images", marks=NEEDS_FFCV),
]


def run_in_process(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return code, out.getvalue(), err.getvalue()


def fill(args: list[str], files: dict[str, Path]) -> list[str]:
    return [arg.format(**{name: str(path) for name, path in files.items()}) for arg in args]


@pytest.mark.parametrize(("args", "expected"), CASES, ids=lambda value: value if isinstance(value, str) else None)
def test_a_user_error_is_one_line_with_exit_code_2(args, expected, files):
    args = fill(args, files)
    code, out, err = run_in_process(args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err[-2000:]
    assert len(lines) == 1 and lines[0].startswith(f"maescale {args[0]}: error: "), err[-2000:]
    assert expected in lines[0] and out == ""
    assert not (files["out"] / "checkpoints").exists()  # nothing was trained or saved


def test_the_table_is_at_least_25_bad_inputs():
    assert len(CASES) >= 25


def test_an_internal_error_keeps_its_traceback(monkeypatch, tmp_path):
    """A defect is not dressed up as a user error: the exception reaches the caller."""
    import maescale.train

    def broken(cfg):
        raise KeyError("a bug")

    monkeypatch.setattr(maescale.train, "pretrain", broken)
    with pytest.raises(KeyError, match="a bug"):
        main(["pretrain", f"output_dir={tmp_path}"])


# ---------------------------------------------------------------- real processes


def run_maescale(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "maescale", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def without_module(tmp_path: Path, module: str) -> dict:
    """An environment where `import <module>` raises ModuleNotFoundError, as when it is not installed."""
    shim = tmp_path / f"no-{module}"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(f"import sys\nsys.modules[{module!r}] = None  # `import {module}` fails\n")
    return {"PYTHONPATH": os.pathsep.join([str(shim), str(REPO)])}


def test_bad_yaml_from_the_shell_is_one_line_and_exit_2(files):
    result = run_maescale(["pretrain", "--config", str(files["bad_yaml"])])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"maescale pretrain: error: {files['bad_yaml']}: not valid YAML at line 3, column 8: "
        "mapping values are not allowed here"
    ]


@pytest.mark.parametrize(("module", "args"), [
    ("deepspeed", ["pretrain", "parallel.strategy=zero2"]),
    ("ffcv", ["pretrain", "data.kind=ffcv", "data.path=data/ffcv"]),
    ("ffcv", ["knn", f"encoder.model={MICRO}", "data.kind=ffcv", "data.path=data/ffcv"]),
    ("ffcv", ["write-beton", "--src", "data/images", "--out", "data/train.beton"]),
])
def test_a_missing_extra_names_the_pip_command(module, args, tmp_path):
    result = run_maescale([*args, f"output_dir={tmp_path / 'run'}"] if args[0] != "write-beton" else args,
                          env=without_module(tmp_path, module))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith(f"maescale {args[0]}: error: "), result.stderr[-3000:]
    assert f"pip install 'maescale[{module}]'" in lines[0]
    assert not (tmp_path / "run").exists()
