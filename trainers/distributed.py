"""Work split over the processes of one launch (DDP, DeepSpeed, FSDP): who does which rows, how the
results come back together, and whole weights for a forward outside DeepSpeed's engine.

:class:`Ranks` wraps the rank, the world size and the object collectives (all no-ops on one
process); :func:`merge_shards` puts per-rank results back in row order; :func:`whole_parameters`
gathers ZeRO-3-partitioned parameters (``zero.Init``) for a read-only computation;
:func:`parameters_sharded` says whether one rank holds the whole model, and :func:`outside_zero3`
lets one process load and run a whole model on its own.
"""

from __future__ import annotations

from contextlib import contextmanager


def no_accelerator() -> bool:
    """No GPU (CUDA or XPU) here: processes of a launch talk over gloo on CPU."""
    import torch

    return not (torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available()))


class Ranks:
    """Rank, world size, device and object collectives (no-ops on one process).

    ``state``: an ``Accelerator`` or accelerate's ``PartialState`` (the default: the current launch's);
    ``alone=True``: this process by itself (work that only one rank calls must not wait for the others).
    """

    def __init__(self, state=None, alone: bool = False):
        if alone:
            self.rank, self.world, self.main, self.device = 0, 1, True, None
            return
        if state is None:  # the launch's state (a CPU machine joins its gloo group; a GPU one its NCCL group)
            from accelerate import PartialState

            state = PartialState(cpu=no_accelerator())
        self.rank, self.world = state.process_index, state.num_processes
        self.main, self.device = state.is_main_process, state.device

    def shard(self, indices: list[int]) -> list[int]:
        """This rank's share of ``indices``, dealt round-robin (sorted rows -> similar lengths everywhere)."""
        return indices[self.rank :: self.world]

    def wait(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def all_gather(self, obj) -> list:
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def gather_to_main(self, obj) -> list | None:
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world if self.main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def broadcast(self, obj):
        """The main process's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([obj if self.main else None])[0]


def _partitioned(params) -> list:
    """The parameters DeepSpeed ZeRO-3 has partitioned (``zero.Init``): each rank holds a slice."""
    return [p for p in params if hasattr(p, "ds_id")]


@contextmanager
def whole_parameters(params):
    """Within: ZeRO-3-partitioned ``params`` are whole on every rank (read-only); others untouched."""
    sharded = _partitioned(params)
    if not sharded:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(sharded, modifier_rank=None):
        yield


def merge_shards(parts: list, n: int) -> list:
    """``[(indices, values), ...]`` from every rank -> one list of ``n`` values in row order."""
    out: list = [None] * n
    for indices, values in parts:
        for i, v in zip(indices, values):
            out[i] = v
    missing = [i for i, v in enumerate(out) if v is None]
    if missing:
        raise RuntimeError(f"{len(missing)} row(s) were computed by no rank, e.g. row {missing[0]}")
    return out


def parameters_sharded(trainer) -> bool:
    """True when no single rank holds the whole model (DeepSpeed ZeRO-3, FSDP on several processes).

    Read from the accelerator's plugin: transformers' global ZeRO-3 flag is gone once training ends,
    while the model's parameters stay partitioned (a forward on one rank then waits forever)."""
    if trainer.args.world_size <= 1:
        return False
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    return (plugin is not None and plugin.zero_stage == 3) or bool(getattr(trainer, "is_fsdp_enabled", False))


@contextmanager
def outside_zero3():
    """Within: ``from_pretrained`` builds an ordinary model (no ``zero.Init``) and ``generate`` does not
    sync with the other ranks, so one process can load and run a whole model on its own."""
    from transformers.integrations import deepspeed as hf_deepspeed

    if not hf_deepspeed.is_deepspeed_zero3_enabled():
        yield
        return
    config = hf_deepspeed._hf_deepspeed_config_weak_ref()  # the live config (its plugin keeps it alive)
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed.set_hf_deepspeed_config(config)
