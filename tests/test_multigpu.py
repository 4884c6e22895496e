"""Several processes: trainer.strategy=ddp|fsdp, what FSDP refuses, the per-GPU memory plan, ranks
from torchrun or SLURM, and end-to-end runs on 2 CPU processes (gloo) that must equal one process
from fine_tune.adapters import ADAPTER_WEIGHTS
with the same global batch (docs/scaling.md). GPU throughput and memory: benchmarks/multi_gpu.sh."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from helpers import FAST, ROOT, checked, cli, compose, train_here

from fine_tune.adapters import ADAPTER_WEIGHTS
from fine_tune.errors import UserError

MISTRAL_7B = ["model=mistral_7b", "quant=nf4", "trainer=gpu", "model.name_or_path=null", "model.init=random"]


# ---- what the options compose to ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "layer"),
    [
        ("tiny_mistral", "MistralDecoderLayer"),
        ("tiny_mixtral", "MixtralDecoderLayer"),
        ("tiny_qwen2_moe", "Qwen2MoeDecoderLayer"),
    ],
)
def test_fsdp_shards_by_each_familys_decoder_layer(model: str, layer: str):
    import transformers

    from fine_tune.families import get_family
    from fine_tune.recipe import Recipe

    cfg = checked(["logger=none", f"model={model}", "trainer=fsdp"])
    family = get_family(cfg.model.family)
    model_class = getattr(transformers, family.config_class.replace("Config", "ForCausalLM"))
    assert family.decoder_layer == layer and model_class._no_split_modules == [layer]

    args = Recipe(cfg).arguments("/tmp/unused", has_eval=True)
    assert args.fsdp is True
    assert args.fsdp_config["version"] == 2
    assert args.fsdp_config["transformer_layer_cls_to_wrap"] == [layer]
    assert args.fsdp_config["state_dict_type"] == "FULL_STATE_DICT"
    # the Trainer's checkpointing: FSDP's own renames the layers' modules and PEFT saves no adapter
    assert args.fsdp_config["activation_checkpointing"] is False and args.activation_checkpointing is True
    plugin = args.fsdp_plugin_args  # what accelerate's FullyShardedDataParallelPlugin is built from
    assert plugin["fsdp_version"] == 2 and plugin["transformer_cls_names_to_wrap"] == layer
    assert plugin["reshard_after_forward"] is True and "cpu_offload" not in plugin


def test_fsdp_options_reach_the_plugin():
    from fine_tune.recipe import Recipe

    reshard, offload = "trainer.fsdp.reshard_after_forward=false", "trainer.fsdp.cpu_offload=true"
    cfg = checked(["logger=none", "trainer=fsdp", reshard, offload])
    plugin = Recipe(cfg).arguments("/tmp/unused", has_eval=True).fsdp_plugin_args
    assert plugin["reshard_after_forward"] is False and plugin["cpu_offload"] is True


@pytest.mark.parametrize("option", ["default", "ddp"])
def test_ddp_neither_searches_unused_parameters_nor_broadcasts_buffers(option: str):
    from fine_tune.recipe import Recipe

    args = Recipe(checked(["logger=none", f"trainer={option}"])).arguments("/tmp/unused", has_eval=True)
    assert not args.fsdp
    assert args.ddp_find_unused_parameters is False and args.ddp_broadcast_buffers is False


def test_trainer_fsdp_stores_4bit_weights_in_bf16():
    cfg = checked(["logger=none", "trainer=fsdp", "quant=nf4"])
    assert cfg.trainer.strategy == "fsdp" and cfg.quant.storage_dtype == "bfloat16"
    assert checked(["logger=none", "trainer=ddp"]).trainer.strategy == "ddp"


# ---- what FSDP refuses, at validation, in one line each ----------------------------------------


@pytest.fixture
def on_gpus_under_torchrun(monkeypatch):
    """Validation as it runs on rank 0 of `torchrun --nproc_per_node 2` on a GPU machine."""
    import fine_tune.validate

    monkeypatch.setattr(fine_tune.validate._LazyCuda, "present", True)
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)


@pytest.mark.parametrize(
    ("overrides", "where", "says"),
    [
        (["quant=int8"], "quant.kind", "int8"),
        (["model=tiny_mixtral", "quant=nf4"], "quant.quant_experts", "buffers"),
        (["quant=nf4", "quant.storage_dtype=uint8"], "quant.storage_dtype", "bfloat16"),
        (["quant=nf4", "quant.storage_dtype=float32"], "quant.storage_dtype", "bfloat16"),
        (["optim=paged_adamw_8bit"], "optim.optimizer._target_", "bitsandbytes"),
        (["optim=adamw_8bit"], "optim.optimizer._target_", "bitsandbytes"),
    ],
)
def test_fsdp_refuses_what_it_cannot_shard(overrides, where, says, on_gpus_under_torchrun):
    from fine_tune.validate import check_config

    with pytest.raises(UserError) as error:
        check_config(compose(["logger=none", "trainer=fsdp", *overrides]))
    assert error.value.where == where
    message, hint = str(error.value).split("\n")  # one line, and one line of what to do instead
    assert says in message or says in hint, str(error.value)
    assert "->" in hint


@pytest.mark.parametrize(
    "overrides",
    [
        ["quant=nf4"],  # QLoRA: 4-bit weights in bf16
        ["quant=none", "optim=adamw_torch_fused"],
        ["model=tiny_mixtral", "quant=nf4", "quant.quant_experts=false"],  # bf16 experts, sharded
        ["model=tiny_mixtral", "quant=none", "lora=attn_only"],
    ],
)
def test_fsdp_accepts_what_it_can_shard(overrides, on_gpus_under_torchrun):
    from fine_tune.validate import check_config

    check_config(compose(["logger=none", "trainer=fsdp", *overrides]))


def test_fsdp_on_cpu_or_without_a_launcher_is_refused_but_validate_only_notes_it(monkeypatch):
    import fine_tune.validate
    from fine_tune.validate import check_config

    with pytest.raises(UserError) as error:  # CPU processes: accelerate would train DDP instead
        check_config(compose(["logger=none", "trainer=fsdp"]))
    assert error.value.where == "trainer.strategy" and "GPUs only" in str(error.value)
    checked = check_config(compose(["logger=none", "trainer=fsdp", "validate=true"]))
    assert any("GPUs only" in note for note in checked.notes)

    monkeypatch.setattr(fine_tune.validate._LazyCuda, "present", True)
    with pytest.raises(UserError) as error:  # plain `python -m fine_tune`: no processes to shard over
        check_config(compose(["logger=none", "trainer=fsdp"]))
    assert "torchrun --nproc_per_node" in str(error.value)


def test_accelerates_fsdp_config_under_ddp_is_refused(monkeypatch):
    from fine_tune.validate import check_config

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(UserError) as error:
        check_config(compose(["logger=none"]))
    assert error.value.where == "trainer.strategy" and "trainer=fsdp" in str(error.value)


# ---- the memory plan, per GPU ------------------------------------------------------------------

# Mistral-7B, nf4 with double quantization, by hand: per layer q/o 4096x4096, k/v 4096x1024,
# gate/up/down 4096x14336 parameters; 4 bits each, plus one byte per 64-value block and 4 bytes per
# 256 blocks (+4) of the quantized constants.
Q_O = 16_777_216 // 2 + 262_144 + 4 * 1024 + 4
K_V = 4_194_304 // 2 + 65_536 + 4 * 256 + 4
MLP = 58_720_256 // 2 + 917_504 + 4 * 3584 + 4
LAYER_NF4 = 2 * Q_O + 2 * K_V + 3 * MLP  # 112,513,052 bytes
LORA = 32 * 16 * (2 * (4096 + 4096) + 2 * (4096 + 1024) + 3 * (4096 + 14336))  # r=16 on 7 projections
SMALL = 2 * 32000 * 4096 + (2 * 32 + 1) * 4096  # embeddings, lm_head, norms


def plan_items(monkeypatch, world: int, overrides: list[str]) -> tuple[dict, object]:
    from fine_tune.plan import plan_memory

    monkeypatch.setenv("WORLD_SIZE", str(world))
    plan = plan_memory(compose(MISTRAL_7B + overrides))
    return {what: size for what, size, _ in plan.items}, plan


def test_plan_ddp_is_a_whole_copy_per_gpu_plus_gradient_buckets(monkeypatch):
    one, _ = plan_items(monkeypatch, 1, ["trainer.strategy=ddp"])
    two, plan = plan_items(monkeypatch, 2, ["trainer.strategy=ddp"])
    assert one["quantized weights (nf4) + constants"] == two["quantized weights (nf4) + constants"]
    assert two["quantized weights (nf4) + constants"] == 32 * LAYER_NF4
    assert "DDP gradient buckets" not in one and two["DDP gradient buckets"] == 4 * LORA
    assert {k: v for k, v in two.items() if k != "DDP gradient buckets"} == one
    assert plan.world_size == 2 and "with 2 GPUs (ddp" in plan.format()


def test_plan_fsdp_divides_by_the_gpus_and_adds_the_gathered_layers(monkeypatch):
    items, plan = plan_items(monkeypatch, 4, ["trainer.strategy=fsdp"])
    assert items["quantized weights (nf4) + constants"] == 32 * LAYER_NF4 // 4
    assert items["non-quantized weights"] == 2 * SMALL // 4  # bf16: no k-bit fp32 upcast under FSDP
    assert items["LoRA parameters (fp32)"] == 4 * LORA // 4
    assert items["optimizer state"] == 8 * LORA // 4  # AdamW: two fp32 moments
    # the running layer and the prefetched next one, with their adapters in bf16, and lm_head
    assert items["weights gathered by FSDP"] == 2 * (LAYER_NF4 + 2 * LORA // 32) + 2 * 32000 * 4096
    assert plan.world_size == 4 and plan.strategy == "fsdp" and "with 4 GPUs (fsdp" in plan.format()

    kept, _ = plan_items(
        monkeypatch, 4, ["trainer.strategy=fsdp", "trainer.fsdp.reshard_after_forward=false"]
    )
    assert kept["weights gathered by FSDP"] == 32 * (LAYER_NF4 + 2 * LORA // 32) + 2 * 32000 * 4096


def test_plan_knows_fsdp_loads_the_whole_model_on_each_gpu_first(monkeypatch):
    from fine_tune.plan import check_fits, plan_memory

    monkeypatch.setenv("WORLD_SIZE", "2")
    mixtral = ["model=mixtral", "quant=nf4", "quant.quant_experts=false", "trainer=fsdp"]
    plan = plan_memory(compose(mixtral))  # bf16 experts: ~85 GiB before sharding
    assert plan.device_bytes() < 79 * 2**30 < plan.load_bytes
    with pytest.raises(UserError) as error:
        check_fits(plan, 79.2)
    assert error.value.where == "trainer.fsdp.load_on_cpu"
    check_fits(plan_memory(compose([*mixtral, "trainer.fsdp.load_on_cpu=true"])), 79.2)


# ---- ranks, world size, effective batch, one run dir, stops --------------------------------------

LAUNCH_VARIABLES = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "SLURM_PROCID",
    "SLURM_LOCALID",
    "SLURM_STEP_NUM_TASKS",
)


@pytest.fixture
def clean_launch_env(monkeypatch):
    """A copy of the environment for the test to change (adopt_slurm_tasks writes os.environ)."""
    monkeypatch.setattr(os, "environ", dict(os.environ))
    for name in (*LAUNCH_VARIABLES, "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE", "SLURM_JOB_ID"):
        os.environ.pop(name, None)
    return monkeypatch


def test_rank_and_world_come_from_torchrun_else_slurm(clean_launch_env):
    from fine_tune.hardware import launched, local_rank, rank, world_size

    assert (rank(), local_rank(), world_size(), launched()) == (0, 0, 1, False)
    for name, value in {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_TASKS": "8"}.items():
        clean_launch_env.setenv(name, value)
    assert (rank(), local_rank(), world_size(), launched()) == (5, 1, 8, True)
    for name, value in {"RANK": "2", "LOCAL_RANK": "0", "WORLD_SIZE": "4"}.items():  # torchrun in SLURM
        clean_launch_env.setenv(name, value)
    assert (rank(), local_rank(), world_size()) == (2, 0, 4)


def test_slurm_tasks_become_torch_ranks(clean_launch_env):
    from fine_tune.distributed import adopt_slurm_tasks

    env = {"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_TASKS": "4", "SLURM_JOB_ID": "12345"}
    for name, value in {**env, "SLURM_STEP_NUM_NODES": "2"}.items():
        clean_launch_env.setenv(name, value)
    clean_launch_env.setenv("MASTER_ADDR", "node-a")  # multi-node: the first node's, given or from submitit
    adopt_slurm_tasks()
    assert {k: os.environ[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")} == {
        "RANK": "3",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "4",
        "LOCAL_WORLD_SIZE": "2",
    }
    assert os.environ["MASTER_ADDR"] == "node-a" and os.environ["MASTER_PORT"] == str(20000 + 12345 % 40000)


def test_one_slurm_task_or_torchrun_is_left_alone(clean_launch_env):
    from fine_tune.distributed import adopt_slurm_tasks

    clean_launch_env.setenv("SLURM_PROCID", "0")
    clean_launch_env.setenv("SLURM_STEP_NUM_TASKS", "1")
    adopt_slurm_tasks()
    assert "RANK" not in os.environ and "MASTER_ADDR" not in os.environ


def test_effective_batch_counts_every_process(monkeypatch):
    from fine_tune.distributed import effective_batch
    from fine_tune.validate import planned_steps

    trainer = {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 3, "max_steps": -1}
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert effective_batch(trainer) == (12, "2 per device x 3 accumulation x 2 processes")
    assert planned_steps({**trainer, "num_train_epochs": 1}, 120) == (10, 1.0)


def test_single_process_helpers_need_no_process_group():
    from fine_tune.distributed import max_over_ranks, sharded_trainable_state, share_run_dir

    assert max_over_ranks(15) == 15 and share_run_dir("outputs/x") == "outputs/x"
    assert sharded_trainable_state(object()) is None


def run_ranks(tmp_path: Path, script: str, nproc: int = 2, timeout: int = 300):
    path = tmp_path / "ranks.py"
    path.write_text(script)
    args = ["--standalone", "--nproc_per_node", str(nproc), str(path)]
    return cli(args, cwd=tmp_path, env=pythonpath(), timeout=timeout, module="torch.distributed.run")


def pythonpath() -> dict:
    return {"PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}


@pytest.mark.subprocess
def test_a_signal_on_one_rank_stops_every_rank_at_the_same_step(tmp_path: Path):
    script = (
        "import signal, torch.distributed as dist\n"
        "from types import SimpleNamespace\n"
        "from fine_tune.training.preemption import PreemptionHandler\n"
        "dist.init_process_group('gloo')\n"
        "handler = PreemptionHandler()\n"
        "if dist.get_rank() == 1:\n"
        "    handler.signum = signal.SIGUSR2\n"
        "control = SimpleNamespace(should_save=False, should_training_stop=False)\n"
        "handler.on_step_end(None, SimpleNamespace(global_step=3), control)\n"
        "stopped = control.should_training_stop, control.should_save, int(handler.signum)\n"
        "print(f'rank {dist.get_rank()} ' + ' '.join(map(str, stopped)), flush=True)  # one write per rank\n"
        "dist.destroy_process_group()\n"
    )
    result = run_ranks(tmp_path, script)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        assert f"rank {rank} True True {int(__import__('signal').SIGUSR2)}" in result.stdout


# ---- FSDP2 on CPU processes: the composition, exactly --------------------------------------------

SHARDED_EQUALS_UNSHARDED = """
import json, sys, torch, torch.distributed as dist
from pathlib import Path
from types import SimpleNamespace
from helpers import checked
from accelerate.utils import FullyShardedDataParallelPlugin
from accelerate.utils.fsdp_utils import fsdp2_prepare_model
from safetensors.torch import load_file
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from fine_tune.adapters import ADAPTER_WEIGHTS, attach_adapter
from fine_tune.distributed import sharded_trainable_state
from fine_tune.families import get_family
from fine_tune.recipe import Recipe
from fine_tune.run import save_adapter
from fine_tune.utils.build import build

