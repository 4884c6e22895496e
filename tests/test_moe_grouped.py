"""The grouped kernel of the 4-bit experts computes what the per-expert loop computes: the same
dequantized weights (bit for bit), logits, input gradients and LoRA gradients within a stated
tolerance, on Mixtral and Qwen2-MoE, in fp32 and bf16; pairs routed to no expert and experts with no
tokens work; routing never reads a device value on the host; and `quant.expert_kernel` reaches the
model and trains the same losses."""

from __future__ import annotations

import pytest
import torch
from helpers import step_losses, tiny_mixtral_config, tiny_qwen2_moe_config
from test_train import train_in_process

from fine_tune.models.moe import Experts4bit, attach_expert_lora, build_random_model
from fine_tune.models.moe import grouped as grouped_module
from fine_tune.models.moe.experts4bit import GROUPED_MIN_ROWS_PER_EXPERT, set_expert_kernel
from fine_tune.models.moe.grouped import SortedRouting, grouped_mm
from fine_tune.models.moe.lora import ExpertLoRA

# Largest |loop - grouped| relative to the largest |loop| of each tensor (the forward is the same sums
# in the same order; gradients are summed in another order): fp32, and bf16 weights and activations
# without autocast, whose gradients round to bf16 at each step (seen: up to 1.4e-2 over seeds).
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


