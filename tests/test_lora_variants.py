"""LoRA variants (conf/lora/{dora,pissa,olora,loftq,rslora}.yaml, optim=loraplus): each trains, its
saved adapter computes the trained model in a process that imports only transformers and PEFT,
PiSSA/OLoRA adapters are converted to plain LoRA exactly as PEFT converts them, LoftQ starts closer to
the full-precision model, LoRA+ puts every B matrix (fine_tune's expert adapters' too) in a group at
lr x ratio, and what cannot combine is refused before anything loads."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from helpers import FAST, TINY, checked, cli, compose, logged, run_tool, stopped_copy, train_here, trained_run
from plain_load import in_plain_process

from fine_tune.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from fine_tune.errors import UserError

PROMPTS = ["<s> [INST] Convert 35000 grams to kilograms. [/INST]", "The capital of France is"]
VARIANTS = {
    "dora": ["lora=dora"],
    "pissa": ["lora=pissa"],
    "olora": ["lora=olora"],
    "loftq": ["lora=loftq", "quant=nf4"],
    "loraplus": ["optim=loraplus"],
}


@functools.cache
def trained(variant: str, root: Path) -> tuple:
    """A 12-step run of the variant (checkpoints at 6 and 12), its logits on PROMPTS as trained, and
    the saved inputs; trained once per session (in this process, its run dir as the CLI leaves it)."""
    run_dir = root / variant / "run"
    cfg, metrics, trainer = train_here(run_dir, [*FAST, *VARIANTS[variant]])
    tokenizer = trainer.processing_class
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.save(dict(inputs), root / variant / "inputs.pt")
    model = trainer.model.eval()
    with torch.no_grad():
        logits = model(**inputs).logits.float()
    return cfg, run_dir, metrics, trainer, logits, root / variant / "inputs.pt"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("variants")


def plain_base(cfg, root: Path) -> Path:
    """The base the adapter is published for, as a plain float32 checkpoint: the original weights
    (the tiny model's saved random checkpoint); for 4-bit runs the 4-bit weights, dequantized."""
    from fine_tune.inference import recipe_of
    from fine_tune.models.moe import dequantize_model

    base = recipe_of(cfg).base.model
    if cfg.quant.kind == "none":
        return Path(base.name_or_path)
    out = root / "dequantized"
    if not out.exists():
        dequantize_model(base, torch.float32).save_pretrained(out)
    return out


@pytest.mark.subprocess
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_trains_and_its_adapter_is_the_trained_model_in_plain_peft(variant, root):
    cfg, run_dir, metrics, _, expected, inputs = trained(variant, root)
    assert metrics["train_loss"] < metrics["first_train_loss"]
    report, got = in_plain_process(plain_base(cfg, root), run_dir / "adapter", inputs)
    assert report["same_keys"] and report["same_values"]
    assert not [w for w in report["warnings"] if "missing" in w.lower() or "unexpected" in w.lower()]
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)
    saved = json.loads((run_dir / "adapter" / ADAPTER_CONFIG).read_text())
    assert saved["use_dora"] == (variant == "dora") and saved["init_lora_weights"] is True
    # PiSSA/OLoRA trained rank r on a residual base; saved: the same model as rank 2r on the original
    assert saved["r"] == cfg.lora.r * (2 if variant in ("pissa", "olora") else 1)
    assert (run_dir / "adapter_init").is_dir() == (variant in ("pissa", "olora"))


def test_pissa_checkpoint_is_converted_for_generate_and_export(root, tmp_path):
    """A checkpoint stays as trained (resume needs it); load_run and export convert it like adapter/."""
    from safetensors.torch import load_file

    from fine_tune.inference import load_run

    _, run_dir, *_ = trained("pissa", root)
    final, latest = load_run(run_dir), load_run(run_dir, checkpoint="latest")  # step 12 = the end
    assert json.loads((latest.adapter_dir / ADAPTER_CONFIG).read_text())["init_lora_weights"] == "pissa"
    batch = final.tokenizer(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        torch.testing.assert_close(latest.model(**batch).logits, final.model(**batch).logits)
    out = tmp_path / "export"
    run_tool("fine_tune.export", [f"run={run_dir}", "checkpoint=latest", f"out={out}"])
    exported, own = (load_file(str(d / ADAPTER_WEIGHTS)) for d in (out, run_dir / "adapter"))
    assert exported.keys() == own.keys() and all(torch.equal(exported[k], own[k]) for k in own)
    assert "residual base" in (out / "README.md").read_text()


@pytest.mark.subprocess
@pytest.mark.slow
def test_resumed_pissa_run_is_the_uninterrupted_one(tmp_path):
    """Resume repeats the initialisation (the same residual base), loads the checkpoint as trained, and
    saves the same converted adapter as the run that was never stopped."""
    from safetensors.torch import load_file

    reference = trained_run("pissa", (*TINY, "lora=pissa"))
    run = stopped_copy(reference, tmp_path / "run", last_checkpoint=3)
    result = cli(["resume=true", f"hydra.run.dir={run}"])
    assert result.returncode == 0, result.stderr[-3000:]
    untimed = [
        [{k: v for k, v in row.items() if not k.endswith("_seconds")} for row in logged(d)]
        for d in (run, reference)
    ]
    assert untimed[0] == untimed[1]  # every loss, grad norm and eval as in the run never stopped
    got, expected = (load_file(str(d / "adapter" / ADAPTER_WEIGHTS)) for d in (run, reference))
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)


