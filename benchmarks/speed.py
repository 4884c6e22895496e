"""Training speed and memory of fine_tune against the tools users would otherwise pick, in ONE run.

    python benchmarks/speed.py --json $OUT/speed.json                      # every system, one GPU
    python benchmarks/speed.py --systems trl,fine_tune_nf4 --steps 12      # a subset
    python benchmarks/speed.py --tiny --systems plain,trl,fine_tune_nf4    # CPU dry run of the harness

Work (issue 10): Mistral-7B shape with random weights, nf4 + double quant, LoRA r=16 / alpha 32 on all
seven projections, the real data of ../shared/data (GSM8K + GPTeacher) in Mistral's [INST] format
with loss on completions only, rows of 2048 tokens, batch 4, gradient checkpointing, paged AdamW 8-bit,
bf16. Every system trains on the SAME token ids and completion masks (tokenized once by fine_tune's
data pipeline, token-exact with mistral-common) from the SAME random checkpoint, each in its own
process (so peak memory is its own):

  plain          the notebook recipe: transformers Trainer, padded batches of 4, reentrant
                 checkpointing, paged AdamW 32-bit (no packing)
  trl            TRL SFTTrainer: packing bfd (padding-free), sdpa, completion-only loss
  trl_liger      the same + use_liger_kernel=True
  unsloth        unsloth FastLanguageModel (its own env: UNSLOTH_SITE=<dir> is put first on the path;
                 it pins older transformers and TRL), LoRA dropout 0, its offloaded checkpointing.
                 The env that ran (pip install --no-deps --target <dir>): unsloth 2026.10.9 (its
                 studio/ web app dropped from the wheel: 28 -> 2 MB), unsloth_zoo 2026.10.9,
                 transformers 5.17.0, trl 1.15.0, datasets 4.3.0, torchao, cut_cross_entropy, tyro,
                 docstring-parser, typeguard, shtab, typer, structlog, json5, nest-asyncio, rich,
                 markdown-it-py, mdurl, pygments, shellingham, msgspec, einops, sentencepiece, certifi
  fine_tune_nf4  `python -m fine_tune` on the same checkpoint and data, nf4
  fine_tune_bf16 `python -m fine_tune` with quant=none (bf16 LoRA)
  fine_tune_mixtral  `python -m fine_tune` on Mixtral-8x7B's shape (random weights, built in 4-bit
                 layer by layer), nf4 experts, LoRA on attention and experts (lora=attn_experts).
  trl_mixtral    TRL's counterpart: a random bf16 Mixtral-8x7B checkpoint (87 GiB) written to host
                 memory (`--mixtral-dir`, /dev/shm: it does not fit the GPU machine's 64 GiB disk), loaded
                 as a TRL user does (`from_pretrained` with bitsandbytes nf4, which converts nn.Linear
                 only: the fused experts stay bf16, ~84 GiB), LoRA on attention and, through PEFT's
                 `target_parameters`, the experts; then SFTTrainer as `trl`. Expected: out of memory
                 on an 80 GB GPU while loading; the table records what happened

Steady tokens/s: non-padding tokens of the timed steps / their wall time (CUDA synchronised), after
`--warmup` steps. Peak: torch.cuda.max_memory_allocated. MFU = tokens/s x FLOPs per token / the GPU's
dense bf16 peak, both as fine_tune computes them (fine_tune/training/throughput.py: 4 x frozen weights
+ 6 x adapter weights per token; fine_tune/hardware.py: 989 TFLOP/s for an H100 SXM), for every system.

A system name may carry fine_tune overrides after '@', joined by '+':
  --systems fine_tune_nf4,fine_tune_nf4@trainer.checkpointing.offload=true
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SYSTEMS = ("plain", "trl", "trl_liger", "unsloth", "fine_tune_nf4", "fine_tune_bf16", "fine_tune_mixtral")
SYSTEMS += ("trl_mixtral",)
PROFILED = 2  # steps under the profiler (--profile), after the timed steps
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHARED = ROOT.parent / "shared" / "data"
DATA_FILES = ("gsm8k_train.alpaca.json", "gpteacher_roleplay.alpaca.json")
TINY = dict(
    hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)


# ---- preparation (our env) ----------------------------------------------------------------------
def data_files(data_dir: Path) -> list[Path]:
    """The shared files, or gzipped copies carried to a GPU machine (`--data-dir`)."""
    found = []
    for name in DATA_FILES:
        for candidate in (data_dir / name, data_dir / f"{name}.gz"):
            if candidate.exists():
                found.append(candidate)
                break
        else:
            raise SystemExit(f"missing {name} under {data_dir}")
    return found


def read_rows(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return json.load(handle)


def prepare(work: Path, args: argparse.Namespace) -> dict:
    """Tokenized examples (input_ids, completion_mask) and one random checkpoint, shared by all systems."""
    import torch
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    from fine_tune.models.tokenizer import mistral_common_tokenizer

    work.mkdir(parents=True, exist_ok=True)
    # A converted copy spares a GPU machine the mistral-common package (same files as it ships).
    if args.tokenizer:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        tokenizer = mistral_common_tokenizer("mistral_v1")
    examples_path = work / "examples.jsonl"
    alpaca = work / "alpaca.jsonl"
    rows = [row for path in data_files(Path(args.data_dir)) for row in read_rows(path)]
    with alpaca.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    bundle = build_bundle(alpaca, tokenizer, work)
    with examples_path.open("w", encoding="utf-8") as handle:
        for row in bundle.train:
            mask = [int(label != -100) for label in row["labels"]]
            handle.write(json.dumps({"input_ids": row["input_ids"], "completion_mask": mask}) + "\n")
    model_dir = work / "model"
    config = MistralConfig(**(TINY if args.tiny else {}), vocab_size=32000, max_position_embeddings=32768)
    if not (model_dir / "config.json").exists():
        device = "cuda" if torch.cuda.is_available() else "cpu"
        torch.manual_seed(0)
        with torch.device(device):
            model = MistralForCausalLM(config).to(torch.bfloat16)
        model.save_pretrained(model_dir, safe_serialization=True)
        del model
        if torch.cuda.is_available():  # the systems' processes get the whole GPU (28 GiB stayed cached)
            torch.cuda.empty_cache()
    tokenizer.save_pretrained(model_dir)
    return {
        "examples": str(examples_path),
        "alpaca": str(alpaca),
        "model_dir": str(model_dir),
        "flops_per_token": lora_flops_per_token(config),
    }


def lora_flops_per_token(config) -> float:
    """fine_tune's own formula (fine_tune/training/throughput.py), on the LoRA model every system trains."""
    import torch
    from peft import get_peft_model
    from transformers import MistralForCausalLM

    from fine_tune.training.throughput import model_flops_per_token

    with torch.device("meta"):
        model = get_peft_model(MistralForCausalLM(config), lora_config())
    return model_flops_per_token(model)


