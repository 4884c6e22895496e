"""The grouped-GEMM path of `Experts4bit`: routing sorted once on the device, one matmul for all experts.

Why: the per-expert loop (transformers' eager MoE loop, which `Experts4bit` followed) costs, per MoE
layer and forward pass, one host-device sync per expert (`torch.where` on the routing mask) and a
few dozen small kernels per expert, whatever the batch size: with 8 experts ~20 syncs and ~490
kernel launches per layer and training step (checkpointing), against none and ~140 here, a cost
that does not shrink with fewer tokens (docs/speed.md, "MoE"). Here the token-expert pairs are
sorted by expert once per layer, every offset stays on the device, and each projection is one
dequantization kernel for all experts plus one `torch._grouped_mm` (CUTLASS on sm90/sm100 in
bf16: no host sync at all).

Nothing here reads a device value on the host: `tests/test_moe_grouped.py` runs this path, forward
and backward, on the meta device, where any such read would fail.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: `torch._grouped_mm` and its CUTLASS kernel want every stride (and, on CUDA, every base address)
#: to be a multiple of 16 bytes
_ALIGNMENT_BYTES = 16


@dataclass(frozen=True)
class SortedRouting:
    """Token-expert pairs sorted by expert (stable, so each expert sees its tokens in order).

    `token` [S] is the token of each sorted pair, `weight` [S] its routing weight (zero for a pair
    routed to no expert), `offsets` [E] int32 the end row of each expert's group (`grouped_mm`'s
    `offs`), `routed` [E] whether an expert has any pair, `unsort` [T, k] the sorted rows of each
    token's pairs, lowest expert first. S = T x k.
    """

    token: torch.Tensor
    weight: torch.Tensor
    offsets: torch.Tensor
    routed: torch.Tensor
    unsort: torch.Tensor

    @classmethod
    def sort(cls, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, num_experts: int) -> SortedRouting:
        """From the router's [T, k] choices. Index `num_experts` means "no expert" (transformers'
        sentinel, which its loop skips): such a pair is computed by the last expert with weight 0
        and no gradient to its weight, so it adds exactly nothing, and no row is left unwritten."""
        tokens, k = top_k_index.shape
        expert = top_k_index.reshape(-1)
        valid = expert < num_experts
        expert = torch.where(valid, expert, num_experts - 1)
        weight = torch.where(valid, top_k_weights.reshape(-1), torch.zeros_like(top_k_weights.reshape(-1)))
        order = torch.argsort(expert, stable=True)
        sorted_expert = expert[order]
        bounds = torch.arange(num_experts, device=expert.device, dtype=expert.dtype)
        offsets = torch.searchsorted(sorted_expert, bounds, right=True).to(torch.int32)
        counts = torch.diff(offsets, prepend=offsets.new_zeros(1))
        unsort = torch.empty_like(order)
        unsort[order] = torch.arange(order.numel(), device=order.device)
        return cls(
            token=torch.div(order, k, rounding_mode="floor"),
            weight=weight[order],
            offsets=offsets,
            routed=counts > 0,
            unsort=unsort.view(tokens, k).sort(dim=1).values,  # rows follow the experts' order
        )

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """[T, d] token rows -> [S, d] rows in expert order."""
        return x[self.token]

    def combine(self, rows: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """[S, d] expert outputs -> [T, d]: each token's k outputs times their routing weights, added
        in `out_dtype` lowest expert first, as the loop's `index_add_` per expert adds them (the same
        sums in the same order; deterministic, which one `index_add_` of all pairs on CUDA is not)."""
        per_k = rows[self.unsort.reshape(-1)].view(*self.unsort.shape, rows.shape[-1]).unbind(1)
        weights = self.weight[self.unsort].unbind(1)
        out = None
        for part, weight in zip(per_k, weights, strict=True):
            term = (part * weight[:, None]).to(out_dtype)
            out = term if out is None else out + term
        return out


# ---- one matmul for all experts -------------------------------------------------------------------
def _aligned(t: torch.Tensor) -> bool:
    """Strides as `torch._grouped_mm` accepts them: one of the last two is 1, the other a multiple
    of 16 bytes at least as long as its row; and a 16-byte aligned base address (CUDA needs it,
    CPU kernels before torch 2.11 too)."""
    if t.data_ptr() % _ALIGNMENT_BYTES:
        return False
    step = _ALIGNMENT_BYTES // t.element_size()
    rows, cols = t.shape[-2:]
    s_rows, s_cols = t.stride()[-2:]
    if s_cols == 1 and s_rows >= max(1, cols):
        return s_rows % step == 0
    if s_rows == 1 and s_cols >= max(1, rows):
        return s_cols % step == 0
    return False


def native_grouped_mm_usable(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether `torch._grouped_mm` takes these operands (it has CPU kernels from torch 2.9)."""
    if not hasattr(torch, "_grouped_mm") or a.dtype != b.dtype:
        return False
    if a.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return False
    if a.device.type == "cpu" and torch.__version__ < "2.9":  # TorchVersion compares as versions
        return False
    return _aligned(a) and _aligned(b)


