"""Tests for maescale.data: synthetic data, folder reader, transforms, epoch loader."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch
from conftest import BAD_FILES, write_mixed_image_folder
from PIL import Image

from maescale.config import DataConfig
from maescale.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Batch,
    EpochLoader,
    EvalTransform,
    ImageFolderDataset,
    Loader,
    MAETrainTransform,
    SyntheticShapes,
    build_loader,
)
from maescale.data.synthetic import NUM_CLASSES
from maescale.data.transforms import sample_crop_box
from maescale.errors import ConfigError, DataError


def data_cfg(**overrides) -> DataConfig:
    """A small data config: 64 synthetic images, batches of 8, no worker processes."""
    return DataConfig(**{"batch_size": 8, "num_workers": 0, "synthetic_size": 64, **overrides})


def unreadable_notices(caplog) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "unreadable image" in r.getMessage()
    ]


class IndexDataset(torch.utils.data.Dataset):
    """Tiny dataset whose label is the sample index, to trace which samples a batch holds."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        pattern = torch.arange(3 * 12 * 12, dtype=torch.int64).view(3, 12, 12)
        return ((pattern * (index + 1)) % 251).to(torch.uint8), index


def index_loader(size=50, batch_size=4, seed=0, rank=0, world_size=1, train=True, num_workers=0, eval_subset=None):
    return EpochLoader(
        IndexDataset(size),
        MAETrainTransform(8) if train else EvalTransform(8),
        batch_size=batch_size,
        seed=seed,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
        train=train,
        eval_subset=eval_subset,
    )


def seen_indices(loader: EpochLoader, epoch: int) -> list[int]:
    return [i for batch in loader.epoch(epoch) for i in batch.labels.tolist()]


def assert_same_batches(first: list[Batch], second: list[Batch]) -> None:
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert torch.equal(a.images, b.images)
        assert torch.equal(a.labels, b.labels)
        assert a.skipped == b.skipped


# --------------------------------------------------------------------------- synthetic


def test_synthetic_image_is_pure_function_of_seed_and_index():
    first, second = SyntheticShapes(100, 32, seed=3), SyntheticShapes(100, 32, seed=3)
    image, label = first[5]
    again, label_again = second[5]
    assert torch.equal(image, again) and label == label_again
    assert not torch.equal(image, first[6][0])
    assert not torch.equal(image, SyntheticShapes(100, 32, seed=4)[5][0])


def test_synthetic_canvas_is_larger_uint8_rgb():
    dataset = SyntheticShapes(10, 32, seed=0)
    image, _ = dataset[0]
    assert image.dtype == torch.uint8
    assert image.shape[0] == 3 and image.shape[1] == image.shape[2] > 32
    with pytest.raises(IndexError):
        dataset[10]


def test_synthetic_labels_in_range_and_varied():
    dataset = SyntheticShapes(300, 32, seed=0)
    labels = [dataset[i][1] for i in range(len(dataset))]
    assert all(0 <= label < NUM_CLASSES for label in labels)
    assert len(set(labels)) == NUM_CLASSES  # 300 draws over 10 balanced classes


def test_synthetic_images_are_structured_not_noise():
    dataset = SyntheticShapes(40, 32, seed=0)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))]).float()
    left, right = images[..., :-1].flatten(), images[..., 1:].flatten()
    correlation = torch.corrcoef(torch.stack([left, right]))[0, 1]
    assert correlation > 0.8
    # Structured but not flat: each image has real contrast.
    assert (images.flatten(1).std(dim=1) > 10).all()


# --------------------------------------------------------------------------- transforms


def test_crop_boxes_respect_scale_and_ratio_bounds():
    height, width, scale, ratio = 300, 400, (0.2, 1.0), (3 / 4, 4 / 3)
    generator = torch.Generator().manual_seed(0)
    areas, ratios = [], []
    for _ in range(2000):
        top, left, crop_h, crop_w = sample_crop_box(height, width, scale, ratio, generator)
        assert 0 <= top and top + crop_h <= height and 0 <= left and left + crop_w <= width
        areas.append(crop_h * crop_w / (height * width))
        ratios.append(crop_w / crop_h)
    # Rounding to whole pixels allows a hair of slack.
    assert min(areas) >= scale[0] - 0.01 and max(areas) <= scale[1] + 1e-9
    assert min(ratios) >= ratio[0] - 0.01 and max(ratios) <= ratio[1] + 0.01
    # The draws actually span the ranges rather than sitting at one value.
    assert min(areas) < 0.25 and max(areas) > 0.9
    assert min(ratios) < 0.8 and max(ratios) > 1.25


