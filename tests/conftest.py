import os

import pytest
import torch

# Tests share 2 cores with data workers: keep intra-op threads low and results repeatable.
torch.set_num_threads(2)
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


@pytest.fixture
def tiny_overrides(tmp_path):
    """Overrides for a seconds-long CPU run writing into a fresh folder."""
    return [f"output_dir={tmp_path / 'run'}", *TINY_RUN]