def fused_grouped_mm(x: torch.Tensor) -> bool:
    """Where `torch._grouped_mm` runs one CUTLASS kernel with device offsets (bf16 on sm90/sm100);
    elsewhere it loops over the groups itself, reading the offsets on the host."""
    if not (x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")):
        return False
    return torch.cuda.get_device_capability(x.device)[0] in (9, 10)


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """[S, k] rows grouped by `offsets` (group g: rows offsets[g-1]..offsets[g]) times b[g] [k, n].

    `torch._grouped_mm` where it takes the operands, else a loop over the groups (one host read of
    the offsets); both differentiable in `a` and `b`, both give every row (offsets[-1] == S here).
    """
    if native_grouped_mm_usable(a, b):
        return torch._grouped_mm(a, b, offs=offsets)
    ends = offsets.tolist()
    starts = [0, *ends[:-1]]
    parts = [a[s:e] @ b[g] for g, (s, e) in enumerate(zip(starts, ends, strict=True)) if e > s]
    return torch.cat(parts) if parts else a.new_zeros(0, b.shape[-1])


def pad_for_grouped_mm(t: torch.Tensor, dim: int) -> torch.Tensor:
    """`t` with dimension `dim` padded by zeros to a multiple of 16 bytes (the grouped kernel's
    stride rule): a LoRA rank of 4 in bf16 becomes 8, and the zero rank adds exact zeros."""
    pad = -t.shape[dim] % (_ALIGNMENT_BYTES // t.element_size())
    if not pad:
        return t
    return torch.nn.functional.pad(t, [0, 0] * (t.dim() - 1 - dim) + [0, pad])


class GroupedDequant4bitLinear(torch.autograd.Function):
    """`grouped_mm(x, dequant(W)^T)` over all experts, keeping only the 4-bit weight for backward.

    As `_Dequant4bitLinear` for one expert: the weights are frozen, the backward only needs
    `grad @ W`, so W is dequantized again there rather than held in bf16 until then. `rows`
    (start, stop) takes those output rows of every expert (Mixtral's gate and up halves apart:
    half the transient bf16 weight of the whole gate_up stack).
    """

    @staticmethod
    def forward(ctx, x, offsets, owner, name: str, rows: tuple[int, int] | None):
        weight = owner.dequantize_stack(name, dtype=x.dtype, rows=rows)  # [E, n, in]
        ctx.owner, ctx.name, ctx.rows = owner, name, rows
        ctx.save_for_backward(offsets)
        return grouped_mm(x, weight.transpose(1, 2), offsets)

    @staticmethod
    def backward(ctx, grad_out):
        grad_x = None
        if ctx.needs_input_grad[0]:
            (offsets,) = ctx.saved_tensors
            weight = ctx.owner.dequantize_stack(ctx.name, dtype=grad_out.dtype, rows=ctx.rows)
            grad_x = grouped_mm(grad_out.contiguous(), weight, offsets)
        return grad_x, None, None, None, None