def build_bundle(alpaca: Path, tokenizer, work: Path):
    from fine_tune.data import build_data

    return build_data(
        {"format": "alpaca", "path": str(alpaca), "template": "mistral", "truncation": "error"},
        tokenizer=tokenizer,
        max_length=2048,
        packing=False,
        seed=0,
        cache_dir=work / "cache",
    )


# ---- the timed loop, shared by the HF-based systems -------------------------------------------------
class Timer:
    """Step wall times and non-padding tokens per step, for the steady-state figure."""

    def __init__(self, warmup: int, until: int) -> None:
        self.warmup, self.until = warmup, until
        self.pending: list[int] = []
        self.steps: list[tuple[float, int, int]] = []  # seconds, tokens, batches collated in the step
        self.shapes: list[str] = []  # the first batches' keys and shapes: what each system really fed
        self._start = 0.0

    def count(self, batch: dict) -> dict:
        if "attention_mask" in batch and batch["attention_mask"] is not None:
            tokens = int(batch["attention_mask"].sum())
        else:
            tokens = int(batch["input_ids"].numel())
        self.pending.append(tokens)
        if len(self.shapes) < 4:
            self.shapes.append(", ".join(f"{k}{tuple(getattr(v, 'shape', ()))}" for k, v in batch.items()))
        return batch

    def callback(self):
        import torch
        from transformers import TrainerCallback

        timer = self

        class _Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                timer._start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                tokens, batches = sum(timer.pending), len(timer.pending)
                timer.pending.clear()
                timer.steps.append((time.perf_counter() - timer._start, tokens, batches))

        return _Callback()

    def result(self) -> dict:
        timed = self.steps[self.warmup : self.until]
        seconds = sum(s for s, _, _ in timed)
        tokens = sum(t for _, t, _ in timed)
        return {
            "steady_tokens_per_s": tokens / seconds if seconds else None,
            "timed_steps": len(timed),
            "tokens_per_step": tokens / max(len(timed), 1),
            "batches_per_step": [b for _, _, b in self.steps],
            "first_batches": self.shapes,
            "step_seconds": [round(s, 3) for s, _, _ in self.steps],
        }


