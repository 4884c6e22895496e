"""TRL's SFTTrainer is the engine: it trains exactly what our data pipeline prepared (the loss of a
step and of an evaluation equal a direct forward of the model on the same batch, padded or packed),
and nothing a TRL default would add (bf16 adapters, an MoE aux loss, a model card, a truncation)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import FAST, checked, compose, tiny_mistral_config

from fine_tune.errors import UserError


def build_engine(tmp_path: Path, overrides: list[str]):
    """Tokenizer, data, model + adapter and the trainer, as `fine_tune.run` builds them (no training)."""
    from hydra.utils import instantiate
    from transformers import set_seed

    from fine_tune.recipe import Recipe
    from fine_tune.training.preemption import PreemptionHandler

    cfg = checked([*FAST, *overrides])
    set_seed(cfg.seed)
    recipe = Recipe(cfg)
    trainer, _ = recipe.trainer(tmp_path, instantiate(cfg.logger), PreemptionHandler())
    return trainer, recipe.data


def seeded_step(trainer, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One training step from a fixed RNG state (dropout masks): its loss and the adapter gradients."""
    model = trainer.model
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1234)
    trained = int((batch["labels"][:, 1:] != -100).sum())
    loss = trainer.training_step(model, dict(batch), num_items_in_batch=torch.tensor(trained))
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def direct_loss(model, batch: dict) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled positions, from the model's full logits."""
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    logits = model(**inputs).logits.float()
    labels = batch["labels"][:, 1:]
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100)


@pytest.mark.parametrize("packing", [False, True])
def test_step_and_eval_loss_equal_a_direct_forward(tmp_path: Path, packing: bool):
    trainer, data = build_engine(tmp_path, [f"dataset.packing={packing}", "lora.lora_dropout=0"])
    model = trainer.model
    batch = next(iter(trainer.get_train_dataloader()))  # the first batch the engine trains on
    assert ("position_ids" in batch) == packing and ("attention_mask" in batch) != packing
    model.train()
    with torch.no_grad():
        expected = direct_loss(model, batch)
    trained = int((batch["labels"][:, 1:] != -100).sum())
    loss = trainer.training_step(model, dict(batch), num_items_in_batch=torch.tensor(trained))
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)

    model.eval()
    with torch.no_grad():  # HF averages eval batch losses weighted by the rows of each batch
        weighted = [(direct_loss(model, b), b["input_ids"].size(0)) for b in trainer.get_eval_dataloader()]
    expected_eval = sum(loss * rows for loss, rows in weighted) / sum(rows for _, rows in weighted)
    assert trainer.evaluate()["eval_loss"] == pytest.approx(float(expected_eval), rel=1e-6)


def test_trl_changes_nothing_on_a_quantized_moe(tmp_path: Path):
    """nf4 Mixtral: TRL would cast the adapters to bf16 and switch Mixtral's load-balancing loss on."""
    trainer, _ = build_engine(tmp_path, ["experiment=tiny_mixtral_qlora", "logger=none"])
    dtypes = {p.dtype for p in trainer.model.parameters() if p.requires_grad}
    assert dtypes == {torch.float32}
    assert trainer.model.config.output_router_logits is False and not trainer.aux_loss_enabled


def test_router_aux_loss_follows_the_model_config():
    from transformers import MistralConfig, MixtralConfig

    from fine_tune.training.trainer import router_aux_loss_coef

    assert router_aux_loss_coef(MistralConfig()) is None
    assert router_aux_loss_coef(MixtralConfig(output_router_logits=False, router_aux_loss_coef=0.02)) == 0.0
    assert router_aux_loss_coef(MixtralConfig(output_router_logits=True, router_aux_loss_coef=0.02)) == 0.02


