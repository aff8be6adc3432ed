"""Benchmark tooling: step variants, FLOPs of the variants, the benchmark scripts on tiny
configs, the prepared GPU check, the mask-noise hash of the loader, and the benchmark pages'
references to scripts and recorded results."""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from maescale.__main__ import main as cli_main
from maescale.bench import StepBench, StepVariant, compare_variants, interleaved_times, paired_ratio
from maescale.data.loader import Batch, sample_mask_seed
from maescale.data.seeding import _splitmix64
from maescale.metrics import mae_train_flops_per_image
from maescale.models import build_model

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_suite  # noqa: E402
from step_variants import build_straightforward, straightforward_step  # noqa: E402

MICRO = "mae_vit_micro_patch4"


def _script(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    return done


# ------------------------------------------------------------------ mask noise


def test_mask_noise_is_the_documented_hash_of_seed_and_patch():
    """The vectorised integer hash must give, bit for bit, what the Python SplitMix64 gives
    (torch's int64 products wrap modulo 2^64 like the masked Python ones)."""
    seeds = [sample_mask_seed(seed, epoch, index) for seed in (0, 7) for epoch in (0, 3) for index in (0, 1, 99, 12345)]
    batch = Batch(torch.zeros(len(seeds), 3, 4, 4), torch.zeros(len(seeds)), (), torch.tensor(seeds))
    for num_patches in (1, 16, 196):
        expected = torch.tensor(
            [[(_splitmix64(_splitmix64(s) ^ j) >> 40) / 2**24 for j in range(num_patches)] for s in seeds]
        )
        assert torch.equal(batch.mask_noise(num_patches).double(), expected.double())
    noise = batch.mask_noise(4096)
    assert 0 <= noise.min() and noise.max() < 1
    assert abs(noise.mean() - 0.5) < 0.01 and abs(noise.std() - 12**-0.5) < 0.01  # uniform on [0, 1)
    ranks = noise.argsort(dim=1)  # masks of different samples are unrelated
    assert (ranks[0] == ranks[1]).float().mean() < 0.01


# ------------------------------------------------------------------ mask tokens in the encoder


def test_default_model_is_unchanged_by_the_option():
    torch.manual_seed(0)
    plain = build_model(MICRO)
    torch.manual_seed(0)
    default = build_model(MICRO, mask_tokens_in_encoder=False)
    assert plain.state_dict().keys() == default.state_dict().keys()
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in default.state_dict().items())


def test_mask_tokens_in_encoder_encodes_every_patch():
    torch.manual_seed(0)
    model = build_model(MICRO, mask_tokens_in_encoder=True)
    images, noise = torch.randn(2, 3, 32, 32), torch.rand(2, model.num_patches)
    seen = []
    handle = model.blocks[0].register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0]))
    loss, pred, mask = model(images, noise=noise)
    handle.remove()
    assert seen[0].shape == (2, 1 + model.num_patches, 64)
    removed = mask[0].bool()
    stand_in = model.encoder_mask_token[0, 0] + model.pos_embed[0, 1:][removed]
    assert torch.allclose(seen[0][0, 1:][removed], stand_in)  # removed patches enter as the mask token
    _, _, default_mask = build_model(MICRO)(images, noise=noise)
    assert torch.equal(mask, default_mask) and pred.shape == (2, model.num_patches, 48)
    loss.backward()
    assert model.encoder_mask_token.grad is not None and model.encoder_mask_token.grad.abs().sum() > 0


# ------------------------------------------------------------------ FLOPs


