"""torchrun / DDP / FSDP2 helpers: nothing home-made, just the wiring (gloo on CPU, nccl on CUDA)."""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist
from torch import nn


def init_distributed() -> tuple[int, int, int]:
    """Join the process group when started by torchrun; returns (rank, world_size, local_rank)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, 0
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        # torchrun's store outlives a worker group that --max-restarts restarts: without a per-attempt prefix the
        # new workers read the old group's keys (the dead workers' addresses) and hang or fail to connect
        store, rank_, world = next(dist.rendezvous("env://"))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(backend, store=dist.PrefixStore(f"voxseq/attempt_{attempt}", store),
                                rank=rank_, world_size=world)
    local = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    return dist.get_rank(), dist.get_world_size(), local


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main_process() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return t


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    return torch.device(name)


def autocast_context(device: torch.device, precision: str = "auto"):
    """bf16 autocast on CUDA; fp32 on CPU unless forced (CPUs without bf16 units run it ~30x slower)."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def wrap_model(model: nn.Module, strategy: str, device: torch.device) -> nn.Module:
    """DDP or FSDP2 (``fully_shard`` on each block, then the root) when running distributed."""
    if not dist.is_initialized() or strategy == "none":
        return model
    if strategy == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if strategy == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for m in model.modules():
            if m.__class__.__name__ == "Block":
                fully_shard(m)
        fully_shard(model)
        return model
    raise ValueError(f"unknown distributed strategy {strategy!r} (ddp, fsdp2, none)")


def full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Full (unsharded) model and optimiser state dicts, gathered to CPU: works for plain modules,
    DDP and FSDP2 alike. A collective under torchrun: every rank must call it (rank 0 gets the data)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=dist.is_initialized())
    return get_state_dict(model, optimizer, options=opts)


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load an optimiser state saved by :func:`full_state_dicts` (parameter names as keys) into a
    plain, DDP or FSDP2-sharded model's optimiser."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def save_training_checkpoint(run_dir, step: int, model: nn.Module, optimizer, *, main: bool, meta: dict,
                             keep_last: int, extra_state: dict | None = None) -> None:
    """Gather full weights and optimiser state (a collective: every rank calls it), write them on rank 0
    with the RNG state and ``extra_state`` (sampler...), then wait for rank 0."""
    from voxseq.checkpoint import get_rng_state, save_checkpoint

    weights, optim_state = full_state_dicts(model, optimizer)
    if main:
        save_checkpoint(run_dir, step, weights, keep_last=keep_last, meta=meta,
                        training_state={"optimizer": optim_state, "rng": get_rng_state(), "step": step,
                                        **(extra_state or {})})
    barrier()


def restore_training_state(model: nn.Module, optimizer, checkpoint) -> int:
    """Optimiser and RNG state of a checkpoint into this process; returns the step to continue from."""
    from voxseq.checkpoint import set_rng_state

    state = checkpoint.training_state()
    load_full_optimizer_state(model, optimizer, state["optimizer"])
    set_rng_state(state["rng"])
    return checkpoint.step
