"""Inference-only linear layers whose weight is packed into oneDNN's blocked CPU layout.

Why: on a CPU, ``F.linear`` hands MKL a plain row-major weight that it re-packs on every call. For
the few-row products of a short query (12 text tokens) that re-packing costs more than the product:
we measured 8 GB/s of weight traffic against ~30 GB/s the memory can stream. A weight packed once
(``torch.ops.mkldnn._reorder_linear_weight``) and multiplied with ``mkldnn._linear_pointwise``
streams at ~16 GB/s (a 12-token text query 2.4x faster end to end), large products run at ~200
instead of ~150 GFLOP/s on 2 cores, and oneDNN applies the GeGLU's exact (erf) GELU and its
elementwise product inside the matrix product (no extra passes over (tokens, F)).

How: packing is an explicit conversion, in the spirit of ``torch.ao``'s quantised ``Linear``.
`pack_linears` swaps ``nn.Linear`` modules for `PackedLinear` (the dense weight is released: no
second copy), `unpack_linears` swaps them back (bit-identical: the reorder is lossless). A
`PackedLinear` holds the packed tensor as a plain attribute, never as a Parameter: every Parameter
a user can reach holds real values. Its state dict writes the dense ``weight`` under nn.Linear's
keys, so saving and loading a packed model is unchanged. It is for inference only: training mode,
a forward that would need gradients and a dtype/device conversion are refused with an error that
says to call ``model.to_dense()`` first (the packed ops have no backward).

Which dtypes: decided once per dtype by the CPU's capability (`cpu_can_pack`), never by catching
errors. float32 packs wherever torch has oneDNN; bfloat16 only where oneDNN supports it
(avx512bw/vl/dq or avx_ne_convert: not on AVX2-only CPUs); float16 is never packed (its oneDNN path
needs avx512_fp16 / avx_ne_convert, which we could not test). Elsewhere the layers stay nn.Linear.

Large batches (`dense_above`): on some CPUs (an AVX2-only AMD EPYC) oneDNN's packed product is slower
than MKL's for many rows (image batch 8: 1.3x) while still 2x faster for a short query. A layer with
``dense_above = N`` multiplies an input of N rows or more with a dense copy of its weight made for
that call (`dense_weight`, one layer's weight at a time: no second copy of the model is kept; the
copy costs ~1% of such a product). `onepeace.modeling.cpu_choice` measures whether and from where.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

_TO_DENSE = "call model.to_dense() first"


@functools.lru_cache(maxsize=None)
def cpu_can_pack(dtype: torch.dtype) -> bool:
    """Can oneDNN pack (and multiply) a linear weight of this dtype on this CPU? Asked once per dtype.

    float32: this torch build has oneDNN and its packed-linear ops. bfloat16: also oneDNN's bf16
    support (``_is_mkldnn_bf16_supported``: avx512bw/vl/dq or avx_ne_convert; an AVX2-only CPU
    answers False, where the reorder would raise). float16 and other dtypes: False."""
    mkldnn = torch.ops.mkldnn
    if not (torch.backends.mkldnn.is_available() and hasattr(mkldnn, "_linear_pointwise")
            and hasattr(mkldnn, "_reorder_linear_weight")):
        return False
    if dtype == torch.float32:
        return True
    if dtype == torch.bfloat16:
        return hasattr(mkldnn, "_is_mkldnn_bf16_supported") and bool(mkldnn._is_mkldnn_bf16_supported())
    return False


def packable(weight: torch.Tensor) -> bool:
    """oneDNN can pack this (out, in) weight: a CPU tensor of a dtype `cpu_can_pack` accepts."""
    return weight.device.type == "cpu" and cpu_can_pack(weight.dtype)


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """(out, in) dense -> oneDNN's blocked layout (lossless; ``.to_dense()`` gives it back)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), None)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` for a dense or a packed (`pack_weight`) weight; the packed one has no backward."""
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class PackedLinear(nn.Module):
    """``y = x W^T + b`` for CPU inference, with W packed for oneDNN (see the module docstring).

    Made by `from_linear` (or ``model.to_packed()``), undone by `to_linear` (or ``model.to_dense()``).
    `bias` is a real Parameter (or None); there is no ``weight`` attribute: `dense_weight()` returns a
    copy. ``state_dict`` / ``load_state_dict`` / deepcopy / pickle see the dense weight under
    nn.Linear's keys (a loaded or restored weight is packed again)."""

    def __init__(self, packed_weight: torch.Tensor, bias: nn.Parameter | None, weight_requires_grad: bool = True):
        super().__init__()
        if not packed_weight.is_mkldnn:
            raise TypeError("PackedLinear takes a packed (oneDNN) weight: build it with PackedLinear.from_linear")
        self._packed = packed_weight  # opaque (out, in) oneDNN tensor: no storage, no autograd
        self.out_features, self.in_features = packed_weight.shape
        self.register_parameter("bias", bias)
        self.weight_requires_grad = weight_requires_grad  # given back to the dense weight by to_linear
        self.dense_above: int | None = None  # inputs of this many rows or more use a dense copy (see module doc)
        self.training = False

    @classmethod
    def from_linear(cls, layer: nn.Linear) -> "PackedLinear":
        """Pack `layer`'s weight (the caller drops `layer`, releasing its dense weight); its bias
        Parameter is kept as is. Raises ValueError where `cpu_can_pack` says no."""
        if not packable(layer.weight):
            raise ValueError(f"this CPU cannot pack a {layer.weight.dtype} weight on {layer.weight.device} for "
                             "oneDNN (see onepeace.modeling.packed.cpu_can_pack); keep the nn.Linear")
        with torch.no_grad():
            return cls(pack_weight(layer.weight), layer.bias, layer.weight.requires_grad)

    def to_linear(self) -> nn.Linear:
        """The plain nn.Linear again: bit-identical weight, the same bias Parameter."""
        layer = nn.Linear(self.in_features, self.out_features, bias=False, device="meta")
        layer.weight = nn.Parameter(self.dense_weight(), requires_grad=self.weight_requires_grad)
        layer.bias = self.bias
        return layer.train(self.training)

    def dense_weight(self) -> torch.Tensor:
        """(out, in) dense copy of the weight (exactly the weight that was packed)."""
        return self._packed.to_dense()

    @property
    def dtype(self) -> torch.dtype:
        return self._packed.dtype

    # ---------------------------------------------------------------- inference
    def _check_inference(self, *inputs: torch.Tensor) -> None:
        """The checks that keep a packed product from being silently wrong (before every product)."""
        tensors = inputs if self.bias is None else (*inputs, self.bias)
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            raise RuntimeError("this layer is packed for inference (oneDNN weights have no backward): run it "
                               "under torch.inference_mode() / torch.no_grad(), or call model.to_dense() to "
                               "train or differentiate")
        if "weight" in self.__dict__:  # torch.func.functional_call(model, {"...weight": w}) sets an attribute
            raise RuntimeError("a 'weight' was substituted into a packed layer, which has no weight Parameter "
                               f"and would ignore it: {_TO_DENSE} (e.g. for torch.func.functional_call)")

    def _dense_product(self, x: torch.Tensor) -> bool:
        """Does this input (..., in) have `dense_above` rows or more (then the dense weight is faster)?"""
        rows = self.__dict__.get("dense_above")  # absent in a layer pickled before this attribute existed
        return rows is not None and x.numel() >= rows * self.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        self._check_inference(x)
        if self._dense_product(x):
            return F.linear(x, self.dense_weight(), self.bias)
        return linear(x, self._packed, self.bias)

    def forward_gelu(self, x: torch.Tensor) -> torch.Tensor:
        """``gelu(x W^T + b)`` (exact, erf) with the GELU inside the matrix product."""
        self._check_inference(x)
        if self._dense_product(x):
            return F.gelu(F.linear(x, self.dense_weight(), self.bias))
        return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "gelu", [], "none")

    def forward_mul(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """``(x W^T + b) * other`` (other: (..., out)) with the product inside the matrix product."""
        self._check_inference(x, other)
        if self._dense_product(x):
            return F.linear(x, self.dense_weight(), self.bias).mul_(other)
        return torch.ops.mkldnn._linear_pointwise.binary(x, other, self._packed, self.bias, "mul")

    # ---------------------------------------------------------------- refusals
    def train(self, mode: bool = True) -> "PackedLinear":
        if mode:
            raise RuntimeError(f"a packed layer is for inference only and cannot train: {_TO_DENSE}")
        return super().train(False)

    def check_conversion(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Raise if `fn` (what ``.to()`` / ``.half()`` / ``.cuda()`` apply to every tensor) would change
        this layer's dtype or device, which the packed tensor cannot follow; a conversion that keeps
        both (``model.to("cpu")``, ``model.float()`` on float32) passes."""
        probe = fn(torch.zeros((), dtype=self.dtype))
        if not (isinstance(probe, torch.Tensor) and probe.dtype == self.dtype and probe.device.type == "cpu"):
            raise RuntimeError(f"cannot convert a packed {self.dtype} CPU layer to {getattr(probe, 'dtype', probe)} "
                               f"on {getattr(probe, 'device', '?')}: {_TO_DENSE}, convert, then model.to_packed()")

    def _apply(self, fn, recurse=True):
        self.check_conversion(fn)
        return super()._apply(fn, recurse)

    def __getattr__(self, name: str):
        if name == "weight":
            raise AttributeError("PackedLinear has no 'weight' (it is packed for oneDNN): dense_weight() returns "
                                 f"a copy; to get nn.Linear layers back, {_TO_DENSE}")
        return super().__getattr__(name)

    # ---------------------------------------------------------------- serialisation: the dense weight
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.dense_weight()  # first, as nn.Linear orders its keys
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        key = prefix + "weight"
        if key in unexpected_keys:
            unexpected_keys.remove(key)
        if key not in state_dict:
            missing_keys.append(key)
            return
        weight = state_dict[key]
        if tuple(weight.shape) != (self.out_features, self.in_features):
            error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(weight.shape)}, "
                              f"the shape in current model is {(self.out_features, self.in_features)}.")
            return
        with torch.no_grad():
            self._packed = pack_weight(weight.to(device="cpu", dtype=self.dtype))

    def __getstate__(self):  # deepcopy / pickle: the packed tensor has no storage; the dense one travels
        state = dict(self.__dict__)
        state["_packed"] = self.dense_weight()
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        with torch.no_grad():
            self._packed = pack_weight(self._packed)

    def extra_repr(self) -> str:
        rows = self.__dict__.get("dense_above")
        dense = "" if rows is None else f", dense weight from {rows} rows"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"dtype={self.dtype}, packed for oneDNN{dense}")


def require_dense(*layers: nn.Module, to: str) -> None:
    """Raise a clear error where one of `layers` is packed (`to`: what needs the dense weights)."""
    if any(isinstance(layer, PackedLinear) for layer in layers):
        raise RuntimeError(f"cannot {to}: the weights are packed for oneDNN; {_TO_DENSE} (on CPU the packed "
                           "weights are the faster choice: fusing projections is for GPUs)")


def pack_linears(module: nn.Module) -> int:
    """Swap every nn.Linear under `module` whose weight `packable` for a PackedLinear (the others
    stay as they are); returns how many were swapped."""
    return _swap(module, lambda m: type(m) is nn.Linear and packable(m.weight), PackedLinear.from_linear)


def set_dense_above(module: nn.Module, rows: int | None) -> None:
    """Set `PackedLinear.dense_above` on every packed layer under `module` (None: always packed)."""
    if rows is not None and (not isinstance(rows, int) or rows < 1):
        raise ValueError(f"dense_above must be a positive row count or None, got {rows!r}")
    for m in module.modules():
        if isinstance(m, PackedLinear):
            m.dense_above = rows


def unpack_linears(module: nn.Module) -> int:
    """Swap every PackedLinear under `module` back for nn.Linear (bit-identical); returns how many."""
    return _swap(module, lambda m: isinstance(m, PackedLinear), PackedLinear.to_linear)


def _swap(module: nn.Module, match: Callable[[nn.Module], bool], convert: Callable[[nn.Module], nn.Module]) -> int:
    count = 0
    for name, child in list(module.named_children()):
        if match(child):
            setattr(module, name, convert(child))  # the old module (and its dense weight) is released here
            count += 1
        else:
            count += _swap(child, match, convert)
    return count
