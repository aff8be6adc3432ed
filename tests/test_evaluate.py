"""Evaluation protocols: LARS, the BN head, kNN, layer decay, fine-tuning, and pretrain -> linprobe -> knn
through the CLI (one and two processes), plus a CIFAR-10 pipeline check when ../shared/data is there."""

import os
import tarfile
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import maescale_printed
from PIL import Image
from processes import run_ranks

from maescale import parallel
from maescale.config import ConfigError, load_config
from maescale.data import SyntheticShapes, build_loader
from maescale.evaluate.accuracy import topk_accuracy
from maescale.evaluate.config import EvalConfig
from maescale.evaluate.features import gather_in_order, pooled
from maescale.evaluate.finetune import classifier_from_mae, finetune, layer_decay_groups
from maescale.evaluate.knn import knn_scores
from maescale.evaluate.lars import LARS
from maescale.evaluate.linprobe import build_head
from maescale.evaluate.monitor import KnnMonitor
from maescale.layout import Layout
from maescale.metrics import read_metrics
from maescale.models import build_model

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
CIFAR_TAR = SHARED_DATA / "cifar10-jpeg.tar.gz"
EVAL_DATA = ["data.kind=synthetic", "data.synthetic_size=256", "data.batch_size=64", "data.num_workers=0"]


def cli(*args: str, nproc: int = 1) -> str:
    """`maescale ...` in this process, or on `nproc` processes; returns what it printed."""
    if nproc == 1:
        return maescale_printed(*args)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = run_ranks(list(args), nproc, env, REPO, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


# ---------------------------------------------------------------- protocol pieces


def test_lars_step_matches_hand_computation():
    weight = torch.nn.Parameter(torch.tensor([[3.0, 0.0], [0.0, 4.0]]))  # ||w|| = 5
    bias = torch.nn.Parameter(torch.tensor([1.0, -1.0]))
    opt = LARS([weight, bias], lr=0.5, weight_decay=0.1, momentum=0.9, trust_coefficient=0.01)
    weight.grad = torch.tensor([[0.7, 0.0], [0.0, 0.6]])
    bias.grad = torch.tensor([0.2, 0.4])
    opt.step()
    # matrix: g = grad + 0.1 w = [[1.0, 0], [0, 1.0]], ||g|| = sqrt(2); update = 0.01 * 5 / sqrt(2) * g
    scaled = 0.05 / 2**0.5
    assert torch.allclose(weight.detach(), torch.tensor([[3.0 - 0.5 * scaled, 0.0], [0.0, 4.0 - 0.5 * scaled]]))
    # vector: plain momentum SGD, no decay, no trust ratio
    assert torch.allclose(bias.detach(), torch.tensor([1.0 - 0.1, -1.0 - 0.2]))
    bias.grad = torch.tensor([0.0, 0.0])
    opt.step()  # buffer = 0.9 * previous
    assert torch.allclose(bias.detach(), torch.tensor([0.9 - 0.5 * 0.18, -1.2 - 0.5 * 0.36]))
    zero = torch.nn.Parameter(torch.zeros(2, 2))
    zero.grad = torch.ones(2, 2)
    LARS([zero], lr=1.0, momentum=0.0).step()  # ||w|| = 0: trust ratio falls back to 1
    assert torch.equal(zero.detach(), -torch.ones(2, 2))


def test_bn_head_has_no_affine_and_whitens_features():
    torch.manual_seed(0)
    head = build_head(16, 5)
    assert [name for name, _ in head.named_parameters()] == ["1.weight", "1.bias"]
    assert head[1].weight.std() < 0.02 and torch.equal(head[1].bias, torch.zeros(5))
    features = torch.randn(256, 16) * 7 + 3
    normalised = head[0](features)
    assert torch.allclose(normalised.mean(0), torch.zeros(16), atol=1e-5)
    assert torch.allclose(normalised.var(0, unbiased=False), torch.ones(16), atol=1e-3)
    head.eval()  # evaluation uses the running statistics, not the batch's
    assert not torch.allclose(head[0](features).mean(0), torch.zeros(16), atol=1e-2)


def test_knn_weighted_vote_known_answer():
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.1, 1.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 2])
    query = torch.tensor([[1.0, 0.05], [0.0, -1.0]])
    # query 0: nearest is class 0 (cos ~1); with a sharp temperature it outvotes two class-1 neighbours
    sharp = knn_scores(bank, labels, query, k=3, temperature=0.07, num_classes=3)
    assert sharp.argmax(1)[0] == 0
    flat = knn_scores(bank, labels, query, k=3, temperature=100.0, num_classes=3)
    assert flat.argmax(1)[0] == 1  # nearly equal weights: the majority wins
    # query 1 by hand: cosines to the bank, the 3 largest vote with exp(cos / T)
    cos = torch.nn.functional.normalize(bank, dim=1) @ torch.tensor([0.0, -1.0])
    top = cos.topk(3)
    votes = torch.zeros(3).index_add_(0, labels[top.indices], (top.values / 0.07).exp())
    assert torch.allclose(sharp[1], votes)
    assert topk_accuracy(sharp, torch.tensor([0, 1]), ks=(1, 2)) == {"top1": 50.0, "top2": 50.0}  # class 1 ranks last


