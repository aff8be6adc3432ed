"""The process-group backend choice; FSDP2's local-shard AdamW and clipping against torch's
own on whole tensors (one process) and on real 2-process gloo groups (FSDP and HSDP); blocks
compiled one by one, eager and under FSDP2 (static graphs)."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from processes import FORKSERVER, free_port

from maescale import parallel
from maescale.config import ConfigError, load_config
from maescale.errors import StrategyError
from maescale.layout import Layout
from maescale.models import build_model
from maescale.optim import LocalShardAdamW, param_groups
from maescale.train import prefetch_to_device


@pytest.mark.parametrize(
    "requested, gpus, processes, expected",
    [
        ("auto", 0, 1, "gloo"),  # CPU-only machine (CI)
        ("auto", 0, 2, "gloo"),
        ("auto", 1, 1, "nccl"),
        ("auto", 1, 2, "gloo"),  # pytest's 2-process tests on a one-GPU machine
        ("auto", 2, 2, "nccl"),
        ("auto", 8, 4, "nccl"),
        ("auto", 4, 8, "gloo"),
        ("gloo", 8, 8, "gloo"),  # forced
        ("nccl", 8, 8, "nccl"),
    ],
)
def test_backend_follows_the_gpus_of_the_node(requested, gpus, processes, expected):
    assert parallel.choose_backend(requested, gpus, processes) == expected


@pytest.mark.parametrize("gpus, processes", [(0, 1), (1, 2), (4, 8)])
def test_nccl_without_a_gpu_per_process_is_refused_in_one_line(gpus, processes):
    with pytest.raises(StrategyError, match=f"{processes} process\\(es\\) on this node, {gpus} GPU\\(s\\)"):
        parallel.choose_backend("nccl", gpus, processes)


@pytest.mark.parametrize(
    "device, backend, gpus, processes, line",
    [
        ("cpu", "gloo", 0, 2, "cpu, gloo"),
        ("cpu", "gloo", 1, 2, "cpu, gloo fallback: 2 processes, 1 GPU on this node"),
        ("cpu", "gloo", 8, 2, "cpu, gloo fallback: parallel.backend=gloo"),
        ("cuda", "nccl", 8, 8, "cuda, nccl"),
    ],
)
def test_strategy_line_states_the_backend_and_why(device, backend, gpus, processes, line):
    assert parallel.placement(device, backend, gpus, processes) == line


def test_backend_key_is_checked_by_the_config():
    assert load_config(None, ["parallel.backend=gloo"]).parallel.backend == "gloo"
    with pytest.raises(ConfigError, match="parallel.backend"):
        load_config(None, ["parallel.backend=mpi"])


def test_fsdp2_options_follow_the_layout_and_the_config():
    cfg = load_config(None, ["parallel.strategy=fsdp2", "parallel.blocks_per_unit=2", "parallel.cpu_offload=true",
                             "train.precision=bf16"])
    layout = Layout.from_config(cfg.parallel, cfg.train.precision, world_size=4)
    options = parallel.FSDP2Options.of(layout, cfg.parallel)
    assert options == parallel.FSDP2Options(precision="bf16", cpu_offload=True, blocks_per_unit=2)


def mesh(world: int, replicate: int = 1, device: str = "cpu"):
    """The mesh the trainer's Layout builds for FSDP2 (replicate > 1: HSDP)."""
    return Layout("hsdp" if replicate > 1 else "fsdp2", world, replicate).build_mesh(device)


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(4, 3, 32, 32, generator=generator), torch.rand(4, 64, generator=generator)


def _model_with_grads(compile_blocks: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model("mae_vit_micro_patch4")
    if compile_blocks:
        parallel.compile_blocks(model)
    images, noise = _inputs()
    model(images, noise=noise)[0].backward()
    return model


@pytest.mark.parametrize("max_norm", [1e-3, 1e3])  # clipped, and left alone
def test_clip_equals_torch_on_whole_tensors(max_norm):
    ours, reference = _model_with_grads(), _model_with_grads()
    norm = parallel.clip_grad_norm(ours.parameters(), max_norm)
    expected = torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm)
    assert norm.item() == pytest.approx(expected.item(), rel=1e-6)
    for a, b in zip(ours.parameters(), reference.parameters()):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)