def counting(collator, timer: Timer):
    def collate(features):
        return timer.count(collator(features))

    return collate


def load_examples(path: str, limit: int) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        rows = [json.loads(line) for _, line in zip(range(limit), handle, strict=False)]
    return rows


def quantized_model(model_dir: str, tiny: bool):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    device = {"": 0} if torch.cuda.is_available() else "cpu"
    return AutoModelForCausalLM.from_pretrained(
        model_dir,
        quantization_config=quant,
        dtype=torch.bfloat16,
        device_map=device,
        attn_implementation="sdpa",
    )


def profiler(args: argparse.Namespace, name: str) -> list:
    """The profiling callback when `--profile DIR` asks for it (benchmarks/profiling.py)."""
    if not args.profile:
        return []
    from benchmarks.profiling import profile_callback

    return [profile_callback(Path(args.profile), name, start=args.timed, steps=PROFILED)]


def lora_config(dropout: float = 0.05, moe: bool = False):
    """Mistral: the seven projections. Mixtral: attention, and the fused 3-D experts through PEFT's
    `target_parameters` (the only way PEFT reaches them in transformers 5), which refuses dropout."""
    from peft import LoraConfig

    dropout = 0.0 if moe else dropout

    targets = TARGETS[:4] if moe else TARGETS
    experts = ["experts.gate_up_proj", "experts.down_proj"] if moe else None
    return LoraConfig(
        r=16, lora_alpha=32, lora_dropout=dropout, target_modules=targets, target_parameters=experts,
        task_type="CAUSAL_LM",
    )  # fmt: skip


