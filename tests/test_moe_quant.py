"""4-bit fused experts on a tiny Mixtral: storage is really 4-bit, and the forward/backward equal the
original module run on the dequantized weights (so quantization is the only approximation)."""

from __future__ import annotations

import pytest
import torch
import transformers
from helpers import tiny_mixtral_config

from fine_tune.models.moe import Experts4bit, count_parameters, quantize_fused_experts


def tiny_config(**kw):
    return tiny_mixtral_config(**kw)


def tiny_model(seed: int = 0, layers: int = 2):
    torch.manual_seed(seed)
    return transformers.MixtralForCausalLM(tiny_config(num_hidden_layers=layers)).float().eval()


def reference_with_dequantized(quantized) -> torch.nn.Module:
    """An unquantized copy of `quantized` whose expert tensors are the dequantized 4-bit weights."""
    ref = transformers.MixtralForCausalLM(quantized.config).float().eval()
    missing, _ = ref.load_state_dict(quantized.state_dict(), strict=False)
    assert all(".experts." in k for k in missing)
    for layer, qlayer in zip(ref.model.layers, quantized.model.layers, strict=True):
        for name in ("gate_up_proj", "down_proj"):
            getattr(layer.mlp.experts, name).data = qlayer.mlp.experts.dequantize(name, torch.float32)
    return ref


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("nf4", False), ("fp4", True)])
def test_every_expert_parameter_is_4bit(quant_type, double_quant):
    model = tiny_model()
    expected_experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    counts = quantize_fused_experts(model, quant_type, double_quant, torch.float32)
    experts = [m for m in model.modules() if isinstance(m, Experts4bit)]
    assert len(experts) == model.config.num_hidden_layers == counts["quantized_modules"]
    assert counts["skipped"] == {}
    # no float expert tensor is left anywhere, parameter or buffer
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if ".experts." in name and name.endswith("_qweight"):
            assert tensor.dtype == torch.uint8
        assert not (".experts." in name and tensor.dim() == 3 and tensor.is_floating_point()), name
    assert counts["params_4bit"] == expected_experts
    packed = sum(getattr(m, f"{n}_qweight").numel() for m in experts for n in m.shapes)
    assert packed * 2 == expected_experts  # two 4-bit values per byte
    assert experts[0].quant_type == quant_type and experts[0].double_quant == double_quant


def test_double_quant_stores_less():
    sizes = {}
    for dq in (True, False):
        model = tiny_model()
        sizes[dq] = quantize_fused_experts(model, "nf4", dq, torch.float32)["bytes_4bit"]
    assert sizes[True] < sizes[False]


def test_dequantized_weights_are_close_to_the_originals():
    model = tiny_model()
    original = model.model.layers[0].mlp.experts.gate_up_proj.detach().clone()
    quantize_fused_experts(model, "nf4", True, torch.float32)
    deq = model.model.layers[0].mlp.experts.dequantize("gate_up_proj", torch.float32)
    assert deq.shape == original.shape
    rel = (deq - original).abs().mean() / original.abs().mean()
    assert rel < 0.15  # nf4 error on gaussian weights is ~0.1 of their mean magnitude
    assert not torch.equal(deq, original)


def test_quantized_forward_matches_reference_on_dequantized_weights():
    model = tiny_model(layers=1)
    quantize_fused_experts(model, "nf4", True, torch.float32)
    ref = reference_with_dequantized(model)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids).logits, ref(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_backward_equals_reference_through_full_model():
    """The custom autograd (dequantize again in the backward) gives the reference input gradients."""
    model = tiny_model(layers=1)
    quantize_fused_experts(model, "nf4", False, torch.float32)
    ref = reference_with_dequantized(model)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2))
    grads = []
    for m in (model, ref):
        emb = m.model.embed_tokens(ids).detach().requires_grad_(True)
        m(inputs_embeds=emb, labels=ids).loss.backward()
        grads.append(emb.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
    assert grads[0].abs().sum() > 0


def test_count_parameters_adds_up_to_the_model_size():
    model = tiny_model()
    total = sum(p.numel() for p in model.parameters())
    quantize_fused_experts(model, "nf4", True, torch.float32)
    counts = count_parameters(model)
    assert counts["params_4bit"] + counts["params_other"] == total


def test_accepts_the_core_quant_spec():
    from types import SimpleNamespace

    spec = SimpleNamespace(kind="nf4", double_quant=True, compute_dtype=torch.float32)
    model = tiny_model()
    assert quantize_fused_experts(model, spec)["quantized_modules"] == 2
    with pytest.raises(ValueError):
        quantize_fused_experts(tiny_model(), "int8")


def test_dtype_casts_of_the_model_leave_quantization_constants_intact():
    model = tiny_model(layers=1)
    quantize_fused_experts(model, "nf4", True, torch.float32)
    experts = model.model.layers[0].mlp.experts
    before = experts.dequantize("down_proj", torch.float32)
    model.to(torch.bfloat16).to(torch.float32)  # e.g. a cast for export, or PEFT's fp32 upcast
    torch.testing.assert_close(experts.dequantize("down_proj", torch.float32), before, rtol=0, atol=0)


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double_quant"])
@pytest.mark.parametrize("shape", [(8, 32), (4, 96), (6, 24), (4, 64)])
def test_dequantized_experts_are_the_weights_within_nf4_error_on_any_cpu(shape, double_quant):
    """Each value within half the widest NF4 gap (0.304 / 2) of its block's largest |w|.

    Rows narrower than a block of 64 (only tiny shapes) came back wrong from bitsandbytes 0.50.2's
    AVX512 CPU kernel (errors up to 0.8 here on a Xeon), and the grouped and loop kernels, which cut
    the experts into rows differently, then disagreed; fine_tune dequantizes those rows itself.
    """
    torch.manual_seed(0)
    layer = Experts4bit(
        num_experts=3,
        shapes={"down_proj": shape},
        act_fn=torch.nn.functional.silu,
        compute_dtype=torch.float32,
        double_quant=double_quant,
    )
    weights = [torch.randn(shape) for _ in range(3)]
    for expert, weight in enumerate(weights):
        layer.set_expert("down_proj", expert, weight)
    stacked = layer.dequantize_stack("down_proj", torch.float32)
    for expert, weight in enumerate(weights):
        got = layer.dequantize_expert("down_proj", expert, torch.float32)
        blocks = torch.nn.functional.pad(weight.reshape(-1), (0, -weight.numel() % 64)).view(-1, 64)
        scale = blocks.abs().amax(dim=1, keepdim=True).expand_as(blocks).reshape(-1)[: weight.numel()]
        error = (got - weight).abs().reshape(-1)
        assert bool((error <= 0.153 * scale * 1.01 + 1e-6).all()), float((error / scale).max())
        torch.testing.assert_close(stacked[expert], got, rtol=0, atol=0)
