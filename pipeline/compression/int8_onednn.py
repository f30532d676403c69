"""int8 Linear on oneDNN's u8 x s8 kernels with one activation scale per token: fast on AVX2-only CPUs.

torchao's int8 path (`torch._int_mm`) is fast only with AVX512-VNNI; fbgemm's dynamic Linear is fast on
AVX2 but scales activations per tensor, which flips a few percent of predictions. oneDNN's
`qlinear_pointwise` multiplies uint8 activations by int8 weights with float output on any x86 CPU; it
takes one activation scale per tensor, so each row is quantized here with its own scale and offset
(x ~= s * q + m, q in 0..127) and the output rescaled per row:

    x @ W.T + b = s * (q @ W.T) + m * rowsum(W) + b

Activations use 7 bits: without VNNI the u8 x s8 products are summed in pairs into int16 (vpmaddubsw),
and 8-bit activations saturate (7 bits do not).
7 bits everywhere keeps an artifact's numerics the same on every CPU.

Why these choices, with their measurements: docs/benchmarks.md ("The int8 backends").
"""
from __future__ import annotations

import torch
from torch import nn

_LEVELS = 127  # 7-bit activations (see above)
_ONE, _ZERO = torch.tensor(1.0), torch.tensor(0, dtype=torch.int64)


def _quantize_rows(x: torch.Tensor):
    lo, hi = torch.aminmax(x, dim=1, keepdim=True)
    scale = ((hi - lo) / _LEVELS).clamp_(min=1e-12)
    return torch.round((x - lo) / scale).to(torch.uint8), scale, lo


def _rescale_rows(y: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, wsum: torch.Tensor, bias: torch.Tensor):
    return y * scale + lo * wsum + bias


@torch.library.custom_op("offramp::int8_matmul", mutates_args=())
def _int8_matmul(q: torch.Tensor, packed: torch.Tensor, w_scale: torch.Tensor, w_zero: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] x packed int8 weights -> float32 [N, out]: q @ (W_int8 * w_scale).T.
    An opaque op to torch.compile (inductor's own qlinear lowering needs frozen weights)."""
    return torch.ops.onednn.qlinear_pointwise.tensor(
        q, _ONE, _ZERO, packed, w_scale, w_zero, None, 1.0, 0, torch.float32, "none", [], "")


@_int8_matmul.register_fake
def _(q, packed, w_scale, w_zero):
    return q.new_empty((q.shape[0], w_scale.shape[0]), dtype=torch.float32)


class OneDnnInt8Linear(nn.Module):
    """Drop-in for a float32 nn.Linear on CPU: int8 weights (one scale per output channel), activations
    quantized per token at run time. Built from the float Linear; holds no trainable parameters.

    Eager, the quantize and rescale steps cost about as much as the int8 matmul: torch.compile the module
    that holds it (the registry compiles each encoder layer, which also fuses GELU and the residual adds)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = (w.abs().amax(1) / 127).clamp(min=1e-12)
        wq = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("w_scale", scale, persistent=False)
        self.register_buffer("w_zero", torch.zeros_like(scale, dtype=torch.int64), persistent=False)
        self.register_buffer("w_sum", (wq.float() * scale[:, None]).sum(1), persistent=False)
        bias = linear.bias.detach().float() if linear.bias is not None else torch.zeros_like(scale)
        self.register_buffer("bias", bias, persistent=False)
        self._packed = torch.ops.onednn.qlinear_prepack(wq, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if x.numel() == 0:
            return x.new_empty(*shape[:-1], self.out_features)
        q, scale, lo = _quantize_rows(x.reshape(-1, shape[-1]))
        y = _int8_matmul(q, self._packed, self.w_scale, self.w_zero)
        return _rescale_rows(y, scale, lo, self.w_sum, self.bias).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, act=uint7 per token"


def swap_linears(module: nn.Module) -> None:
    """Replace every nn.Linear under `module` (in place) with a OneDnnInt8Linear."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, OneDnnInt8Linear(child))
        else:
            swap_linears(child)


def available() -> str | None:
    """Why these kernels cannot run here (None when they can): oneDNN's int8 Linear needs an x86 CPU with AVX2."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.onednn, "qlinear_pointwise"):
        return "this torch build has no oneDNN int8 Linear (torch.ops.onednn.qlinear_pointwise)"
    cap = torch.backends.cpu.get_cpu_capability()
    if cap not in ("AVX2", "AVX512"):
        return f"oneDNN's int8 Linear needs an x86 CPU with AVX2 (this CPU: {cap})"
    return None