@pytest.mark.parametrize(
    "name, with_mask_tokens, with_recompute",
    [("mae_vit_base_patch16", 137.96, 77.82), ("mae_vit_large_patch16", 402.06, 165.53),
     ("mae_vit_huge_patch14", 1047.29, 387.87)],
)
def test_flops_of_mask_tokens_and_recompute(name, with_mask_tokens, with_recompute):
    """Hand calculation for ViT-L: block(T, D, H) = 2T(4D^2 + 2DH) + 4T^2 D.
    [M] in encoder: 3 * (24 block(197, 1024, 4096) + 8 block(197, 512, 2048) + embed/decoder_embed/pred)
    = 402.06 GFLOP; checkpointing adds one forward of all blocks: 124.53 + 41.00 = 165.53."""
    with torch.device("meta"):
        model = build_model(name)
    assert (mae_train_flops_per_image(model, mask_tokens_in_encoder=True) / 1e9
            == pytest.approx(with_mask_tokens, abs=0.01))
    assert mae_train_flops_per_image(model, include_recompute=True) / 1e9 == pytest.approx(with_recompute, abs=0.01)
    # the [M] encoder does the work of an encoder without masking
    assert (mae_train_flops_per_image(model, mask_tokens_in_encoder=True)
            == mae_train_flops_per_image(model, mask_ratio=0.0))


def test_flops_follow_the_models_own_switch():
    with torch.device("meta"):
        model = build_model("mae_vit_large_patch16", mask_tokens_in_encoder=True)
    assert mae_train_flops_per_image(model) / 1e9 == pytest.approx(402.06, abs=0.01)


# ------------------------------------------------------------------ step variants


def test_variants_switch_the_shared_model():
    bench = StepBench(MICRO, batch_size=2, device="cpu")
    bench.apply(StepVariant(attention="explicit", activation_checkpointing=True, mask_tokens_in_encoder=True))
    assert not any(b.attn.fused_attn for b in [*bench.model.blocks, *bench.model.decoder_blocks])
    assert bench.model.activation_checkpointing and bench.model.mask_tokens_in_encoder
    assert bench.optimizer(True) is bench.optimizer(True) and bench.optimizer(True) is not bench.optimizer(None)
    bench.apply(StepVariant())
    assert all(b.attn.fused_attn for b in bench.model.blocks) and not bench.model.mask_tokens_in_encoder
    with pytest.raises(ValueError, match="attention"):
        StepVariant(attention="flash")


def test_explicit_attention_gives_the_same_loss():
    bench = StepBench(MICRO, batch_size=2, device="cpu")
    noise = torch.rand(2, bench.model.num_patches)
    bench.apply(StepVariant())
    fused, _, _ = bench.model(bench.images, noise=noise)
    bench.apply(StepVariant(attention="explicit"))
    explicit, _, _ = bench.model(bench.images, noise=noise)
    assert torch.allclose(fused, explicit, atol=1e-5)


def test_interleaved_rounds_rotate_and_pair():
    calls = []
    steps = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = interleaved_times(steps, rounds=3, steps_per_round=1, warmup=1, device=torch.device("cpu"))
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")
    assert all(len(t) == 3 for t in times.values())
    assert paired_ratio([2.0, 4.0, 3.0], [1.0, 1.0, 3.0]) == 2.0


def test_compare_variants_reports_each_variant():
    variants = {"maescale": StepVariant(), "mask_tokens_in_encoder": StepVariant(mask_tokens_in_encoder=True),
                "explicit_attention": StepVariant(attention="explicit"), "fused_adamw": StepVariant(fused_adamw=True),
                "checkpointing": StepVariant(activation_checkpointing=True)}
    rows = compare_variants(MICRO, variants, others={"straightforward": lambda images: straightforward_step(
        build_straightforward(MICRO), images)}, batch_size=2, rounds=1, steps_per_round=1, warmup=1, device="cpu")
    by_name = {r["variant"]: r for r in rows}
    assert list(by_name) == [*variants, "straightforward"]
    assert by_name["maescale"]["speedup"] == 1.0
    assert all(r["images_per_sec"] > 0 and r["speedup"] > 0 for r in rows)
    assert by_name["mask_tokens_in_encoder"]["tflops"] / by_name["mask_tokens_in_encoder"]["images_per_sec"] > (
        by_name["maescale"]["tflops"] / by_name["maescale"]["images_per_sec"])  # more FLOPs per image
    assert by_name["checkpointing"]["hardware_tflops"] > by_name["checkpointing"]["tflops"]