def assert_near(loop: torch.Tensor, grouped: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    scale = float(loop.float().abs().max())
    assert scale > 0, what
    diff = float((loop.float() - grouped.float()).abs().max())
    assert diff <= TOLERANCE[dtype] * scale, f"{what}: {diff} vs {scale}"


def adapted_model(config, dtype: torch.dtype) -> torch.nn.Module:
    """A 4-bit MoE model with expert LoRA whose B is not zero, so the adapters change the output."""
    model = build_random_model(config, "nf4", True, dtype, device="cpu", dtype=dtype, seed=0)
    torch.manual_seed(0)  # the adapters' A (PEFT's init draws from the global generator)
    attach_expert_lora(model, r=4, lora_alpha=8)
    gen = torch.Generator().manual_seed(1)
    for name, param in model.named_parameters():
        if name.endswith(".B"):
            param.data.normal_(0, 0.05, generator=gen)
    return model


def run(model, kernel: str, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Logits, the gradient of the input embeddings and of every expert adapter, with `kernel`."""
    assert set_expert_kernel(model, kernel) == model.config.num_hidden_layers
    model.zero_grad(set_to_none=True)
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    out = model(inputs_embeds=embeds, labels=ids)
    out.loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if ".adapters." in name}
    assert grads and all(g is not None for g in grads.values())
    return {"logits": out.logits.detach(), "input grad": embeds.grad, **grads}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_grouped_equals_loop_forward_and_backward(family: str, dtype: torch.dtype):
    if family == "mixtral":
        config = tiny_mixtral_config(vocab_size=128)
    else:  # 8 experts, top-4: the combine adds more than two outputs per token
        config = tiny_qwen2_moe_config(num_experts=8, num_experts_per_tok=4)
    model = adapted_model(config, dtype)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(2))
    loop, grouped = run(model, "loop", ids), run(model, "grouped", ids)
    assert loop.keys() == grouped.keys()
    for what in loop:
        assert_near(loop[what], grouped[what], dtype, what)
    if dtype == torch.float32:  # each expert's rows by the same matmul, outputs added in the same order
        assert torch.equal(loop["logits"], grouped["logits"])


@pytest.mark.parametrize(("quant_type", "double_quant"), [("nf4", True), ("nf4", False), ("fp4", True)])
def test_stacked_dequantization_is_bit_exact(quant_type: str, double_quant: bool):
    """One kernel over all experts (and over row ranges) gives each expert's own dequantization."""
    experts = Experts4bit(
        num_experts=3,
        shapes={"gate_up_proj": (256, 64), "down_proj": (64, 128), "odd": (10, 7)},
        act_fn=torch.nn.functional.silu,
        quant_type=quant_type,
        double_quant=double_quant,
        compute_dtype=torch.float32,
    )
    gen = torch.Generator().manual_seed(0)
    for name, shape in experts.shapes.items():
        for e in range(3):
            experts.set_expert(name, e, torch.randn(shape, generator=gen))
    # gate_up's nested blocks follow each other across experts (256 blocks each), down's do not
    # (128 each), and "odd" has no whole blocks at all: all three ways of stacking are covered
    for dtype in (torch.float32, torch.bfloat16):
        for name, (out_f, _) in experts.shapes.items():
            each = experts.dequantize(name, dtype)
            assert torch.equal(experts.dequantize_stack(name, dtype), each), name
            for rows in ((0, out_f // 2), (out_f // 2, out_f)):
                stacked = experts.dequantize_stack(name, dtype, rows=rows)
                assert torch.equal(stacked, each[:, rows[0] : rows[1]]), (name, rows)


def experts_layer(kernel: str) -> Experts4bit:
    torch.manual_seed(0)
    layer = Experts4bit(
        num_experts=4,
        shapes={"gate_up_proj": (64, 32), "down_proj": (32, 32)},
        act_fn=torch.nn.functional.silu,
        compute_dtype=torch.float32,
        kernel=kernel,
    )
    for name, shape in layer.shapes.items():
        for e in range(4):
            layer.set_expert(name, e, torch.randn(shape))
        layer.adapters[name] = ExpertLoRA(4, shape[1], shape[0], r=4, lora_alpha=8)
        torch.nn.init.normal_(layer.adapters[name].B, 0, 0.1)
    return layer


def test_pairs_routed_to_no_expert_and_experts_without_tokens():
    """Experts 1 and 3 get no token; some pairs carry index 4, transformers' "no expert"."""
    index = torch.tensor([[0, 2], [2, 4], [0, 4], [2, 0], [4, 4], [0, 2]])
    weights = torch.rand(6, 2, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(4))
    results = {}
    for kernel in ("loop", "grouped"):
        layer = experts_layer(kernel)
        inputs, w = x.clone().requires_grad_(True), weights.detach().clone().requires_grad_(True)
        out = layer(inputs, index, w)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(5)))
        grads = {n: p.grad for n, p in layer.named_parameters()}
        results[kernel] = {"out": out.detach(), "x": inputs.grad, "weights": w.grad, **grads}
    loop, grouped = results["loop"], results["grouped"]
    for what in loop:
        assert_near(loop[what], grouped[what], torch.float32, what)
    assert torch.equal(grouped["out"][4], torch.zeros(32))  # routed to no expert at all
    assert torch.equal(grouped["weights"][index == 4], torch.zeros(4))  # no gradient to unused weights
    for name in ("gate_up_proj", "down_proj"):
        for part in ("A", "B"):
            grad = grouped[f"adapters.{name}.{part}"]
            assert torch.equal(grad[[1, 3]], torch.zeros_like(grad[[1, 3]]))  # never routed to
            assert grad[[0, 2]].abs().sum() > 0


def test_routing_and_grouped_path_never_read_the_device_on_the_host():
    """On the meta device no value exists, so any `.item()`, `.tolist()`, `nonzero` or boolean
    mask (each a host-device sync on CUDA) raises: the grouped path runs there, forward and backward;
    the loop, which syncs per expert, does not."""
    layer = Experts4bit(
        num_experts=4,
        shapes={"gate_up_proj": (256, 64), "down_proj": (64, 128)},
        act_fn=torch.nn.functional.silu,
        compute_dtype=torch.bfloat16,
        kernel="grouped",
        device="meta",
    )
    for name, (out_f, in_f) in layer.shapes.items():
        layer.adapters[name] = ExpertLoRA(4, in_f, out_f, 4, 8, dtype=torch.bfloat16, device="meta")
    index = torch.randint(0, 4, (10, 2), device="meta")
    x = torch.randn(10, 64, device="meta", requires_grad=True)
    out = layer(x, index, torch.rand(10, 2, device="meta"))
    out.sum().backward()
    assert out.shape == x.grad.shape == (10, 64)
    assert layer.adapters["gate_up_proj"].A.grad.shape == (4, 4, 64)
    layer.kernel = "loop"
    with pytest.raises((RuntimeError, NotImplementedError)):
        layer(x, index, torch.rand(10, 2, device="meta"))


def test_grouped_mm_fallback_equals_torch_grouped_mm(monkeypatch):
    """The per-group loop (where `torch._grouped_mm` cannot take the operands) is the same op,
    empty groups included, forward and backward."""
    offsets = torch.tensor([3, 3, 9, 12], dtype=torch.int32)
    results = []
    for native in (True, False):
        monkeypatch.setattr(grouped_module, "native_grouped_mm_usable", lambda a, b, n=native: n)
        a = torch.randn(12, 16, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
        b = torch.randn(4, 16, 8, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
        out = grouped_mm(a, b, offsets)
        out.backward(torch.ones_like(out))
        results.append((out, a.grad, b.grad))
    for native, fallback in zip(*results, strict=True):
        torch.testing.assert_close(native, fallback)
    assert torch.equal(results[0][2][1], torch.zeros(16, 8))  # the empty group's weight gradient


def test_sorted_routing_groups_pairs_by_expert():
    index = torch.tensor([[2, 0], [1, 2], [0, 3], [2, 1]])
    routing = SortedRouting.sort(index, torch.rand(4, 2), num_experts=4)
    assert routing.offsets.tolist() == [2, 4, 7, 8]
    assert routing.token.tolist() == [0, 2, 1, 3, 0, 1, 3, 2]  # each expert's tokens in order
    assert routing.routed.tolist() == [True] * 4
    assert routing.unsort.tolist() == [[0, 4], [2, 5], [1, 7], [3, 6]]  # lowest expert first
    rows = routing.gather(torch.arange(4.0)[:, None])
    assert rows[routing.unsort].squeeze(-1).tolist() == [[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]


def test_auto_groups_on_fused_kernels_with_enough_rows(monkeypatch):
    layer = experts_layer("auto")
    x = torch.zeros(1, 32, dtype=torch.bfloat16)
    many = GROUPED_MIN_ROWS_PER_EXPERT * layer.num_experts
    assert not layer.uses_grouped(x, many)  # CPU: torch._grouped_mm loops over groups itself
    monkeypatch.setattr("fine_tune.models.moe.experts4bit.fused_grouped_mm", lambda x: True)
    assert layer.uses_grouped(x, many)
    assert not layer.uses_grouped(x, many - 1)  # decode steps: dequantize only the hit experts
    layer.kernel = "grouped"
    assert layer.uses_grouped(x, 1)
    with pytest.raises(ValueError, match="expert kernel"):
        set_expert_kernel(layer, "fast")


@pytest.mark.slow
def test_config_key_reaches_the_experts_and_trains_the_same(tmp_path):
    """`quant.expert_kernel` is a checked config key; the same 3 training steps of tiny Mixtral
    QLoRA (packed, expert adapters) give the same losses and grad norms with either kernel."""
    from helpers import compose

    from fine_tune.errors import UserError
    from fine_tune.schema import check_types

    with pytest.raises(UserError, match="quant.expert_kernel"):
        check_types(compose(["experiment=tiny_mixtral_qlora", "quant.expert_kernel=fast"]))
    losses = {}
    for kernel in ("loop", "grouped"):
        overrides = [
            "experiment=tiny_mixtral_qlora",
            f"quant.expert_kernel={kernel}",
            "trainer.max_steps=3",
            "trainer.logging_steps=1",
            "trainer.eval_steps=3",
            "trainer.generation.num_prompts=0",
            "dataset.packing=true",
            "dataset.max_samples=32",
        ]
        _, run_dir, _, trainer = train_in_process(tmp_path / kernel, overrides)
        experts = [m for m in trainer.model.modules() if isinstance(m, Experts4bit)]
        assert experts and {m.kernel for m in experts} == {kernel}
        losses[kernel] = step_losses(run_dir)
    assert [step for step, _, _ in losses["loop"]] == [1, 2, 3]
    flat = {kernel: [v for _, loss, norm in rows for v in (loss, norm)] for kernel, rows in losses.items()}
    assert flat["grouped"] == pytest.approx(flat["loop"], rel=1e-5)