@pytest.mark.parametrize("fused", [True, False])
def test_local_shard_adamw_steps_whole_tensors_as_torch_adamw(fused):
    ours, reference = _model_with_grads(), _model_with_grads()
    options = dict(lr=1e-2, betas=(0.9, 0.95), fused=fused or None)
    optimizers = [LocalShardAdamW(param_groups(ours, 0.05), **options),
                  torch.optim.AdamW(param_groups(reference, 0.05), **options)]
    for _ in range(3):
        for optimizer in optimizers:
            optimizer.step()
    for a, b in zip(ours.parameters(), reference.parameters()):
        assert torch.equal(a, b)
    assert optimizers[0].state_dict()["state"].keys() == optimizers[1].state_dict()["state"].keys()


def _sharded_vs_whole(rank: int, world: int, port: int, replicate: int, queue,
                      options: parallel.FSDP2Options | None = None, micro_batches: int = 1) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        images, noise = torch.randn(4, 3, 32, 32), torch.rand(4, 64)
        sharded, whole = build_model("mae_vit_micro_patch4"), build_model("mae_vit_micro_patch4")
        whole.load_state_dict(sharded.state_dict())
        parallel.shard_fsdp2(sharded, mesh(world, replicate), options or parallel.FSDP2Options())
        ours = LocalShardAdamW(param_groups(sharded, 0.05), lr=1e-2, fused=True)
        reference = torch.optim.AdamW(param_groups(whole, 0.05), lr=1e-2)
        norms = []
        for _ in range(3):
            # Every rank sees the whole batch: FSDP2 averages the identical gradients.
            for shift in range(micro_batches):  # more than one: other masks, gradients add up
                batch = images.roll(shift, dims=0)
                sharded(batch, noise=noise)[0].backward()
                whole(batch, noise=noise)[0].backward()
            norms.append((parallel.clip_grad_norm(sharded.parameters(), 0.05).item(),
                          torch.nn.utils.clip_grad_norm_(whole.parameters(), 0.05).item()))
            for optimizer in (ours, reference):
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        worst = max((p.full_tensor() - q).abs().max().item() for p, q in zip(sharded.parameters(), whole.parameters()))
        if rank == 0:
            queue.put((norms, worst, units_reducing_in_place(sharded)))
    finally:
        dist.destroy_process_group()


def units_reducing_in_place(model: torch.nn.Module) -> int:
    """FSDP2 units whose reduce-scatter is parallel.ReduceOverOneRank (FSDP2 keeps it privately)."""
    from torch.distributed.fsdp import FSDPModule

    states = {id(m._get_fsdp_state()): m._get_fsdp_state() for m in model.modules() if isinstance(m, FSDPModule)}
    return sum(isinstance(group._reduce_scatter_comm, parallel.ReduceOverOneRank)
               for state in states.values() for group in state._fsdp_param_groups)


@pytest.mark.parametrize("replicate", [1, 2], ids=["fsdp", "hsdp_2x1"])
def test_sharded_clip_and_adamw_match_whole_tensors_on_two_processes(replicate):
    port = free_port()
    queue = FORKSERVER.Queue()
    mp.start_processes(_sharded_vs_whole, args=(2, port, replicate, queue), nprocs=2, start_method="forkserver")
    norms, worst, in_place = queue.get(timeout=10)
    # HSDP 2x1 shards over one process: its 3 units (encoder, decoder, root) reduce in place
    assert in_place == (3 if replicate == 2 else 0)
    for ours, reference in norms:
        assert ours == pytest.approx(reference, rel=1e-5)
    assert norms[0][1] > 0.05  # the clip really scaled the gradients
    # Sums in another order round the norm differently in the last bit, and AdamW amplifies that
    # on near-zero gradients (update ~ lr * g / eps): same tolerance as the strategy parity tests.
    assert worst < 1e-4


