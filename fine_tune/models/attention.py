"""`model.attn_implementation=varlen`: packed rows through PyTorch's own flash-attention varlen kernel.

A packed batch is one row of several examples (fine_tune/data/collate.py). transformers' sdpa sees it
as one sequence with a block-diagonal mask, so attention costs the square of the whole row (8,192
tokens for 4 x 2,048) and the masked-out blocks are computed anyway. `torch.nn.attention.varlen`
(PyTorch >= 2.10, CUDA) attends within each example only, from the boundaries the packing collator
already passes (`cu_seq_lens_q`, `max_length_q`, computed on the CPU: no sync), and needs no
flash-attn package to build. Figures: docs/speed.md.

What it does not cover goes to transformers' sdpa unchanged: padded batches, generation with a KV
cache, attention dropout, and tensors on a CPU.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

NAME = "varlen"


@functools.cache
def kernel() -> Any:
    """PyTorch's varlen flash attention, or None where this PyTorch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def on_gpu(tensor: Any) -> bool:
    return tensor.is_cuda


@functools.cache
def kernel_parameters() -> frozenset[str]:
    """The kernel's keyword arguments, which changed between PyTorch versions (2.10: `is_causal`;
    later: `window_size`, `enable_gqa`)."""
    attend = kernel()
    return frozenset(inspect.signature(attend).parameters) if attend is not None else frozenset()


def windowed(sliding_window: int | None, max_length: int) -> bool:
    """Whether a sliding window cuts into the longest example (else attention is plainly causal)."""
    return bool(sliding_window) and max_length > sliding_window


def half_dtype(query: Any) -> Any:
    """The dtype the flash kernel computes in (fp16/bf16 only): autocast's, else the query's; None
    for fp32 outside autocast (sdpa computes that)."""
    import torch

    if torch.is_autocast_enabled(query.device.type):
        return torch.get_autocast_dtype(query.device.type)
    return query.dtype if query.dtype in (torch.float16, torch.bfloat16) else None


def packed_attention(
    query: Any,
    key: Any,
    value: Any,
    cu_seq_lens: Any,
    max_length: int,
    scaling: float | None,
    sliding_window: int | None,
) -> Any:
    """Causal attention of each example of the packed rows on its own; (batch, length, heads, dim) out.

    `query` is (batch, heads, length, dim) as transformers' attention modules hand it over, `key` and
    `value` may have fewer heads (grouped-query attention: query head h reads key head h // group).
    """
    import torch

    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]

    def tokens_first(x: Any) -> Any:
        return x.transpose(1, 2).reshape(batch * length, x.shape[1], dim)

    q, k, v = tokens_first(query), tokens_first(key), tokens_first(value)
    dtype = half_dtype(query) or torch.bfloat16
    if q.dtype != dtype:  # a custom op: autocast does not cast its inputs as it does sdpa's
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    options: dict[str, Any] = {"scale": scaling}
    parameters = kernel_parameters()
    if kv_heads != heads:
        if "enable_gqa" in parameters:
            options["enable_gqa"] = True
        else:
            k, v = (x.repeat_interleave(heads // kv_heads, dim=1) for x in (k, v))
    if "window_size" in parameters:
        options["window_size"] = (sliding_window - 1, 0) if windowed(sliding_window, max_length) else (-1, 0)
    else:  # torch 2.10: causal only (varlen_attention sends windowed rows to sdpa there)
        options["is_causal"] = True
    out = kernel()(q, k, v, cu_seq_lens, cu_seq_lens, max_length, max_length, **options)
    return out.view(batch, length, heads, dim)


def varlen_attention(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    **kwargs: Any,
) -> tuple[Any, None]:
    """transformers' attention interface: packed training rows by varlen, anything else by sdpa."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu_seq_lens, max_length = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    packed = cu_seq_lens is not None and max_length is not None and query.shape[2] == key.shape[2]
    # `packed` first: a decoding step (KV cache) never asks for the kernel, so a compiled step has
    # no cached lookup to trace
    if packed and on_gpu(query) and not dropout and half_dtype(query) is not None:
        parameters = kernel_parameters()
        if "window_size" in parameters or (
            "is_causal" in parameters and not windowed(sliding_window, max_length)
        ):
            return packed_attention(query, key, value, cu_seq_lens, max_length, scaling, sliding_window), None
    if isinstance(attention_mask, DeferredMask):
        attention_mask = attention_mask.build()
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
        sliding_window=sliding_window, **kwargs,
    )  # fmt: skip


class DeferredMask:
    """sdpa's mask for a batch without padding or cache, built the first time a layer sends the
    batch to sdpa. A packed row that goes to varlen never needs it, and built eagerly it is a
    (length x length) tensor made at every forward and alive through the backward: 64 MiB at 8,192
    tokens, part of the training peak (docs/speed.md)."""

    def __init__(self, arguments: dict[str, Any]) -> None:
        self.arguments: dict[str, Any] | None = arguments
        self.mask: Any = None

    def build(self) -> Any:
        from transformers.masking_utils import sdpa_mask

        if self.arguments is not None:
            self.mask, self.arguments = sdpa_mask(**self.arguments), None
        return self.mask


def varlen_mask(**arguments: Any) -> Any:
    """The mask interface registered with varlen: rows that may be packed (no padding mask, no
    cache, more than one token) get a DeferredMask; anything else sdpa's mask, as before."""
    from transformers.masking_utils import sdpa_mask

    if arguments.get("attention_mask") is None and arguments["q_length"] == arguments["kv_length"] > 1:
        return DeferredMask(arguments)
    return sdpa_mask(**arguments)


def resolve(name: str) -> str:
    """`auto` (the default): varlen where its kernel runs (a CUDA GPU, PyTorch >= 2.10), else sdpa.
    On an H100 varlen trained packed Mistral-7B QLoRA 1.56x faster than sdpa (docs/speed.md); what
    it does not cover goes to sdpa anyway. Registers varlen with transformers when chosen."""
    import torch

    if name == "auto":
        name = NAME if kernel() is not None and torch.cuda.is_available() else "sdpa"
    if name == NAME:
        register()
    return name


def register() -> None:
    """Make `attn_implementation="varlen"` known to transformers (before a model is built with it);
    its masks are sdpa's, for the batches that go to sdpa (deferred: varlen_mask)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(NAME, varlen_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, varlen_mask)
