"""LoRA on 4-bit experts: the requested rank, only adapters train, the loss falls, and the adapter
round-trips through save/load; it is saved as PEFT's own `target_parameters` adapter (same keys,
shapes and meaning), so plain PEFT on the dequantized base computes the same model; old runs' files
still load."""

from __future__ import annotations

import peft
import pytest
import torch
import transformers
from helpers import tiny_mixtral_config

from fine_tune.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from fine_tune.models.moe import (
    attach_expert_lora,
    build_random_model,
    dequantize_model,
    expert_lora_state_dict,
    load_adapter,
    load_expert_adapter,
    save_expert_adapter,
)
from fine_tune.models.moe.adapter_files import LEGACY_CONFIG, LEGACY_WEIGHTS, expert_peft_tensors
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


def trained_like(r: int = 4, seed: int = 3, layers: int = 1):
    """A QLoRA model whose adapters hold non-trivial values, as after training, in eval mode."""
    model = qlora_model(r=r, seed=seed, layers=layers)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    return model.eval()


def fresh_base(seed: int = 3, layers: int = 1):
    return build_random_model(
        tiny_config(layers), "nf4", True, torch.float32, device="cpu", dtype=torch.float32, seed=seed
    )


IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def test_adapter_round_trip(tmp_path):
    model = trained_like()
    expected = logits(model)
    model.save_pretrained(tmp_path)
    save_expert_adapter(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "README.md",
        ADAPTER_CONFIG,
        ADAPTER_WEIGHTS,
    ]
    loaded = load_adapter(fresh_base(), tmp_path).eval()
    torch.testing.assert_close(logits(loaded), expected)
    assert load_expert_adapter(loaded, tmp_path) == 4  # 1 layer x (gate_up, down) x (lora_A, lora_B)


def test_saved_like_peft_saves_fused_experts(tmp_path):
    """Same keys, shapes and config as PEFT's own `target_parameters` adapter on unquantized experts."""
    import json

    from peft.utils import get_peft_model_state_dict

    model = trained_like(layers=2)
    model.save_pretrained(tmp_path)
    save_expert_adapter(model, tmp_path)
    twin = transformers.AutoModelForCausalLM.from_config(tiny_config(2))
    targets = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    twin = peft.get_peft_model(
        twin, peft.LoraConfig(r=4, lora_alpha=8, target_modules=ATTN, target_parameters=targets)
    )
    peft_shapes = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(twin).items()}
    ours = {k: tuple(v.shape) for k, v in expert_peft_tensors(model).items()}
    assert ours == {k: v for k, v in peft_shapes.items() if ".mlp.experts." in k}
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / ADAPTER_WEIGHTS))
    assert {k: tuple(v.shape) for k, v in saved.items()} == peft_shapes
    config = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert sorted(config["target_parameters"]) == sorted(targets) and config["lora_dropout"] == 0


def test_plain_peft_on_the_dequantized_base_is_the_same_model(tmp_path):
    model = trained_like(layers=2)
    expected = logits(model)
    model.save_pretrained(tmp_path)
    save_expert_adapter(model, tmp_path)
    plain = dequantize_model(fresh_base(layers=2), torch.float32)
    assert not any(type(m).__name__ in ("Linear4bit", "Experts4bit") for m in plain.modules())
    with torch.no_grad():
        before = plain(IDS).logits
    loaded = peft.PeftModel.from_pretrained(plain, tmp_path).eval()
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(p.numel() for n, p in loaded.named_parameters() if "lora_" in n) == trained
    torch.testing.assert_close(logits(loaded), expected, atol=2e-5, rtol=1e-5)
    assert (before - expected).abs().max() > 1e-2
    config = peft.PeftConfig.from_pretrained(tmp_path)
    config.target_parameters = None  # what plain PEFT loaded before: the attention adapters alone
    attention_only = peft.PeftModel.from_pretrained(
        dequantize_model(fresh_base(layers=2), torch.float32), tmp_path, config=config
    )
    assert (logits(attention_only.eval()) - expected).abs().max() > 1e-3
    merged = loaded.merge_and_unload()
    torch.testing.assert_close(logits(merged), expected, atol=2e-5, rtol=1e-5)


def test_runs_saved_in_the_old_format_still_load(tmp_path):
    """Before PEFT's format, expert adapters sat in expert_adapter.safetensors beside PEFT's files."""
    import json

    from safetensors.torch import save_file

    model = trained_like()
    expected = logits(model)
    model.save_pretrained(tmp_path)  # PEFT's files alone: attention only
    save_file(
        {k: v.contiguous() for k, v in expert_lora_state_dict(model).items()},
        tmp_path / LEGACY_WEIGHTS,
    )
    old_config = {
        "format": "fine_tune.expert_lora/1",
        "r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "use_rslora": False,
        "which": ["down_proj", "gate_up_proj"],
        "dtype": "float32",
        "modules": ["model.layers.0.mlp.experts"],
    }
    (tmp_path / LEGACY_CONFIG).write_text(json.dumps(old_config))
    torch.testing.assert_close(logits(load_adapter(fresh_base(), tmp_path).eval()), expected)
    plain = dequantize_model(fresh_base(), torch.float32)
    torch.testing.assert_close(logits(load_adapter(plain, tmp_path).eval()), expected, atol=2e-5, rtol=1e-5)


def test_load_refuses_mismatched_shapes(tmp_path):
    model = qlora_model(r=4)
    model.save_pretrained(tmp_path)
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