dist.init_process_group("gloo")
rank = dist.get_rank()
cfg = checked(sys.argv[1:])

def adapted():
    loaded = Recipe(cfg).base  # a fresh base each time
    torch.manual_seed(0)
    return attach_adapter(loaded.model, build(cfg.lora), True)

# what the Trainer hands accelerate: the SFTConfig's FSDP2 plugin, applied by accelerate's own code
plugin = FullyShardedDataParallelPlugin(**Recipe(cfg).arguments("unused", has_eval=False).fsdp_plugin_args)
accelerator = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin), mixed_precision="no",
                              is_main_process=rank == 0, device=torch.device("cpu"), parallelism_config=None)
model = adapted()
plugin.set_auto_wrap_policy(model)
model = fsdp2_prepare_model(accelerator, model)
layer_class = get_family(cfg.model.family).decoder_layer
layers = [m for m in model.modules() if type(m).__name__.endswith(layer_class)]
assert len(layers) == 2 and all(isinstance(m, FSDPModule) for m in layers), "a shard group per layer"
assert all(isinstance(p, DTensor) for p in model.parameters()), "every weight sharded"
assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}

def train(m):
    optimizer = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(3):  # both ranks take the same batch: the averaged gradient is the same gradient
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward(); optimizer.step(); optimizer.zero_grad()
        losses.append(loss.item())
    return losses