def test_liger_switch():
    from transformers import MistralConfig, MixtralConfig

    from fine_tune.schema import check_group
    from fine_tune.training.arguments import resolve_liger
    from fine_tune.training.trainer import liger_kernel_config

    assert resolve_liger("auto") is False and resolve_liger(False) is False  # CPU
    with pytest.raises(UserError) as error:
        resolve_liger(True)
    assert error.value.where == "trainer.use_liger_kernel" and "CUDA" in str(error.value)
    with pytest.raises(UserError):  # the schema's allowed values
        check_group("trainer", {"use_liger_kernel": "yes"})
    # Liger's SwiGLU would bypass the 4-bit experts and their adapters
    assert liger_kernel_config(MixtralConfig()) == {"swiglu": False}
    assert liger_kernel_config(MistralConfig()) == {}


def test_checkpointing_options_become_transformers_kwargs():
    from fine_tune.schema import check_group
    from fine_tune.training.arguments import build_training_arguments, checkpointing_kwargs

    assert checkpointing_kwargs(None) == {"use_reentrant": False}
    assert checkpointing_kwargs({"mode": "selective", "every_n_layers": 2}) == {
        "use_reentrant": False,
        "every_n_layers": 2,
        "selective": True,
    }
    assert "offload" not in checkpointing_kwargs({"offload": True})  # ours: fine_tune.training.offload
    assert checkpointing_kwargs({"every_n_layers": "auto"}) == {"use_reentrant": False}  # unresolved: all
    bad_options = [({"mode": "some"}, "mode")] + [
        ({"every_n_layers": v}, "every_n_layers") for v in (0, "x", True)
    ]
    for bad, where in bad_options:  # the schema checks them, also while checkpointing is off
        with pytest.raises(UserError) as error:
            check_group("trainer", {"gradient_checkpointing": False, "checkpointing": bad})
        assert error.value.where == f"trainer.checkpointing.{where}"
    optim = check_group("optim", {"lr": 1e-4, "optimizer": {"_target_": "torch.optim.AdamW"}})
    args = build_training_arguments(output_dir="unused", seed=0, optim=optim, gradient_checkpointing=False)
    # SFTConfig's own defaults (checkpointing and bf16 on) never leak in; TRL prepares no data.
    assert args.activation_checkpointing is False and args.bf16 is False
    assert args.dataset_kwargs == {"skip_prepare_dataset": True} and args.max_length is None


# Each fast-path switch that runs on CPU, against the same run without it.
NO_DROPOUT = ["lora.lora_dropout=0"]  # inductor draws dropout masks from its own generator
SWITCHES = {
    "full": ["trainer.gradient_checkpointing=true"],
    "selective": ["trainer.gradient_checkpointing=true", "trainer.checkpointing.mode=selective"],
    "every_2nd_layer": ["trainer.gradient_checkpointing=true", "trainer.checkpointing.every_n_layers=2"],
    "eager_attention": ["model.attn_implementation=eager"],
    "torch_compile": ["trainer.torch_compile=true", *NO_DROPOUT],
}
SHORT = [
    "trainer.max_steps=3",
    "trainer.logging_steps=1",
    "trainer.eval_steps=3",
    "trainer.save_steps=3",
    "dataset.packing=true",
    "trainer.generation.num_prompts=2",
    "trainer.generation.max_new_tokens=4",
]
TOLERANCE = 1e-5  # relative, on every step's loss and grad norm (fp32 on CPU)


def short_run(tmp_path: Path, overrides: list[str]):
    from hydra.utils import instantiate

    from fine_tune.run import train

    cfg = compose([*FAST, *SHORT, *overrides])
    run_dir = tmp_path / "run"
    run_dir.mkdir(parents=True)
    metrics, trainer = train(cfg, run_dir, instantiate(cfg.logger), job={})
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return run_dir, metrics, trainer, rows


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return short_run(tmp_path_factory.mktemp("reference"), [])


def steps(rows: list[dict]) -> list[float]:
    """Every logged step's loss and grad norm, in one flat list."""
    return [value for r in rows if "train/loss" in r for value in (r["train/loss"], r["train/grad_norm"])]


