"""Config loading: defaults <- YAML <- dotlist, and errors that name the key."""

from pathlib import Path

import pytest
import yaml

from maescale.config import Config, ConfigError, describe_keys, load_config, save_resolved

REPO = Path(__file__).resolve().parents[1]


def test_defaults_yaml_and_overrides_merge_in_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("seed: 3\noptim:\n  blr: 2.0e-4\ndata:\n  batch_size: 16\n")
    cfg = load_config(path, ["optim.blr=1e-3", "train.max_steps=50", "model.norm_pix_loss=false"])
    assert cfg.seed == 3  # from YAML
    assert cfg.data.batch_size == 16  # from YAML
    assert cfg.optim.blr == pytest.approx(1e-3)  # override wins, "1e-3" read as a float
    assert cfg.train.max_steps == 50
    assert cfg.model.norm_pix_loss is False
    assert cfg.optim.weight_decay == Config().optim.weight_decay  # untouched default


def test_unknown_key_names_it_and_suggests_the_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"'optim\.bLR'; did you mean optim\.blr\?"):
        load_config(None, ["optim.bLR=1"])
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  batchsize: 4\n")
    with pytest.raises(ConfigError, match=r"'data\.batchsize'.*data\.batch_size"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"'modle'.*model"):
        load_config(None, ["modle.name=x"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.batch_size=abc", r"data\.batch_size must be int"),
        ("data.batch_size=1.5", r"data\.batch_size must be int"),
        ("model.norm_pix_loss=3", r"model\.norm_pix_loss must be bool"),
        ("train.precision=fp16", r"train\.precision must be one of 'fp32', 'bf16'"),
        ("data.kind=imagenet", r"data\.kind must be one of"),
        ("model=3", r"'model' is a section"),
        ("optim.blr", r"key=value"),
    ],
)
def test_wrong_types_fail_with_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.mask_ratio=1.0", "model.mask_ratio"),
        ("model.mask_ratio=0", "model.mask_ratio"),
        ("data.batch_size=0", "data.batch_size"),
        ("train.accum_iter=0", "train.accum_iter"),
        ("schedule.warmup_epochs=900", "schedule.warmup_epochs"),
        ("checkpoint.keep_last=0", "checkpoint.keep_last"),
        ("parallel.strategy=zero4", "parallel.strategy"),
        ("parallel.cpu_offload=true", "parallel.cpu_offload"),  # the default strategy is ddp
        ("parallel.replicate_degree=2", "it needs parallel.strategy=hsdp"),
        ("parallel.strategy=deepspeed", "parallel.strategy=deepspeed: the ZeRO stage is part of the name"),
        ("parallel.zero_stage=3", "parallel.zero_stage=3: the ZeRO stage is part of the name"),
        ("parallel.forward_prefetch=true", "no longer a key"),
    ],
)
def test_impossible_values_fail_with_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(None, [override])


def test_image_not_divisible_by_patch():
    with pytest.raises(ConfigError, match=r"img_size=30.*patch_size=4"):
        load_config(None, ["model.img_size=30", "model.patch_size=4"])


def test_folder_needs_a_path():
    with pytest.raises(ConfigError, match=r"data\.path"):
        load_config(None, ["data.kind=folder"])


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["optim.blr=3e-4", "seed=7"])
    save_resolved(cfg, tmp_path / "config.yaml", {"lr": 0.1, "effective_batch": 512})
    written = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert written["derived"] == {"lr": 0.1, "effective_batch": 512}
    assert load_config(tmp_path / "config.yaml") == cfg  # `derived` is informational


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "pretrain").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.model.name.startswith("mae_vit_")


def test_paper_recipe_in_shipped_configs():
    for name in ("vit_b", "vit_l", "vit_h"):
        cfg = load_config(REPO / "configs" / "pretrain" / f"{name}.yaml")
        assert cfg.optim.blr == pytest.approx(1.5e-4)
        assert cfg.schedule.warmup_epochs == 40
        assert cfg.model.mask_ratio == 0.75 and cfg.model.norm_pix_loss
        assert (cfg.optim.beta1, cfg.optim.beta2, cfg.optim.weight_decay) == (0.9, 0.95, 0.05)


def test_every_key_has_help():
    rows = describe_keys()
    keys = {key for key, _, _ in rows}
    for required in (
        "output_dir", "seed", "model.name", "model.mask_ratio", "model.norm_pix_loss", "data.kind", "data.path",
        "data.batch_size", "data.num_workers", "optim.blr", "optim.weight_decay", "schedule.epochs",
        "schedule.warmup_epochs", "train.max_steps", "train.accum_iter", "train.precision", "parallel.strategy",
        "checkpoint.every_steps", "checkpoint.keep_last",
    ):
        assert required in keys
    assert all(help_text for _, _, help_text in rows)