def test_one_process_reduces_in_place_and_matches_whole_tensors():
    """A group of one: two same-shaped one-block units reduce into buffers that must not mix, and
    the second micro-batch's gradients add to the first's, which view the first reduction's buffer."""
    port = free_port()
    queue = FORKSERVER.Queue()
    options = parallel.FSDP2Options(blocks_per_unit=1)
    mp.start_processes(_sharded_vs_whole, args=(1, port, 1, queue, options, 2), nprocs=1, start_method="forkserver")
    norms, worst, in_place = queue.get(timeout=10)
    assert in_place == 4  # 2 encoder blocks, the decoder, the root
    for ours, reference in norms:
        assert ours == pytest.approx(reference, rel=1e-5)
    assert worst < 1e-4


def test_reduce_over_one_rank_hands_each_input_back_as_its_output():
    comm = parallel.ReduceOverOneRank()
    for _ in range(2):
        reduce_input = comm.allocate((6,), dtype=torch.float32, device=torch.device("cpu"))
        assert comm.allocate((6,), dtype=torch.float32, device=torch.device("cpu")) is reduce_input
    # The next reduction gets a buffer of its own, not the previous one's (its gradients view it).
    assert comm.allocate((6,), dtype=torch.float32, device=torch.device("cpu")) is not reduce_input
    with pytest.raises(StrategyError, match=r"reduce output of \(3,\).*not a group of one"):
        comm.allocate((3,), dtype=torch.float32, device=torch.device("cpu"))


def test_prefetch_passes_cpu_batches_through_in_order():
    steps = [[f"step{i}-micro{j}" for j in range(2)] for i in range(3)]
    assert list(prefetch_to_device(iter(steps), torch.device("cpu"))) == steps


def test_blocks_compiled_one_by_one_train_like_eager_and_keep_plain_keys():
    eager, compiled = _model_with_grads(), _model_with_grads(compile_blocks=True)
    # checkpoints and exports stay free of `_orig_mod`
    assert list(compiled.state_dict()) == list(eager.state_dict())
    assert all(type(block.forward).__name__ != "method" for block in parallel.transformer_blocks(compiled))
    for (name, a), b in zip(compiled.named_parameters(), eager.parameters()):
        if b.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)


def _compiled_sharded_steps(rank: int, world: int, port: int, queue) -> None:
    """Losses of 3 steps of the sharded model, eager and with compiled blocks, and the graphs compiled."""
    from torch._dynamo.utils import counters

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch._dynamo.reset()
        counters.clear()
        images, noise = _inputs()
        losses = {}
        for compiled in (False, True):
            torch.manual_seed(0)
            model = build_model("mae_vit_micro_patch4", decoder_depth=2)
            if compiled:
                parallel.compile_blocks(model)
            parallel.shard_fsdp2(model, mesh(world))
            optimizer = LocalShardAdamW(param_groups(model, 0.05), lr=1e-3)
            losses[compiled] = []
            for _ in range(3):
                loss = model(images, noise=noise)[0]
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses[compiled].append(loss.item())
        if rank == 0:
            queue.put((losses, counters["stats"]["unique_graphs"]))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [1, 2])
def test_blocks_compiled_under_fsdp2_keep_one_static_graph_per_shape(world):
    """Encoder and decoder blocks share one code object: two shapes, two static graphs. With
    dynamo's default (dynamic=None) a third, dynamic-shape graph appeared in the second step."""
    queue = FORKSERVER.Queue()
    mp.start_processes(_compiled_sharded_steps, args=(world, free_port(), queue), nprocs=world,
                       start_method="forkserver")
    losses, graphs = queue.get(timeout=10)
    assert graphs == 2
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)
