"""Plain building blocks the model files share (no ranks here).

``fuse_linears``, ``linear_gelu`` and ``pack`` are fast paths for the CPU:
exact rewrites of plain PyTorch (the same numbers up to float rounding), so
the model files stay readable and the fast paths stay optional.

An int8 weight (``hpcllm convert --weights int8``, ``hpcllm.model.quant``) is an int8
parameter carrying its per-row scales as the attribute ``scale`` (in the compute dtype);
``linear``, ``embedding``, ``fuse_linears`` and ``pack`` take it as they take a float weight.
"""

import functools

import torch
import torch.nn.functional as F
from torch import nn

# oneDNN's fused linear + pointwise op; without it ``linear_gelu`` takes the two-op path.
ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@functools.cache
def _fused_runs(dtype: torch.dtype) -> bool:
    """Whether oneDNN's fused op runs in ``dtype`` on this CPU: bf16 needs AVX-512 (or AMX), which
    torch's own bf16 matmul does without, so a CPU lacking them takes the two-op path in bf16."""
    try:
        w = torch.zeros(8, 8, dtype=dtype)
        torch.ops.mkldnn._linear_pointwise(torch.zeros(2, 8, dtype=dtype), w, torch.zeros(8, dtype=dtype),
                                           "gelu", [], "none")
        return True
    except RuntimeError:
        return False


def linear_gelu(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """``gelu(layer(x))`` (exact, erf form); on CPU one oneDNN call with the GELU fused into the matmul's
    epilogue (measured 24% faster than linear then gelu at [16384, 384] x [384, 1536]), elsewhere two ops.
    A weight being trained takes the two ops too (oneDNN's op has no backward)."""
    if layer.weight.requires_grad and torch.is_grad_enabled():
        return F.gelu(F.linear(x, layer.weight, layer.bias))
    if layer.weight.is_mkldnn or (ONEDNN and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
                                  and _fused_runs(x.dtype)):
        return torch.ops.mkldnn._linear_pointwise(x, layer.weight, layer.bias, "gelu", [], "none")
    return F.gelu(F.linear(x, layer.weight, layer.bias))


PACK_ROWS = 32   # the row count oneDNN lays packed weights out for (a decode batch; prefill runs as fast)


@functools.cache
def _packs(dtype: torch.dtype = torch.float32) -> bool:
    """Whether oneDNN's linear on a packed ``dtype`` weight runs here: fp32 wherever the wheel has
    oneDNN (x86 and arm); bf16 only where the CPU has native bf16 (AVX512-BF16 or AMX), elsewhere
    oneDNN would emulate it and plain ``F.linear`` is the better path."""
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    try:
        w = torch.ops.mkldnn._reorder_linear_weight(torch.zeros(4, 8, dtype=dtype), PACK_ROWS)
        torch.ops.mkldnn._linear_pointwise(torch.zeros(2, 8, dtype=dtype), w, None, "none", [], "")
        return True
    except (RuntimeError, AttributeError):
        return False


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """An [out, in] fp32 or bf16 CPU weight reordered into oneDNN's blocked layout (same size) where
    oneDNN runs it (``_packs``), else unchanged.

    ``linear`` then calls oneDNN's matmul on dense inputs and outputs instead of MKL's, measured
    (2 cores, SmolLM2's shapes) 1.4-1.7x faster in fp32 at 32 decode rows (2.8x for the LM head,
    which MKL repacks on every call) and 1.1-1.7x at 512-row prefill chunks; in bf16 on an
    AVX512-BF16 CPU 1.05-1.4x ``F.linear``'s bf16 path at 32 rows, 1.03-1.09x at 512."""
    if (weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16) and not weight.is_mkldnn
            and _packs(weight.dtype)):
        return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), PACK_ROWS)
    return weight


def pack(*layers: nn.Module) -> None:
    """Each layer's float ``weight`` replaced by its ``pack_weight`` (no second copy; the layers must call
    ``linear`` or ``linear_gelu``); an int8 weight stays as it is."""
    for layer in layers:
        if layer.weight.is_floating_point():
            layer.weight = nn.Parameter(pack_weight(layer.weight.data), requires_grad=False)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` for a dense, a packed (``pack_weight``) or an int8 weight."""
    if weight.dtype == torch.int8:
        return int8_linear(x, weight, bias)
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


INT8PACK_ROWS = 1   # up to this many rows ATen's int8 x bf16 kernel beats the bf16 matmul (bench/quant_kernels.py)


def int8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ (codes * scale).T + bias for an int8 ``weight`` with ``weight.scale`` [out].

    Measured on 2 cores (SmolLM2 / Qwen2.5 shapes, ``bench/quant_kernels.py``): ATen's weight-only
    kernel (``_weight_int8pack_mm``) is 2.2x the bf16 matmul at one row but 3-8x slower from 8 rows
    up and in fp32; dynamic int8 activations (fbgemm / oneDNN, W8A8) are 1.7-2x faster but drift
    0.5 nats per token on SmolLM2 (per-token activation scales: 0.24). So: the ATen kernel for a bf16
    row, else the codes converted to x's dtype (exact: |code| <= 127) in a plain matmul, scaled after."""
    rows = x.numel() // x.shape[-1]
    if x.dtype == torch.bfloat16 and x.device.type == "cpu" and rows <= INT8PACK_ROWS:
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(rows, -1), weight, weight.scale)
        y = y.reshape(*x.shape[:-1], -1)
    else:
        y = F.linear(x, weight.to(x.dtype)) * weight.scale
    return y if bias is None else y + bias


def embedding(ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.embedding`` for a float or an int8 weight (rows dequantised: codes times their row's scale)."""
    if weight.dtype == torch.int8:
        return F.embedding(ids, weight).to(weight.scale.dtype) * weight.scale[ids][..., None]
    return F.embedding(ids, weight)


def with_scale(weight: torch.Tensor, scale: torch.Tensor | None) -> nn.Parameter:
    """``weight`` as a frozen parameter, carrying ``scale`` where it is int8 codes."""
    param = nn.Parameter(weight, requires_grad=False)
    if scale is not None:
        param.scale = scale
    return param


class Linear(nn.Linear):
    """nn.Linear that also runs with a packed weight (``pack``)."""

    def forward(self, x):
        return linear(x, self.weight, self.bias)


def fuse_linears(*layers: nn.Linear) -> nn.Linear:
    """One linear whose output is the concatenation of ``layers``' outputs (same input), e.g. Q|K|V."""
    weight = torch.cat([layer.weight for layer in layers])
    bias = torch.cat([layer.bias for layer in layers]) if layers[0].bias is not None else None
    scale = torch.cat([layer.weight.scale for layer in layers]) if weight.dtype == torch.int8 else None
    fused = Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    fused.weight = with_scale(weight, scale)
    if bias is not None:
        fused.bias = nn.Parameter(bias, requires_grad=False)
    return fused


def frozen_embedding(n: int, dim: int) -> nn.Embedding:
    """An [n, dim] embedding left uninitialised (the loader fills it).

    from_pretrained: no random init (nn.Embedding's normal_ on the meta device imports torch._dynamo, 1.1 s).
    """
    return nn.Embedding.from_pretrained(torch.empty(n, dim))
