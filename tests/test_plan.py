"""The memory planner: exact parameter arithmetic, a breakdown that adds up, and the directions every
knob must move the prediction (batch, checkpointing, 8-bit optimizer, quantization)."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest

from fine_tune.errors import UserError
from fine_tune.families.shapes import model_shapes
from fine_tune.plan import GIB, check_fits, plan_memory


def cfg(
    family="mixtral",
    batch=4,
    seq=2048,
    ckpt=True,
    optim="bitsandbytes.optim.PagedAdamW8bit",
    kind="nf4",
    experts=True,
    targets=("q_proj", "k_proj", "v_proj", "o_proj"),
    arch=None,
    overrides=None,
):
    """The composed-config shape (model/quant/lora/trainer/optim nodes), as plain dicts."""
    return {
        "model": {
            "family": family,
            "name_or_path": None,
            "init": "random",
            "architecture": arch or {},
            "config": overrides or {},
            "dtype": "auto",
        },
        "quant": {"kind": kind, "double_quant": True, "compute_dtype": "auto", "quant_experts": True},
        "lora": {
            "r": 16,
            "lora_alpha": 32,
            "lora_dropout": 0.0,
            "target_modules": list(targets),
            "experts": experts,
        },
        "trainer": {"per_device_train_batch_size": batch, "gradient_checkpointing": ckpt},
        "dataset": {"max_length": seq},
        "optim": {"optimizer": {"_target_": optim, "_partial_": True}},
    }


TINY = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
}


def test_breakdown_sums_to_total():
    for c in (cfg(), cfg(family="mistral", experts=False, ckpt=False, optim="torch.optim.AdamW")):
        plan = plan_memory(c)
        assert plan.total_bytes == sum(b for _, b, _ in plan.items)
        assert plan.total_bytes == plan.static_bytes + plan.activation_bytes(plan.batch_size) + sum(
            b for w, b, _ in plan.items if w.startswith("LoRA grad")
        )
        text = plan.format(80)
        assert (
            "quantized weights" in text and "activations" in text and f"{plan.total_bytes / GIB:.2f}" in text
        )


def test_parameter_counts_match_transformers_model_exactly():
    import torch
    import transformers

    for family, config_cls in (
        ("mixtral", transformers.MixtralConfig),
        ("mistral", transformers.MistralConfig),
        ("qwen2_moe", transformers.Qwen2MoeConfig),
    ):
        # real widths, 2 layers (every layer is alike; 32 on the meta device only cost time)
        plan = plan_memory(
            cfg(family=family, experts=family != "mistral", overrides={"num_hidden_layers": 2})
        )
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config_cls(num_hidden_layers=2))
        assert plan.params_4bit + plan.params_other == sum(p.numel() for p in model.parameters())
    # Mixtral-8x7B: 46.7B parameters, all but embeddings/lm_head/norms/router in 4-bit
    plan = plan_memory(cfg())
    assert 46.6e9 < plan.params_4bit + plan.params_other < 46.8e9
    assert plan.params_other < 0.3e9


TINY_QWEN = {
    **{k: v for k, v in TINY.items() if k != "num_local_experts"},
    "num_experts": 4,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 96,
    "mlp_only_layers": [1],  # one dense layer, of intermediate_size
}


@pytest.mark.parametrize(("family", "arch"), [("mixtral", TINY), ("qwen2_moe", TINY_QWEN)])
def test_quantized_bytes_equal_what_the_builder_holds(family, arch):
    import torch

    from fine_tune.families import get_family
    from fine_tune.models.moe import build_random_model

    plan = plan_memory(cfg(family=family, arch=arch, kind="nf4"))
    model = build_random_model(get_family(family).config(**arch), "nf4", True, torch.bfloat16, device="cpu")
    counts = model.fine_tune_param_counts
    held = counts["bytes_4bit"]
    quant_item = next(b for w, b, _ in plan.items if w.startswith("quantized weights"))
    # the builder also holds the 16-entry code tables, which the plan leaves out
    assert 0 <= held - quant_item <= 2 * 16 * 4 + 2 * 256 * 4
    assert (plan.params_4bit, plan.params_other) == (counts["params_4bit"], counts["params_other"])


def test_monotonic_in_batch_and_length():
    totals = [plan_memory(cfg(batch=b)).total_bytes for b in (1, 2, 4, 8, 16)]
    assert totals == sorted(totals) and len(set(totals)) == len(totals)
    assert plan_memory(cfg(seq=4096)).total_bytes > plan_memory(cfg(seq=2048)).total_bytes


def test_checkpointing_needs_less():
    for family in ("mistral", "mixtral"):
        on = plan_memory(cfg(family=family, ckpt=True)).total_bytes
        off = plan_memory(cfg(family=family, ckpt=False)).total_bytes
        assert on < off


SEVEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def with_checkpointing(every_n_layers="auto", offload=False, **kwargs) -> dict:
    c = cfg(family="mistral", experts=False, kind="none", targets=SEVEN, **kwargs)
    c["trainer"]["checkpointing"] = {"every_n_layers": every_n_layers, "offload": offload}
    return c


def test_fewer_checkpointed_layers_need_more_and_offload_less():
    totals = [plan_memory(with_checkpointing(n)).total_bytes for n in (1, 2, 4, 32)]
    assert totals == sorted(totals) and len(set(totals)) == 4
    assert totals[-1] < plan_memory(with_checkpointing(ckpt=False)).total_bytes  # layer 0 still checkpointed
    assert plan_memory(with_checkpointing(1, offload=True)).total_bytes < totals[0]
    assert plan_memory(with_checkpointing("auto")).total_bytes == totals[0]  # unresolved: every layer


def test_auto_checkpoints_only_as_much_as_the_gpu_needs():
    from fine_tune.plan import AUTO_CHECKPOINTING_SHARE, choose_every_n_layers

    every_n = choose_every_n_layers(with_checkpointing(), gpu_gib=64.0)
    assert every_n > 1  # bf16 LoRA of Mistral-7B, batch 4 x 2048, 64 GiB free: room to recompute less
    limit = AUTO_CHECKPOINTING_SHARE * 64.0 * GIB
    assert plan_memory(with_checkpointing(every_n)).device_bytes() <= limit
    fewer = next(n for n in range(every_n + 1, 33) if -(-32 // n) < -(-32 // every_n))  # fewer checkpointed
    assert plan_memory(with_checkpointing(fewer)).device_bytes() > limit
    assert choose_every_n_layers(with_checkpointing(), gpu_gib=22.0) == 1  # a 24 GB GPU: every layer
    assert choose_every_n_layers(with_checkpointing(offload=True), gpu_gib=79.2) == 1  # least memory asked
    assert choose_every_n_layers(with_checkpointing(ckpt=False), gpu_gib=79.2) == 1


def test_8bit_optimizer_needs_less():
    adam = plan_memory(cfg(optim="torch.optim.AdamW"))
    adam8 = plan_memory(cfg(optim="bitsandbytes.optim.AdamW8bit"))
    paged8 = plan_memory(cfg(optim="bitsandbytes.optim.PagedAdamW8bit"))
    assert adam8.total_bytes < adam.total_bytes
    state = [next(b for w, b, _ in p.items if w == "optimizer state") for p in (adam, adam8)]
    assert state[1] * 4 == state[0]
    # paged state lives outside torch's allocator: not in the allocated peak, still on the device
    assert paged8.total_bytes < adam8.total_bytes
    assert paged8.device_bytes() > paged8.total_bytes


def test_4bit_experts_are_what_make_mixtral_fit():
    nf4 = plan_memory(cfg())
    none = plan_memory(cfg(kind="none"))
    assert nf4.static_bytes < 30 * GIB < 80 * GIB < none.static_bytes
    int8 = plan_memory(cfg(kind="int8"))  # int8 leaves fused experts in bf16: no fit either
    assert int8.static_bytes > 80 * GIB


def test_max_batch_size_is_the_fitting_boundary():
    plan = plan_memory(cfg())
    for gib in (40, 80):
        best = plan.max_batch_size(gib)
        assert best >= 1
        assert plan.device_bytes(best) <= gib * GIB < plan.device_bytes(best + 1)
    assert plan.max_batch_size(10) == 0  # weights alone exceed 10 GiB
    assert plan_memory(cfg(ckpt=False)).max_batch_size(80) < plan.max_batch_size(80)


def test_check_fits_raises_with_advice():
    plan = plan_memory(cfg(ckpt=False, batch=8, optim="torch.optim.AdamW"))
    with pytest.raises(UserError) as err:
        check_fits(plan, 80)
    hint = err.value.hint
    assert "per_device_train_batch_size" in hint and "gradient_checkpointing=true" in hint
    assert "8bit" in hint
    assert check_fits(plan_memory(cfg(batch=1)), 80) is None
    with pytest.raises(UserError, match="quant=nf4"):
        check_fits(plan_memory(cfg(kind="none", batch=1)), 80)


def test_shapes_from_architecture_node_and_overrides():
    shapes = model_shapes(cfg(arch=TINY, overrides={"num_hidden_layers": 3})["model"])
    assert (shapes.hidden_size, shapes.num_hidden_layers, shapes.num_experts) == (64, 3, 4)
    assert model_shapes({"family": "mistral"}).num_experts == 0
    with pytest.raises(UserError):
        model_shapes({"family": "llama"})


def test_reads_local_checkpoint_config(tmp_path):
    (tmp_path / "config.json").write_text('{"hidden_size": 1024, "num_hidden_layers": 4, "vocab_size": 1000}')
    c = cfg(family="mistral", experts=False)
    c["model"].update(name_or_path=str(tmp_path), init="pretrained")
    shapes = model_shapes(c["model"])
    assert (shapes.hidden_size, shapes.num_hidden_layers, shapes.vocab_size) == (1024, 4, 1000)


def test_accepts_omegaconf():
    import omegaconf

    c = cfg()
    assert plan_memory(omegaconf.OmegaConf.create(c)).total_bytes == plan_memory(copy.deepcopy(c)).total_bytes


@pytest.mark.subprocess
def test_planning_imports_neither_torch_nor_transformers():
    code = (
        "import sys, fine_tune.plan as p; p.plan_memory({'model': {'family': 'mixtral'}}).format(80); "
        "print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_print_plan_lists_fit_and_max_batch(capsys, monkeypatch):
    from fine_tune.plan import print_plan

    monkeypatch.setenv("FINE_TUNE_GPU_GIB", "79.2")
    plan = print_plan(cfg())
    out = capsys.readouterr().out
    room = 79.2 - plan.device_bytes() / 2**30
    assert f"max {plan.max_batch_size(79.2)})" in out and f"on 79 GiB: fits, {room:.1f} GiB to spare" in out
    monkeypatch.setenv("FINE_TUNE_GPU_GIB", "20")
    short = plan.device_bytes() / 2**30 - 20
    print_plan(cfg())
    assert f"on 20 GiB: does NOT fit, {short:.1f} GiB short" in capsys.readouterr().out
