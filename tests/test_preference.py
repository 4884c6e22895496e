"""Preference tuning: `method=dpo` and `method=orpo` train on our tokenized pairs in every layout,
learn the preference (measured on the pairs, before vs after), compare against the right reference
(the base model with every adapter off, 4-bit expert adapters included; an SFT run's adapter with
init_adapter), resume exactly, and leave run dirs that generate and export read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import FIXTURES, checked, cli, compose, read_jsonl, run_tool, stopped_copy, trained_run

from fine_tune.adapters import ADAPTER_CONFIG
from fine_tune.errors import UserError

# Tiny CPU runs: a loss and the rewards logged every step, an eval and a checkpoint at the end.
SHORT = [
    "trainer=cpu",
    "logger=none",
    "trainer.max_steps=3",
    "trainer.logging_steps=1",
    "trainer.eval_steps=3",
    "trainer.save_steps=3",
    "trainer.per_device_train_batch_size=2",
    "trainer.generation.num_prompts=1",
    "trainer.generation.max_new_tokens=4",
]
LAYOUTS = {  # fixture file -> dataset.format
    "preference.jsonl": "preference",  # prompt / chosen / rejected as strings
    "preference_chat.jsonl": "preference",  # as chat-message lists
    "preference_openai.jsonl": "preference_openai",  # input.messages / preferred / non_preferred
}
MIXTRAL_EXPERTS = ["model=tiny_mixtral", "quant=nf4", "lora=attn_experts"]


def pairs(
    method: str, path: Path | str = FIXTURES / "preference.jsonl", fmt: str = "preference"
) -> list[str]:
    return [f"method={method}", "dataset=preference", f"dataset.path={path}", f"dataset.format={fmt}"]


@pytest.fixture(scope="module")
def arithmetic(tmp_path_factory) -> Path:
    """Sixteen pairs whose answers differ in a way a tiny model can learn in a few steps."""
    path = tmp_path_factory.mktemp("pairs") / "arithmetic.jsonl"
    rows = [
        {
            "prompt": f"What is {a} plus {a + 1}?",
            "chosen": f"It is {2 * a + 1}.",
            "rejected": "I do not know.",
        }
        for a in range(2, 18)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def train(tmp_path: Path, overrides: list[str]):
    from hydra.utils import instantiate

    from fine_tune.run import train as run_train

    cfg = checked(overrides)
    run_dir = tmp_path / "run"
    run_dir.mkdir(parents=True)
    metrics, trainer = run_train(cfg, run_dir, instantiate(cfg.logger), job={})
    return run_dir, metrics, trainer


def engine(tmp_path: Path, overrides: list[str]):
    """The run's trainer as `fine_tune.run` builds it, untrained, and its recipe."""
    from hydra.utils import instantiate

    from fine_tune.recipe import Recipe
    from fine_tune.training.preemption import PreemptionHandler

    recipe = Recipe(checked(overrides))
    trainer, _ = recipe.trainer(tmp_path, instantiate(recipe.cfg.logger), PreemptionHandler())
    return trainer, recipe


def answer_log_probs(model, rows: list[dict], answer: str) -> torch.Tensor:
    """Summed log-probabilities of each row's answer after its prompt, from the full logits."""
    out = []
    with torch.no_grad():
        for row in rows:
            prompt, ids = row["prompt_ids"], row["prompt_ids"] + row[f"{answer}_ids"]
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, :-1].float()
            per_token = logits.log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
            out.append(per_token[len(prompt) - 1 :].sum())
    return torch.stack(out)


# ------------------------------------------------------------------------------------------------
# Training on every layout, and what a preference run records


