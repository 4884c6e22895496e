"""Predict peak GPU memory of a run from its composed config, without loading any weights.

Why: a Mixtral QLoRA job that will not fit should stop in a second with advice, not after ten
minutes of loading and an OOM traceback. Parameter memory is exact arithmetic on the model's
shapes (including bitsandbytes' quantization constants); activation memory is a per-token model
whose coefficients were measured with `torch.cuda.max_memory_allocated` on an H100 (see
docs/memory.md and benchmarks/memory_bench.py), for the training path fine_tune uses: frozen
weights in the model dtype, or fp32 with quant.upcast_frozen=true (PEFT's
`prepare_model_for_kbit_training`, hence an fp32 residual stream), bf16 autocast, sdpa attention,
non-reentrant checkpointing, transformers' causal-LM loss.

Neither torch nor transformers is imported: `plan=true` must answer fast.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from fine_tune.errors import UserError
from fine_tune.models.quant import upcasts_frozen

log = logging.getLogger("fine_tune")

GIB = 2**30

# ---- activation coefficients (bytes per token), measured on one H100 80GB, torch 2.11, transformers
# 5.23, peft 0.21.2, bitsandbytes 0.50.2, seq 2048, nf4 + double quant, LoRA r=16, on models cut to
# 2 and 4 layers (per-layer slope and intercept); the 32-layer runs in docs/memory.md were not used
# to fit them. "fp32"/"bf16" is the residual stream: fp32 with quant.upcast_frozen=true, where PEFT's
# prepare_model_for_kbit_training upcasts every non-4-bit weight (embeddings included).
CALIBRATION = {
    # activations one layer keeps for the backward without LoRA, per token, per unit of
    # (hidden + k * intermediate), k = experts per token (1 for dense). mixtral/bf16 is not measured:
    # scaled from mixtral/fp32 by mistral's bf16/fp32 ratio.
    # The bf16 entries were refitted on 2026-11-26 for the path runs take now (varlen attention, Liger's
    # RMSNorm/SwiGLU, fused LoRA layers): from the difference between checkpointing every layer and one
    # in two (16 layers keeping their activations), one H100, packed 4 x 2048 (docs/benchmarks.md):
    # Mistral-7B bf16 LoRA 17.89 -> 42.57 GiB (was 7.67: +24% over), Mixtral-8x7B nf4 with expert LoRA
    # 29.53 -> 65.41 GiB (was 5.60: -10% under).
    "layer_base": {
        ("mistral", "fp32"): 12.39,
        ("mistral", "bf16"): 5.08,
        ("mixtral", "fp32"): 9.05,
        ("mixtral", "bf16"): 6.46,
    },
    # PEFT LoRA on an nn.Linear keeps the bf16 cast of its input (2 B x in_features per token), plus
    # the dropout mask (1 B x in_features) when lora_dropout > 0. Derived, and checked against the
    # attention-only vs all-projections runs (65.5 measured vs 67.6 KB/token/layer predicted).
    "lora_dense": 2.0,
    "lora_dropout": 1.0,
    # our expert LoRA, per routed token per unit of (hidden + intermediate) (measured)
    "lora_experts": 1.565,
    "lora_experts_dropout": 1.12,
    # checkpointing: one layer recomputed + back-propagated costs its saved activations plus this,
    # per token per unit of width (the dense MLP's fp32 gradients of the intermediate dominate)
    "recompute_extra": {
        ("mistral", "fp32"): 8.30,
        ("mistral", "bf16"): 9.93,
        ("mixtral", "fp32"): 1.64,
        ("mixtral", "bf16"): 1.64,
    },
    # DoRA (PEFT's DoraLinearLayer), derived from its code, NOT measured (benchmarks/variants_bench.py
    # measures it): per token per output feature of each adapted linear, the base and the LoRA output
    # kept for the magnitude's gradient and a wider (fp32) sum after them; per forward of each adapted
    # linear, its weight norm: an [in x in] identity (fp32 + autocast's bf16 copy, kept for A's
    # gradient) pushed through the LoRA, B @ A (bf16 + fp32), the dequantized weight (bf16 + fp32),
    # the scaled sum (bytes per in^2 and per in x out, the largest adapted linear counted); with
    # lora_dropout > 0 on a quantized base, autocast's bf16 copy of each dequantized weight (2 B per
    # element) is kept for the backward of PEFT's second base matmul
    "dora_per_out": 6.0,
    "dora_norm_identity": 6.0,
    "dora_norm_weight": 18.0,
    "dora_dropout_weight": 2.0,
    # loss phase: logits bf16, fp32 upcast, log-softmax and its backward, per token per vocab entry
    "loss_per_vocab": 11.5,
    # cuBLAS workspace: allocated through the caching allocator at the first matmul, kept
    "fixed_workspace": 64 * 2**20,
    # one-off allocations of the loss phase besides the logits (a second workspace and the like)
    "loss_workspace": 64 * 2**20,
}
# Reserved-but-unused share of the activation memory (fragmentation of the caching allocator). Set
# from the largest batches that trained on an 80 GB H100 (Mixtral-8x7B 27, Mistral-7B 35 at seq 2048,
# the next batch ran out of memory): 8% puts the boundary of both where it was measured.
ALLOCATOR_SLACK = 0.08
CUDA_CONTEXT = 0.5 * GIB  # CUDA context + kernels: device memory the allocator never sees


def _quant_bytes(
    matrices: dict[str, tuple[int, int]], kind: str, double_quant: bool, blocksize: int = 64
) -> int:
    """Bytes bitsandbytes holds for these (in, out) matrices: packed values + quantization constants."""
    total = 0
    for i, rows in matrices.values():
        n = i * rows
        if kind == "int8":
            total += n + 4 * rows
            continue
        blocks = math.ceil(n / blocksize)
        total += (n + 1) // 2 + (blocks + 4 * math.ceil(blocks / 256) + 4 if double_quant else 4 * blocks)
    return total


def _optimizer_kind(optim: dict) -> tuple[str, int, bool]:
    """(class path, bytes of state per trainable parameter, paged?) from the optim node."""
    factory = optim.get("optimizer")
    target = (factory.get("_target_") if isinstance(factory, dict) else None) or "torch.optim.AdamW"
    name = str(target).rsplit(".", 1)[-1].lower()
    paged = "paged" in name
    if "8bit" in name:
        per_param = 2 if ("adam" in name or "lion" not in name) else 1
    elif "sgd" in name or "lion" in name:
        per_param = 4
    else:
        per_param = 8  # Adam/AdamW: exp_avg + exp_avg_sq in fp32
    return str(target), per_param, paged


@dataclass
class MemoryPlan:
    """Predicted peak `torch.cuda.max_memory_allocated` of one training step, with its parts."""

    description: str
    batch_size: int
    seq_len: int
    gradient_checkpointing: bool
    items: list[tuple[str, int, str]] = field(default_factory=list)  # (what, bytes, how)
    saved_per_sample: int = 0  # activations kept across layers, per sample
    loss_per_sample: int = 0  # loss-phase transient per sample (logits and friends)
    loss_fixed: int = 0  # loss-phase bytes that do not scale with the batch
    recompute_per_sample: int = 0  # checkpointing: one layer's recompute + backward, per sample
    reference_per_sample: int = 0  # DPO: the reference forward (no gradients) while activations are kept
    outside_allocator_bytes: int = 0  # paged optimizer state, CUDA context: on the GPU, not in `allocated`
    params_4bit: int = 0
    params_other: int = 0
    trainable_params: int = 0
    load_bytes: int = 0  # FSDP loading onto the GPU: the whole model there before it is sharded
    world_size: int = 1  # processes (GPUs) the plan assumed: WORLD_SIZE
    strategy: str = "ddp"  # trainer.strategy: every figure is per GPU

    @property
    def static_bytes(self) -> int:
        skip = ("activations", "logits", "LoRA grad")
        return sum(b for what, b, _ in self.items if not what.startswith(skip))

    @property
    def total_bytes(self) -> int:
        """What `torch.cuda.max_memory_allocated` should report at the peak."""
        return sum(b for _, b, _ in self.items)

    def activation_bytes(self, batch_size: int) -> int:
        """Saved activations + the largest transient peak (loss, layer recompute, reference forward)."""
        b = batch_size
        loss = self.loss_per_sample * b + self.loss_fixed if b else 0
        return self.saved_per_sample * b + max(
            loss, self.recompute_per_sample * b, self.reference_per_sample * b
        )

    def device_bytes(self, batch_size: int | None = None) -> int:
        """Memory the GPU must really have: allocated peak + allocator slack + outside the allocator."""
        b = self.batch_size if batch_size is None else batch_size
        act = self.activation_bytes(b)
        return self.static_bytes + act + int(ALLOCATOR_SLACK * act) + self.outside_allocator_bytes

    def max_batch_size(self, gpu_gib: float) -> int:
        """Largest per-device batch whose predicted device memory fits `gpu_gib` (0 if none)."""
        limit = gpu_gib * GIB
        if self.device_bytes(1) > limit:
            return 0
        lo, hi = 1, 2
        while self.device_bytes(hi) <= limit and hi < 1 << 20:
            lo, hi = hi, hi * 2
        while hi - lo > 1:  # device_bytes grows with the batch: bisect the boundary
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.device_bytes(mid) <= limit else (lo, mid)
        return lo

    def format(self, gpu_gib: float | None = None) -> str:
        lines = [
            f"memory plan: {self.description}",
            f"  per GPU, with {self.world_size} GPU{'s' if self.world_size > 1 else ''} ({self.strategy}; "
            "the count from WORLD_SIZE, e.g. WORLD_SIZE=4 python -m fine_tune plan=true)",
            f"  batch {self.batch_size} x {self.seq_len} tokens, gradient checkpointing "
            f"{'on' if self.gradient_checkpointing else 'off'}",
            f"  {'':2}{'part':<44}{'GiB':>8}   how",
        ]
        row = "    {:<44}{:>8.2f}".format  # part, GiB
        lines += [f"{row(what, b / GIB)}   {how}" for what, b, how in self.items]
        slack = ALLOCATOR_SLACK * self.activation_bytes(self.batch_size)
        lines += [
            row("= peak allocated (max_memory_allocated)", self.total_bytes / GIB),
            row("+ allocator slack (fragmentation)", slack / GIB),
            row("+ outside the allocator (paged optim, context)", self.outside_allocator_bytes / GIB),
            row("= device memory needed", self.device_bytes() / GIB),
        ]
        total = self.params_4bit + self.params_other
        if total:
            lines.append(
                f"  parameters: {self.params_4bit / 1e9:.2f}B 4-bit, {self.params_other / 1e9:.2f}B other, "
                f"{self.trainable_params / 1e6:.1f}M trainable"
            )
        if gpu_gib:
            lines.append(f"  on {self.fit(gpu_gib)}; largest batch that fits: {self.max_batch_size(gpu_gib)}")
        return "\n".join(lines)

    def fit(self, gpu_gib: float) -> str:
        """Whether the run fits a `gpu_gib` GPU and by how much: the room a recipe can count on."""
        room = gpu_gib - self.device_bytes() / GIB
        if room >= 0:
            return f"{gpu_gib:.0f} GiB: fits, {room:.1f} GiB to spare"
        return f"{gpu_gib:.0f} GiB: does NOT fit, {-room:.1f} GiB short"

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "items": [dict(zip(("what", "bytes", "how"), item, strict=True)) for item in self.items],
            "total_bytes": self.total_bytes,
            "device_bytes": self.device_bytes(),
            "per_sample_bytes": self.saved_per_sample
            + max(self.loss_per_sample, self.recompute_per_sample, self.reference_per_sample),
            "activation_bytes": self.activation_bytes(self.batch_size),
        }


def plan_memory(cfg: Any) -> MemoryPlan:
    """The memory plan of the composed config `cfg` (DictConfig or plain dict, groups may be partial:
    the schema's defaults fill them); loads no weights."""
    from fine_tune.adapters import variant_name
    from fine_tune.families import shapes as fs
    from fine_tune.hardware import world_size
    from fine_tune.schema import complete
    from fine_tune.training.methods import method_of

    cfg = complete(cfg)
    world, strategy = world_size(), cfg["trainer"]["strategy"]
    shards = world if strategy == "fsdp" else 1  # DDP: a whole copy per GPU
    quant, lora, trainer = cfg["quant"], cfg["lora"], cfg["trainer"]
    method = method_of(cfg["method"])
    # a preference "sample" is a pair: chosen and rejected go through one forward, twice the rows
    sequences = 2 if method.pairs else 1
    s = fs.model_shapes(cfg["model"])
    kind, double_quant = quant["kind"], quant["double_quant"]
    batch, ckpt = trainer["per_device_train_batch_size"], trainer["gradient_checkpointing"]
    seq = cfg["dataset"]["max_length"]
    base_bytes = 4 if cfg["model"]["dtype"] in ("float32", "fp32") else 2
    h, v, n_layers = s.hidden_size, s.vocab_size, s.num_hidden_layers
    quantized, experts_4bit = kind in ("nf4", "fp4", "int8"), fs.experts_in_4bit(s, quant)
    # PEFT's prepare_model_for_kbit_training upcasts every weight that is not quantized to fp32, which
    # also makes the residual stream fp32.
    kbit_prep = upcasts_frozen(kind, quant.get("upcast_frozen", False), strategy)
    counts = fs.parameter_counts(s, lora, experts_4bit)
    items: list[tuple[str, int, str]] = []
    sharded = f", / {shards} GPUs (FSDP shards)" if strategy == "fsdp" else ""

    def add(what: str, size: float, how: str) -> None:
        items.append((what, int(size), how))

    def layer_quant_bytes(sparse: bool) -> int:
        experts = s.num_experts * _quant_bytes(fs.expert_matrices(s), kind, double_quant)
        return _quant_bytes(fs.layer_linears(s, sparse), kind, double_quant) + (
            experts if sparse and experts_4bit else 0
        )

    q_bytes = sum(layers * layer_quant_bytes(sp) for sp, layers in fs.layer_kinds(s)) if quantized else 0
    if quantized:
        add(
            f"quantized weights ({kind}) + constants",
            q_bytes / shards,
            f"{n_layers} layers; double quant {'on' if double_quant else 'off'}{sharded}",
        )
    # The linears when not quantized and the experts when not 4-bit (int8 too) stay in the model dtype.
    large = (0 if quantized else counts.linear) + (0 if experts_4bit else counts.experts)
    small = counts.total - counts.linear - counts.experts  # embeddings, lm_head, norms, routers, biases
    small_in = "fp32 (kbit prep)" if kbit_prep else ("fp32" if base_bytes == 4 else "bf16")
    bf16_experts = ", experts in bf16 (not 4-bit)" if s.moe and not experts_4bit else ""
    how = f"embeddings, lm_head, norms{', router' if s.moe else ''} in {small_in}{bf16_experts}{sharded}"
    unquantized = large * base_bytes + small * (4 if kbit_prep else base_bytes)
    add("non-quantized weights", unquantized / shards, how)

    lora_n, lora_experts = counts.trainable, lora["experts"] and s.moe
    target, state_per_param, paged = _optimizer_kind(cfg["optim"])
    add("LoRA parameters (fp32)", 4 * lora_n / shards, f"{lora_n / 1e6:.1f}M, rank {lora['r']}{sharded}")
    optim_bytes = state_per_param * lora_n / shards
    if paged:
        add("optimizer state", 0, f"{target}: {optim_bytes / GIB:.2f} GiB paged (outside allocator)")
    else:
        add("optimizer state", optim_bytes, f"{target}: {state_per_param} B/param{sharded}")
    if strategy == "fsdp":
        # Gathered for compute in the model dtype: the layer running and the next one (prefetched),
        # or every layer from its forward to its backward without resharding; the final norm and
        # lm_head stay gathered from the end of the forward to the start of the backward.
        def gathered_layer(sparse: bool) -> int:
            linears = 0 if quantized else sum(i * o for i, o in fs.layer_linears(s, sparse).values())
            stacked = s.num_experts * sum(i * o for i, o in fs.expert_matrices(s).values())
            experts = stacked if sparse and not experts_4bit else 0
            return (layer_quant_bytes(sparse) if quantized else 0) + (linears + experts) * base_bytes

        layer = max(gathered_layer(sparse) for sparse, _ in fs.layer_kinds(s)) + 2 * lora_n // n_layers
        held = 2 if cfg["trainer"]["fsdp"]["reshard_after_forward"] else n_layers
        add(
            "weights gathered by FSDP",
            held * layer + base_bytes * v * h,
            f"{held} decoder layers of {layer / 2**20:.0f} MiB + lm_head, all-gathered",
        )
    elif world > 1:
        add("DDP gradient buckets", 4 * lora_n, "a second fp32 copy of the LoRA gradients, for all-reduce")

    # activations, per token, of one typical layer (an MoE layer in an MoE model)
    k = s.num_experts_per_tok if s.moe else 1
    width = h + (
        k * s.expert_intermediate_size + s.shared_expert_intermediate_size if s.moe else s.intermediate_size
    )
    residual = 4 if kbit_prep else base_bytes
    key = (s.family.calibration, "fp32" if residual == 4 else "bf16")
    adapted = fs.lora_targets(s, lora, s.moe)
    per_in = CALIBRATION["lora_dense"] + (CALIBRATION["lora_dropout"] if lora["lora_dropout"] > 0 else 0.0)
    layer = CALIBRATION["layer_base"][key] * width + sum(per_in * i for i, _ in adapted.values())
    dora = bool(lora.get("use_dora"))
    if dora:
        layer += CALIBRATION["dora_per_out"] * sum(o for _, o in adapted.values())
    if lora_experts:
        # the core attaches expert adapters without dropout unless `lora.expert_dropout` says otherwise
        dropout = CALIBRATION["lora_experts_dropout"] if lora["expert_dropout"] > 0 else 0.0
        layer += k * (CALIBRATION["lora_experts"] + dropout) * (h + s.expert_intermediate_size)
    if ckpt:
        options = trainer["checkpointing"]
        every_n = every_n_layers(options["every_n_layers"])
        checkpointed = math.ceil(n_layers / every_n)  # transformers: the layers whose index % every_n == 0
        # offloaded inputs: on the GPU only the one being copied and the one fetched ahead
        inputs = min(2, checkpointed) if options["offload"] else checkpointed
        saved = inputs * residual * h + (n_layers - checkpointed) * layer
        recompute = layer + CALIBRATION["recompute_extra"][key] * width
        how = f"{inputs} layer inputs ({residual} B x hidden per token) kept for the recompute" + (
            " (the others in host memory)" if options["offload"] else ""
        )
        if checkpointed < n_layers:
            how += f", {n_layers - checkpointed} layers x {layer / 1024:.0f} KiB per token not checkpointed"
    else:
        saved, recompute = n_layers * layer, 0.0
        how = f"{n_layers} layers x {layer / 1024:.0f} KiB per token"
    lm_head_cast = 2 * v * h if kbit_prep else 0  # autocast's bf16 copy of the fp32 lm_head (forward only)
    tokens = sequences * seq  # per sample (per pair for preference methods)
    plan_args = {
        "saved_per_sample": int(tokens * saved),
        "loss_per_sample": int(tokens * CALIBRATION["loss_per_vocab"] * v),
        "loss_fixed": int(CALIBRATION["loss_workspace"] + lm_head_cast),
        "recompute_per_sample": int(tokens * recompute),
        # DPO's reference forward runs after the policy's, its activations still held: one layer's
        # forward intermediates at a time (nothing kept for a backward). Derived, not measured.
        "reference_per_sample": int(tokens * layer) if method.reference else 0,
    }
    probe = MemoryPlan("", batch, seq, ckpt, **plan_args)
    act = probe.activation_bytes(batch)
    transient = act - probe.saved_per_sample * batch
    # gradients of the adapters exist in full only after the backward, when the activations are gone:
    # they add to the peak only where they outweigh the activation peak (tiny batches)
    grads = 4 * lora_n // shards
    add("cuBLAS workspace", CALIBRATION["fixed_workspace"], "kept by the allocator after step 1")
    add(
        "LoRA gradients (fp32), beyond activations",
        max(grads - act, 0),
        f"{grads / GIB:.2f} GiB at the optimizer step, after activations are freed",
    )
    if dora:
        norms = {
            (i, o): CALIBRATION["dora_norm_identity"] * i * i + CALIBRATION["dora_norm_weight"] * i * o
            for i, o in adapted.values()
        }
        (i, o), norm = max(norms.items(), key=lambda item: item[1])
        add("DoRA weight norm (one linear at a time)", norm, f"largest: {o}x{i}; derived, not measured")
        if lora["lora_dropout"] > 0 and quantized:
            per_layer = CALIBRATION["dora_dropout_weight"] * sum(i * o for i, o in adapted.values())
            kept = per_layer * (1 if ckpt else n_layers)
            add("DoRA weights kept (lora_dropout > 0)", kept, "bf16 copies of the dequantized weights")
    shape = f"batch {batch}{' pairs x 2' if method.pairs else ''} x {seq}"
    add(f"activations ({shape})", probe.saved_per_sample * batch, how)
    if transient == probe.loss_per_sample * batch + probe.loss_fixed:
        peak = "loss (logits bf16 + fp32 + log-softmax + grad)"
    elif transient == probe.recompute_per_sample * batch:
        peak = "one layer recomputed + its backward"
    else:
        peak = "the reference forward (no gradients), one layer at a time"
    add("logits/loss, recompute or reference peak", transient, peak)

    load_whole = strategy == "fsdp" and not cfg["trainer"]["fsdp"]["load_on_cpu"]
    on = f"r={lora['r']} on {'+'.join(sorted(adapted)) or 'nothing'}{' + experts' if lora_experts else ''}"
    variant = variant_name(lora)
    on += f" ({variant})" if variant else ""
    params_4bit = (counts.linear if kind in fs.FOUR_BIT else 0) + (counts.experts if experts_4bit else 0)
    return MemoryPlan(
        description=f"{s.family.name} {counts.total / 1e9:.1f}B, {n_layers} layers, quant {kind}, LoRA {on}"
        + (f", {method.name} (pairs: chosen + rejected)" if method.pairs else ""),
        batch_size=batch,
        seq_len=seq,
        gradient_checkpointing=ckpt,
        items=items,
        **plan_args,
        outside_allocator_bytes=int(CUDA_CONTEXT + (optim_bytes if paged else 0)),
        params_4bit=params_4bit,
        params_other=counts.total - params_4bit,
        trainable_params=lora_n,
        # FSDP shards a model each rank loaded whole onto its GPU, unless it loads into host RAM
        load_bytes=int(q_bytes + unquantized + CUDA_CONTEXT) if load_whole else 0,
        world_size=world,
        strategy=strategy,
    )


def every_n_layers(value: int | str) -> int:
    """`trainer.checkpointing.every_n_layers` as it runs: `auto` left unresolved (no GPU, no plan:
    `check_before_loading` resolves it on a GPU) checkpoints every layer."""
    return 1 if value == "auto" else int(value)


#: share of the GPU a plan may fill when `every_n_layers=auto` picks less checkpointing: the planner
#: is within ~4% of measured peaks (docs/memory.md), other processes and fragmentation take the rest
AUTO_CHECKPOINTING_SHARE = 0.85


def choose_every_n_layers(cfg: Any, gpu_gib: float) -> int:
    """`trainer.checkpointing.every_n_layers=auto`: checkpoint only as much as memory needs. The
    largest N (fewest checkpointed layers, least recompute) whose plan fits in
    AUTO_CHECKPOINTING_SHARE of the GPU; 1 where nothing less fits, and with offload (which asks for
    the least memory). On an H100, bf16 LoRA of Mistral-7B: N=2 trained 1.15x faster than N=1 at
    42.6 instead of 17.9 GiB (docs/benchmarks.md)."""
    from fine_tune.families import shapes as fs
    from fine_tune.schema import complete

    plain = complete(cfg)
    options = plain["trainer"]["checkpointing"]
    if not plain["trainer"]["gradient_checkpointing"] or options["offload"]:
        return 1
    n_layers = fs.model_shapes(plain["model"]).num_hidden_layers
    tried = set()
    for every_n in range(n_layers, 1, -1):
        checkpointed = math.ceil(n_layers / every_n)
        if checkpointed in tried:
            continue
        tried.add(checkpointed)
        options["every_n_layers"] = every_n
        if plan_memory(plain).device_bytes() <= AUTO_CHECKPOINTING_SHARE * gpu_gib * GIB:
            return every_n
    return 1


def check_fits(plan: MemoryPlan, gpu_gib: float) -> None:
    """Raise UserError with concrete advice when `plan` will not fit a `gpu_gib` GPU."""
    if plan.load_bytes > gpu_gib * GIB:
        raise UserError(
            f"each GPU must hold the whole model ({plan.load_bytes / GIB:.1f} GiB) while it loads, before "
            f"FSDP shards it; the GPU has {gpu_gib:.1f} GiB",
            where="trainer.fsdp.load_on_cpu",
            hint="set trainer.fsdp.load_on_cpu=true (each rank loads into host RAM; FSDP moves the shards)",
        )
    need = plan.device_bytes()
    if need <= gpu_gib * GIB:
        return None
    advice = []
    best = plan.max_batch_size(gpu_gib)
    if best >= 1:
        advice.append(
            f"trainer.per_device_train_batch_size={best} (raise gradient_accumulation_steps to keep "
            f"the effective batch)"
        )
    if not plan.gradient_checkpointing:
        advice.append("trainer.gradient_checkpointing=true (activations of one layer instead of all)")
    if plan.seq_len > 512:
        advice.append(f"a shorter dataset.max_length (now {plan.seq_len}; activations scale with it)")
    if any(w == "optimizer state" and b > 0 for w, b, _ in plan.items):
        advice.append("optim=paged_adamw_8bit (8-bit optimizer state, paged)")
    if "quant none" in plan.description or "quant int8" in plan.description:
        advice.append("quant=nf4 (4-bit weights)")
    raise UserError(
        f"this run needs about {need / GIB:.1f} GiB of GPU memory, the GPU has {gpu_gib:.1f} GiB "
        f"({plan.description}, batch {plan.batch_size} x {plan.seq_len})",
        where="plan",
        hint="; or ".join(advice) or "use a larger GPU",
    )


COMMON_GPUS = {
    "24 GB (RTX 4090/A10G)": 22.0,
    "40 GB (A100-40G)": 39.4,
    "48 GB (L40S/A6000)": 44.4,
    "80 GB (A100/H100)": 79.2,
    "141 GB (H200)": 139.8,
}


def detected_gpu_gib() -> float | None:
    """Memory of the local GPU without importing torch: FINE_TUNE_GPU_GIB, else nvidia-smi, else None."""
    import os
    import shutil
    import subprocess

    if os.environ.get("FINE_TUNE_GPU_GIB"):
        return float(os.environ["FINE_TUNE_GPU_GIB"])
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
        # nvidia-smi reports MiB including what the driver keeps; torch sees ~0.5 GiB less
        return int(out.split()[0]) / 1024 - 0.45
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def print_plan(cfg: Any, gpu_gib: float | None = None) -> MemoryPlan:
    """`plan=true`: the breakdown, whether it fits the local GPU (or common GPU sizes) and the largest
    batch that fits; ends with one `plan:` line so a multirun's jobs can be compared at a glance."""
    from fine_tune.schema import complete

    plan = plan_memory(cfg)
    gpu_gib = gpu_gib if gpu_gib is not None else detected_gpu_gib()
    print(plan.format(gpu_gib))
    if gpu_gib is None:
        print(
            "  no GPU here; largest batch that fits (seq "
            f"{plan.seq_len}, checkpointing {'on' if plan.gradient_checkpointing else 'off'}):"
        )
        for name, gib in COMMON_GPUS.items():
            print(f"    {name:<24}{plan.max_batch_size(gib):>5}")
    gib = gpu_gib if gpu_gib is not None else COMMON_GPUS["80 GB (A100/H100)"]
    if plan.gradient_checkpointing and complete(cfg)["trainer"]["checkpointing"]["every_n_layers"] == "auto":
        print(
            f"  checkpointing every_n_layers=auto: the plan above checkpoints every layer; a run on "
            f"{gib:.0f} GiB checkpoints one layer in {choose_every_n_layers(cfg, gib)}"
        )
    print(
        f"plan: {plan.device_bytes() / GIB:.1f} GiB needed per GPU ({plan.world_size} x {plan.strategy}), "
        f"on {plan.fit(gib)}, batch {plan.batch_size} (max {plan.max_batch_size(gib)}) x {plan.seq_len}"
    )
    return plan


def check_before_loading(cfg: Any) -> MemoryPlan | None:
    """For a normal run on a GPU: raise UserError with advice if the plan will not fit this GPU.

    Returns the plan (for the log) or None where there is no GPU or nothing to plan (unknown family).
    """
    import torch

    if not torch.cuda.is_available():
        return None
    try:
        plan = plan_memory(cfg)
    except UserError:
        return None  # a model the planner does not know: train anyway, the OOM handler still reports
    gpu_gib = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GIB
    if cfg.trainer.checkpointing.every_n_layers == "auto":
        # what is free now: another process on the GPU (a second job, a notebook) keeps its share
        free = torch.cuda.mem_get_info()[0] / GIB
        every_n = choose_every_n_layers(cfg, free)
        cfg.trainer.checkpointing.every_n_layers = every_n  # what the trainer's arguments will read
        plan = plan_memory(cfg)
        if cfg.trainer.gradient_checkpointing:
            which = "every decoder layer" if every_n == 1 else f"one decoder layer in {every_n}"
            log.info("checkpointing %s (every_n_layers=auto, %.0f of %.0f GiB free)", which, free, gpu_gib)
    check_fits(plan, gpu_gib)
    return plan