@pytest.mark.slow
@pytest.mark.parametrize("switch", sorted(SWITCHES))
def test_fast_path_switches_train_the_same(tmp_path: Path, reference, switch: str):
    _, _, trainer, rows = short_run(tmp_path, SWITCHES[switch])
    compiled = switch == "torch_compile"
    expected = steps((short_run(tmp_path / "eager", NO_DROPOUT) if compiled else reference)[3])
    assert len(expected) == 6
    assert steps(rows) == pytest.approx(expected, rel=TOLERANCE)
    layers = trainer.model.get_base_model().model.layers
    flags = [layer.gradient_checkpointing for layer in layers]
    if compiled:  # each decoder layer compiled, not the whole model
        from torch._dynamo.eval_frame import OptimizedModule

        wrapped = trainer.model_wrapped.get_base_model().model.layers
        assert all(isinstance(layer, OptimizedModule) for layer in wrapped) and not any(flags)
        return
    if switch == "eager_attention":
        assert trainer.model.config._attn_implementation == "eager" and not any(flags)
        return
    assert flags == ([True, False] if switch == "every_2nd_layer" else [True, True])  # the switch took effect
    context = layers[0]._gradient_checkpointing_func.keywords.get("context_fn")
    assert (context is not None) == (switch == "selective")


def test_metrics_report_training_time_apart(reference):
    """Tokens/s over training time only; eval, samples and checkpoints timed apart; no MFU on CPU."""
    run_dir, metrics, _, rows = reference
    for key in ("train_time_s", "eval_time_s", "sample_time_s", "checkpoint_time_s"):
        assert metrics[key] > 0, key
    parts = sum(metrics[k] for k in ("train_time_s", "eval_time_s", "sample_time_s", "checkpoint_time_s"))
    assert parts <= metrics["runtime_s"]
    assert metrics["tokens_per_second"] == pytest.approx(metrics["tokens_seen"] / metrics["train_time_s"])
    assert metrics["mfu"] is None and metrics["peak_memory_gib"] > 0
    train_rows = [r for r in rows if "train/loss" in r]
    assert all(r["perf/tokens_per_second"] > 0 and "perf/mfu" not in r for r in train_rows)
    assert all(0 <= r["train/token_accuracy"] <= 1 for r in train_rows)
    assert any("perf/eval_seconds" in r for r in rows) and any("perf/sample_seconds" in r for r in rows)
    assert not (run_dir / "checkpoints" / "README.md").exists()  # TRL's model card stays out


@pytest.mark.parametrize("mixed_precision", [True, False])
def test_adapter_inputs_stay_in_the_compute_dtype_under_mixed_precision(mixed_precision: bool):
    """A training step under autocast skips PEFT's fp32 copy of each adapted layer's input (autocast
    casts it back for the matmul): the same loss and gradients within bf16 rounding, checkpointing's
    recompute included; outside the step (samples) the cast is back."""
    from types import SimpleNamespace

    from peft import LoraConfig, get_peft_model
    from peft.tuners.tuners_utils import BaseTunerLayer
    from transformers import MistralForCausalLM

    from fine_tune.training.trainer import EngineMixin

    torch.manual_seed(0)
    base = MistralForCausalLM(tiny_mistral_config(vocab_size=100)).to(torch.bfloat16)
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.enable_input_require_grads()
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "down_proj"], lora_dropout=0.0))
    model.train()
    trainer = SimpleNamespace(model=model, args=SimpleNamespace(bf16=mixed_precision, fp16=False))
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    ids = torch.randint(0, 100, (2, 16))

    def step(uncast: bool):
        model.zero_grad()
        context = EngineMixin.lora_inputs_uncast(trainer) if uncast else contextlib.nullcontext()
        with context, torch.autocast("cpu", dtype=torch.bfloat16):
            assert {layer.cast_input_dtype_enabled for layer in layers} == {not (uncast and mixed_precision)}
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        grad = next(p.grad for n, p in model.named_parameters() if "lora_A" in n).clone()
        return loss.detach(), grad

    (loss_cast, grad_cast), (loss, grad) = step(False), step(True)
    assert all(layer.cast_input_dtype_enabled for layer in layers)  # restored after the step
    torch.testing.assert_close(loss, loss_cast, atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(grad, grad_cast, atol=2e-3, rtol=5e-2)
