"""Layer-by-layer building: random real-shape models come out quantized and reproducible, and the
streaming loader reads real checkpoints (both expert layouts) into exactly the weights that
quantizing the loaded bf16 model would give."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
import transformers
from helpers import tiny_mixtral_config, tiny_qwen2_moe_config

from fine_tune.errors import UserError
from fine_tune.families.shapes import config_shapes, parameter_counts
from fine_tune.models.moe import (
    Experts4bit,
    build_random_model,
    load_pretrained_moe_4bit,
    quantize_fused_experts,
    replace_linear_with_4bit,
)


def tiny_config(**kw):
    return tiny_mixtral_config(**{"vocab_size": 128, **kw})


def build(seed=0, **kw):
    return build_random_model(
        tiny_config(**kw), "nf4", True, torch.float32, device="cpu", dtype=torch.float32, seed=seed
    )


def test_random_model_is_quantized_as_from_pretrained_would_plus_experts():
    model = build()
    linears = {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert linears.pop("lm_head") == "Linear"  # kept in full precision, like bnb's loader
    assert linears and set(linears.values()) == {"Linear4bit"}
    assert all(m.weight.bnb_quantized for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    assert len([m for m in model.modules() if isinstance(m, Experts4bit)]) == 2
    assert not any(p.device.type == "meta" for p in model.parameters())
    assert not any(b.device.type == "meta" for b in model.buffers())
    counts = model.fine_tune_param_counts
    assert (
        counts["params_4bit"] + counts["params_other"] == parameter_counts(config_shapes(tiny_config())).total
    )
    assert model.is_loaded_in_4bit
    ids = torch.randint(0, 128, (2, 10))
    loss = model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss)


def test_random_model_is_reproducible_from_its_seed():
    ids = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b, c = (build(seed=s)(ids).logits for s in (1, 1, 2))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_unquantized_random_model_keeps_dtype():
    model = build_random_model(tiny_config(), None, device="cpu", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(isinstance(m, Experts4bit) for m in model.modules())


def _fused_checkpoint(model, path):
    """A checkpoint with the fused transformers-5 key layout (the hub's Mixtral uses the legacy one)."""
    from safetensors.torch import save_file

    model.config.save_pretrained(path)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))


@pytest.mark.parametrize(
    ("family", "layout"), [("mixtral", "legacy"), ("mixtral", "fused"), ("qwen2_moe", "legacy")]
)
def test_streaming_loader_equals_quantizing_the_full_model(tmp_path, family, layout):
    torch.manual_seed(0)
    config = tiny_config() if family == "mixtral" else tiny_qwen2_moe_config()
    original = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    if layout == "legacy":
        original.save_pretrained(tmp_path)  # transformers 5 writes the family's per-expert layout
    else:
        _fused_checkpoint(original, tmp_path)
    loaded = load_pretrained_moe_4bit(tmp_path, "nf4", True, torch.float32, device="cpu", dtype=torch.float32)

    # reference: the whole model in memory, then quantized (what we avoid doing for Mixtral-8x7B)
    quantize_fused_experts(original, "nf4", True, torch.float32)
    replace_linear_with_4bit(original, "nf4", True, torch.float32)
    for (name, a), (_, b) in zip(loaded.named_buffers(), original.named_buffers(), strict=True):
        assert torch.equal(a, b), name
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, original(ids).logits)
    assert loaded.fine_tune_param_counts["params_4bit"] > 0


def test_loader_refuses_a_checkpoint_with_missing_weights(tmp_path):
    from safetensors.torch import load_file, save_file

    transformers.MixtralForCausalLM(tiny_config()).save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(UserError, match="lacks weight"):
        load_pretrained_moe_4bit(tmp_path, "nf4", device="cpu", dtype=torch.float32)


def test_loader_refuses_an_expert_layout_no_family_describes(tmp_path):
    config = transformers.Qwen3MoeConfig(**tiny_qwen2_moe_config().to_dict() | {"model_type": "qwen3_moe"})
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    with pytest.raises(UserError, match="does not know how 'qwen3_moe' checkpoints store") as error:
        load_pretrained_moe_4bit(tmp_path, "nf4", device="cpu", dtype=torch.float32)
    assert error.value.where == "model.name_or_path" and "quant_experts=false" in error.value.hint


def test_quant_node_settings_reach_the_layer_by_layer_loader(tmp_path):
    """quant.skip_modules and quant.storage_dtype, as bitsandbytes' from_pretrained applies them."""
    from fine_tune.models.quant import build_quant_config

    transformers.MixtralForCausalLM(tiny_config()).save_pretrained(tmp_path)
    spec = build_quant_config(
        "nf4", compute_dtype="float32", skip_modules=["lm_head", "o_proj"], storage_dtype="bfloat16"
    )
    for model in (
        load_pretrained_moe_4bit(tmp_path, device="cpu", dtype=torch.float32, quant=spec),
        build_random_model(tiny_config(), device="cpu", dtype=torch.float32, quant=spec),
    ):
        kinds = {n.rsplit(".", 1)[-1]: type(m).__name__ for n, m in model.named_modules()}
        assert (
            kinds["o_proj"] == "Linear" and kinds["q_proj"] == "Linear4bit" and kinds["lm_head"] == "Linear"
        )
        assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
        ids = torch.randint(0, 128, (1, 6))
        assert torch.isfinite(model(input_ids=ids, labels=ids).loss)


def test_quant_experts_false_keeps_the_experts_in_full_precision():
    """quant.quant_experts=false (FSDP shards bf16 experts): attention in 4 bits, experts left as
    parameters of `dtype`, as for bitsandbytes' from_pretrained. The builder once quantized them anyway."""
    from fine_tune.models.quant import build_quant_config

    spec = build_quant_config("nf4", compute_dtype="float32", quant_experts=False)
    model = build_random_model(tiny_config(), device="cpu", dtype=torch.float32, quant=spec)
    experts = model.model.layers[0].mlp.experts
    assert type(experts).__name__ != "Experts4bit"
    assert {n: p.dtype for n, p in experts.named_parameters()} == {
        "gate_up_proj": torch.float32,
        "down_proj": torch.float32,
    }
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    ids = torch.randint(0, 128, (1, 6))
    assert torch.isfinite(model(input_ids=ids, labels=ids).loss)


def test_int8_is_refused_with_advice():
    from fine_tune.models.quant import QuantSpec

    spec = QuantSpec(kind="int8", bnb_config=None, compute_dtype=torch.float32)
    with pytest.raises(UserError, match="nf4"):
        build_random_model(tiny_config(), device="cpu", dtype=torch.float32, quant=spec)