def test_straightforward_model_matches_maescale_sizes():
    for name in (MICRO, "mae_vit_base_patch16"):
        with torch.device("meta"):
            ours, plain = build_model(name), build_straightforward(name)
        trainable = [sum(p.numel() for p in m.parameters() if p.requires_grad) for m in (ours, plain)]
        assert trainable[0] == trainable[1]  # the position tables are frozen in both
    step = straightforward_step(build_straightforward(MICRO), torch.randn(2, 3, 32, 32))
    assert torch.isfinite(step())


def test_bench_command_takes_the_variant_options(capsys):
    assert cli_main(["bench", "--model", MICRO, "--batch-size", "2", "--steps", "1", "--warmup", "1", "--device", "cpu",
                     "--attention", "explicit", "--mask-tokens-in-encoder", "--fused-adamw"]) == 0
    assert f"| {MICRO} | cpu | 2 | fp32 | off |" in capsys.readouterr().out


# ------------------------------------------------------------------ scripts


def test_step_variants_script():
    done = _script("benchmarks/step_variants.py", "--models", MICRO, "--batch-size", "2", "--variants", "maescale",
                   "mask_tokens_in_encoder", "straightforward", "--rounds", "1", "--steps", "1", "--warmup", "1",
                   "--no-optimizer", "--device", "cpu")
    rows = [line for line in done.stdout.splitlines() if line.startswith(f"| {MICRO}")]
    assert [row.split("|")[2].strip() for row in rows] == ["maescale", "mask_tokens_in_encoder", "straightforward"]


def test_trainer_overhead_script():
    done = _script("benchmarks/trainer_overhead.py", "--model", MICRO, "--batch-size", "8", "--steps", "4",
                   "--log-every", "2", "--rounds", "1")
    result = json.loads(done.stdout.splitlines()[0])
    assert result["ratio"] > 0 and len(result["trainer_images_per_sec"]) == 1
    assert "trainer / bare step" in done.stdout


def test_trainer_overhead_profiles_the_real_command(tmp_path):
    import trainer_overhead

    args = argparse.Namespace(
        model=MICRO, batch_size=8, workers=1, steps=4, log_every=2, checkpoint_every=100)
    command = trainer_overhead.pretrain_command(args, tmp_path / "run", profile=str(tmp_path / "p.prof"))
    assert command[1:5] == ["-m", "cProfile", "-o", str(tmp_path / "p.prof")]
    assert command[5:8] == ["-m", "maescale", "pretrain"] and "train.max_steps=4" in command


def test_gpu_check_script_is_valid_and_names_real_sections():
    subprocess.run(["bash", "-n", "benchmarks/gpu_check.sh"], cwd=REPO, check=True)
    text = (REPO / "benchmarks/gpu_check.sh").read_text()
    sections = re.findall(r"^section (\w+) \d+", text, flags=re.M)
    assert sections == ["sweep", "best", "decode"] and set(sections) <= set(gpu_suite.SECTIONS)
    for script in re.findall(r"python (benchmarks/\w+\.py)", text):
        assert (REPO / script).is_file(), script
    # The whole suite, over xdist workers one module each, its report in the output folder.
    assert re.search(r'python -m pytest "\$\{pytest_args\[@\]\}" tests >', text)
    assert '--junitxml="$out/junit.xml"' in text
    assert "-n 8 --dist loadscope" in text and "--timeout" in text
    # Every step has a time limit (kill-after included), and together they fit the 8 minutes
    # (the trainer's runs once per strategy, the decode runs once per decoder).
    calls = re.findall(r"(?<![-\w])timeout (?:-s \w+ )?(?:-k (\d+) )?(\d+)", text)
    limits = [int(k or 0) + int(n) for k, n in calls] + [int(n) for n in re.findall(r"^section \w+ (\d+)", text, re.M)]
    per_strategy = int(re.search(r"timeout (\d+) python -m torch.distributed.run", text).group(1))
    strategies = re.search(r"for strategy in ([\w ]+);", text).group(1).split()
    assert strategies == ["ddp", "fsdp2"]
    per_decoder = int(re.search(r"timeout (\d+) python -m maescale pretrain", text).group(1))
    decoders = re.search(r"for decode in ([\w ]+);", text).group(1).split()
    assert decoders == ["gpu", "cpu"]
    assert sum(limits) + per_strategy * (len(strategies) - 1) + per_decoder * (len(decoders) - 1) <= 8 * 60