sharded_losses = train(model)
gathered = sharded_trainable_state(model)
if rank == 0:
    reference = adapted()
    reference_losses = train(reference)
    save_adapter(model, "sharded", Path("."), gathered)  # PEFT's files, from the gathered shards
    save_adapter(reference, "reference", Path("."))
    saved, expected = (load_file(f"{d}/{ADAPTER_WEIGHTS}") for d in ("sharded", "reference"))
    assert saved.keys() == expected.keys()
    assert len(saved) == sum(p.requires_grad for p in reference.parameters())
    diff = max((expected[k] - saved[k]).abs().max().item() for k in saved)
    print("RESULT", json.dumps({"sharded": sharded_losses, "reference": reference_losses, "diff": diff}))
else:
    assert gathered == {}
dist.destroy_process_group()
"""


@pytest.mark.subprocess
@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [
        # QLoRA as on GPUs: 4-bit weights stored (and computed) in bf16, sharded by decoder layer
        ["model=tiny_mistral", "quant=nf4", "quant.storage_dtype=bfloat16", "quant.compute_dtype=bfloat16"],
        # Mixtral with bf16 experts sharded, 4-bit attention
        [
            "model=tiny_mixtral",
            "quant=nf4",
            "quant.quant_experts=false",
            "quant.storage_dtype=bfloat16",
            "quant.compute_dtype=bfloat16",
        ],
    ],
    ids=["mistral_qlora", "mixtral_bf16_experts"],
)
def test_fsdp2_over_two_processes_trains_exactly_as_one(tmp_path: Path, overrides: list[str]):
    settings = [
        "trainer=cpu",
        "trainer.strategy=fsdp",
        "trainer.gradient_checkpointing=true",
        "lora.lora_dropout=0",
    ]
    result = run_ranks(
        tmp_path, SHARDED_EQUALS_UNSHARDED.replace("sys.argv[1:]", repr([*overrides, *settings]))
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("RESULT"))
    found = json.loads(line.removeprefix("RESULT"))
    assert found["sharded"] == pytest.approx(found["reference"], abs=1e-5)
    assert found["sharded"][-1] < found["sharded"][0] and found["diff"] < 1e-5


# ---- end to end: 2 gloo processes vs one, the same global batch ----------------------------------

# Four steps of the tiny Mistral in nf4 (fp32 on CPU), no dropout: the only difference between the
# runs is how the global batch of 4 is split over processes.
EQUAL = [
    *FAST,
    "trainer.max_steps=4",
    "trainer.logging_steps=1",
    "trainer.eval_steps=2",
    "trainer.save_steps=2",
    "lora.lora_dropout=0",
    "quant=nf4",
    "quant.compute_dtype=float32",
    "quant.storage_dtype=float32",
]
TOLERANCE = 1e-4  # relative, per logged loss: the same examples, summed in another order


def losses(run_dir: Path) -> list[tuple[int, str, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], key, r[key]) for r in rows for key in ("train/loss", "eval/loss") if key in r]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    """The reference: the same global batch in one process, trained in this one (`train_here`)."""
    run_dir = tmp_path_factory.mktemp("one") / "run"
    train_here(run_dir, [*EQUAL, "trainer.per_device_train_batch_size=4"])
    return run_dir


def two_processes(tmp_path: Path, entry: list[str], overrides: list[str]):
    """torchrun without FINE_TUNE_RUN_DIR, from an empty directory: rank 0 names the one run dir."""
    args = ["--standalone", "--nproc_per_node", "2", *entry, *EQUAL, "trainer.per_device_train_batch_size=2"]
    result = cli(
        [*args, *overrides], cwd=tmp_path, env=pythonpath(), timeout=600, module="torch.distributed.run"
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    runs = list((tmp_path / "outputs" / "train").iterdir())
    assert len(runs) == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["outputs"], runs
    assert output.count("run directory:") == 1 and output.count("final: train loss") == 1
    return runs[0], output


def assert_same_training(run_dir: Path, reference: Path) -> None:
    found, expected = losses(run_dir), losses(reference)
    assert [x[:2] for x in found] == [x[:2] for x in expected] and len(found) == 6
    for (step, key, value), (_, _, want) in zip(found, expected, strict=True):
        assert value == pytest.approx(want, rel=TOLERANCE), (step, key)
    metrics, single = (json.loads((d / "metrics.json").read_text()) for d in (run_dir, reference))
    assert metrics["tokens_seen"] == single["tokens_seen"] > 0  # every rank's share counted once
    assert (metrics["world_size"], single["world_size"]) == (2, 1)
    assert metrics["effective_batch"] == single["effective_batch"] == 4
    assert json.loads((run_dir / "status.json").read_text())["status"] == "finished"


@pytest.mark.subprocess
@pytest.mark.slow
def test_ddp_over_two_processes_trains_as_one_process_with_the_same_global_batch(tmp_path, one_process):
    run_dir, output = two_processes(tmp_path, ["-m", "fine_tune"], [])
    assert "effective batch 4 (2 per device x 1 accumulation x 2 processes, ddp)" in output
    assert_same_training(run_dir, one_process)


@pytest.mark.subprocess
@pytest.mark.slow
def test_fsdp_over_two_processes_trains_as_one_process_and_saves_the_whole_adapter(tmp_path, one_process):
    from safetensors.torch import load_file

    shim = [str(ROOT / "tests" / "fsdp_cpu_shim.py")]
    run_dir, output = two_processes(
        tmp_path, shim, ["trainer.strategy=fsdp", "trainer.gradient_checkpointing=true"]
    )
    assert "x 2 processes, fsdp)" in output
    assert_same_training(run_dir, one_process)
    checkpoint = run_dir / "checkpoints" / "checkpoint-4"
    assert (checkpoint / "pytorch_model_fsdp.bin").is_file()  # FSDP's resume files: not DDP in disguise
    adapter, expected = (
        load_file(d / ADAPTER_WEIGHTS) for d in (run_dir / "adapter", one_process / "adapter")
    )
    saved_at_step_4 = load_file(checkpoint / ADAPTER_WEIGHTS)
    assert adapter.keys() == expected.keys() == saved_at_step_4.keys()
    for key, value in adapter.items():
        assert value.shape == expected[key].shape and value.equal(saved_at_step_4[key])
        assert (value - expected[key]).abs().max() < 1e-3, key


@pytest.mark.subprocess
@pytest.mark.slow
def test_a_sweep_under_torchrun_writes_one_sweep_dir(tmp_path: Path):
    args = ["--standalone", "--nproc_per_node", "2", "-m", "fine_tune", "-m", "lora.r=4", *FAST]
    args += ["trainer.max_steps=2", "trainer.eval_steps=2", "trainer.save_steps=2"]
    # microseconds: the ranks' own `${now:}` always differ, so only sharing rank 0's dir gives one
    args += ["hydra.sweep.dir=multirun/train/${now:%Y-%m-%d_%H-%M-%S-%f}"]
    result = cli(args, cwd=tmp_path, env=pythonpath(), timeout=600, module="torch.distributed.run")
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    sweeps = list((tmp_path / "multirun" / "train").iterdir())
    assert len(sweeps) == 1, sweeps  # not one `${now:}` per rank
    (job,) = [d for d in sweeps[0].iterdir() if d.is_dir()]
    assert json.loads((job / "status.json").read_text())["status"] == "finished"
