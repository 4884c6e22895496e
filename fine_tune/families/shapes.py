"""A model's shapes without its weights, and the one parameter count the planner and validation share.

The count mirrors what transformers builds and what PEFT adds (tested equal to both, per family),
so `validate=true` and `plan=true` cannot disagree on how large a model or an adapter is.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fine_tune.families import Family, expert_count, family_of, get_family

FOUR_BIT = ("nf4", "fp4")


@dataclass(frozen=True)
class Shapes:
    family: Family
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # of a dense MLP
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # biases on q/k/v
    num_experts: int = 0
    num_experts_per_tok: int = 0
    expert_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    sparse_layers: int = 0  # layers whose MLP is the MoE block

    @property
    def moe(self) -> bool:
        return self.num_experts > 1


@dataclass(frozen=True)
class ParameterCounts:
    total: int  # the base model, as transformers counts it
    linear: int  # weights of the decoder layers' nn.Linear (what bitsandbytes quantizes)
    experts: int  # fused expert tensors (what fine_tune quantizes on top)
    trainable: int  # LoRA: PEFT's adapters plus the expert adapters


def shapes_from(values: Mapping[str, Any], family: Family) -> Shapes:
    """Shapes from config fields (a config.json, an architecture node) over the family's reference."""
    values = {**family.reference, **values}
    h, heads, layers = values["hidden_size"], values["num_attention_heads"], values["num_hidden_layers"]
    experts = expert_count(values)
    dense = set(values.get("mlp_only_layers") or ())
    step = int(values.get("decoder_sparse_step") or 1)
    return Shapes(
        family=family,
        vocab_size=values["vocab_size"],
        hidden_size=h,
        intermediate_size=values["intermediate_size"],
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=values.get("num_key_value_heads") or heads,
        head_dim=values.get("head_dim") or h // heads,
        tie_word_embeddings=bool(values.get("tie_word_embeddings")),
        attention_bias=bool(values.get("qkv_bias", values.get("attention_bias"))),
        num_experts=experts,
        num_experts_per_tok=int(values.get("num_experts_per_tok") or 0),
        expert_intermediate_size=int(values.get(family.expert_intermediate_key) or 0),
        shared_expert_intermediate_size=int(values.get("shared_expert_intermediate_size") or 0),
        sparse_layers=sum(i not in dense and (i + 1) % step == 0 for i in range(layers))
        if experts > 1
        else 0,
    )


def config_shapes(config: Any) -> Shapes:
    """Shapes of a transformers config of a known family (its `model_type` says which)."""
    values = config.to_dict()
    family = family_of(values)
    if family is None:
        raise ValueError(f"no family in fine_tune/families/ reads model_type {values.get('model_type')!r}")
    return shapes_from(values, family)


def model_shapes(model: Mapping[str, Any], hub: bool = True) -> Shapes:
    """Shapes of the `model` node: a local checkpoint's config.json (whose model_type decides the
    family), else the `architecture` node, with `config` overrides on top; the hub only when `hub`
    and nothing else says what the model is. Either way over the family's reference shapes."""
    family = get_family(model["family"])
    name, architecture = model.get("name_or_path"), dict(model.get("architecture") or {})
    loaded = None
    if name and model.get("init") == "pretrained":
        path = Path(str(name)).expanduser() / "config.json"
        if path.is_file():
            loaded = json.loads(path.read_text())
        elif not architecture and hub:
            from transformers import AutoConfig

            loaded = AutoConfig.from_pretrained(str(name)).to_dict()
    if loaded is not None:
        family = family_of(loaded) or family
    return shapes_from({**(loaded or architecture), **(model.get("config") or {})}, family)


def layer_kinds(s: Shapes) -> Iterator[tuple[bool, int]]:
    """(sparse?, how many layers) for the dense and the MoE layers that the model has."""
    for sparse, layers in ((False, s.num_hidden_layers - s.sparse_layers), (True, s.sparse_layers)):
        if layers:
            yield sparse, layers


def layer_linears(s: Shapes, sparse: bool) -> dict[str, tuple[int, int]]:
    """(in, out) of each nn.Linear of one decoder layer, by the leaf name LoRA targets."""
    h, q, kv = s.hidden_size, s.num_attention_heads * s.head_dim, s.num_key_value_heads * s.head_dim
    linears = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h)}
    mlp = s.shared_expert_intermediate_size if sparse else s.intermediate_size
    if mlp:  # the dense MLP, or an MoE layer's shared expert
        linears.update(gate_proj=(h, mlp), up_proj=(h, mlp), down_proj=(mlp, h))
    if sparse and s.shared_expert_intermediate_size:
        linears["shared_expert_gate"] = (h, 1)
    return linears