def test_gpu_suite_sections_on_cpu(tmp_path):
    """The Python side of gpu_check.sh with a tiny model (bf16 autocast works on CPU too)."""
    tiny = ["--out", str(tmp_path), "--models", MICRO, "--steps", "1", "--warmup", "1", "--rounds", "1",
            "--device", "cpu"]
    gpu_suite.main(["sweep", *tiny, "--batch-sizes", "2", "4"])
    assert json.loads((tmp_path / "best_batch.json").read_text())[MICRO] in (2, 4)
    gpu_suite.main(["encoder", *tiny, "--encoder-batch", "2"])
    # in its own process, as gpu_check.sh runs each section
    _script("benchmarks/gpu_suite.py", "best", *tiny, "--no-compile")
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    sections = [row["section"].split()[0] for row in rows]
    assert sections == ["sweep", "sweep", "encoder", "encoder", "best"]
    assert rows[0]["precision"] == "bf16" and rows[-1]["variant"] == "eager"
    assert "### encoder" in (tmp_path / "table.md").read_text()


def test_gpu_suite_decode_section_on_cpu(tmp_path):
    gpu_suite.main(["decode", "--out", str(tmp_path), "--device", "cpu", "--rounds", "1", "--jpegs",
                    str(tmp_path / "photos"), "--decode-images", "16", "--decode-batch", "8"])
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [row["section"] for row in rows] == ["decode", "decode"] and all(row["images_per_s"] > 0 for row in rows)
    assert len(list((tmp_path / "photos" / "photo").glob("*.jpg"))) == 16


def test_forward_backward_only_variant_leaves_the_weights():
    bench = StepBench(MICRO, batch_size=2, device="cpu")
    before = bench.model.decoder_pred.weight.detach().clone()
    bench.step_fn(StepVariant(optimizer_step=False))()
    assert torch.equal(bench.model.decoder_pred.weight, before) and bench.model.decoder_pred.weight.grad is None
    bench.step_fn(StepVariant())()
    assert not torch.equal(bench.model.decoder_pred.weight, before)


def test_cpu_clock_ignores_time_off_the_cpu():
    import time

    from maescale.bench import time_steps

    cpu = torch.device("cpu")
    assert time_steps(lambda: time.sleep(0.05), 2, cpu, clock="wall") >= 0.05
    assert time_steps(lambda: time.sleep(0.05), 2, cpu, clock="cpu") < 0.02


def test_host_overhead_breaks_steps_down_for_every_strategy(tmp_path):
    """Both modes of benchmarks/host_overhead.py on the micro model, 1 and 2 real gloo processes."""
    rows_file = tmp_path / "rows.jsonl"
    common = ["--models", MICRO, "--batch-sizes", "2", "--rounds", "1", "--steps", "1", "--warmup", "1",
              "--jsonl", str(rows_file)]
    _script("benchmarks/host_overhead.py", *common, "--world-sizes", "1", "2", "--profile", "--profile-steps", "1",
            "--candidates", "plain", "ddp", "fsdp2")
    _script("benchmarks/host_overhead.py", *common, "--world-sizes", "2", "--trainer", "--trainer-steps", "2",
            "--trainer-workers", "0")
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    steps = {(r["world"], r["candidate"]): r for r in rows if "candidate" in r}
    assert set(steps) == {(1, "plain"), (1, "ddp"), (1, "fsdp2"), (2, "ddp"), (2, "fsdp2")}
    assert {steps[(1, "fsdp2")]["reference"], steps[(2, "fsdp2")]["reference"]} == {"plain", "ddp"}
    for row in steps.values():
        assert row["step"] == pytest.approx(sum(row[p] for p in ("forward", "backward", "clip", "optimizer")))
        assert row["train_step"] > 0
    # On one process the trainer's fsdp2 is the model whole; on two, micro's 2 encoder blocks (one unit
    # of up to 4), its decoder block and the root are 3 FSDP2 units.
    assert steps[(1, "fsdp2")]["units"] == 0 and "FSDP2" not in steps[(1, "fsdp2")]["profile"]
    assert steps[(2, "fsdp2")]["units"] == 3 and steps[(2, "fsdp2")]["profile"]["FSDP2"] > 0
    assert "FSDP2" not in steps[(1, "plain")]["profile"]
    trainer = [r for r in rows if "strategy" in r]
    assert [(r["world"], r["strategy"]) for r in trainer] == [(2, "ddp"), (2, "fsdp2")]
    assert all(r["trainer_ms"] > 0 and r["bare_ms"] > 0 for r in trainer)


