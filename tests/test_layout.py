"""The process layout: degrees, checks, names, the earlier spellings; and `maescale plan --config`
naming the same layout as a real 2-process run of every shipped recipe."""

import os
import re
from pathlib import Path

import pytest
import yaml
from conftest import run_maescale
from processes import run_ranks

from maescale.config import ConfigError, load_config
from maescale.layout import STRATEGIES, Layout

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "configs/pretrain").glob("*.yaml"))


@pytest.mark.parametrize("layout, degrees, line", [
    (Layout("ddp", 1), (1, 0, True), "ddp: whole model (shard degree 1), fp32"),
    (Layout("ddp", 8, precision="bf16"), (1, 0, True), "ddp: replicate 8, bf16 autocast"),
    (Layout("fsdp2", 1, precision="bf16"), (1, 0, True), "fsdp2: whole model (shard degree 1), bf16 autocast"),
    (Layout("fsdp2", 1, cpu_offload=True), (1, 0, False), "fsdp2: shard 1, CPU offload, fp32"),
    (Layout("fsdp2", 8, precision="bf16"), (8, 0, False), "fsdp2: shard 8, bf16"),
    (Layout("hsdp", 32, 4, precision="bf16"), (8, 0, False), "hsdp: shard 8 x replicate 4, bf16"),
    (Layout("zero1", 4), (4, 1, False), "zero1: partitioned over 4, fp32"),
    (Layout("zero3", 2, precision="bf16"), (2, 3, False), "zero3: partitioned over 2, bf16"),
])
def test_layout_degrees_and_its_name(layout, degrees, line):
    assert (layout.shard_degree, layout.zero_stage, layout.whole_model) == degrees
    assert layout.describe() == line
    assert layout.autocast == ("autocast" in line)


@pytest.mark.parametrize("kwargs, message", [
    (dict(strategy="deepspeed"), "choose one of ddp, fsdp2, hsdp, zero1, zero2, zero3"),
    (dict(strategy="hsdp", world_size=8, replicate_degree=3), "replicate_degree=3 does not divide the 8 processes"),
    (dict(strategy="fsdp2", world_size=8, replicate_degree=2), "it needs parallel.strategy=hsdp"),
    (dict(strategy="zero2", cpu_offload=True), "parallel.cpu_offload needs parallel.strategy=fsdp2 or hsdp"),
    (dict(world_size=0), "at least 1"),
    (dict(precision="fp16"), "train.precision='fp16'"),
])
def test_an_impossible_layout_is_refused_when_built(kwargs, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        Layout(**kwargs)


def test_hsdp_replicates_across_the_nodes_unless_told():
    cfg = load_config(None, ["parallel.strategy=hsdp"])
    assert Layout.from_config(cfg.parallel, "bf16", world_size=16, nodes=2).mesh_shape == {"replicate": 2, "shard": 8}
    cfg = load_config(None, ["parallel.strategy=hsdp", "parallel.replicate_degree=4"])
    layout = Layout.from_config(cfg.parallel, "bf16", world_size=16, nodes=2)
    assert layout.describe() == "hsdp: shard 4 x replicate 4, bf16"
    assert Layout.from_config(load_config(None, []).parallel, "fp32", 16, nodes=2).replicate_degree == 1


def test_an_earlier_spelling_in_a_yaml_file_loads_with_a_notice(tmp_path, caplog):
    """Run folders written before keep loading: deepspeed + zero_stage, fsdp2 with replicas."""
    for old, new in [({"strategy": "deepspeed", "zero_stage": 3}, "zero3"),
                     ({"strategy": "fsdp2", "replicate_degree": 2, "zero_stage": 2}, "hsdp"),
                     ({"strategy": "ddp", "zero_stage": 2}, "ddp")]:
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump({"parallel": old}))
        with caplog.at_level("INFO", logger="maescale.layout"):
            assert load_config(path).parallel.strategy == new
    notices = [record.getMessage() for record in caplog.records]
    assert len(notices) == 2 and "parallel.strategy=deepspeed with zero_stage=3 is now spelled" in notices[0]


def test_every_strategy_name_lives_in_one_module():
    """No second list of the names: a literal naming most of them outside maescale/layout.py."""
    pattern = re.compile(r"""["'](ddp|fsdp2|hsdp|zero[123])["']""")
    offenders = []
    for folder in ("maescale", "slurm", "benchmarks"):
        for path in (REPO / folder).rglob("*.py"):
            if path.name == "layout.py":
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if len(set(pattern.findall(line))) >= 3:
                    offenders.append(f"{path.relative_to(REPO)}:{number}")
    assert offenders == []
    assert set(STRATEGIES) == {"ddp", "fsdp2", "hsdp", "zero1", "zero2", "zero3"}


def planned_layout(recipe: Path) -> str:
    out = run_maescale("plan", "--world-size", "2", "--gpus-per-node", "2", "--config", str(recipe)).stdout
    return re.search(r"^setup: (.*) on 2 GPU\(s\)", out, re.MULTILINE).group(1)


# What makes a recipe runnable on 2 CPU processes in seconds, leaving its layout (strategy,
# precision, offload, replicas) as the recipe says.
SMALL_RUN = [
    "model.name=mae_vit_micro_patch4", "model.img_size=null", "model.patch_size=null", "model.decoder_depth=null",
    "model.decoder_embed_dim=null", "model.decoder_num_heads=null", "model.in_chans=3", "data.kind=synthetic",
    "data.synthetic_size=32", "data.batch_size=4", "data.num_workers=0", "train.max_steps=1",
    "train.figure_every=null", "monitor.knn_every=null", "parallel.backend=gloo", "checkpoint.resume=none",
]


def test_plan_of_every_recipe_names_the_layout_a_two_process_run_prints(tmp_path):
    """`maescale plan --config R` on 2 GPUs and `maescale pretrain --config R` on 2 CPU processes name
    the same layout, for every shipped recipe (one run per distinct layout)."""
    planned = {recipe.name: planned_layout(recipe) for recipe in RECIPES}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for line in sorted(set(planned.values())):
        recipe = next(REPO / "configs/pretrain" / name for name, value in planned.items() if value == line)
        args = ["pretrain", "--config", str(recipe), *SMALL_RUN, f"output_dir={tmp_path / recipe.stem}"]
        result = run_ranks(args, 2, env, REPO, timeout=300)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        assert f"{line} on 2 process(es) (cpu, gloo" in result.stdout, (recipe.name, line, result.stdout[-2000:])
    assert len(set(planned.values())) >= 3  # the recipes span fp32 ddp, bf16 ddp and bf16 fsdp2
