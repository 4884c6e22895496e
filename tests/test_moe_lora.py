"""LoRA on 4-bit experts: the requested rank, only adapters train, the loss falls, and the adapter
round-trips through save/load; its PEFT layout equals PEFT's own `target_parameters` adapter."""

from __future__ import annotations

import peft
import pytest
import torch
import transformers
from conftest import tiny_mixtral_config

from fine_tune.models.moe import (
    attach_expert_lora,
    build_random_model,
    load_expert_adapter,
    save_expert_adapter,
)
from fine_tune.models.moe.lora import ExpertLoRA

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]


def tiny_config(layers: int = 1):
    return tiny_mixtral_config(vocab_size=128, num_hidden_layers=layers)


def qlora_model(r: int = 4, seed: int = 0, layers: int = 1):
    """The core's path: 4-bit build, PEFT on attention, then expert LoRA (fp32 compute on CPU)."""
    model = build_random_model(
        tiny_config(layers), "nf4", True, torch.float32, device="cpu", dtype=torch.float32, seed=seed
    )
    model = peft.get_peft_model(
        model,
        peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=ATTN, lora_dropout=0.0, task_type="CAUSAL_LM"),
    )
    attach_expert_lora(model, r=r, lora_alpha=2 * r)
    return model


def experts_of(model):
    return [m for m in model.modules() if type(m).__name__ == "Experts4bit"]


def test_rank_is_the_requested_rank():
    model = qlora_model(r=4, layers=2)
    cfg = model.config
    h, i, e = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts
    for mod in experts_of(model):
        gu, down = mod.adapters["gate_up_proj"], mod.adapters["down_proj"]
        assert tuple(gu.A.shape) == (e, 4, h) and tuple(gu.B.shape) == (e, 2 * i, 4)
        assert tuple(down.A.shape) == (e, 4, i) and tuple(down.B.shape) == (e, h, 4)
    n = sum(p.numel() for n_, p in model.named_parameters() if ".adapters." in n_)
    assert n == cfg.num_hidden_layers * e * 4 * ((h + 2 * i) + (i + h))


def test_fresh_adapter_changes_nothing():
    base = build_random_model(tiny_config(), "nf4", True, torch.float32, device="cpu", dtype=torch.float32)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = base(ids).logits
        attach_expert_lora(base, r=4, lora_alpha=8)
        after = base(ids).logits
    torch.testing.assert_close(before, after)


def test_training_updates_only_adapters_and_loss_falls():
    model = qlora_model(r=4)
    model.train()
    frozen = {
        k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k and ".adapters." not in k
    }
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or ".adapters." in n for n, _ in trainable)
    assert any(".adapters." in n for n, _ in trainable)
    opt = torch.optim.AdamW([p for _, p in trainable], lr=3e-2)
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for step in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if step == 0:
            with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
            assert with_grad == {n for n, _ in trainable}
            # B starts at zero, so its gradient is the first to be non-zero
            assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in with_grad if n.endswith(".B"))
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    for k, v in model.state_dict().items():
        if k in frozen:
            assert torch.equal(v, frozen[k]), f"{k} changed"


def test_adapter_round_trip(tmp_path):
    model = qlora_model(r=4, seed=3)
    with torch.no_grad():  # non-trivial adapter weights, as after training
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    model.eval()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path)
    save_expert_adapter(model, tmp_path)

    base = build_random_model(
        tiny_config(), "nf4", True, torch.float32, device="cpu", dtype=torch.float32, seed=3
    )
    loaded = peft.PeftModel.from_pretrained(base, tmp_path)
    assert load_expert_adapter(loaded, tmp_path) == 4  # 1 layer x (gate_up, down) x (A, B)
    loaded.eval()
    with torch.no_grad():
        got = loaded(ids).logits
    torch.testing.assert_close(got, expected)
    # PEFT's own file must not have swallowed the expert adapters
    from safetensors.torch import load_file

    assert not any(".adapters." in k for k in load_file(str(tmp_path / "adapter_model.safetensors")))


def test_load_refuses_mismatched_shapes(tmp_path):
    model = qlora_model(r=4)
    save_expert_adapter(model, tmp_path)
    other = build_random_model(tiny_config(), "nf4", True, torch.float32, device="cpu", dtype=torch.float32)
    attach_expert_lora(other, r=8, lora_alpha=16)
    with pytest.raises(ValueError, match="shape"):
        load_expert_adapter(other, tmp_path)


def test_peft_layout_equals_peft_target_parameters():
    """Our adapter, written in PEFT's ParamWrapper layout onto an unquantized twin, gives PEFT the same
    expert update: the saved numbers mean the same thing to PEFT."""
    torch.manual_seed(0)
    cfg = tiny_config()
    e, h, i, r = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size, 4
    experts = transformers.models.mixtral.modeling_mixtral.MixtralExperts(cfg).float()
    torch.nn.init.normal_(experts.gate_up_proj, std=0.05)
    torch.nn.init.normal_(experts.down_proj, std=0.05)
    ours = ExpertLoRA(e, h, 2 * i, r, lora_alpha=8)
    with torch.no_grad():
        ours.B.normal_(0, 0.1)
    holder = torch.nn.Module()
    holder.experts = experts
    wrapped = peft.get_peft_model(
        holder, peft.LoraConfig(r=r, lora_alpha=8, target_parameters=["experts.gate_up_proj"])
    )
    wrapper = wrapped.base_model.model.experts
    with torch.no_grad():
        for name, value in ours.peft_layout().items():
            layer, _ = name.split(".")
            getattr(wrapper, layer)["default"].weight.copy_(value)
    peft_delta = wrapper.get_delta_weight("default")  # [E, 2I, H]
    our_delta = torch.einsum("eor,eri->eoi", ours.B, ours.A) * ours.scaling
    torch.testing.assert_close(peft_delta, our_delta)
