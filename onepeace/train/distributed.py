"""torch.distributed wiring, kept outside the model: process group from torchrun's environment,
DDP or FSDP2 wrapping, full (unsharded) state dicts for checkpoints, small collectives."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


def is_fsdp(module: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # older torch
        return False
    return isinstance(module, FSDPModule)


def _child_prefix(module: nn.Module, model: nn.Module) -> str:
    """The state-dict prefix of `model` inside the wrapped `module` ('model.' for a PretrainTask)."""
    for name, child in module.named_modules():
        if child is model:
            return f"{name}." if name else ""
    raise ValueError(f"{type(model).__name__} is not a submodule of the wrapped {type(module).__name__}")


@dataclass
class DistributedContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    # ---- wrapping ----
    def wrap(self, model: nn.Module, fsdp: bool = False) -> nn.Module:
        """DDP or FSDP2 around `model` (a PretrainTask: its forward computes the losses; FSDP shards
        its `shard_units()` one by one, then the rest)."""
        if not self.distributed:
            return model
        if fsdp:
            from torch.distributed.fsdp import fully_shard

            for unit in model.shard_units():  # shard per encoder layer, then the rest
                fully_shard(unit)
            # FSDP2 cannot shard 0-D tensors (the released logit_scale is one): keep them replicated
            # and average their gradients ourselves (see sync_ignored_grads)
            self.ignored = [p for p in model.parameters() if p.ndim == 0]
            fully_shard(model, ignored_params=set(self.ignored))
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        # a stage leaves whole branches unused (stage 1 never touches audio)
        return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)

    @contextlib.contextmanager
    def no_sync(self, module: nn.Module, enabled: bool):
        """Skip the gradient all-reduce for accumulation micro-steps (DDP no_sync / FSDP2 flag)."""
        if enabled and hasattr(module, "no_sync"):
            with module.no_sync():
                yield
        elif enabled and is_fsdp(module):
            module.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                module.set_requires_gradient_sync(True)
        else:
            yield

    def sync_ignored_grads(self) -> None:
        """Average the gradients of parameters FSDP2 leaves replicated (call before clipping)."""
        for p in getattr(self, "ignored", []):
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= self.world

    # ---- state dicts (full, on CPU, for rank 0 to save) ----
    def full_state_dict(self, module: nn.Module, model: nn.Module) -> dict[str, torch.Tensor]:
        if is_fsdp(module):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            prefix = _child_prefix(module, model)  # keys of `model` itself, as the unsharded path writes
            return {k.removeprefix(prefix): v for k, v in state.items()}
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

    def load_full_state_dict(self, module: nn.Module, model: nn.Module, state: dict) -> None:
        if is_fsdp(module):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            prefix = _child_prefix(module, model)
            state = {prefix + k: v for k, v in state.items()}
            set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))
            return
        model.load_state_dict(state, strict=True)

    def full_optimizer_state(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        if is_fsdp(module):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            return get_optimizer_state_dict(module, optimizer,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return optimizer.state_dict()

    def load_full_optimizer_state(self, module: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        if is_fsdp(module):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(module, optimizer, state, options=StateDictOptions(full_state_dict=True))
            return
        optimizer.load_state_dict(state)

    # ---- collectives ----
    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def mean(self, value: float) -> float:
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        return float(t) / self.world

    def gather_objects(self, obj):
        if not self.distributed:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def shutdown(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def setup_distributed() -> DistributedContext:
    """From torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); one process otherwise.
    NCCL on GPUs, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        return DistributedContext(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistributedContext(rank=rank, world=world, local_rank=local_rank, device=device)
