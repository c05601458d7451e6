"""int8 CPU inference: the shared encoder's linear layers with int8 weights (``quantize="int8"``).

What: every ``nn.Linear`` of the encoder (q/k/v/out projections, every modality's GeGLU expert)
becomes an `Int8Linear`: its weight is stored as int8 with one float32 scale per output channel
(symmetric, ``w ~= q * scale``, q in [-127, 127]); each call quantises the activations on the fly
(PyTorch's *dynamic* quantisation, with one scale per row: `_row_scaled_linear`) and multiplies in
int8 with int32 accumulation. Adapters, norms, embeddings and projection heads stay float32: the encoder's linears
are 97% of the 4B model's parameters (85% at base size, where the rest is mostly embeddings and the
image/audio stems); the only other linears (audio feature_proj, the (D, D) projections) are too small
to pay.

Which implementation, and why: PyTorch's own dynamic-quantisation kernels
(``torch.ops.quantized.linear_prepack`` / ``linear_dynamic``, the ops behind
``torch.ao.nn.quantized.dynamic.Linear``, fbgemm on x86), not hand-written ones. We measured
``torchao`` 0.18's ``Int8DynamicActivationInt8WeightConfig`` on this CPU (AMD EPYC, AVX-512 VNNI,
torch 2.13, eager, 1 thread, CPU time): a 768 -> 3072 -> 768 block ran at about float32's speed
(3.46 vs 3.22 ms on 13 rows, 142 vs 209 ms on 2056; its CPU path needs torch.compile to fuse), while
fbgemm's dynamic linear took 0.37 and 62 ms (5x and 3x faster than oneDNN-packed float32).
torch.ao's quantisation API warns that it is deprecated in favour of torchao, but its kernels ship
inside torch itself (no extra dependency) and are what torch's own ``quantize_dynamic`` runs. We build the packed weight from OUR int8 tensors and scales, so the
numbers in a converted folder (plain int8 + float32 safetensors) and in memory are the same.

Memory: an `Int8Linear` holds only fbgemm's packed weight (~1.03x the int8 bytes; the plain int8
copy is dropped once packed); ``state_dict`` unpacks it per layer (int8 ``weight`` + float32
``weight_scale`` + ``bias``). `quantize_int8` converts layer by layer, releasing each float weight
as it goes, so a model never holds two full copies.

Inference only: training mode, inputs that require gradients, a dtype other than float32 and a
device other than the CPU are refused with an error naming the way out (load without quantize).
"""
from __future__ import annotations

import functools
import warnings
import torch
from torch import nn

QUANTIZE_CHOICES = ("int8",)
_WAY_OUT = "load the model without quantize= (float32 or bfloat16) for that"
_QMAX = 127  # symmetric int8: q in [-127, 127] (not -128), so -q is representable


def check_quantize(quantize: str | None, *, device: torch.device | str = "cpu",
                   dtype: torch.dtype | None = torch.float32) -> None:
    """Raise a ValueError naming the bad argument where `quantize` cannot be honoured."""
    if quantize is None:
        return
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize={quantize!r} is not supported: choose one of {QUANTIZE_CHOICES} or None")
    if torch.device(device).type != "cpu":
        raise ValueError(f"quantize={quantize!r} runs on the CPU only (PyTorch's int8 dynamic-quantisation "
                         f"kernels), not on device={str(device)!r}: on a GPU use dtype=torch.bfloat16")
    if dtype not in (None, torch.float32):
        raise ValueError(f"quantize={quantize!r} computes around the int8 products in float32: dtype={dtype} "
                         "is not supported with it (pass dtype=torch.float32)")