def test_crop_boxes_differ_across_seeds_and_repeat_for_same_seed():
    def box(seed):
        return sample_crop_box(300, 400, (0.2, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(seed))

    assert box(1) == box(1)
    assert len({box(seed) for seed in range(20)}) > 15


def test_crop_falls_back_to_ratio_clamped_center_crop():
    # Thin strips cannot hold any crop within the ratio bounds at these scales.
    wide = sample_crop_box(10, 1000, (0.9, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(0))
    assert wide == (0, (1000 - 13) // 2, 10, 13)
    tall = sample_crop_box(1000, 10, (0.9, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(0))
    assert tall == ((1000 - 13) // 2, 0, 13, 10)


def test_train_transform_accepts_pil_uint8_and_float_and_is_seeded():
    transform = MAETrainTransform(16)
    image = SyntheticShapes(1, 20, seed=0)[0][0]
    pil = Image.fromarray(image.permute(1, 2, 0).numpy())
    outputs = [
        transform(source, torch.Generator().manual_seed(7)) for source in (image, pil, image.float() / 255)
    ]
    for output in outputs:
        assert output.shape == (3, 16, 16) and output.dtype == torch.float32
    assert torch.equal(outputs[0], outputs[1])  # PIL and tensor take the same path
    assert torch.allclose(outputs[0], outputs[2], atol=0.05)
    assert not torch.equal(outputs[0], transform(image, torch.Generator().manual_seed(8)))


def test_train_transform_flips_about_half_the_time():
    transform = MAETrainTransform(8, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    image = torch.arange(3 * 8 * 8, dtype=torch.uint8).view(3, 8, 8)
    unflipped = transform(image, torch.Generator().manual_seed(0))
    flips = 0
    for seed in range(200):
        output = transform(image, torch.Generator().manual_seed(seed))
        flips += not torch.equal(output, unflipped)
        assert torch.equal(output, unflipped) or torch.equal(output, unflipped.flip(-1))
    assert 70 < flips < 130


def test_eval_transform_is_deterministic_center_crop():
    transform = EvalTransform(32)
    image = torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    output = transform(image)
    assert output.shape == (3, 32, 32)
    assert torch.equal(output, transform(image, torch.Generator().manual_seed(5)))


def test_eval_transform_crops_away_the_border():
    # crop_pct=0.5: resize 80 -> 64, keep the central 32, so a 4 px frame vanishes.
    framed = torch.full((3, 80, 80), 255, dtype=torch.uint8)
    framed[:, 4:-4, 4:-4] = 0
    output = EvalTransform(32, crop_pct=0.5, mean=(0, 0, 0), std=(1, 1, 1))(framed)
    assert output.max() < 0.01


# --------------------------------------------------------------------------- folder reader


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    return write_mixed_image_folder(tmp_path_factory.mktemp("imagenet"))




def test_folder_lists_classes_and_sorted_images(image_root):
    dataset = ImageFolderDataset(image_root)
    assert dataset.classes == ["cat", "dog", "emu"]
    relative = [str(Path(p).relative_to(image_root)) for p in dataset.paths]
    assert relative == sorted(relative)
    assert "dog/notes.txt" not in relative and "cat/d_cmyk.JPG" in relative
    assert len(dataset) == 12
    assert dataset.labels == [0] * 6 + [1] * 4 + [2] * 2


def test_folder_converts_every_mode_to_rgb(image_root):
    dataset = ImageFolderDataset(image_root)
    by_name = {Path(p).name: i for i, p in enumerate(dataset.paths)}
    for name in ("a_rgb.jpg", "b_grey.jpg", "d_cmyk.JPG", "c_deep.png", "d_tiny.png", "e_palette.bmp"):
        sample = dataset[by_name[name]]
        assert sample.image.mode == "RGB" and sample.skipped == ()
    # 16-bit value 40000 must be scaled (40000 / 256 = 156), not clipped to 255.
    assert dataset[by_name["c_deep.png"]].image.getpixel((0, 0)) == (156, 156, 156)
    assert dataset[by_name["d_tiny.png"]].image.size == (1, 1)


def test_folder_substitutes_next_readable_sample(image_root):
    dataset = ImageFolderDataset(image_root)
    by_name = {Path(p).name: i for i, p in enumerate(dataset.paths)}
    sample = dataset[by_name["b_truncated.jpg"]]
    assert sample.skipped == (str(image_root / "cat" / "b_truncated.jpg"),)
    assert sample.image.size == (96, 64)  # c_big.jpg, the next file
    # Two bad files in a row across a class boundary: both are reported and the
    # label is the substitute's (dog), not the bad file's folder (cat).
    sample = dataset[by_name["e_text.jpg"]]
    assert sample.skipped == (str(image_root / "cat" / "e_text.jpg"), str(image_root / "dog" / "a_empty.jpg"))
    assert sample.label == 1 and sample.image.size == (30, 20)  # dog/c_deep.png


def expected_folder_samples(dataset: ImageFolderDataset, bad: set[str]):
    """(label, skipped) per index, computed independently of the dataset."""
    expected = []
    for index in range(len(dataset)):
        skipped, candidate = [], index
        while dataset.paths[candidate] in bad:
            skipped.append(dataset.paths[candidate])
            candidate = (candidate + 1) % len(dataset)
        expected.append((dataset.labels[candidate], tuple(skipped)))
    return expected


def test_folder_loader_full_batches_labels_and_skipped_reported(image_root, caplog):
    cfg = data_cfg(kind="folder", path=str(image_root), batch_size=4)
    loader = build_loader(cfg, img_size=32, seed=0)
    bad = {str(image_root / name) for name in BAD_FILES}
    expected = expected_folder_samples(loader.dataset, bad)
    with caplog.at_level(logging.WARNING, logger="maescale"):
        batches = list(loader.epoch(0))
    assert loader.batches_per_epoch == 3 and len(batches) == 3
    order = loader.rank_indices(0).tolist()
    for number, batch in enumerate(batches):
        assert batch.images.shape == (4, 3, 32, 32) and batch.images.dtype == torch.float32
        indices = order[number * 4 : (number + 1) * 4]
        assert batch.labels.tolist() == [expected[i][0] for i in indices]
        assert batch.skipped == tuple(p for i in indices for p in expected[i][1])
    notices = unreadable_notices(caplog)
    assert len(notices) == len(bad) and all("\n" not in notice for notice in notices)
    assert all(any(path in notice for notice in notices) for path in bad)
    # Reported once per path: a second epoch, or another loader, stays silent.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="maescale"):
        list(loader.epoch(1))
        list(build_loader(cfg, img_size=32, seed=0, train=False).epoch(0))
    assert unreadable_notices(caplog) == []


def test_folder_eval_sees_every_file_once(image_root, caplog):
    cfg = data_cfg(kind="folder", path=str(image_root), batch_size=5)
    loader = build_loader(cfg, img_size=16, seed=0, train=False)
    expected = expected_folder_samples(loader.dataset, {str(image_root / n) for n in BAD_FILES})
    with caplog.at_level(logging.WARNING, logger="maescale"):
        batches = list(loader.epoch(0))
    assert unreadable_notices(caplog) == []  # the previous test's loader reported them: once per process
    assert [len(b.labels) for b in batches] == [5, 5, 2]
    assert torch.cat([b.labels for b in batches]).tolist() == [label for label, _ in expected]
    assert sorted(p for b in batches for p in b.skipped) == sorted(p for _, s in expected for p in s)


def test_folder_picks_split_subfolder(image_root, tmp_path):
    (tmp_path / "train").symlink_to(image_root, target_is_directory=True)
    assert ImageFolderDataset(tmp_path, split="train").classes == ["cat", "dog", "emu"]
    with pytest.raises(FileNotFoundError, match="val"):
        ImageFolderDataset(tmp_path, split="val")


def test_folder_missing_path_names_it(tmp_path):
    missing = tmp_path / "no_such_dir"
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        ImageFolderDataset(missing)
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        build_loader(data_cfg(kind="folder", path=str(missing)), img_size=32, seed=0)


def test_folder_without_images_names_path_and_layout(tmp_path):
    (tmp_path / "empty_class").mkdir()
    (tmp_path / "empty_class" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError) as error:
        ImageFolderDataset(tmp_path)
    assert str(tmp_path) in str(error.value) and "<class>" in str(error.value)


def test_folder_all_unreadable_raises_clearly(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.jpg").write_bytes(b"junk")
    with pytest.raises(DataError, match="could be read"):
        ImageFolderDataset(tmp_path)[0]


# --------------------------------------------------------------------------- build_loader


def test_build_loader_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="data.path"):
        build_loader(data_cfg(kind="folder", path=None), img_size=32, seed=0)
    with pytest.raises(ConfigError, match="folder.*synthetic"):
        build_loader(data_cfg(kind="tfrecord"), img_size=32, seed=0)
    with pytest.raises(ConfigError, match="data.batch_size"):
        build_loader(data_cfg(batch_size=0), img_size=32, seed=0)
    with pytest.raises(DataError, match="data.batch_size"):
        build_loader(data_cfg(synthetic_size=10, batch_size=8), img_size=32, seed=0, world_size=2)
    with pytest.raises(ConfigError, match="data.crop_min_scale"):
        build_loader(data_cfg(crop_min_scale=0.0), img_size=32, seed=0)


@pytest.mark.parametrize("train", [True, False])
def test_every_kind_implements_the_loader_protocol(image_root, train):
    for cfg in (data_cfg(), data_cfg(kind="folder", path=str(image_root), batch_size=4)):
        loader = build_loader(cfg, img_size=16, seed=0, train=train)
        assert isinstance(loader, Loader)
        assert len(loader) == loader.batches_per_epoch > 0 and loader.batch_size == cfg.batch_size
        labels = torch.cat([batch.labels for batch in loader.epoch(0)])
        assert 0 <= int(labels.min()) and int(labels.max()) < loader.num_classes
        assert len(loader.eval_selection()) == loader.num_samples


def test_synthetic_batches_shape_dtype_and_normalised_range():
    loader = build_loader(data_cfg(synthetic_size=40, batch_size=8), img_size=32, seed=0)
    batches = list(loader.epoch(0))
    assert len(batches) == loader.batches_per_epoch == 5
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for batch in batches:
        assert isinstance(batch, Batch) and batch.skipped == ()
        assert batch.images.shape == (8, 3, 32, 32) and batch.images.dtype == torch.float32
        assert batch.labels.shape == (8,) and batch.labels.dtype == torch.int64
        assert (batch.images >= (0 - mean) / std - 1e-5).all()
        assert (batch.images <= (1 - mean) / std + 1e-5).all()
    # Normalised, so not left in [0, 1] or [0, 255].
    images = torch.cat([b.images for b in batches])
    assert images.min() < -0.5 and images.max() > 1.0


def test_synthetic_train_and_eval_splits_differ():
    cfg = data_cfg(synthetic_size=16)
    train = build_loader(cfg, img_size=32, seed=0).dataset
    val = build_loader(cfg, img_size=32, seed=0, train=False).dataset
    assert not torch.equal(train[0][0], val[0][0])


# --------------------------------------------------------------------------- epoch loader


def test_ranks_are_disjoint_and_cover_epoch_minus_tail():
    ranks = [index_loader(size=50, batch_size=4, rank=r, world_size=2) for r in range(2)]
    assert ranks[0].batches_per_epoch == ranks[1].batches_per_epoch == 6  # floor(50 / 8)
    seen = [seen_indices(loader, epoch=3) for loader in ranks]
    assert len(seen[0]) == len(seen[1]) == 24
    assert not set(seen[0]) & set(seen[1])
    assert len(set(seen[0]) | set(seen[1])) == 48
    # Each step, the ranks' batches together are the batch of one process twice as large.
    single = [b.labels.tolist() for b in index_loader(size=50, batch_size=8, world_size=1).epoch(3)]
    per_rank = [[b.labels.tolist() for b in loader.epoch(3)] for loader in ranks]
    assert single == [r0 + r1 for r0, r1 in zip(*per_rank)]


def test_mask_noise_follows_the_sample_not_the_split():
    """The same sample gets the same mask seed on 2 ranks of batch 4 as on 1 process of batch 8."""
    single = next(build_loader(data_cfg(synthetic_size=64, batch_size=8), img_size=32, seed=4).epoch(1))
    ranks = [
        next(
            build_loader(data_cfg(synthetic_size=64, batch_size=4), img_size=32, seed=4, rank=r, world_size=2).epoch(1)
        )
        for r in range(2)
    ]
    assert torch.equal(single.mask_noise(16), torch.cat([r.mask_noise(16) for r in ranks]))
    assert single.mask_noise(16).shape == (8, 16)
    assert len(set(single.seeds.tolist())) == 8  # every sample its own mask
    other_epoch = next(build_loader(data_cfg(synthetic_size=64, batch_size=8), img_size=32, seed=4).epoch(2))
    assert not torch.equal(single.seeds, other_epoch.seeds)


def test_epoch_order_depends_on_seed_and_epoch_only():
    loader = index_loader(size=50, seed=0)
    assert seen_indices(loader, 0) == seen_indices(index_loader(size=50, seed=0), 0)
    assert seen_indices(loader, 0) != seen_indices(loader, 1)
    assert seen_indices(loader, 0) != seen_indices(index_loader(size=50, seed=1), 0)
    assert sorted(seen_indices(loader, 0)) != list(range(48))  # shuffled and truncated


def test_augmentation_depends_on_sample_not_rank_or_position():
    def images_by_index(loader, epoch):
        batches = list(loader.epoch(epoch))
        return {i: image for b in batches for i, image in zip(b.labels.tolist(), b.images)}

    single = images_by_index(index_loader(world_size=1), 2)
    rank1 = images_by_index(index_loader(rank=1, world_size=2), 2)
    assert set(rank1) & set(single)
    for i in set(rank1) & set(single):
        assert torch.equal(rank1[i], single[i])
    epoch_3 = images_by_index(index_loader(), 3)
    shared = set(single) & set(epoch_3)
    assert any(not torch.equal(single[i], epoch_3[i]) for i in shared)


def test_resume_mid_epoch_equals_tail():
    loader = build_loader(data_cfg(synthetic_size=48, batch_size=6), img_size=32, seed=5)
    full = list(loader.epoch(2))
    assert_same_batches(list(loader.epoch(2, start_batch=3)), full[3:])
    assert list(loader.epoch(2, start_batch=loader.batches_per_epoch)) == []
    with pytest.raises(ValueError, match="start_batch"):
        loader.epoch(2, start_batch=loader.batches_per_epoch + 1)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loading_leaves_the_global_rng_alone(num_workers):
    """The trainer draws masks from the global RNG; a loader that consumed it at each
    epoch start would make a run resumed mid-epoch draw different masks."""
    loader = build_loader(data_cfg(synthetic_size=48, batch_size=6, num_workers=num_workers), img_size=32, seed=9)
    before = torch.get_rng_state()
    next(iter(loader.epoch(0, start_batch=2)))
    assert torch.equal(before, torch.get_rng_state())


def test_worker_count_does_not_change_batches():
    in_process = build_loader(data_cfg(synthetic_size=48, batch_size=6, num_workers=0), img_size=32, seed=9)
    with_workers = build_loader(data_cfg(synthetic_size=48, batch_size=6, num_workers=2), img_size=32, seed=9)
    assert_same_batches(list(in_process.epoch(1)), list(with_workers.epoch(1)))


class ProcessIdDataset(IndexDataset):
    """Labels each sample with the id of the process that loaded it."""

    def __getitem__(self, index: int):
        return super().__getitem__(index)[0], os.getpid()


def test_num_workers_really_loads_in_worker_processes():
    dataset = ProcessIdDataset(16)
    loader = EpochLoader(dataset, EvalTransform(8), batch_size=4, seed=0, num_workers=2, train=False)
    pids = {pid for batch in loader.epoch(0) for pid in batch.labels.tolist()}
    assert os.getpid() not in pids and len(pids) == 2


def test_eval_mode_is_ordered_deterministic_and_drops_nothing():
    ranks = [index_loader(size=50, batch_size=8, rank=r, world_size=2, train=False) for r in range(2)]
    first = [list(loader.epoch(0)) for loader in ranks]
    for loader, batches in zip(ranks, first):
        assert_same_batches(batches, list(loader.epoch(7)))  # no randomness, even across epochs
        assert len(batches) == loader.batches_per_epoch == 4
        assert [len(b.labels) for b in batches] == [8, 8, 8, 1]
    seen = [torch.cat([b.labels for b in batches]).tolist() for batches in first]
    assert seen[0] == list(range(0, 50, 2)) and seen[1] == list(range(1, 50, 2))


def test_eval_subset_is_evenly_spaced_and_equal_on_every_rank():
    ranks = [index_loader(size=103, batch_size=8, rank=r, world_size=3, train=False, eval_subset=50) for r in range(3)]
    selection = ranks[0].eval_selection().tolist()
    # 50 rounded down to 48 (3 processes x 16): evenly spaced over all 103 images, each once.
    assert len(selection) == 48 and selection == sorted(set(selection))
    assert selection[0] == 0 and selection[-1] >= 103 - 103 // 48 - 1
    assert max(b - a for a, b in zip(selection, selection[1:])) <= 3
    seen = [torch.cat([b.labels for b in loader.epoch(0)]).tolist() for loader in ranks]
    assert [len(s) for s in seen] == [16, 16, 16] and {len(loader) for loader in ranks} == {2}
    assert sorted(sum(seen, [])) == selection
    whole = index_loader(size=10, world_size=3, train=False, eval_subset=1000)  # more than the split: all, rounded
    assert whole.eval_selection().tolist() == list(range(9))
    with pytest.raises(ValueError, match="leaves nothing for 3 processes"):
        index_loader(size=10, world_size=3, train=False, eval_subset=2)
    with pytest.raises(ValueError, match="eval-mode loaders"):
        build_loader(data_cfg(), img_size=8, seed=0, train=True, eval_subset=5)