def expert_matrices(s: Shapes) -> dict[str, tuple[int, int]]:
    """(in, out) of one expert's matrices, by the name of the fused tensor that stacks them."""
    h, i = s.hidden_size, s.expert_intermediate_size
    return {"gate_up_proj": (h, 2 * i), "down_proj": (i, h)}


def lora_targets(s: Shapes, lora: Mapping[str, Any], sparse: bool) -> dict[str, tuple[int, int]]:
    """(in, out) of each layer PEFT adapts in one decoder layer (experts apart)."""
    linears = layer_linears(s, sparse)
    if sparse and s.family.peft_remaps_moe:
        linears["gate"] = (s.hidden_size, s.num_experts)  # the router, adapted by its transformers-4 name
    targets = lora["target_modules"]
    if targets == "all-linear":
        return linears
    names = {str(t) for t in ([targets] if isinstance(targets, str) else targets or ())}
    return {name: dims for name, dims in linears.items() if name in names}


def experts_in_4bit(s: Shapes, quant: Mapping[str, Any]) -> bool:
    return s.moe and quant["kind"] in FOUR_BIT and bool(quant["quant_experts"])


def peft_remaps(s: Shapes, lora: Mapping[str, Any]) -> bool:
    """PEFT's `all-linear` on this MoE model also adapts the router (and bf16 fused experts) as bare
    parameters (`Family.peft_remaps_moe`), which take no dropout and no variant."""
    return s.moe and s.family.peft_remaps_moe and lora["target_modules"] == "all-linear"


def parameter_counts(
    s: Shapes, lora: Mapping[str, Any] | None = None, experts_4bit: bool = False
) -> ParameterCounts:
    """Parameters of the base model and of the LoRA adapters `lora` (a lora node) puts on it.

    LoRA: r * (in + out) per adapted linear (+ out with DoRA: its magnitudes); the expert adapters
    r * (in + out) per expert and fused tensor; PEFT's `all-linear` on bf16 fused experts (families
    it remaps) rank r per expert, twice for gate_up_proj. `experts_4bit`: the experts are
    fine_tune's 4-bit ones.
    """
    h = s.hidden_size
    total = linear = experts = trainable = 0
    for sparse, layers in layer_kinds(s):
        linears = layer_linears(s, sparse)
        weights = sum(i * o for i, o in linears.values())
        biases = linears["q_proj"][1] + 2 * linears["k_proj"][1] if s.attention_bias else 0
        stacked = s.num_experts * sum(i * o for i, o in expert_matrices(s).values()) if sparse else 0
        router = h * s.num_experts if sparse else 0
        total += layers * (weights + biases + stacked + router + 2 * h)
        linear += layers * weights
        experts += layers * stacked
        if lora:
            trainable += layers * _lora_per_layer(s, lora, sparse, experts_4bit)
    total += s.vocab_size * h * (1 if s.tie_word_embeddings else 2) + h
    return ParameterCounts(total=total, linear=linear, experts=experts, trainable=trainable)


def _lora_per_layer(s: Shapes, lora: Mapping[str, Any], sparse: bool, experts_4bit: bool) -> int:
    r = int(lora["r"])
    adapted = lora_targets(s, lora, sparse)
    n = sum(r * (i + o) for i, o in adapted.values())
    if lora.get("use_dora"):  # DoRA: one trained magnitude per output feature of each adapted linear
        n += sum(o for _, o in adapted.values())
    if s.attention_bias and lora["bias"] != "none":  # PEFT trains the biases too (q/k/v have them)
        with_bias = ("q_proj", "k_proj", "v_proj")
        n += sum(layer_linears(s, sparse)[k][1] for k in with_bias if lora["bias"] == "all" or k in adapted)
    if not sparse:
        return n
    per_expert = {name: i + o for name, (i, o) in expert_matrices(s).items()}
    if lora["experts"]:
        n += s.num_experts * r * sum(per_expert.values())
    if peft_remaps(s, lora) and not experts_4bit:
        rank = r * s.num_experts  # PEFT's ParamWrapper: rank r per expert, 2r for gate_up_proj
        n += 2 * rank * per_expert["gate_up_proj"] + rank * per_expert["down_proj"]
    return n