@functools.lru_cache(maxsize=None)
def reduce_range() -> bool:
    """Whether activations are quantised to 7 bits instead of 8. fbgemm's AVX2/AVX-512 kernels
    without VNNI add pairs of u8*s8 products in int16, which full-range activations could saturate:
    there (and where we cannot tell) 7 bits, as torch.ao's x86 default. With VNNI (avx512_vnni /
    avx_vnni: int32 accumulation) the full 8 bits: on the official-tiny fixture that halved the int8
    error (max relative 0.036 -> 0.018). Read once from /proc/cpuinfo (Linux); elsewhere True."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split() for line in f if line.startswith("flags")), [])
    except OSError:
        return True
    return not ({"avx512_vnni", "avx_vnni"} & set(flags))


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's malloc_trim, or None (another C library, another OS); looked up once (called per layer)."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Give the heap's free pages back to the OS (glibc ``malloc_trim``; elsewhere nothing).

    Why: converting layer after layer allocates a temporary (the quantised tensor fbgemm packs from)
    and a packed weight of nearly the same size in turn; each freed temporary is split by the next
    allocation and the heap grows by both. We measured a (6144, 1536) layer costing 1.36x its int8
    bytes, (3072, 768) ~3x, and the 4B int8 load peaking at 1.28x its weights; trimming after each
    layer brings a layer to 1.01-1.16x (~1 ms a call)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float weight -> (int8 (out, in), float32 scale (out,)): symmetric per output channel."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / _QMAX).clamp_min(torch.finfo(torch.float32).tiny)  # (out,)
    q = torch.round(w / scale[:, None]).clamp_(-_QMAX, _QMAX).to(torch.int8)
    return q, scale


def _prepack(q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
    """int8 + scales -> fbgemm's packed weight (a per-channel qint8 tensor handed to linear_prepack)."""
    with warnings.catch_warnings():  # torch 2.13: "quantized tensor creation functions are deprecated"
        warnings.simplefilter("ignore", UserWarning)
        qweight = torch._make_per_channel_quantized_tensor(
            q, scale.double(), torch.zeros(scale.shape, dtype=torch.long), 0)
        return torch.ops.quantized.linear_prepack(qweight, None if bias is None else bias.detach().float())


def _row_scaled_linear(x: torch.Tensor, packed, bias: torch.Tensor | None) -> torch.Tensor:
    """(..., in) float32 -> (..., out): fbgemm's dynamic int8 product with one activation scale per ROW.

    fbgemm quantises its input with one scale per call, set by the largest value of the whole tensor:
    a token with a large range (CLS, an end token, a loud frame) leaves every other token of the
    batch a few of the 256 levels, and an item's embedding depended on its batch-mates. Dividing each
    row by its own largest |value| first gives every row the full range (per-token quantisation, as in
    LLM.int8 / SmoothQuant's O3); the product is scaled back per row: ``y = ld(x / r) * r + b``, r (..., 1).
    The weight is packed without its bias so that the bias is added once, after the scaling."""
    # abs().amax(): 0.13 ms on (1576, 768), linalg.vector_norm(ord=inf) 3 ms (1 thread)
    row_max = x.abs().amax(dim=-1, keepdim=True).clamp_min_(torch.finfo(torch.float32).tiny)  # (..., 1)
    y = torch.ops.quantized.linear_dynamic((x / row_max).contiguous(), packed, reduce_range())
    # in place: one pass over the output (2.5x faster than a new tensor at (1576, 3072))
    return y.mul_(row_max) if bias is None else torch.addcmul(bias, y, row_max, out=y)