def test_dora_merges_into_a_plain_model(root, tmp_path):
    """DoRA with merge=true export: PEFT folds magnitude and direction into the weights."""
    from transformers import AutoModelForCausalLM

    _, run_dir, _, _, expected, inputs = trained("dora", root)
    out = tmp_path / "merged"
    run_tool("fine_tune.export", [f"run={run_dir}", "merge=true", "dtype=float32", f"out={out}"])
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        got = merged(**torch.load(inputs)).logits
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)


def attached(overrides: list[str]):
    """The config and the model with its adapter, as a run builds them (no training)."""
    from fine_tune.adapters import attach_adapter
    from fine_tune.recipe import Recipe
    from fine_tune.utils.build import build

    cfg = checked(["logger=none", *overrides])
    loaded = Recipe(cfg).base
    return cfg, attach_adapter(loaded.model, build(cfg.lora), False)


def test_pissa_conversion_equals_peft_own(tmp_path):
    """Our conversion on files gives exactly what PEFT's save_pretrained(path_initial_model_for_weight_
    conversion=...) writes, so users get PEFT's format."""
    from safetensors.torch import load_file

    from fine_tune.residual_init import INITIAL, convert_saved_adapter, save_initial_adapter

    _, model = attached(["lora=pissa", "lora.use_rslora=true"])
    save_initial_adapter(model, tmp_path)
    model.peft_config["default"].init_lora_weights = True  # PEFT's recipe for its initial adapter
    model.save_pretrained(tmp_path / "peft_init")
    model.peft_config["default"].init_lora_weights = "pissa"
    with torch.no_grad():  # "training"
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn_like(param) * 0.01)
    model.save_pretrained(
        tmp_path / "peft", path_initial_model_for_weight_conversion=str(tmp_path / "peft_init")
    )
    model.save_pretrained(tmp_path / "ours")
    convert_saved_adapter(tmp_path / "ours", tmp_path / INITIAL)
    ours, peft = (load_file(str(tmp_path / d / ADAPTER_WEIGHTS)) for d in ("ours", "peft"))
    assert ours.keys() == peft.keys() and all(torch.equal(ours[k], peft[k]) for k in peft)
    ours, peft = (json.loads((tmp_path / d / ADAPTER_CONFIG).read_text()) for d in ("ours", "peft"))
    for key in ("r", "lora_alpha", "init_lora_weights", "use_rslora"):
        assert ours[key] == peft[key], key
    # PEFT keeps target_modules as a set: the saved list's order is the string hash's, which differs
    # between processes (PYTHONHASHSEED), so only the modules themselves are compared
    assert sorted(ours["target_modules"]) == sorted(peft["target_modules"])
    assert ours["r"] == 32 and ours["lora_alpha"] == pytest.approx(32 * 2**0.5)


def test_loftq_starts_closer_to_the_full_precision_model():
    """scaling * B @ A cancels the best rank-r part of the 4-bit error, whatever alpha / r is."""
    from fine_tune.loftq import checkpoint_weights, loftq_initialise, quantization_error

    _, model = attached(["quant=nf4", "lora.lora_alpha=8"])  # scaling 0.5: PEFT's LoftQ ignores it
    weights = checkpoint_weights(model.get_base_model().name_or_path, model.config)
    qlora = quantization_error(model, weights)  # B = 0: the 4-bit weights alone
    assert loftq_initialise(model, weights) == 2 * 7
    assert quantization_error(model, weights) < 0.9 * qlora


def test_loraplus_puts_every_b_matrix_at_ratio_times_lr():
    """PEFT's lora_B and fine_tune's 4-bit expert B in the fast group; A and the rest at lr."""
    from fine_tune.training.optim import build_optimizer_factory

    cfg, model = attached(["model=tiny_mixtral", "quant=nf4", "lora=attn_experts", "optim=loraplus"])
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = build_optimizer_factory(cfg.optim.optimizer, cfg.optim.loraplus_lr_ratio)(named)
    slow, fast = optimizer.param_groups
    assert fast["lr"] == pytest.approx(16 * slow["lr"]) and slow["lr"] == pytest.approx(cfg.optim.lr)
    ids = {id(p): n for n, p in named}
    fast_names = {ids[id(p)] for p in fast["params"]}
    expert_b = {n for n in fast_names if n.endswith(".adapters.gate_up_proj.B")}
    assert len(expert_b) == 2  # one per layer: fine_tune's experts, [E, out, r]
    assert fast_names == {n for n in ids.values() if "lora_B" in n or n.endswith(".B")}
    assert all("lora_A" in ids[id(p)] or ids[id(p)].endswith(".A") for p in slow["params"])