def mixtral_checkpoint(prep: dict, args: argparse.Namespace) -> str:
    """A random bf16 checkpoint of Mixtral-8x7B's shape (transformers' default MixtralConfig), one
    safetensors shard per layer, drawn on the GPU; plus the benchmark's tokenizer. Written once."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM

    out = Path(args.mixtral_dir)
    if (out / "config.json").exists():
        return str(out)
    out.mkdir(parents=True, exist_ok=True)
    shape = dict(TINY, num_local_experts=4) if args.tiny else {}  # the defaults are 8x7B's
    config = MixtralConfig(**shape, max_position_embeddings=32768)
    with torch.device("meta"):
        shapes = {name: t.shape for name, t in MixtralForCausalLM(config).state_dict().items()}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator(device).manual_seed(0)
    shards: dict[str, dict[str, tuple]] = {}
    for name, shape in shapes.items():
        layer = name.split(".")[2] if name.startswith("model.layers.") else "rest"
        shards.setdefault(f"layer-{layer}.safetensors", {})[name] = shape
    index = {}
    for file, names in shards.items():
        tensors = {}
        for name, shape in names.items():
            drawn = torch.randn(shape, generator=generator, device=device, dtype=torch.bfloat16)
            tensors[name] = drawn.mul_(0.02).cpu()
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        index.update(dict.fromkeys(names, file))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    AutoTokenizer.from_pretrained(prep["model_dir"]).save_pretrained(out)
    config.save_pretrained(out)  # last: its presence says the checkpoint is whole
    return str(out)


def run_plain(prep: dict, args: argparse.Namespace, timer: Timer) -> None:
    """The notebook recipe: padded batches, reentrant checkpointing, paged AdamW 32-bit."""
    import torch
    from datasets import Dataset
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import Trainer, TrainingArguments

    model = prepare_model_for_kbit_training(quantized_model(prep["model_dir"], args.tiny))
    model = get_peft_model(model, lora_config())
    rows = load_examples(prep["examples"], args.batch * (args.steps + 1))

    def pad(features):
        longest = max(len(f["input_ids"]) for f in features)
        ids = torch.zeros(len(features), longest, dtype=torch.long)
        labels = torch.full((len(features), longest), -100, dtype=torch.long)
        mask = torch.zeros(len(features), longest, dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n] = torch.tensor(f["input_ids"])
            labels[i, :n] = torch.where(torch.tensor(f["completion_mask"]) == 1, ids[i, :n], -100)
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    training = TrainingArguments(
        output_dir=str(Path(args.work) / "plain"),
        per_device_train_batch_size=args.batch,
        max_steps=args.steps,
        gradient_checkpointing=True,
        optim="paged_adamw_32bit" if torch.cuda.is_available() else "adamw_torch",
        learning_rate=2e-4,
        bf16=torch.cuda.is_available(),
        logging_steps=1000,
        save_strategy="no",
        report_to="none",
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=training,
        train_dataset=Dataset.from_list(rows),
        data_collator=counting(pad, timer),
        callbacks=[timer.callback(), *profiler(args, "plain")],
    )
    trainer.train()


def run_trl(
    prep: dict, args: argparse.Namespace, timer: Timer, liger: bool, unsloth: bool = False, moe: bool = False
) -> None:
    """TRL's SFTTrainer on the pre-tokenized examples, packed bfd (padding-free)."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer

    if unsloth:
        from unsloth import FastLanguageModel  # must come before trl/transformers' trainer import

        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=prep["model_dir"],
            max_seq_length=args.max_length,
            load_in_4bit=True,
            dtype=torch.bfloat16,
        )
        model = FastLanguageModel.get_peft_model(
            model,
            r=16,
            lora_alpha=32,
            lora_dropout=0,
            target_modules=TARGETS,
            use_gradient_checkpointing="unsloth",
            random_state=0,
        )
    else:
        from peft import get_peft_model, prepare_model_for_kbit_training

        tokenizer = AutoTokenizer.from_pretrained(prep["model_dir"])
        model = prepare_model_for_kbit_training(
            quantized_model(prep["model_dir"], args.tiny),
            use_gradient_checkpointing=True,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
        model = get_peft_model(model, lora_config(moe=moe))
    from trl import SFTConfig, SFTTrainer

    rows = load_examples(prep["examples"], args.batch * 16 * (args.steps + 1))
    config = SFTConfig(
        output_dir=str(Path(args.work) / ("unsloth" if unsloth else "trl")),
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1,  # said: unsloth's default is 2 (one optimizer step per two batches)
        max_steps=args.steps,
        max_length=args.max_length,
        packing=True,
        gradient_checkpointing=not unsloth,  # unsloth set its own (offloaded) checkpointing above
        gradient_checkpointing_kwargs={"use_reentrant": False},
        optim="paged_adamw_8bit" if torch.cuda.is_available() else "adamw_torch",
        learning_rate=2e-4,
        bf16=torch.cuda.is_available(),
        use_liger_kernel=liger,
        logging_steps=1000,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataset_num_proc=1,
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[timer.callback(), *profiler(args, args.child)],
    )
    trainer.data_collator = counting(trainer.data_collator, timer)
    a = trainer.args  # as the trainer (and unsloth's patches) left them
    timer.shapes.append(
        f"args: batch {a.per_device_train_batch_size} x accumulation {a.gradient_accumulation_steps}"
        f", packing {getattr(a, 'packing', None)} {getattr(a, 'packing_strategy', '')}"
        f", padding_free {getattr(a, 'padding_free', None)}"
    )
    trainer.train()


# Mixtral-8x7B shape through the CLI: random weights built layer by layer in 4-bit (no checkpoint: it
# would not fit the GPU machine's disk in bf16), LoRA on attention and every expert, the same data.
MIXTRAL = ("model=mixtral_8x7b", "model.init=random", "lora=attn_experts")
MIXTRAL_TINY = ("model=tiny_mixtral", "lora=attn_experts")  # --tiny: the harness on a CPU


def run_fine_tune(prep: dict, args: argparse.Namespace, quant: str, mixtral: bool = False) -> dict:
    """The real CLI on the same checkpoint and data; steady figure from its own per-step log."""
    name = f"fine_tune_{'mixtral' if mixtral else quant}_{abs(hash(tuple(args.fine_tune_overrides)))}"
    run_dir = Path(args.work) / name
    shutil.rmtree(run_dir, ignore_errors=True)  # a warm machine keeps the work dir of an earlier call
    model = (
        [*(MIXTRAL_TINY if args.tiny else MIXTRAL), f"model.tokenizer={prep['model_dir']}"]
        if mixtral
        else [
            "model=local",
            f"model.name_or_path={prep['model_dir']}",
            f"lora.target_modules=[{','.join(TARGETS)}]",
        ]
    )
    overrides = [
        *model,
        f"quant={quant}",
        "lora.r=16",
        "lora.lora_alpha=32",
        "optim=paged_adamw_8bit" if not args.tiny else "optim=adamw_torch",
        "trainer=gpu" if not args.tiny else "trainer=cpu",
        f"trainer.max_steps={args.steps}",
        f"trainer.per_device_train_batch_size={args.batch}",
        "trainer.gradient_accumulation_steps=1",
        "trainer.logging_steps=1",
        "trainer.eval_steps=100000",
        "trainer.save_steps=100000",
        "trainer.gradient_checkpointing=true",
        "dataset=alpaca",
        f"dataset.path={prep['alpaca']}",
        "dataset.template=mistral",
        "dataset.val_ratio=0",
        f"dataset.max_samples={args.batch * 16 * (args.steps + 1)}",
        "logger=none",
        f"hydra.run.dir={run_dir}",
        *fine_tune_data_keys(args.max_length),
        *args.fine_tune_overrides,
    ]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    entry = ["-m", "fine_tune"]
    if args.profile:  # the same CLI run, with the profiler callback added to its trainer
        entry = [str(ROOT / "benchmarks" / "profiling.py")]
        name = args.child.replace("@", "__").replace("=", "-").replace("+", "_")[:80]
        env.update(PROFILE_OUT=args.profile, PROFILE_NAME=name, PROFILE_START=str(args.timed))
        env.update(PROFILE_STEPS=str(PROFILED))
    done = subprocess.run([sys.executable, *entry, *overrides], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"fine_tune exited {done.returncode}: {done.stderr[-3000:]}")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "perf/step_seconds" in r or "perf/tokens_per_second" in r]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {
        "steady_tokens_per_s": steady_from_log(steps, args.warmup, args.timed),
        "peak_gib": metrics.get("peak_memory_gib"),
        "metrics_json_tokens_per_second": metrics.get("tokens_per_second"),
        # the same data and seed in every fine_tune system: runs that differ only in how they compute
        # (fused_lora, attention kernel) must log the same losses, to a few bf16 roundings
        "losses": [round(r["train/loss"], 4) for r in rows if "train/loss" in r][:8],
        "log_tail": done.stderr[-600:],
    }


