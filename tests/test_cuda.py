"""What only a GPU can show: bf16 autocast, FSDP2 over one GPU, fused AdamW, masks drawn on the
device, the side-stream batch copies, and FFCV's ToDevice path. Marked `cuda`: skipped, with
the reason, on machines without one (conftest.py)."""

import os

import pytest
import torch
import torch.multiprocessing as mp
from processes import free_port

from maescale import parallel
from maescale.data import Batch
from maescale.data.seeding import mask_noise
from maescale.layout import Layout
from maescale.models import build_model
from maescale.optim import LocalShardAdamW, param_groups
from maescale.train import prefetch_to_device

pytestmark = pytest.mark.cuda


def _inputs(device: str, batch: int = 8):
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, 32, 32, generator=generator)
    noise = torch.rand(batch, 64, generator=generator)
    return images.to(device), noise.to(device)


def test_bf16_autocast_loss_is_close_to_fp32():
    torch.manual_seed(0)
    model = build_model("mae_vit_micro_patch4").cuda()
    images, noise = _inputs("cuda")
    with torch.no_grad():
        fp32 = model(images, noise=noise)[0]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = model(images, noise=noise)[0]
    assert bf16.item() == pytest.approx(fp32.item(), rel=2e-2)


def test_mask_noise_on_the_gpu_equals_the_cpu():
    seeds = torch.tensor([0, 1, 2**40 + 7, -5, 123456789], dtype=torch.int64)
    assert torch.equal(mask_noise(seeds.cuda(), 196).cpu(), mask_noise(seeds, 196))


@pytest.mark.parametrize("fused", [True, False])
def test_local_shard_adamw_on_cuda_steps_as_torch_adamw(fused):
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(build_model("mae_vit_micro_patch4").cuda())
    images, noise = _inputs("cuda")
    ours = LocalShardAdamW(param_groups(models[0], 0.05), lr=1e-3, fused=fused or None)
    reference = torch.optim.AdamW(param_groups(models[1], 0.05), lr=1e-3, fused=fused or None)
    for _ in range(3):
        for model, optimizer in zip(models, (ours, reference)):
            model(images, noise=noise)[0].backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    for a, b in zip(*(m.parameters() for m in models)):
        assert torch.equal(a, b)


def _fsdp2_vs_plain(rank: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="1", RANK="0")
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    parallel.start_process_group_of_one(device)
    torch.manual_seed(0)
    sharded, plain = build_model("mae_vit_micro_patch4").cuda(), build_model("mae_vit_micro_patch4").cuda()
    plain.load_state_dict(sharded.state_dict())
    parallel.shard_fsdp2(sharded, Layout("fsdp2", 1).build_mesh("cuda"))
    optimizers = [LocalShardAdamW(param_groups(m, 0.05), lr=1e-3, fused=True) for m in (sharded, plain)]
    images, noise = _inputs("cuda")
    losses = []
    for _ in range(3):
        step = []
        for model, optimizer in zip((sharded, plain), optimizers):
            loss = model(images, noise=noise)[0]
            loss.backward()
            parallel.clip_grad_norm(model.parameters(), 0.05)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step.append(loss.item())
        losses.append(step)
    queue.put(losses)
    torch.distributed.destroy_process_group()


def test_fsdp2_over_one_gpu_trains_as_the_plain_model():
    port = free_port()
    queue = mp.get_context("spawn").Queue()
    mp.start_processes(_fsdp2_vs_plain, args=(port, queue), nprocs=1, start_method="spawn")
    for sharded, plain in queue.get(timeout=10):
        assert sharded == pytest.approx(plain, rel=1e-4)


@pytest.mark.parametrize("offload, placement", [(False, "(cuda, no process group)"), (True, "(cuda, nccl)")],
                         ids=["whole", "offload"])
def test_fsdp2_trainer_on_one_gpu_without_a_launcher_trains_as_ddp(tmp_path, offload, placement):
    """Over one GPU the model trains whole; CPU offload keeps FSDP2 over an NCCL group of one."""
    from conftest import TINY_RUN, run_maescale

    from maescale.metrics import read_metrics

    common = [*TINY_RUN, "train.max_steps=3"]
    run_maescale("pretrain", *common, f"output_dir={tmp_path / 'ddp'}")
    result = run_maescale("pretrain", *common, "parallel.strategy=fsdp2",
                          f"parallel.cpu_offload={str(offload).lower()}", f"output_dir={tmp_path / 'fsdp2'}")
    layout = "fsdp2: shard 1, CPU offload, fp32" if offload else "fsdp2: whole model (shard degree 1), fp32"
    assert f"{layout} on 1 process(es) {placement}" in result.stdout
    ddp, fsdp2 = ([r["loss"] for r in read_metrics(tmp_path / name)] for name in ("ddp", "fsdp2"))
    assert fsdp2 == pytest.approx(ddp, rel=1e-4)


def test_prefetched_batches_arrive_on_the_gpu_unchanged():
    steps = [[Batch(torch.randn(4, 3, 32, 32).pin_memory(), torch.arange(4), (), torch.arange(4) + 10 * i)]
             for i in range(3)]
    out = list(prefetch_to_device(iter(steps), torch.device("cuda")))
    assert len(out) == 3
    for (host,), (device,) in zip(steps, out):
        assert device.images.is_cuda and device.seeds.is_cuda
        assert torch.equal(device.images.cpu(), host.images) and torch.equal(device.seeds.cpu(), host.seeds)
        assert torch.equal(device.mask_noise(64, "cuda").cpu(), host.mask_noise(64))


def test_ffcv_loader_puts_batches_on_the_gpu(tmp_path):
    pytest.importorskip("ffcv", reason="ffcv is not installed (pip install 'maescale[ffcv]')")
    from PIL import Image

    from maescale.data.ffcv_loader import FFCVEpochLoader
    from maescale.data.ffcv_writer import BetonOptions, write_beton

    for label in ("a", "b"):
        (tmp_path / "jpegs" / label).mkdir(parents=True)
        for i in range(8):
            pixels = torch.randint(0, 256, (40, 48, 3), dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(tmp_path / "jpegs" / label / f"{i}.jpg", quality=95)
    beton = tmp_path / "val.beton"
    write_beton(tmp_path / "jpegs", beton, BetonOptions(max_resolution=48, num_workers=1))
    common = dict(img_size=32, batch_size=4, seed=0, num_workers=1, train=False)
    on_gpu = next(iter(FFCVEpochLoader(beton, device=torch.device("cuda", 0), **common).epoch(0)))
    on_cpu = next(iter(FFCVEpochLoader(beton, **common).epoch(0)))
    assert on_gpu.images.is_cuda and on_gpu.images.shape == (4, 3, 32, 32)
    torch.testing.assert_close(on_gpu.images.cpu(), on_cpu.images, atol=1e-5, rtol=1e-5)