def test_loraplus_run_keeps_the_ratio_through_the_schedule(root):
    cfg, _, _, trainer, _, _ = trained("loraplus", root)
    slow, fast = trainer.optimizer.param_groups  # the scheduler starts each group from its own lr
    assert fast["initial_lr"] == pytest.approx(16 * slow["initial_lr"]) == pytest.approx(16 * cfg.optim.lr)
    assert all(p.ndim == 2 for p in slow["params"])


@pytest.mark.parametrize(
    ("overrides", "where"),
    [
        (["model=tiny_mixtral", "quant=nf4", "lora=attn_experts", "lora.use_dora=true"], "lora.use_dora"),
        (
            ["model=tiny_mixtral", "quant=nf4", "lora=all", "lora.init_lora_weights=loftq"],
            "lora.init_lora_weights",
        ),
        (
            ["model=tiny_mixtral", "lora=all_linear", "lora.lora_dropout=0", "lora.use_dora=true"],
            "lora.use_dora",
        ),
        (["lora=pissa", "quant=nf4"], "lora.init_lora_weights"),
        (["lora=olora", "quant=int8"], "lora.init_lora_weights"),
        (["lora=loftq"], "lora.init_lora_weights"),  # quant=none: no quantization error to start from
        (["lora=loftq", "quant=int8"], "lora.init_lora_weights"),
        (["lora=loftq", "quant=nf4", "model=mistral_7b", "model.init=random"], "lora.init_lora_weights"),
        (["lora=dora", "lora.init_lora_weights=pissa"], "lora.use_dora"),
        (["lora.init_lora_weights=svd"], "lora.init_lora_weights"),
        (["lora.init_lora_weights=pissa_niter_0"], "lora.init_lora_weights"),
        (["optim=loraplus", "optim.loraplus_lr_ratio=0"], "optim.loraplus_lr_ratio"),
    ],
)
def test_what_cannot_combine_is_refused_with_the_key(overrides, where):
    from fine_tune.validate import check_config

    with pytest.raises(UserError) as error:
        check_config(compose(["logger=none", *overrides]))
    assert error.value.where == where
    assert error.value.hint


def test_variants_combine_with_what_they_can():
    """DoRA on 4-bit and 8-bit bases, rsLoRA and LoRA+ on expert adapters, pissa_niter_N: no refusal;
    validate=true notes what the initialisations and DoRA cost."""
    from fine_tune.validate import check_config

    for overrides in (
        ["lora=dora", "quant=nf4"],
        ["lora=dora", "quant=int8"],
        ["model=tiny_mixtral", "quant=nf4", "lora=attn_experts", "lora.use_rslora=true", "optim=loraplus"],
        ["model=tiny_mixtral", "quant=nf4", "lora=loftq", "lora.target_modules=[q_proj,v_proj]"],
        ["lora=pissa", "lora.init_lora_weights=pissa_niter_4"],
    ):
        check_config(compose(["logger=none", *overrides]))
    notes = " ".join(check_config(compose(["logger=none", "lora=pissa"])).notes)
    assert "an SVD of each of the 14 adapted weight matrices (largest 192x64)" in notes
    assert "recomputes the norm" in " ".join(check_config(compose(["logger=none", "lora=dora"])).notes)


def test_planner_counts_what_dora_costs():
    """Magnitudes (one per adapted output feature), activations, the weight-norm transient, and with
    dropout on a 4-bit base the kept weight copies: Mistral-7B, all seven projections, no checkpointing."""
    from fine_tune.plan import plan_memory

    base = ["model=mistral_7b", "model.init=random", "quant=nf4", "trainer.gradient_checkpointing=false"]
    plain, dora, dropout, bf16 = (
        plan_memory(compose(["logger=none", *base, *more]))
        for more in (
            [],
            ["lora=dora"],
            ["lora=dora", "lora.lora_dropout=0.05"],
            ["lora=dora", "lora.lora_dropout=0.05", "quant=none"],
        )
    )
    h, kv, i = 4096, 1024, 14336
    outs, weights = 2 * h + 2 * kv + 2 * i + h, 2 * h * h + 2 * h * kv + 3 * h * i
    assert dora.trainable_params - plain.trainable_params == 32 * outs
    assert dora.saved_per_sample > plain.saved_per_sample
    parts = [{what: size for what, size, _ in p.items} for p in (dora, dropout, bf16)]
    assert parts[0]["DoRA weight norm (one linear at a time)"] == 6 * i * i + 18 * i * h  # down_proj
    assert parts[1]["DoRA weights kept (lora_dropout > 0)"] == 2 * 32 * weights  # bf16 copies, every layer
    assert "DoRA weights kept (lora_dropout > 0)" not in parts[0] | parts[2]  # no dropout / not dequantized
    assert "(DoRA)" in dora.description
