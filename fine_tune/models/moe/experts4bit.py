"""4-bit storage for fused 3-D expert weights (transformers 5 MoE layers such as `MixtralExperts`).

Why a module of our own: bitsandbytes converts `nn.Linear` only, and the fused experts are plain
3-D `nn.Parameter`s, so `from_pretrained(quantization_config=nf4)` leaves them in bf16 (~87 GiB for
Mixtral-8x7B). Each expert matrix is quantized on its own with `bitsandbytes.functional.quantize_4bit`
(the same blockwise NF4/FP4 + optional double quant that `Linear4bit` uses), stored stacked per
expert, and dequantized one hit expert at a time in the forward *and again in the backward*, so no
bf16 copy of an expert outlives the matmul that needs it (autograd would otherwise keep every
dequantized weight alive until the backward: the full bf16 model again).

Two kernels compute the same function (`quant.expert_kernel`, docs/speed.md "MoE"): `loop`, one hit
expert at a time (transformers' eager loop: least memory, one host sync per expert), and `grouped`
(grouped.py: tokens sorted by expert once, all experts dequantized by one kernel, one grouped GEMM
per projection, no host sync). `auto` takes `grouped` where `torch._grouped_mm` is one fused kernel
(bf16 on sm90/sm100) and the batch has rows for every expert, `loop` elsewhere.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fine_tune.schema import EXPERT_KERNELS, QuantSchema, default

from .grouped import GroupedDequant4bitLinear, SortedRouting, fused_grouped_mm

log = logging.getLogger(__name__)

#: the fused expert tensors we know how to quantize, with their layout [E, out, in] (not transposed)
EXPERT_PARAM_NAMES = ("gate_up_proj", "down_proj")
NESTED_BLOCKSIZE = 256  # bitsandbytes' fixed block size for the second (absmax) quantization
#: `auto` groups when there are this many routed rows per expert on average: below (generation's
#: decode steps) dequantizing every expert would cost more than the loop's hit experts only
GROUPED_MIN_ROWS_PER_EXPERT = 16
DEFAULT_KERNEL = default(QuantSchema, "expert_kernel")
_MAX_KERNEL_NUMEL = 2**31 - 1  # bitsandbytes' dequantization kernels count elements in an int


def _bnb_functional():
    import bitsandbytes.functional as bnbf

    return bnbf


def dequantize_4bit(packed: torch.Tensor, state: Any) -> torch.Tensor:
    """bitsandbytes' `dequantize_4bit`, except on CPU where a row is not a whole number of blocks.

    There bitsandbytes 0.50.2's native CPU kernel returned wrong values on a Xeon with AVX512-BF16
    and AMX (errors of 0.2-0.8 on unit-scale weights of shape 8 x 32 or 4 x 96; right on an AMD CPU
    without AVX512, and for rows of whole blocks, which every real Mistral/Mixtral shape has). Those
    are computed here as bitsandbytes' generic kernel does: code table value x block scale.
    """
    bnbf = _bnb_functional()
    if packed.device.type != "cpu" or state.shape[-1] % state.blocksize == 0:
        return bnbf.dequantize_4bit(packed, state)
    absmax = state.absmax
    if state.nested:
        absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
    nibbles = packed.reshape(-1).view(torch.uint8)
    index = torch.stack((nibbles >> 4, nibbles & 15), dim=-1).reshape(-1)  # high nibble first
    count = state.shape.numel()
    values = state.code.float()[index[:count].long()]
    values = F.pad(values, (0, -count % state.blocksize))
    values = values.view(-1, state.blocksize) * absmax.float().view(-1, 1)
    return values.reshape(-1)[:count].view(state.shape).to(state.dtype)


class _Dequant4bitLinear(torch.autograd.Function):
    """`F.linear(x, dequant(W_e))` that keeps only the 4-bit weight for the backward.

    The weights are frozen, so the backward only needs `grad @ W_e`; dequantizing W_e again there
    trades one cheap kernel for not holding E x out x in bf16 values per layer until the backward.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, owner: Experts4bit, name: str, expert: int) -> torch.Tensor:
        weight = owner.dequantize_expert(name, expert, dtype=x.dtype)
        ctx.owner, ctx.name, ctx.expert = owner, name, expert
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_x = None
        if ctx.needs_input_grad[0]:
            weight = ctx.owner.dequantize_expert(ctx.name, ctx.expert, dtype=grad_out.dtype)
            grad_x = grad_out @ weight
        return grad_x, None, None, None