class Int8Linear(nn.Module):
    """``y = x W^T + b`` with W int8 per output channel and x quantised per row (see module docstring).

    `bias` is a float32 Parameter (frozen; added after the product, not packed with the weight) or None;
    there is no ``weight`` Parameter. ``state_dict``
    writes ``weight`` (int8, (out, in)), ``weight_scale`` (float32, (out,)) and ``bias``; loading
    them packs the weight. Built by `from_linear` (quantises) or `placeholder` (on the meta device,
    for loading a converted int8 folder)."""

    #: one activation scale per row (True) or fbgemm's one per call (False: what torch's quantize_dynamic
    #: does, kept to measure the difference: benchmarks/int8_quality.py); a class setting, not saved
    row_scaling = True

    def __init__(self, in_features: int, out_features: int, bias: nn.Parameter | None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_parameter("bias", bias)
        if bias is not None:
            bias.requires_grad_(False)
        self._plain: tuple[torch.Tensor, torch.Tensor] | None = None  # (int8, scale) until packed
        self._packed = None  # fbgemm LinearPackedParamsBase (opaque, no autograd)
        self.training = False

    @classmethod
    def from_linear(cls, layer: nn.Linear, pack: bool = True) -> "Int8Linear":
        """Quantise `layer` (the caller drops it, releasing its float weight)."""
        bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().float(), requires_grad=False)
        module = cls(layer.in_features, layer.out_features, bias)
        module.set_int8(*quantize_weight(layer.weight), pack=pack)
        return module

    @classmethod
    def placeholder(cls, layer: nn.Linear) -> "Int8Linear":
        """A meta-device stand-in for `layer` whose state dict has the int8 keys and shapes."""
        bias = None if layer.bias is None else nn.Parameter(torch.empty(layer.out_features, device="meta"))
        module = cls(layer.in_features, layer.out_features, bias)
        module._plain = (torch.empty(layer.out_features, layer.in_features, dtype=torch.int8, device="meta"),
                         torch.empty(layer.out_features, device="meta"))
        return module

    def set_int8(self, q: torch.Tensor, scale: torch.Tensor, pack: bool = True) -> None:
        """Take int8 (out, in) + float32 (out,) as this layer's weight; pack it now unless pack=False
        (then at the first forward: `convert` writes plain tensors without packing them)."""
        if q.dtype != torch.int8 or tuple(q.shape) != (self.out_features, self.in_features):
            raise ValueError(f"an int8 ({self.out_features}, {self.in_features}) weight is needed, got "
                             f"{q.dtype} {tuple(q.shape)}")
        if tuple(scale.shape) != (self.out_features,) or not scale.is_floating_point():
            raise ValueError(f"weight_scale must be a float ({self.out_features},) tensor, got "
                             f"{scale.dtype} {tuple(scale.shape)}")
        self._plain, self._packed = (q, scale.float()), None
        if pack:
            self.pack()

    def load_int8(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Take this layer's stored tensors (a converted folder's) and pack them."""
        if (bias is None) != (self.bias is None):
            raise ValueError(f"this layer {'has' if self.bias is not None else 'has no'} bias")
        if bias is not None:
            if tuple(bias.shape) != (self.out_features,):
                raise ValueError(f"bias must be ({self.out_features},), got {tuple(bias.shape)}")
            self.bias = nn.Parameter(bias.float(), requires_grad=False)
        self.set_int8(q, scale, pack=True)

    def pack(self) -> None:
        """Hand the plain int8 weight to fbgemm and drop it (one copy of the weight at a time)."""
        if self._packed is None and self._plain is not None:
            self._packed = _prepack(*self._plain, None)  # the bias is added after the per-row scaling
            self._plain = None

    def int8_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(int8 (out, in), float32 scale (out,)): the plain tensors, or unpacked from fbgemm."""
        if self._plain is not None:
            return self._plain
        qweight, _ = torch.ops.quantized.linear_unpack(self._packed)
        return qweight.int_repr(), qweight.q_per_channel_scales().float()

    def dense_weight(self) -> torch.Tensor:
        """(out, in) float32 weight the products use (int8 x scale)."""
        q, scale = self.int8_weight()
        return q.float() * scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) float32 -> (..., out) float32
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError(f"an int8-quantised layer has no backward: run it under torch.inference_mode() "
                               f"or torch.no_grad(), or {_WAY_OUT}")
        if x.dtype != torch.float32:
            raise RuntimeError(f"an int8-quantised layer takes float32 inputs, got {x.dtype}")
        if self._packed is None:
            self.pack()
        if not self.row_scaling:
            y = torch.ops.quantized.linear_dynamic(x.contiguous(), self._packed, reduce_range())
            return y if self.bias is None else y.add_(self.bias)
        return _row_scaled_linear(x, self._packed, self.bias)

    # ---------------------------------------------------------------- refusals
    def train(self, mode: bool = True) -> "Int8Linear":
        if mode:
            raise RuntimeError(f"this model is int8-quantised for CPU inference and cannot train: {_WAY_OUT}")
        return super().train(False)

    def _apply(self, fn, recurse=True):
        probe = fn(torch.zeros(()))
        if not (isinstance(probe, torch.Tensor) and probe.dtype == torch.float32 and probe.device.type == "cpu"):
            raise RuntimeError(f"cannot convert an int8-quantised layer to {getattr(probe, 'dtype', probe)} on "
                               f"{getattr(probe, 'device', '?')}: it runs in float32 on the CPU; {_WAY_OUT}")
        return super()._apply(fn, recurse)

    # ---------------------------------------------------------------- serialisation
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        q, scale = self.int8_weight()
        destination[prefix + "weight"] = q
        destination[prefix + "weight_scale"] = scale
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        names = (prefix + "weight", prefix + "weight_scale")
        for key in names:
            if key in unexpected_keys:
                unexpected_keys.remove(key)
        if any(key not in state_dict for key in names):
            missing_keys.extend(key for key in names if key not in state_dict)
            return
        try:
            self.set_int8(state_dict[names[0]], state_dict[names[1]], pack=True)
        except ValueError as e:
            error_msgs.append(f"{prefix}weight: {e}")

    def __getstate__(self):  # deepcopy / pickle: fbgemm's packed object does not travel; the int8 does
        state = dict(self.__dict__)
        state["_plain"], state["_packed"] = self.int8_weight(), None
        return state

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                "int8 weights (per-channel), dynamic int8 activations (per-row)")