@pytest.mark.parametrize("method", ["dpo", "orpo"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_each_layout_trains(tmp_path: Path, method: str, layout: str):
    run_dir, metrics, _ = train(tmp_path, [*SHORT, *pairs(method, FIXTURES / layout, LAYOUTS[layout])])
    rows = read_jsonl(run_dir / "metrics.jsonl")
    steps = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert all(torch.isfinite(torch.tensor(r[f"train/{key}"])) for r in steps), key
    if method == "orpo":  # its own log-odds terms; no reference, so chosen rewards move from step 1
        assert all("train/log_odds_ratio" in r and "train/nll_loss" in r for r in steps)
    assert len({r["train/loss"] for r in steps}) > 1 and steps[0]["perf/tokens_per_second"] > 0
    assert metrics["steps"] == 3 and 0 <= metrics["reward_accuracy"] <= 1
    assert metrics["eval_perplexity"] is None  # exp(a preference loss) is no perplexity
    assert not any("eval/perplexity" in r for r in rows)
    assert (run_dir / "adapter" / ADAPTER_CONFIG).is_file()
    assert [r["step"] for r in read_jsonl(run_dir / "samples.jsonl")] == [3]  # samples for pairs too
    report = json.loads((run_dir / "data_report.json").read_text())
    assert report["data_format"] == LAYOUTS[layout]


def preference_margins(model, rows: list[dict], method: str) -> torch.Tensor:
    """What each method makes positive on a pair it has learnt. DPO: the implicit reward margin,
    (log p(chosen) - log p_ref(chosen)) - (log p(rejected) - log p_ref(rejected)), the reference
    being the same model with its adapter off. ORPO: the log odds ratio of the answers' mean
    per-token probabilities."""
    chosen, rejected = answer_log_probs(model, rows, "chosen"), answer_log_probs(model, rows, "rejected")
    if method == "dpo":
        with model.disable_adapter():
            base = answer_log_probs(model, rows, "chosen") - answer_log_probs(model, rows, "rejected")
        return chosen - rejected - base
    from trl.experimental.orpo.orpo_trainer import log1mexp

    mean_c = chosen / torch.tensor([len(r["chosen_ids"]) for r in rows])
    mean_r = rejected / torch.tensor([len(r["rejected_ids"]) for r in rows])
    return (mean_c - mean_r) - (log1mexp(mean_c) - log1mexp(mean_r))


@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_preference_accuracy_on_the_training_pairs_rises(tmp_path: Path, arithmetic: Path, method: str):
    overrides = [
        *SHORT,
        *pairs(method, arithmetic),
        "dataset.val_ratio=0",
        "trainer.max_steps=8",
        "trainer.per_device_train_batch_size=4",
        "trainer.save_steps=100",
        "trainer.eval_steps=100",
    ]
    trainer, recipe = engine(tmp_path, overrides)
    model, rows = trainer.model, list(recipe.data.train)
    model.eval()
    before = preference_margins(model, rows, method)
    model.train()
    trainer.train()
    model.eval()
    after = preference_margins(model, rows, method)
    accuracy = lambda margins: float((margins > 0).float().mean())  # noqa: E731
    if method == "dpo":  # policy = reference before the first step: every margin is exactly 0
        assert before.abs().max() == 0
    assert accuracy(after) > max(accuracy(before), 0.75)
    assert after.mean() > before.mean()


# ------------------------------------------------------------------------------------------------
# The reference


def perturb_adapters(model, seed: int = 0) -> None:
    """Make every adapter (PEFT's lora_B, our experts' B) non-zero, as a trained one is."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and ("lora_B" in name or name.endswith(".B")):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)


@pytest.mark.parametrize(
    "overrides",
    [[], MIXTRAL_EXPERTS, ["method.precompute_ref_log_probs=true"]],
    ids=["mistral", "mixtral_nf4_experts", "precomputed"],
)
def test_the_reference_is_the_base_model_with_every_adapter_off(tmp_path: Path, overrides: list[str]):
    from fine_tune.models.moe.lora import experts_modules
    from fine_tune.recipe import Recipe

    args = [*SHORT, *pairs("dpo"), "dataset.val_ratio=0", *overrides]
    trainer, recipe = engine(tmp_path, args)
    policy, rows = trainer.model, list(recipe.data.train)
    perturb_adapters(policy)
    base = Recipe(checked(args)).base.model  # built again from the config: the same base weights
    expected = {a: answer_log_probs(base, rows, a) for a in ("chosen", "rejected")}
    adapted = answer_log_probs(policy, rows, "chosen")
    assert (adapted - expected["chosen"]).abs().min() > 1e-2  # the adapter changes every answer
    if "method.precompute_ref_log_probs=true" in overrides:
        # taken before the perturbation: the fresh adapter is zero, so the reference is the base too
        columns = trainer.train_dataset
        torch.testing.assert_close(torch.tensor(columns["ref_chosen_logps"]), expected["chosen"], **TOL)
        torch.testing.assert_close(torch.tensor(columns["ref_rejected_logps"]), expected["rejected"], **TOL)
        return
    experts = [module for _, module in experts_modules(policy)]
    if experts:  # the expert adapters alone change the answers: leaving them on would show
        with policy.disable_adapter():
            assert not any(module.adapters_enabled for module in experts)  # PEFT's switch is ours too
            for module in experts:
                module.adapters_enabled = True
            experts_only = answer_log_probs(policy, rows, "chosen")
        assert all(module.adapters_enabled for module in experts)  # and back on with PEFT's
        assert (experts_only - expected["chosen"]).abs().max() > 1e-2
    batch = trainer.data_collator(rows)
    chosen, rejected = trainer.compute_ref_log_probs(policy, batch)
    torch.testing.assert_close(chosen, expected["chosen"], **TOL)
    torch.testing.assert_close(rejected, expected["rejected"], **TOL)
    # the training step's own reference pass (inside the loss): its rewards are beta x (policy - base)
    policy.train()
    trainer.compute_loss(policy, trainer._prepare_inputs(batch))
    beta = recipe.method.options["beta"]
    logged = trainer._metrics["train"]["rewards/chosen"][-1]
    assert logged == pytest.approx(float(beta * (adapted - expected["chosen"]).mean()), rel=1e-4, abs=1e-5)


TOL = {"rtol": 1e-4, "atol": 1e-4}


@pytest.mark.slow
def test_dpo_starts_from_an_sft_runs_adapter_experts_included(tmp_path: Path):
    """init_adapter: the policy starts as the SFT model and the reference is that SFT model."""
    from omegaconf import OmegaConf

    from fine_tune.recipe import Recipe
    from fine_tune.validate import check_config

    sft_args = [
        "experiment=tiny_mixtral_qlora",
        *SHORT,
        "dataset.max_samples=16",
        "dataset.max_eval_samples=2",
    ]
    sft_dir, _, _ = train(tmp_path / "sft", sft_args)
    (sft_dir / ".hydra").mkdir()
    OmegaConf.save(compose(sft_args), sft_dir / ".hydra" / "config.yaml")  # what Hydra keeps of a run
    args = ["experiment=tiny_mixtral_qlora", *SHORT, *pairs("dpo"), "dataset.val_ratio=0"]
    check_config(compose([*args, f"init_adapter={sft_dir}"]))  # the adapter fits the config
    trainer, recipe = engine(tmp_path / "dpo", [*args, f"init_adapter={sft_dir}"])
    rows = list(recipe.data.train)
    sft = Recipe(checked(sft_args)).with_adapter(sft_dir / "adapter")
    expected = {a: answer_log_probs(sft, rows, a) for a in ("chosen", "rejected")}
    with sft.disable_adapter():
        base = answer_log_probs(sft, rows, "chosen")
    assert (base - expected["chosen"]).abs().max() > 1e-3  # the SFT adapter matters
    trainer.model.eval()
    torch.testing.assert_close(answer_log_probs(trainer.model, rows, "chosen"), expected["chosen"], **TOL)
    reference = trainer.train_dataset  # taken before the first step (no frozen copy of the adapter)
    torch.testing.assert_close(torch.tensor(reference["ref_chosen_logps"]), expected["chosen"], **TOL)
    torch.testing.assert_close(torch.tensor(reference["ref_rejected_logps"]), expected["rejected"], **TOL)
    assert "ref" not in trainer.model.peft_config  # TRL's frozen copy is gone
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert any(n.endswith(".B") for n in trainable) and any("lora_B" in n for n in trainable)

    for other, where in (
        (["lora.r=4"], "lora.r"),
        (["seed=7"], "seed"),
        (["model.architecture.num_local_experts=2"], "init_adapter"),
    ):
        with pytest.raises(UserError) as error:  # another adapter shape or base: refused before loading
            check_config(compose([*args, f"init_adapter={sft_dir}", *other]))
        assert error.value.where == where, other


# ------------------------------------------------------------------------------------------------
# Refusals


@pytest.mark.parametrize(
    ("overrides", "where"),
    [
        (["method=dpo"], "method"),  # the default instruction data
        (["method=sft", "dataset=preference", f"dataset.path={FIXTURES / 'preference.jsonl'}"], "method"),
        ([*pairs("orpo"), "dataset.packing=true"], "dataset.packing"),
    ],
    ids=["dpo_on_sft_data", "sft_on_pairs", "packed_pairs"],
)
def test_a_method_and_data_that_do_not_fit_are_refused(overrides: list[str], where: str):
    from fine_tune.recipe import Recipe

    with pytest.raises(UserError) as error:
        _ = Recipe(checked(["trainer=cpu", *overrides])).data
    assert error.value.where == where


def test_method_keys_are_checked_before_anything_loads(tmp_path: Path):
    from fine_tune.validate import check_config

    for overrides, where in (
        (["method.label_smoothing=0.1"], "method.label_smoothing"),  # sigmoid ignores it
        (["method.loss_type=kto"], "method.loss_type"),
        (["method.beta=0"], "method.beta"),
        ([f"init_adapter={tmp_path}"], "init_adapter"),  # holds no adapter
    ):
        with pytest.raises(UserError) as error:
            check_config(compose([*pairs("dpo"), *overrides]))
        assert error.value.where == where, overrides
    check_config(compose([*pairs("dpo"), "method.loss_type=robust", "method.label_smoothing=0.1"]))


# ------------------------------------------------------------------------------------------------
# The planner and validate=true


def test_plan_counts_both_answers_and_the_reference_forward():
    from fine_tune.plan import plan_memory

    base = ["model=mistral_7b", "quant=nf4", "trainer=gpu", *pairs("dpo")]
    sft = plan_memory(compose(["model=mistral_7b", "quant=nf4", "trainer=gpu"]))
    dpo = plan_memory(compose(base))
    orpo = plan_memory(compose([*base, "method=orpo"]))
    precomputed = plan_memory(compose([*base, "method.precompute_ref_log_probs=true"]))
    # a pair is two sequences: twice the activations of one example of the same length
    assert dpo.saved_per_sample == orpo.saved_per_sample == 2 * sft.saved_per_sample
    assert dpo.reference_per_sample > 0 and orpo.reference_per_sample == precomputed.reference_per_sample == 0
    assert dpo.max_batch_size(79.2) <= orpo.max_batch_size(79.2) < sft.max_batch_size(79.2)
    assert "dpo (pairs" in dpo.description


@pytest.mark.subprocess
@pytest.mark.slow
def test_validate_prints_the_method(tmp_path: Path):
    result = cli(["validate=true", *SHORT, *pairs("dpo"), f"hydra.run.dir={tmp_path / 'run'}"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "method: dpo (beta 0.1, loss_type sigmoid" in result.stdout
    assert "reference: the base model with the adapter off" in result.stdout
    assert "effective batch 2 pairs" in result.stdout and not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------
# Resume and sweeps (subprocesses, as a user runs them); generate and export read a DPO run dir

RESUMABLE = (
    *pairs("dpo", FIXTURES / "preference.jsonl"),
    "trainer=cpu",
    "logger=none",
    "dataset.val_ratio=0.2",
    "trainer.per_device_train_batch_size=2",
    "trainer.max_steps=6",
    "trainer.logging_steps=2",  # a logging window spans the checkpoint at step 3
    "trainer.save_steps=3",
    "trainer.eval_steps=3",
    "trainer.generation.num_prompts=1",
    "trainer.generation.max_new_tokens=4",
)


def training_record(run_dir: Path) -> list[dict]:
    """metrics.jsonl without what measures the machine (times, speeds, memory)."""
    return [
        {k: v for k, v in r.items() if not k.startswith("perf/")}
        for r in read_jsonl(run_dir / "metrics.jsonl")
    ]


@pytest.mark.subprocess
@pytest.mark.slow
def test_a_resumed_dpo_run_logs_what_the_uninterrupted_run_logged(tmp_path: Path):
    reference = trained_run("dpo", RESUMABLE)
    run = stopped_copy(reference, tmp_path / "run", last_checkpoint=3)
    result = cli(["resume=true", f"hydra.run.dir={run}"])
    assert result.returncode == 0, result.stderr[-3000:]
    rows = training_record(run)
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 4, 6]
    assert rows == training_record(reference)  # losses and rewards, the window across step 3 included
    assert json.loads((run / "status.json").read_text())["status"] == "finished"
    final, expected = (json.loads((d / "metrics.json").read_text()) for d in (run, reference))
    assert final["reward_accuracy"] == expected["reward_accuracy"]


@pytest.mark.subprocess
@pytest.mark.slow
def test_generate_and_export_read_a_dpo_run_dir(tmp_path: Path):
    from transformers import AutoModelForCausalLM

    from fine_tune.inference import load_run

    run = trained_run("dpo", RESUMABLE)
    prompt = "prompt=What is the capital of France?"
    answer = run_tool("fine_tune.generate", [f"run={run}", prompt, "max_new_tokens=4", "show_prompt=true"])
    assert answer.startswith("[prompt] <s> [INST] What is the capital of France? [/INST]")
    out = tmp_path / "merged"
    run_tool("fine_tune.export", [f"run={run}", "merge=true", "dtype=float32", f"out={out}"])
    loaded = load_run(run)
    ids = torch.tensor([loaded.tokenizer("[INST] Name a colour. [/INST]")["input_ids"]])
    with torch.no_grad():
        expected = loaded.model(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(input_ids=ids).logits
    torch.testing.assert_close(merged, expected, atol=1e-4, rtol=1e-4)
    assert "**Method**: dpo (beta 0.1" in (out / "README.md").read_text()


@pytest.mark.subprocess
@pytest.mark.slow
def test_a_beta_by_rank_sweep_gives_four_tracked_dpo_runs(tmp_path: Path):
    from test_sweep_e2e import fine_tune

    from fine_tune import compare
    from fine_tune.tracking.wandb_offline import find_runs, read_run

    sweep_dir = tmp_path / "sweep"
    result = fine_tune(
        tmp_path,
        "-m",
        *pairs("dpo", FIXTURES / "preference.jsonl"),
        "dataset.val_ratio=0.2",
        "method.beta=0.1,0.5",
        "lora.r=2,4",
        "logger=wandb",
        f"hydra.sweep.dir={sweep_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = [p.parent.parent for p in sweep_dir.glob("*/.hydra/overrides.yaml")]
    names = set()
    for job in jobs:
        (wandb_file,) = find_runs(job)
        run = read_run(wandb_file)
        names.add(run["name"])
        history = [h for h in run["history"] if "train/loss" in h]
        local = [r for r in read_jsonl(job / "metrics.jsonl") if "train/loss" in r]
        assert [h["train/rewards/accuracies"] for h in history] == [
            r["train/rewards/accuracies"] for r in local
        ]
        assert (
            run["summary"]["reward_accuracy"]
            == json.loads((job / "metrics.json").read_text())["reward_accuracy"]
        )
    assert names == {f"beta={b},r={r}" for b in ("0.1", "0.5") for r in (2, 4)}
    table = compare.compare([sweep_dir])
    assert {"eval_acc", "eval_margin", "acc", "margin"} <= set(table["text"].splitlines()[0].split())
    assert all(row["eval_reward_accuracy"] is not None for row in table["rows"])