def test_host_overhead_compares_with_plain_then_ddp():
    import host_overhead  # benchmarks/ is on sys.path

    assert host_overhead.reference_for("fsdp2", {"plain": 10.0, "ddp": 11.0, "fsdp2": 10.0}) == "plain"
    assert host_overhead.reference_for("zero3", {"ddp": 1.0, "zero3": 2.0}) == "ddp"
    assert host_overhead.reference_for("zero2", {"zero2": 1.0}) is None


# ------------------------------------------------------------------ memory vs the plan


def test_memory_script_sets_recorded_rows_against_the_plan():
    results = REPO / "benchmarks/results"
    out = _script("benchmarks/memory.py", "--cpu", str(results / "2026-12-02-memory-vit-b-mmap-threshold.txt"),
                  "--gpu", str(results / "2026-11-26-h200.jsonl")).stdout
    rows = [line for line in out.splitlines() if line.startswith("| mae_")]
    assert len(rows) == 4 + 8  # ddp fsdp2 zero2 zero3 on CPU; the 8 recorded H200 steps
    within, total = map(int, re.search(r"(\d+) of (\d+) predictions within 20%", out).groups())
    assert within == total == 4 * 3 + 8


# ------------------------------------------------------------------ the pages that cite them


def test_benchmark_pages_cite_existing_scripts_and_every_recorded_result():
    """README and docs/ name only scripts and results that exist (docs/ARCHIVE.md names those of
    earlier commits), and docs/BENCHMARKS.md names every recorded result."""
    pages = [REPO / "README.md", *sorted(p for p in (REPO / "docs").glob("*.md") if p.name != "ARCHIVE.md")]
    text = "\n".join(page.read_text() for page in pages)
    for script in set(re.findall(r"benchmarks/\w+\.(?:py|sh)", text)):
        assert (REPO / script).is_file(), script
    cited = {name.rstrip(".") for name in re.findall(r"benchmarks/results/([\w.*\[\]-]+)", text)}
    recorded = {path.name for path in (REPO / "benchmarks/results").iterdir()}
    for pattern in cited:
        assert any(fnmatch.fnmatch(name, pattern) for name in recorded), pattern
    benchmarks_page = (REPO / "docs/BENCHMARKS.md").read_text()
    for name in recorded:
        assert name in benchmarks_page or any(fnmatch.fnmatch(name, p) for p in cited), name


def test_the_loader_benchmark_reads_your_own_shards(tmp_path):
    """`benchmarks/loader.py --config RECIPE key=value ...` times the loader pretraining builds, on any data."""
    from conftest import maescale_printed
    from test_matrix import write_jpeg_split

    write_jpeg_split(tmp_path / "jpegs", 40, seed=3)
    maescale_printed("write-shards", "--src", tmp_path / "jpegs", "--out", tmp_path / "shards",
                     "--samples-per-shard", 10, "--workers", 0)
    done = _script("benchmarks/loader.py", "--config", "configs/pretrain/vit_b.yaml", "model.name=mae_vit_micro_patch4",
                   "data.kind=shards", f"data.path={tmp_path / 'shards'}", "data.batch_size=4", "data.num_workers=0",
                   "--batches", "3", "--out", str(tmp_path / "rate.jsonl"))
    assert "data.kind=shards decode=cpu" in done.stdout and "32x32 crops" in done.stdout
    (row,) = [json.loads(line) for line in (tmp_path / "rate.jsonl").read_text().splitlines()]
    suggested = re.search(r"--loader-rate (\d+)", done.stdout)
    assert row["images_per_s"] > 0 and suggested and abs(int(suggested.group(1)) - row["images_per_core_s"]) <= 1