def _linears(module: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, layer) for every plain nn.Linear under `module` (a list: safe to swap)."""
    return [(parent, attr, sub) for parent in module.modules() for attr, sub in parent.named_children()
            if type(sub) is nn.Linear]


def quantize_int8(model: nn.Module, pack: bool = True) -> int:
    """Swap the encoder's nn.Linear layers for `Int8Linear` in place, one at a time (each float
    weight is released as its layer is replaced); the model is put in eval mode with its remaining
    parameters frozen. Returns how many layers were quantised. pack=False keeps plain int8 tensors
    (for writing a folder: no fbgemm copy)."""
    check_quantize("int8", device=next(model.parameters()).device, dtype=None)
    if any(isinstance(m, Int8Linear) for m in model.modules()):
        raise ValueError("this model is already int8-quantised")
    if any(type(m).__name__ == "PackedLinear" for m in model.encoder.modules()):
        raise ValueError("the encoder's weights are packed for oneDNN (float): call model.to_dense() before "
                         "quantising, or load with quantize='int8' (which does not pack)")
    model.eval()
    count = 0
    for parent, attr, layer in _linears(model.encoder):
        setattr(parent, attr, Int8Linear.from_linear(layer, pack=pack))
        del layer  # its float weight is freed here: hand the pages back before the next layer
        release_freed_memory()
        count += 1
    model.requires_grad_(False)
    return count


def prepare_int8(model: nn.Module) -> int:
    """On a meta-device model: the encoder's nn.Linear layers become `Int8Linear.placeholder`s, so
    that ``model.state_dict()`` lists the keys, dtypes and shapes of a converted int8 folder."""
    count = 0
    for parent, attr, layer in _linears(model.encoder):
        setattr(parent, attr, Int8Linear.placeholder(layer))
        count += 1
    return count


def int8_layers(model: nn.Module) -> dict[str, Int8Linear]:
    """{module name: layer} for every `Int8Linear` of `model`."""
    return {name: m for name, m in model.named_modules() if isinstance(m, Int8Linear)}


def quantization(model: nn.Module) -> str | None:
    """"int8" where `model` holds `Int8Linear` layers, else None (what config.json records)."""
    return "int8" if any(isinstance(m, Int8Linear) for m in model.modules()) else None


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights as held: parameters (float) + each int8 layer's int8 weight and scales."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return total + sum(m.out_features * (m.in_features + 4) for m in int8_layers(model).values())