def test_knn_separates_gaussian_clusters():
    torch.manual_seed(0)
    centres = torch.randn(4, 32) * 3
    labels = torch.arange(4).repeat_interleave(50)
    bank = centres[labels] + torch.randn(200, 32)
    queries = centres[labels[::5]] + torch.randn(40, 32)
    scores = knn_scores(bank, labels, queries, k=20, temperature=0.07, num_classes=4)
    assert topk_accuracy(scores, labels[::5])["top1"] == 100.0


def test_gather_in_order_and_pooling():
    local = torch.tensor([[2.0], [0.0]])
    assert torch.equal(gather_in_order(local, torch.tensor([2, 0]), 3), torch.tensor([[0.0], [0.0], [2.0]]))
    tokens = torch.arange(12.0).view(1, 3, 4)
    assert torch.equal(pooled(tokens, "cls"), tokens[:, 0])
    assert torch.equal(pooled(tokens, "mean"), tokens[:, 1:].mean(1))


def test_eval_config_names_bad_keys():
    with pytest.raises(ConfigError, match="linprobe.blrr"):
        load_config(None, ["linprobe.blrr=1"], schema=EvalConfig)
    with pytest.raises(ConfigError, match="encoder.model is required"):
        load_config(None, [], schema=EvalConfig)
    with pytest.raises(ConfigError, match="knn.k"):
        load_config(None, ["encoder.model=mae_vit_micro_patch4", "knn.k=0"], schema=EvalConfig)


# ---------------------------------------------------------------- fine-tuning pieces


