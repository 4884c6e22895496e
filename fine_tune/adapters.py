"""LoRA adapters: the `lora` group becomes a `peft.LoraConfig` plus the choices PEFT cannot express
safely on its own (experts of fused MoE layers at exactly the requested rank, LoftQ on a model
already loaded in 4 bits).

The variants (conf/lora/*.yaml headers say what each costs): DoRA (`use_dora`) and the PiSSA /
OLoRA / gaussian initialisations are PEFT's own; LoftQ is fine_tune's (fine_tune/loftq.py says
why); rsLoRA is a scaling. PiSSA and OLoRA train on a residual base, which fine_tune/residual_init.py
turns back into a plain LoRA on the original base when the adapter is saved. What cannot combine is
refused by fine_tune/validate.py before anything loads.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fine_tune.errors import UserError
from fine_tune.schema import LORA_TARGETS, LoraSchema, default

log = logging.getLogger(__name__)

# PEFT's files of a saved adapter (a run's adapter/, each checkpoint); expert adapters are in them too.
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


@dataclass
class AdapterSpec:
    lora: Any  # peft.LoraConfig for the dense (nn.Linear) targets
    experts: bool  # also adapt fused MoE expert weights (same rank and alpha)
    expert_dropout: float = 0.0
    # LoftQ: PEFT builds plain LoRA, fine_tune.loftq sets A and B once the 4-bit model is wrapped
    loftq: bool = False


def changes_base(init: Any) -> bool:
    """PiSSA and OLoRA move the adapted weight's principal part into the adapter: the model trains on
    base - scaling * B0 @ A0, a residual, not the checkpoint."""
    return isinstance(init, str) and (init.startswith("pissa") or init == "olora")


def variant_name(lora: Mapping[str, Any]) -> str:
    """What a `lora` node trains besides plain LoRA, for logs, plans and model cards ("" for none)."""
    init = lora.get("init_lora_weights", True)
    parts = ["DoRA"] if lora.get("use_dora") else []
    if init is not True:
        kind, _, niter = str(init).partition("_niter_")
        label = {"pissa": "PiSSA", "olora": "OLoRA", "loftq": "LoftQ"}.get(kind, kind)
        parts.append(f"{label} init" + (f" ({init})" if niter else ""))
    if lora.get("use_rslora"):
        parts.append("rsLoRA")
    return ", ".join(parts)


def build_lora_config(
    r: int = default(LoraSchema, "r"),
    lora_alpha: float = default(LoraSchema, "lora_alpha"),
    lora_dropout: float = default(LoraSchema, "lora_dropout"),
    target_modules: Sequence[str] | str = LORA_TARGETS,
    bias: str = default(LoraSchema, "bias"),
    use_rslora: bool = default(LoraSchema, "use_rslora"),
    use_dora: bool = default(LoraSchema, "use_dora"),
    init_lora_weights: bool | str = default(LoraSchema, "init_lora_weights"),
    experts: bool = default(LoraSchema, "experts"),
    expert_dropout: float = default(LoraSchema, "expert_dropout"),
    modules_to_save: list[str] | None = None,
) -> AdapterSpec:
    """The `lora` node (validated by fine_tune.schema) as PEFT's config plus the expert adapters'."""
    from peft import LoraConfig

    config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=target_modules if isinstance(target_modules, str) else list(target_modules),
        bias=bias,
        use_rslora=use_rslora,
        use_dora=use_dora,
        init_lora_weights=True if init_lora_weights == "loftq" else init_lora_weights,
        modules_to_save=modules_to_save,
        task_type="CAUSAL_LM",
    )
    loftq = init_lora_weights == "loftq"
    return AdapterSpec(lora=config, experts=experts, expert_dropout=expert_dropout, loftq=loftq)


def prepare_for_adapter(model: Any, gradient_checkpointing: bool, upcast_frozen: bool = False) -> Any:
    """What the base needs before an adapter trains on it: checkpointing with gradients flowing from
    the (frozen) input embeddings; with `upcast_frozen` (quant.upcast_frozen), PEFT's k-bit
    preparation instead, which also casts every frozen weight that is not quantized (norms,
    embeddings, LM head) to fp32.

    That cast makes the whole residual stream fp32 (an fp32 norm weight times a bf16 activation is
    fp32), so every layer casts its inputs back to bf16 for the 4-bit matmuls and the adapters: on an
    H100 it cost a fifth of a QLoRA step (docs/speed.md). Off by default, as in any bf16 training;
    never under FSDP, whose mixed precision would cast the fp32 copies back to bf16 (twice the memory
    of Mixtral's bf16 experts for nothing)."""
    if upcast_frozen:
        from peft import prepare_model_for_kbit_training

        return prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    for param in model.parameters():
        param.requires_grad = False
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model


def attach_adapter(
    model: Any, spec: AdapterSpec, gradient_checkpointing: bool, upcast_frozen: bool = False
) -> Any:
    """Wrap the base model with LoRA; only adapter weights remain trainable (fine_tune.validate has
    checked that expert adapters have experts to go on, and that the variant fits the base)."""
    from peft import get_peft_model

    checkpoint = getattr(model, "name_or_path", None)  # LoftQ reads the full-precision weights there
    model = prepare_for_adapter(model, gradient_checkpointing, upcast_frozen)
    experts_4bit = spec.experts and any(type(m).__name__ == "Experts4bit" for m in model.modules())
    lora = spec.lora
    if spec.experts and not experts_4bit:
        # bf16 experts are real parameters: PEFT's target_parameters adapts them at rank r per
        # expert (lora_A is [r x experts, in]) and saves them in its own format.
        lora = dataclasses.replace(lora, target_parameters=fused_expert_parameter_names(model))
    try:
        peft_model = get_peft_model(model, lora)
    except ValueError as error:
        raise UserError(
            f"LoRA targets do not match this model: {error}",
            where="lora.target_modules",
            hint="use module names of the model, e.g. q_proj, v_proj, or 'all-linear'",
        ) from None
    if spec.loftq:
        from fine_tune.loftq import checkpoint_weights, loftq_initialise

        loftq_initialise(peft_model, checkpoint_weights(checkpoint, peft_model.config))
    if experts_4bit:
        from fine_tune.models.moe import attach_expert_lora

        attach_expert_lora(
            peft_model,
            r=spec.lora.r,
            lora_alpha=spec.lora.lora_alpha,
            lora_dropout=spec.expert_dropout,
            use_rslora=spec.lora.use_rslora,
        )
    return peft_model


def load_trained_adapter(
    model: Any, directory: Any, gradient_checkpointing: bool, upcast_frozen: bool = False
) -> Any:
    """The base with a saved adapter (expert adapters included), trainable: a run that starts from
    another run's adapter (`init_adapter`) rather than a fresh one."""
    from fine_tune.models.moe import load_adapter

    return load_adapter(
        prepare_for_adapter(model, gradient_checkpointing, upcast_frozen), directory, is_trainable=True
    )


def fused_expert_parameter_names(model: Any) -> list[str]:
    """Layer-relative names of 3-D expert tensors, e.g. `mlp.experts.gate_up_proj`."""
    from fine_tune.models.moe.adapter_files import layer_relative

    named = [name for name, param in model.named_parameters() if param.dim() == 3]
    return sorted({layer_relative(name) for name in named if layer_relative(name) != name})


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total), counting 4-bit weights (Linear4bit and fused experts, which are buffers)
    by their logical size, so Mixtral-8x7B reports 46.7B whatever its storage."""
    from fine_tune.models.moe import count_parameters as count_by_storage

    counts = count_by_storage(model)
    return counts["params_trainable"], counts["params_4bit"] + counts["params_other"]
