"""One rank of the 2-process FFCV test (started by torchrun from tests/test_ffcv.py).

Reads its share of an epoch, maps each sample back to its index through its mask
seed, and gathers (indices, labels, batch count) from all ranks over gloo; rank 0
writes them to the JSON file given as argv[2].
"""

import json
import os
import sys

import torch
import torch.distributed as dist

from maescale.data.ffcv_loader import FFCVEpochLoader
from maescale.data.seeding import sample_mask_seed

SEED, EPOCH, BATCH = 3, 1, 4


def main(beton: str, out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    loader = FFCVEpochLoader(
        beton, img_size=32, batch_size=BATCH, seed=SEED, rank=rank, world_size=world, num_workers=1
    )
    index_of_seed = {sample_mask_seed(SEED, EPOCH, i): i for i in range(loader.num_samples)}
    indices, labels, batches = [], [], 0
    for batch in loader.epoch(EPOCH):
        batches += 1
        indices += [index_of_seed[int(s)] for s in batch.seeds]
        labels += batch.labels.tolist()
    gathered = [None] * world
    dist.all_gather_object(gathered, {"indices": indices, "labels": labels, "batches": batches, "length": len(loader)})
    if rank == 0:
        with open(out, "w") as file:
            json.dump(gathered, file)
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    main(sys.argv[1], sys.argv[2])