def fine_tune_data_keys(max_length: int) -> list[str]:
    """Where the data length and packing live in this version of the config (dataset or trainer)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config")
    group = "dataset" if "packing" in cfg.dataset else "trainer"
    return [f"{group}.max_length={max_length}", f"{group}.packing=true"]


def steady_from_log(rows: list[dict], warmup: int, until: int) -> float | None:
    """Per-step rows (logging_steps=1): tokens over time of the steps after the warm-up."""
    timed = [r for r in rows if warmup < r.get("step", 0) <= until and r.get("perf/tokens_per_second")]
    if not timed:
        return None
    if all("perf/step_seconds" in r and "perf/step_tokens" in r for r in timed):
        return sum(r["perf/step_tokens"] for r in timed) / sum(r["perf/step_seconds"] for r in timed)
    speeds = [r["perf/tokens_per_second"] for r in timed]
    return len(speeds) / sum(1 / s for s in speeds)  # equal tokens per step: harmonic mean


# ---- driver -------------------------------------------------------------------------------------
def child(args: argparse.Namespace) -> None:
    import torch

    prep = json.loads(Path(args.prep).read_text())
    args.timed = args.steps  # profiled steps come after the timed ones (the profiler slows them)
    args.steps += PROFILED + 1 if args.profile else 0  # +1: the last step's end-of-run work unprofiled
    timer = Timer(args.warmup, args.timed)
    started = time.perf_counter()
    if args.child == "plain":
        run_plain(prep, args, timer)
        result = timer.result()
    elif args.child in ("trl", "trl_liger", "unsloth"):
        run_trl(prep, args, timer, liger=args.child == "trl_liger", unsloth=args.child == "unsloth")
        result = timer.result()
    elif args.child == "trl_mixtral":
        run_trl({**prep, "model_dir": mixtral_checkpoint(prep, args)}, args, timer, liger=False, moe=True)
        result = timer.result()
    else:
        name, _, extra = args.child.partition("@")
        args.fine_tune_overrides = [*args.fine_tune_overrides, *filter(None, extra.split("+"))]
        quant = "none" if name == "fine_tune_bf16" else "nf4"
        result = run_fine_tune(prep, args, quant, mixtral=name == "fine_tune_mixtral")
    if torch.cuda.is_available() and "peak_gib" not in result:
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    result["wall_s"] = time.perf_counter() - started
    print("RESULT " + json.dumps(result))


def versions(env_extra: dict | None = None) -> str:
    code = (
        "import importlib.metadata as m\n"
        "for p in ('torch', 'transformers', 'trl', 'peft', 'bitsandbytes',\n"
        "          'liger-kernel', 'unsloth', 'accelerate'):\n"
        "    try: print(p, m.version(p))\n"
        "    except Exception: pass\n"
    )
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--steps", type=int, default=14)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--data-dir", default=str(SHARED))
    parser.add_argument("--work", default="/tmp/speed_work")
    parser.add_argument("--json", default=None)
    parser.add_argument("--tokenizer", default=None, help="saved mistral_v1 tokenizer dir")
    parser.add_argument("--tiny", action="store_true", help="tiny random model: check the harness on CPU")
    parser.add_argument(
        "--fine-tune-overrides", nargs="*", default=[], help="extra overrides for fine_tune runs"
    )
    parser.add_argument(
        "--mixtral-dir", default="/dev/shm/speed_mixtral", help="trl_mixtral's bf16 checkpoint (87 GiB)"
    )
    parser.add_argument("--profile", default=None, help="profile 2 steps after warm-up into DIR")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--prep", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    import torch

    work = Path(args.work)
    t0 = time.perf_counter()
    prep = prepare(work, args)
    (work / "prep.json").write_text(json.dumps(prep))
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    print(f"device: {gpu}; prepared in {time.perf_counter() - t0:.0f} s")
    print(versions())
    from fine_tune.hardware import peak_flops

    peak = peak_flops("bf16")
    results = {}
    for system in args.systems.split(","):
        env = dict(os.environ)
        if system == "unsloth":
            site = os.environ.get("UNSLOTH_SITE")
            if not site:
                results[system] = {"error": "UNSLOTH_SITE not set (unsloth needs its own env)"}
                continue
            env["PYTHONPATH"] = f"{site}{os.pathsep}{env.get('PYTHONPATH', '')}"
            env.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
        command = [
            sys.executable, __file__, "--child", system, "--prep", str(work / "prep.json"),
            "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch),
            "--max-length", str(args.max_length), "--work", str(work), "--mixtral-dir", args.mixtral_dir,
            *(["--tiny"] if args.tiny else []),
            *(["--profile", args.profile] if args.profile else []),
            *(["--fine-tune-overrides", *args.fine_tune_overrides] if args.fine_tune_overrides else []),
        ]  # fmt: skip
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            results[system] = {"error": (done.stderr or done.stdout)[-1500:]}
        else:
            results[system] = json.loads(line[len("RESULT ") :])
        speed = results[system].get("steady_tokens_per_s")
        if speed and peak:
            results[system]["mfu"] = speed * prep["flops_per_token"] / peak
        print(f"{system}: {json.dumps({k: v for k, v in results[system].items() if k != 'log_tail'})[:600]}")
    print_table(results, gpu)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": gpu, "results": results}, indent=2))


def print_table(results: dict, gpu: str) -> None:
    base = {k: (v.get("steady_tokens_per_s") or 0) for k, v in results.items()}
    ref = next((base[k] for k in ("unsloth", "trl_liger", "trl") if base.get(k)), None)
    print(f"\n| system ({gpu}) | steady tokens/s | peak GiB | MFU | vs best peer |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        speed, gib, mfu = r.get("steady_tokens_per_s"), r.get("peak_gib"), r.get("mfu")
        ratio = f"{speed / ref:.2f}x" if speed and ref else "-"
        if "error" in r:
            print(f"| {name} | error: {r['error'].splitlines()[-1][:80] if r['error'] else '?'} | | | |")
            continue
        print(
            f"| {name} | {speed:,.0f} | {gib:.2f} | {mfu * 100 if mfu else 0:.1f}% | {ratio} |"
            if speed and gib is not None
            else f"| {name} | {speed} | {gib} | {mfu} | {ratio} |"
        )


if __name__ == "__main__":
    main()