class Experts4bit(nn.Module):
    """Drop-in replacement for a fused experts module, with every expert matrix in 4 bits.

    Buffers per fused tensor `<name>` (E experts, each quantized independently):
    `<name>_qweight` uint8 [E, ceil(out*in/2)] packed nibbles; `<name>_absmax` [E, n_blocks]
    float32, or uint8 with `<name>_absmax2` float32 [E, n_blocks2] and `<name>_offset` float32 [E]
    (float32 constants are held as int32 views, see `_float_buffer`)
    when double quant is on. Shared: `quant_code` (the 16-value NF4/FP4 map) and `nested_code`.
    Call signature and routing maths follow transformers' eager `MixtralExperts.forward` exactly.
    """

    def __init__(
        self,
        *,
        num_experts: int,
        shapes: dict[str, tuple[int, int]],
        act_fn: Callable[[torch.Tensor], torch.Tensor],
        quant_type: str = "nf4",
        double_quant: bool = True,
        compute_dtype: torch.dtype = torch.bfloat16,
        blocksize: int = 64,
        is_concatenated: bool = True,
        kernel: str = DEFAULT_KERNEL,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if quant_type not in ("nf4", "fp4"):
            raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
        self.kernel = check_kernel(kernel)
        self.num_experts = num_experts
        self.shapes = dict(shapes)
        self.act_fn = act_fn
        self.quant_type = quant_type
        self.double_quant = double_quant
        self.compute_dtype = compute_dtype
        self.blocksize = blocksize
        self.is_concatenated = is_concatenated
        self.adapters = nn.ModuleDict()  # filled by fine_tune.models.moe.lora.attach_expert_lora
        # False inside PEFT's `disable_adapter()` (lora.switch_with_peft): the base experts alone
        self.adapters_enabled = True
        code = _bnb_functional().get_4bit_type(quant_type, device="cpu").float()
        self._float_buffer("quant_code", code.to(device))
        self._float_buffer("nested_code", torch.zeros(256, dtype=torch.float32, device=device))
        for name, (out_f, in_f) in self.shapes.items():
            n = out_f * in_f
            n_blocks = math.ceil(n / blocksize)
            self.register_buffer(
                f"{name}_qweight", torch.zeros(num_experts, (n + 1) // 2, dtype=torch.uint8, device=device)
            )
            if double_quant:
                n_blocks2 = math.ceil(n_blocks / NESTED_BLOCKSIZE)
                self.register_buffer(
                    f"{name}_absmax", torch.zeros(num_experts, n_blocks, dtype=torch.uint8, device=device)
                )
                self._float_buffer(f"{name}_absmax2", torch.zeros(num_experts, n_blocks2, device=device))
                self._float_buffer(f"{name}_offset", torch.zeros(num_experts, device=device))
            else:
                self._float_buffer(f"{name}_absmax", torch.zeros(num_experts, n_blocks, device=device))

    def _float_buffer(self, name: str, value: torch.Tensor) -> None:
        """Quantization constants are stored as int32 views of float32: `model.to(torch.bfloat16)`,
        `.half()` or an fp32 upcast cast floating buffers, which would silently corrupt them."""
        self.register_buffer(name, value.to(torch.float32).view(torch.int32))

    def _f32(self, name: str) -> torch.Tensor:
        buf = getattr(self, name)
        return buf.view(torch.float32) if buf.dtype == torch.int32 else buf

    @torch.no_grad()
    def set_expert(self, name: str, expert: int, weight: torch.Tensor) -> None:
        """Quantize one expert's [out, in] matrix into slot `expert` (weight is then free to drop)."""
        out_f, in_f = self.shapes[name]
        if tuple(weight.shape) != (out_f, in_f):
            raise ValueError(f"{name}[{expert}]: expected shape {(out_f, in_f)}, got {tuple(weight.shape)}")
        qweight = getattr(self, f"{name}_qweight")
        weight = weight.to(qweight.device).contiguous()
        if not weight.is_floating_point():
            raise ValueError(f"{name}[{expert}]: expected a float tensor, got {weight.dtype}")
        packed, state = _bnb_functional().quantize_4bit(
            weight,
            blocksize=self.blocksize,
            compress_statistics=self.double_quant,
            quant_type=self.quant_type,
            quant_storage=torch.uint8,
        )
        qweight[expert].copy_(packed.view(-1))
        self._f32(f"{name}_absmax")[expert].copy_(state.absmax.view(-1))
        if self.double_quant:
            self._f32(f"{name}_absmax2")[expert].copy_(state.state2.absmax.view(-1))
            self._f32(f"{name}_offset")[expert].copy_(state.offset)
            self._f32("nested_code").copy_(state.state2.code)

    # ---- dequantization -----------------------------------------------------------------------
    def quant_state(self, name: str, expert: int, dtype: torch.dtype):
        """bitsandbytes QuantState for one expert, built as views on the stacked buffers."""
        nested = {}
        if self.double_quant:
            nested = {
                "state2": self._nested_state(name, expert),
                "offset": self._f32(f"{name}_offset")[expert],
            }
        return self._state(self._f32(f"{name}_absmax")[expert], self.shapes[name], dtype, **nested)

    def _state(self, absmax: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype, **nested: Any):
        """A QuantState of this module's 4-bit code and blocks, over `absmax` (float32 scales, or
        with `nested` the double-quantized ones)."""
        return _bnb_functional().QuantState(
            absmax=absmax,
            shape=torch.Size(shape),
            code=self._f32("quant_code"),
            blocksize=self.blocksize,
            quant_type=self.quant_type,
            dtype=dtype,
            **nested,
        )

    def _nested_state(self, name: str, expert: int | None):
        """QuantState of the absmax quantization (double quant): one expert's, or with None all
        experts' one after the other."""
        absmax2 = self._f32(f"{name}_absmax2")
        return _bnb_functional().QuantState(
            absmax=absmax2[expert] if expert is not None else absmax2.reshape(-1),
            code=self._f32("nested_code"),
            blocksize=NESTED_BLOCKSIZE,
            dtype=torch.float32,
        )

    def dequantize_expert(self, name: str, expert: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The [out, in] weight of one expert, in `dtype` (default: the compute dtype)."""
        dtype = dtype or self.compute_dtype
        qweight = getattr(self, f"{name}_qweight")[expert]
        return dequantize_4bit(qweight, self.quant_state(name, expert, dtype))

    def dequantize(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """All experts stacked as [E, out, in] (for tests and merging; needs the full bf16 size)."""
        return torch.stack([self.dequantize_expert(name, e, dtype) for e in range(self.num_experts)])

    def dequantize_stack(
        self, name: str, dtype: torch.dtype | None = None, rows: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """Output rows `rows` (default: all) of every expert as [E, n, in], in as few kernels as the
        layout allows: experts are quantized one by one, but when each one's rows fill whole blocks
        their blocks follow each other as if the stack had been quantized at once, so one
        dequantization of the stacked buffers gives the same numbers as E of them."""
        dtype = dtype or self.compute_dtype
        out_f, in_f = self.shapes[name]
        start, stop = rows or (0, out_f)
        n_rows = stop - start
        if not self._stackable(name, start, stop):
            return torch.stack(
                [self.dequantize_expert(name, e, dtype)[start:stop] for e in range(self.num_experts)]
            )
        packed = getattr(self, f"{name}_qweight")
        absmax = self._absmax(name)
        if (start, stop) != (0, out_f):
            packed = packed[:, start * in_f // 2 : stop * in_f // 2]
            absmax = absmax[:, start * in_f // self.blocksize : stop * in_f // self.blocksize]
        state = self._state(absmax.reshape(-1), (self.num_experts * n_rows, in_f), dtype)
        weight = dequantize_4bit(packed.reshape(-1), state)
        return weight.view(self.num_experts, n_rows, in_f)

    def _stackable(self, name: str, start: int, stop: int) -> bool:
        out_f, in_f = self.shapes[name]
        whole_blocks = all(n % self.blocksize == 0 for n in (out_f * in_f, start * in_f, stop * in_f))
        return whole_blocks and self.num_experts * (stop - start) * in_f <= _MAX_KERNEL_NUMEL

    def _absmax(self, name: str) -> torch.Tensor:
        """Every expert's float32 block scales [E, n_blocks] (nested ones dequantized by the same
        bitsandbytes call and offset add that `dequantize_4bit` makes for one expert)."""
        if not self.double_quant:
            return self._f32(f"{name}_absmax")
        codes = getattr(self, f"{name}_absmax")  # uint8 [E, n_blocks]
        dequantize = _bnb_functional().dequantize_blockwise
        if codes.shape[1] % NESTED_BLOCKSIZE == 0:  # nested blocks of all experts follow each other
            scales = dequantize(codes.reshape(-1), self._nested_state(name, None)).view(codes.shape)
        else:
            scales = torch.stack(
                [dequantize(codes[e], self._nested_state(name, e)) for e in range(self.num_experts)]
            )
        return scales + self._f32(f"{name}_offset")[:, None]

    # ---- forward ------------------------------------------------------------------------------
    def _project(self, name: str, x: torch.Tensor, expert: int) -> torch.Tensor:
        out = _Dequant4bitLinear.apply(x, self, name, expert)
        adapter = self.adapters[name] if name in self.adapters else None  # noqa: SIM401
        if adapter is not None and self.adapters_enabled:
            out = out + adapter(x, expert).to(out.dtype)
        return out

    def _apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        if self.is_concatenated:
            gate, up = gate_up.chunk(2, dim=-1)
        else:
            gate, up = gate_up[..., 0::2], gate_up[..., 1::2]
        return self.act_fn(gate) * up

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        x_all = hidden_states.to(self.compute_dtype)
        if self.uses_grouped(x_all, top_k_index.numel()):
            routing = SortedRouting.sort(top_k_index, top_k_weights, self.num_experts)
            x = routing.gather(x_all)
            parts = self._project_grouped("gate_up_proj", x, routing, self._gate_up_ranges())
            hidden = self.act_fn(parts[0]) * parts[1] if len(parts) == 2 else self._apply_gate(parts[0])
            (down,) = self._project_grouped("down_proj", hidden, routing, [None])
            return routing.combine(down, hidden_states.dtype)
        # the loop kernel: transformers' eager MixtralExperts.forward, one hit expert at a time
        final_hidden_states = torch.zeros_like(x_all, dtype=hidden_states.dtype)
        with torch.no_grad():
            expert_mask = F.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert_idx in expert_hit.flatten().tolist():
            if expert_idx == self.num_experts:
                continue
            top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
            current_state = x_all[token_idx]
            hidden = self._apply_gate(self._project("gate_up_proj", current_state, expert_idx))
            hidden = self._project("down_proj", hidden, expert_idx)
            hidden = hidden * top_k_weights[token_idx, top_k_pos, None]
            final_hidden_states.index_add_(0, token_idx, hidden.to(final_hidden_states.dtype))
        return final_hidden_states

    def uses_grouped(self, x: torch.Tensor, pairs: int) -> bool:
        """Which kernel a forward on `x` with `pairs` routed (token, expert) pairs takes."""
        if self.kernel != "auto":
            return self.kernel == "grouped"
        return fused_grouped_mm(x) and pairs >= GROUPED_MIN_ROWS_PER_EXPERT * self.num_experts

    def _gate_up_ranges(self) -> list[tuple[int, int] | None]:
        """The gate and the up rows apart where they are the two halves and each is one stackable
        dequantization (half the transient bf16 weight of the whole stack), else all rows at once."""
        out_f = self.shapes["gate_up_proj"][0]
        halves = [(0, out_f // 2), (out_f // 2, out_f)]
        if (
            self.is_concatenated
            and out_f % 2 == 0
            and all(self._stackable("gate_up_proj", *h) for h in halves)
        ):
            return halves
        return [None]

    def _project_grouped(
        self, name: str, x: torch.Tensor, routing: SortedRouting, row_ranges: list[tuple[int, int] | None]
    ) -> list[torch.Tensor]:
        """`x @ W^T (+ LoRA)` for the output rows in each of `row_ranges`, all experts at once; the
        adapter's `x A^T` is computed once and shared by the ranges."""
        adapter = self.adapters[name] if name in self.adapters else None  # noqa: SIM401
        low_rank = adapter.grouped_down(x, routing) if adapter is not None else None
        outs = []
        for rows in row_ranges:
            out = GroupedDequant4bitLinear.apply(x, routing.offsets, self, name, rows)
            if adapter is not None:
                out = out + adapter.grouped_up(low_rank, routing, rows).to(out.dtype)
            outs.append(out)
        return outs

    def extra_repr(self) -> str:
        shapes = ", ".join(f"{k}={self.num_experts}x{v[0]}x{v[1]}" for k, v in self.shapes.items())
        return (
            f"{shapes}, quant_type={self.quant_type}, double_quant={self.double_quant}, kernel={self.kernel}"
        )

    def logical_numel(self) -> int:
        """Parameters this module stands for (what the bf16 model would have)."""
        return sum(self.num_experts * o * i for o, i in self.shapes.values())


def check_kernel(kernel: str) -> str:
    if kernel not in EXPERT_KERNELS:
        raise ValueError(f"expert kernel must be one of {list(EXPERT_KERNELS)}, got {kernel!r}")
    return kernel


def set_expert_kernel(model: nn.Module, kernel: str) -> int:
    """Switch every `Experts4bit` of `model` to `kernel` (auto | grouped | loop); returns how many."""
    check_kernel(kernel)
    modules = [m for m in model.modules() if isinstance(m, Experts4bit)]
    for module in modules:
        module.kernel = kernel
    return len(modules)


# ---- discovery / replacement ----------------------------------------------------------------------
def _unsupported_reason(module: nn.Module) -> str | None:
    if getattr(module, "has_bias", False):
        return "expert biases"
    if getattr(module, "has_post_expert_norm", False):
        return "post-expert norm"
    if not getattr(module, "has_gate", True):
        return "no gate projection"
    apply_gate = getattr(type(module), "_apply_gate", None)
    if apply_gate is not None and getattr(apply_gate, "__name__", "") != "_default_apply_gate":
        return f"custom gate activation ({type(module).__name__}._apply_gate)"
    if not hasattr(module, "act_fn"):
        return "no act_fn"
    return None


def find_fused_experts(model: nn.Module) -> Iterator[tuple[str, nn.Module, str | None]]:
    """(qualified name, module, reason it cannot be quantized or None) for each fused-expert module."""
    for name, module in model.named_modules():
        if isinstance(module, Experts4bit):
            continue
        params = [getattr(module, p, None) for p in EXPERT_PARAM_NAMES]
        if all(isinstance(p, torch.Tensor) and p.dim() == 3 for p in params):
            yield name, module, _unsupported_reason(module)


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def quantize_experts_module(
    module: nn.Module,
    *,
    device: torch.device | str | None = None,
    read: Callable[[str, int, tuple[int, ...]], torch.Tensor] | None = None,
    **options: Any,
) -> Experts4bit:
    """Quantize one fused-experts module expert by expert, onto `device` (default: where it lives);
    `options` are `Experts4bit`'s (quant_type, double_quant, compute_dtype, blocksize, kernel).

    `read(name, expert, shape)` gives one expert's matrix as the module stores it (default: its own
    weights; the layer-by-layer loaders read a checkpoint or draw random ones instead)."""
    device = torch.device(device) if device is not None else getattr(module, EXPERT_PARAM_NAMES[0]).device
    transposed = bool(getattr(module, "is_transposed", False))
    stored = {name: tuple(getattr(module, name).shape) for name in EXPERT_PARAM_NAMES}  # [E, a, b]
    new = Experts4bit(
        num_experts=stored[EXPERT_PARAM_NAMES[0]][0],
        shapes={name: (b, a) if transposed else (a, b) for name, (_, a, b) in stored.items()},
        act_fn=module.act_fn,
        is_concatenated=bool(getattr(module, "is_concatenated", True)),
        device=device,
        **options,
    )
    read = read or (lambda name, e, shape: getattr(module, name)[e].detach())
    for name in EXPERT_PARAM_NAMES:
        for e in range(new.num_experts):
            w = read(name, e, stored[name][1:])
            new.set_expert(name, e, w.t() if transposed else w)
    return new


def quantize_fused_experts(
    model: nn.Module,
    quant_type: Any = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype | str = torch.bfloat16,
    blocksize: int = 64,
    device: torch.device | str | None = None,
    strict: bool = False,
    kernel: str = DEFAULT_KERNEL,
) -> dict:
    """Replace every fused 3-D experts module of `model` by `Experts4bit`, one module at a time.

    Peak extra memory is one module's 4-bit storage plus one expert in bf16, and each original
    module is released as soon as its replacement exists, so a model whose experts were loaded on
    CPU can be moved expert by expert onto `device`. Returns the parameter counts for the log
    (see `count_parameters`) plus `quantized_modules` and `skipped` (name -> reason). Already
    quantized modules are left alone, so calling it after `build_random_model` is harmless.
    `quant_type` may also be the core's `QuantSpec`; `kernel` is the modules' `Experts4bit.kernel`.
    """
    if hasattr(quant_type, "kind"):  # the core's QuantSpec
        spec = quant_type
        quant_type, double_quant = spec.kind, spec.double_quant
        compute_dtype = spec.compute_dtype or torch.bfloat16
        kernel = getattr(spec, "expert_kernel", kernel)  # a stand-in spec may leave it out
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"fused experts are quantized to nf4 or fp4, not {quant_type!r}")
    if isinstance(compute_dtype, str):
        compute_dtype = getattr(torch, compute_dtype)
    # names only: no list keeps the originals alive
    found = {name: reason for name, _, reason in find_fused_experts(model)}
    skipped = {name: reason for name, reason in found.items() if reason is not None}
    if skipped and strict:
        raise ValueError(f"cannot quantize fused experts: {skipped}")
    done = [name for name, reason in found.items() if reason is None]
    for name in done:
        new = quantize_experts_module(
            model.get_submodule(name),
            quant_type=quant_type,
            double_quant=double_quant,
            compute_dtype=compute_dtype,
            blocksize=blocksize,
            device=device,
            kernel=kernel,
        )
        set_submodule(model, name, new)  # the model held the original's last reference
    counts = count_parameters(model)
    counts.update(quantized_modules=len(done), skipped=skipped)
    log.info("quantized %d fused-expert modules to %s; %s", len(done), quant_type, format_counts(counts))
    for name, reason in skipped.items():
        log.warning("experts %s left unquantized: %s", name, reason)
    return counts


def count_parameters(model: nn.Module) -> dict:
    """Logical parameter counts by storage: 4-bit (bnb Linear4bit + Experts4bit) vs everything else.

    Logical = what the unquantized model would count, so the two numbers add up to the model size
    users know (46.7B for Mixtral-8x7B) whatever the storage; bytes are what is actually held.
    """
    four_bit = four_bit_bytes = other = other_bytes = trainable = 0
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, Experts4bit):
            four_bit += module.logical_numel()
            four_bit_bytes += sum(b.numel() * b.element_size() for b in module.buffers(recurse=False))
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        if param.requires_grad:
            trainable += param.numel()
        state = getattr(param, "quant_state", None)
        if type(param).__name__ == "Params4bit" and state is not None:
            four_bit += math.prod(state.shape)
            four_bit_bytes += param.numel() * param.element_size()
            four_bit_bytes += state.absmax.numel() * state.absmax.element_size()
            if state.state2 is not None:
                four_bit_bytes += state.state2.absmax.numel() * state.state2.absmax.element_size()
        else:
            other += param.numel()
            other_bytes += param.numel() * param.element_size()
    return {
        "params_4bit": four_bit,
        "params_other": other,
        "params_trainable": trainable,
        "bytes_4bit": four_bit_bytes,
        "bytes_other": other_bytes,
    }


def format_counts(counts: dict) -> str:
    """One log line: how much of the model is really 4-bit."""
    total = counts["params_4bit"] + counts["params_other"]
    frac = counts["params_4bit"] / total if total else 0.0
    return (
        f"parameters: {counts['params_4bit'] / 1e9:.3f}B in 4-bit ({frac:.1%}), "
        f"{counts['params_other'] / 1e9:.3f}B not 4-bit; "
        f"held: {counts['bytes_4bit'] / 2**30:.2f} GiB 4-bit + constants, "
        f"{counts['bytes_other'] / 2**30:.2f} GiB other"
    )