def test_layer_decay_groups_scale_by_depth():
    mae = build_model("mae_vit_micro_patch4")  # 2 blocks: embeddings layer 0, blocks 1-2, head 3
    model = classifier_from_mae(mae, classes=10)
    decay = 0.5
    groups = layer_decay_groups(model, weight_decay=0.05, layer_decay=decay)
    scale = {id(p): (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert scale[id(named["patch_embed.proj.weight"])] == (decay**3, 0.05)
    assert scale[id(named["cls_token"])] == (decay**3, 0.0)
    assert scale[id(named["pos_embed"])] == (decay**3, 0.0)
    assert scale[id(named["blocks.0.attn.qkv.weight"])] == (decay**2, 0.05)
    assert scale[id(named["blocks.1.mlp.fc1.weight"])] == (decay**1, 0.05)
    assert scale[id(named["blocks.1.norm1.weight"])] == (decay**1, 0.0)
    assert scale[id(named["head.weight"])] == (1.0, 0.05)
    assert scale[id(named["fc_norm.bias"])] == (1.0, 0.0)
    assert len(scale) == len(named)


def test_classifier_keeps_the_encoder_and_interpolates_position_embeddings():
    torch.manual_seed(0)
    mae = build_model("mae_vit_micro_patch4").eval()
    same = classifier_from_mae(mae, classes=10).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = same.forward_features(images)  # blocks only: the final norm moved to fc_norm
        assert torch.allclose(mae.norm(tokens), mae.forward_features(images), atol=1e-5)
    bigger = classifier_from_mae(mae, classes=10, img_size=48, drop_path=0.1)
    assert bigger.pos_embed.shape == (1, 1 + 12 * 12, 64)
    assert torch.equal(bigger.pos_embed[:, 0], mae.pos_embed[:, 0])  # cls row kept
    assert bigger(torch.randn(2, 3, 48, 48)).shape == (2, 10)


def test_finetune_a_few_steps_at_another_resolution(tmp_path):
    cfg = load_config(
        None,
        [
            f"output_dir={tmp_path}",
            "encoder.model=mae_vit_micro_patch4",
            *EVAL_DATA,
            "finetune.img_size=40",
            "finetune.max_steps=3",
            "finetune.log_every=1",
            "finetune.blr=1e-3",
        ],
        schema=EvalConfig,
    )
    result = finetune(cfg)
    rows = [r for r in read_metrics(tmp_path) if r["protocol"] == "finetune"]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows if "loss" in r)
    assert 0 <= result["top1"] <= 100 and result["steps"] == 3
    from safetensors import safe_open

    with safe_open(str(result["weights"]), "pt") as handle:
        assert handle.get_tensor("pos_embed").shape == (1, 1 + 10 * 10, 64)
        assert '"img_size": 40' in handle.metadata()["timm_kwargs"]


# ---------------------------------------------------------------- end to end through the CLI


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A micro MAE pretrained for a few steps on the synthetic shapes (through the CLI)."""
    out = tmp_path_factory.mktemp("pretrain") / "run"
    cli(
        "pretrain",
        f"output_dir={out}",
        "model.name=mae_vit_micro_patch4",
        "data.synthetic_size=256",
        "data.batch_size=32",
        "data.num_workers=0",
        "schedule.epochs=2",
        "schedule.warmup_epochs=0.5",
        "optim.blr=2e-3",
        "train.log_every=4",
        "monitor.knn_every=5",
        "monitor.bank_images=64",
        "monitor.val_images=32",
    )
    return out / "checkpoints" / "step_00000016"


def test_online_knn_monitor_runs_every_n_steps_and_at_the_end(pretrained):
    rows = [row for row in read_metrics(pretrained.parents[1]) if "knn_top1" in row]
    assert [row["step"] for row in rows] == [5, 10, 15, 16]
    assert all(0 <= row["knn_top1"] <= row["knn_top5"] <= 100 for row in rows)


def test_knn_monitor_equals_knn_of_directly_encoded_images():
    cfg = load_config(
        overrides=[*EVAL_DATA, "monitor.bank_images=40", "monitor.val_images=20", "monitor.k=5", "data.batch_size=16"]
    )
    torch.manual_seed(0)
    model = build_model("mae_vit_micro_patch4").train()
    monitor = KnnMonitor(cfg, parallel.build_accelerator(Layout()), model.img_size, model.embed_dim)
    result = monitor(model)
    assert model.training  # put back in training mode

    def encoded(split: str, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        data = replace(cfg.data, batch_size=256)
        batch = next(iter(build_loader(data, img_size=model.img_size, seed=0, train=False, split=split).epoch(0)))
        picked = torch.arange(count) * 256 // count  # evenly spaced over the 256 images
        with torch.no_grad():
            return model.forward_features(batch.images[picked])[:, 1:].mean(dim=1), batch.labels[picked]

    bank, bank_labels = encoded("train", 40)
    queries, labels = encoded("val", 20)
    scores = knn_scores(bank, bank_labels, queries, k=5, temperature=0.07, num_classes=SyntheticShapes.num_classes)
    expected = topk_accuracy(scores, labels)
    assert result == pytest.approx({"knn_top1": expected["top1"], "knn_top5": expected["top5"]})


def test_pretrain_then_linprobe_then_knn_through_the_cli(pretrained, tmp_path):
    out = tmp_path / "eval"
    common = [f"output_dir={out}", f"encoder.ckpt={pretrained}", *EVAL_DATA]
    lp = cli(
        "linprobe", *common, "linprobe.batch_size=64", "linprobe.epochs=6", "linprobe.warmup_epochs=1", "linprobe.blr=5"
    )
    assert "linprobe val: top-1" in lp
    kn = cli("knn", *common, "knn.k=10")
    assert "features of train read from" in kn  # linprobe's features reused
    rows = read_metrics(out)
    probe = [r for r in rows if r["protocol"] == "linprobe"]
    assert [r["epoch"] for r in probe] == list(range(1, 7)) and probe[-1]["step"] == 6 * 4
    assert probe[-1]["loss"] < probe[0]["loss"]  # the head learns on the training features
    knn_row = [r for r in rows if r["protocol"] == "knn"][-1]
    assert 0 <= knn_row["top1"] <= knn_row["top5"] <= 100
    assert (out / "linprobe_config.yaml").is_file() and (out / "knn_config.yaml").is_file()


def test_linprobe_on_two_processes_matches_one(pretrained, tmp_path):
    args = [
        f"encoder.ckpt={pretrained}",
        *EVAL_DATA,
        "data.batch_size=32",
        "linprobe.batch_size=64",
        "linprobe.epochs=2",
        "linprobe.warmup_epochs=1",
        "linprobe.augment=true",
    ]
    cli("linprobe", f"output_dir={tmp_path / 'one'}", *args)
    cli("linprobe", f"output_dir={tmp_path / 'two'}", *args, nproc=2)
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two] == [4, 8]
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["top1"] == pytest.approx(b["top1"], abs=0.5)


# ---------------------------------------------------------------- real data


def unpack_cifar_subset(root: Path, per_class: dict[str, int]) -> Path:
    """The first N JPEGs of each class of each split (the archive streams class by class)."""
    counts: Counter = Counter()
    with tarfile.open(CIFAR_TAR, "r:gz") as archive:
        for member in archive:
            parts = member.name.split("/")
            if not member.isfile() or len(parts) != 3 or parts[0] not in per_class:
                continue
            if counts[parts[0], parts[1]] < per_class[parts[0]]:
                counts[parts[0], parts[1]] += 1
                target = root / member.name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(archive.extractfile(member).read())
    return root


@pytest.mark.skipif(not CIFAR_TAR.is_file(), reason=f"CIFAR-10 archive not found at {CIFAR_TAR} (../shared/data)")
def test_knn_and_linprobe_pipeline_on_cifar10_jpegs(tmp_path):
    root = unpack_cifar_subset(tmp_path / "cifar10", {"train": 40, "test": 20})
    with Image.open(next((root / "test").rglob("*.jpg"))) as image:
        assert image.size == (32, 32)
    common = [
        f"output_dir={tmp_path / 'eval'}",
        "encoder.model=mae_vit_micro_patch4",
        "encoder.pool=mean",
        "data.kind=folder",
        f"data.path={root}",
        "val_split=test",
        "data.batch_size=100",
        "data.num_workers=0",
    ]
    cli("linprobe", *common, "linprobe.batch_size=100", "linprobe.epochs=3", "linprobe.warmup_epochs=1")
    cli("knn", *common)
    rows = read_metrics(tmp_path / "eval")
    assert {r["protocol"] for r in rows} == {"linprobe", "knn"}
    knn_row = rows[-1]
    # 200 test images, 10 classes: even a random encoder's colour statistics beat chance
    assert knn_row["top1"] > 10.0 and knn_row["top5"] > 50.0
