"""Linear layers whose weights can be packed into oneDNN's blocked layout for CPU inference.

Why: on a CPU, ``F.linear`` hands MKL a plain row-major weight that it re-packs on every call. For
the few-row products of a short query (12 text tokens) that re-packing costs more than the product:
we measured 8 GB/s of weight traffic against ~30 GB/s the memory can stream. A weight packed once
(``torch.ops.mkldnn._reorder_linear_weight``) and multiplied with ``mkldnn._linear_pointwise``
streams at ~16 GB/s (a 12-token text query 2.4x faster end to end), large products run at ~200
instead of ~150 GFLOP/s on 2 cores, and oneDNN applies the GeGLU's exact (erf)
GELU and its elementwise product inside the matrix product (no extra passes over (tokens, F)).

How, without a second copy of the weights: packing keeps the same ``nn.Parameter`` object (so
optimisers and parameter counts stay valid) but swaps its data for a NaN placeholder expanded to the
weight's shape (one element of memory); the packed tensor lives beside it. The state dict, ``.to()``,
``.train()`` and ``load_state_dict`` all see or restore the dense weight (the reorder is lossless).
A packed layer run with gradients enabled unpacks itself (with a warning): the packed ops have no backward.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn


def cpu_packing_available() -> bool:
    """oneDNN is in this torch build and has the packed-linear ops."""
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


PACKABLE_DTYPES = (torch.float32, torch.bfloat16)


def packable(weight: torch.Tensor) -> bool:
    """oneDNN can pack this (out, in) weight: on CPU, float32 or bfloat16, in a build with the ops."""
    return weight.device.type == "cpu" and weight.dtype in PACKABLE_DTYPES and cpu_packing_available()


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """(out, in) dense -> oneDNN's blocked layout (lossless; ``.to_dense()`` gives it back)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, None)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` for a dense or a packed (`pack_weight`) weight; the packed one has no backward."""
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class PackableLinear(nn.Linear):
    """``nn.Linear`` (same parameters, same state-dict keys) with an optional packed CPU weight."""

    _packed: torch.Tensor | None = None

    @property
    def is_packed(self) -> bool:
        return self._packed is not None

    def pack(self) -> bool:
        """Pack the weight for CPU inference; returns False (and does nothing) where it cannot."""
        if self._packed is not None:
            return True
        w = self.weight
        if not packable(w):
            return False
        with torch.no_grad():
            self._packed = pack_weight(w.detach())
            # same Parameter object; its dense storage is released (the placeholder is 1 element)
            w.data = torch.full((), float("nan"), dtype=w.dtype).expand(w.shape)
        return True

    def unpack(self) -> None:
        """Give the parameter its dense weight back (bit-identical to before packing)."""
        if self._packed is None:
            return
        with torch.no_grad():
            self.weight.data = self._packed.to_dense()
        self._packed = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is None or _unpacked_for_gradients(self):
            return F.linear(x, self.weight, self.bias)
        return packed_linear(self, x)

    # -- everything that reads or replaces the weight sees the dense one --
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._packed is not None:
            destination[prefix + "weight"] = self._packed.to_dense()

    def _load_from_state_dict(self, *args, **kwargs):
        self.unpack()
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, recurse=True):
        # .to(), .cuda(), .half(): convert the dense weight, not the placeholder. A conversion that
        # keeps dtype and device (model.to("cpu"), model.float() on float32) keeps the packing.
        if self._packed is not None:
            w = self.weight
            probe = fn(torch.zeros(1, dtype=w.dtype, device=w.device))
            if not (isinstance(probe, torch.Tensor) and probe.dtype == w.dtype and probe.device == w.device):
                self.unpack()
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True):
        if mode:
            self.unpack()
        return super().train(mode)

    # copy.deepcopy and pickling (torch.save(model)) see the dense weight: the packed (opaque)
    # tensor has no storage to copy; the copy is packed again when it is restored
    def __getstate__(self):
        state = dict(self.__dict__)
        if self._packed is not None:
            parameters = dict(state["_parameters"])
            parameters["weight"] = nn.Parameter(self._packed.to_dense(), requires_grad=self.weight.requires_grad)
            state.update(_parameters=parameters, _packed=None, _repack=True)
        return state

    def __setstate__(self, state):
        repack = state.pop("_repack", False)
        super().__setstate__(state)
        if repack:
            self.pack()

    def extra_repr(self) -> str:
        return super().extra_repr() + (", packed" if self._packed is not None else "")


def _unpacked_for_gradients(layer: PackableLinear) -> bool:
    """With gradients enabled a packed layer turns dense again (the packed ops have no backward), once,
    with a warning: the numbers and gradients are then those of plain nn.Linear."""
    if not torch.is_grad_enabled() or layer._packed is None:
        return False
    warnings.warn(
        "a CPU-packed onepeace layer ran with gradients enabled: its weights were unpacked (slower "
        "inference from now on). For fast inference run under torch.inference_mode(); to train, "
        "call model.train() (which unpacks) first", stacklevel=3)
    layer.unpack()
    return True


def packed_linear(layer: PackableLinear, x: torch.Tensor, activation: str = "none") -> torch.Tensor:
    """``act(x W^T + b)`` with the packed weight (or the dense one where gradients are enabled);
    activation "none" or "gelu" (exact, erf)."""
    if layer._packed is None or _unpacked_for_gradients(layer):
        y = F.linear(x, layer.weight, layer.bias)
        return F.gelu(y) if activation == "gelu" else y
    if activation == "gelu":
        return torch.ops.mkldnn._linear_pointwise(x, layer._packed, layer.bias, "gelu", [], "none")
    return linear(x, layer._packed, layer.bias)


def packed_linear_mul(layer: PackableLinear, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``(x W^T + b) * other`` with the product fused into the matrix product."""
    if layer._packed is None or _unpacked_for_gradients(layer):
        return F.linear(x, layer.weight, layer.bias) * other
    return torch.ops.mkldnn._linear_pointwise.binary(x, other, layer._packed, layer.bias, "mul")


def pack_linear_weights(module: nn.Module) -> int:
    """Pack every PackableLinear under `module`; returns how many were packed."""
    return sum(1 for m in module.modules() if isinstance(m, PackableLinear) and m.pack())


def unpack_linear_weights(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, PackableLinear):
            m.unpack()
