"""`python -m fine_tune.export run=<run dir> [merge=true] [out=...] [push_to_hub=<repo>]`.

Two products, because they serve different users: the adapter alone (megabytes, PEFT format, needs
the base model) for people who already have the base, and a merged model (base + LoRA folded into
the weights, no PEFT needed) that plain `AutoModelForCausalLM.from_pretrained` loads, for serving.
The adapter is PEFT's format throughout, Mixtral's expert adapters included (`target_parameters`),
so plain PEFT loads all of it. A quantized base is merged in float, never into 4-bit weights (that
would round the adapter away): `base=original` loads the unquantized checkpoint in `dtype`,
`base=dequantized` dequantizes the run's 4-bit weights, the very weights the adapter was trained
and evaluated on (and the way to merge Mixtral-8x7B with its 4-bit base on one GPU). Both get a
model card that says what was trained on what, with which settings, to which metrics, and how to
load it. Outputs are written into a temporary sibling and renamed, so an interrupted export never
leaves a half model under the final name.

  python -m fine_tune.export run=outputs/train/2026-11-23_10-00-00                  # -> <run>/export/adapter
  python -m fine_tune.export run=<dir> merge=true dtype=bfloat16 out=/models/my-mistral
  python -m fine_tune.export run=<dir> merge=true base=dequantized out=/models/my-mixtral
  python -m fine_tune.export run=<dir> push_to_hub=me/my-adapter   # needs HF_TOKEN or huggingface-cli login
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fine_tune.errors import UserError
from fine_tune.inference import adapter_dir_of, load_config, load_run, parse_args, run_main
from fine_tune.utils.format import format_metric
from fine_tune.utils.io import publish_dir

RESIDUAL_NOTE = (
    " (trained on a residual base; saved as the equal plain LoRA of rank 2r on the original base, "
    "so it loads like any adapter)"
)
MERGED_USAGE = [
    "from transformers import AutoModelForCausalLM, AutoTokenizer",
    "model = AutoModelForCausalLM.from_pretrained('<this directory or repo>')",
    "tokenizer = AutoTokenizer.from_pretrained('<this directory or repo>')",
]
UNQUANTIZED = {"_target_": "fine_tune.models.quant.build_quant_config", "kind": "none"}  # quant node

ARGS: dict[str, Any] = {
    "run": None,
    "merge": False,  # true: base + LoRA merged into one model; false: the adapter alone
    "out": None,  # default <run>/export/adapter or <run>/export/merged
    "checkpoint": None,  # latest | <checkpoint dir>: export a checkpoint's adapter
    "dtype": None,  # merged weights: bfloat16 | float16 | float32; default: the run's model.dtype
    "base": "original",  # merge into: original (the unquantized checkpoint) | dequantized (the 4-bit run's)
    "push_to_hub": None,  # a hub repo id, e.g. me/my-adapter
    "private": True,  # a new hub repo is private
}


def model_card(
    run_dir: Path, cfg: Any, merged: bool, template: str | None, adapter: dict | None = None
) -> str:
    """README.md for the hub: base model, data set, training config, final metrics (redacted) and
    code that loads it; `adapter` ({config, numbers}) is what an adapter export holds."""
    from omegaconf import OmegaConf

    from fine_tune.adapters import changes_base, variant_name
    from fine_tune.tracking.redact import redact
    from fine_tune.training.methods import method_of
    from fine_tune.utils.io import read_json

    model = cfg.model
    base = (
        model.get("name_or_path") or f"random-init {model.family} (seed {cfg.seed}; model.architecture below)"
    )
    dataset = cfg.get("dataset") or {}
    data_source = dataset.get("hub_name") or dataset.get("path") or dataset.get("format")
    metrics = read_json(run_dir / "metrics.json") or {}
    report = read_json(run_dir / "data_report.json") or {}
    plain = redact(OmegaConf.to_container(cfg, resolve=False))
    config_yaml = OmegaConf.to_yaml(OmegaConf.create(plain))
    targets = plain["lora"].get("target_modules")
    front = ["---", "library_name: " + ("transformers" if merged else "peft"), "tags: [fine_tune, lora]"]
    if model.get("name_or_path"):
        front.append(f"base_model: {model.name_or_path}")
    front.append("---")
    lines = [
        *front,
        "",
        f"# {'Merged model' if merged else 'LoRA adapter'} fine-tuned with fine_tune",
        "",
        f"- **Base model**: {base}",
        f"- **Quantization during training**: {cfg.quant.kind}",
        f"- **Method**: {method_of(cfg.get('method')).describe()}"
        + (f", starting from the adapter of {cfg.init_adapter}" if cfg.get("init_adapter") else ""),
        f"- **Data set**: {data_source} (format {dataset.get('format')}, "
        f"{report.get('train_examples', '?')} train / {report.get('eval_examples', '?')} eval examples)",
        f"- **Prompt template**: {template or report.get('template') or dataset.get('template')}",
        f"- **LoRA**: r={cfg.lora.r}, alpha={cfg.lora.lora_alpha}, targets {targets}"
        + (", experts" if cfg.lora.get("experts") else "")
        + (f", {variant_name(cfg.lora)}" if variant_name(cfg.lora) else "")
        + (RESIDUAL_NOTE if changes_base(cfg.lora.get("init_lora_weights", True)) and not merged else ""),
        "",
        "## Final metrics",
        "",
        "| metric | value |",
        "|---|---|",
        *[f"| {k} | {format_metric(k, v)} |" for k, v in sorted(metrics.items())],
        "",
        "## Usage",
        "",
        "```python",
        *(MERGED_USAGE if merged else adapter_usage(model.get("name_or_path"), adapter or {})),
        "```",
        "",
        "Prompts must use the training template above (`python -m fine_tune.generate` applies it).",
        "",
        "## Training config",
        "",
        "```yaml",
        config_yaml.rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def adapter_usage(base: str | None, adapter: dict) -> list[str]:
    """Plain PEFT code that loads every trained number (experts too: PEFT's `target_parameters`)."""
    experts = (adapter.get("config") or {}).get("target_parameters")
    lines = ["import torch", "from peft import PeftModel", "from transformers import AutoModelForCausalLM"]
    if experts:
        lines += [
            "",
            f"# LoRA on the fused experts too ({', '.join(experts)}): PEFT adapts them on an",
            "# unquantized base (bf16 or fp32): load it without a quantization config.",
        ]
    lines += [
        f"base = AutoModelForCausalLM.from_pretrained('{base or '<base>'}', dtype=torch.bfloat16)",
        "model = PeftModel.from_pretrained(base, '<this directory or repo>')",
    ]
    if adapter.get("numbers"):
        lines.append(
            f"# all {adapter['numbers']:,} trained numbers load: "
            "sum(p.numel() for n, p in model.named_parameters() if 'lora_' in n)"
        )
    return lines


def export_adapter(run_dir: Path, cfg: Any, adapter: Path, out: Path) -> Path:
    """PEFT's two files (runs from before the expert format are converted), tokenizer, card."""
    from fine_tune.inference import recipe_of, template_of
    from fine_tune.models.moe import read_peft_adapter, write_peft_adapter
    from fine_tune.residual_init import INITIAL, to_plain_lora

    tokenizer = recipe_of(cfg).tokenizer
    template = template_of(run_dir, cfg, tokenizer)
    config, tensors = to_plain_lora(*read_peft_adapter(adapter), run_dir / INITIAL)  # PiSSA/OLoRA checkpoints
    numbers = sum(t.numel() for t in tensors.values())

    def fill(tmp: Path) -> None:
        write_peft_adapter(tmp, config, tensors)
        tokenizer.save_pretrained(tmp)
        card = model_card(run_dir, cfg, False, template, {"config": config, "numbers": numbers})
        (tmp / "README.md").write_text(card)

    return publish_dir(out, fill)


def export_merged(run_dir: Path, checkpoint: str | None, dtype: str | None, base: str, out: Path) -> Path:
    from omegaconf import OmegaConf

    path, cfg = load_config(run_dir)
    if base == "dequantized":
        if cfg.quant.kind not in ("nf4", "fp4"):
            raise UserError(
                f"base=dequantized needs a 4-bit run, this one trained with quant={cfg.quant.kind}",
                where="base",
                hint="use base=original (the default)",
            )
        loaded = load_run(run_dir, checkpoint, dtype=dtype, dequantize=True)
    else:
        loaded = load_run(run_dir, checkpoint, quant=OmegaConf.create(UNQUANTIZED), dtype=dtype)
    merged = loaded.model.merge_and_unload()  # PEFT folds attention and expert adapters alike
    merged.config.use_cache = True

    def fill(tmp: Path) -> None:
        merged.save_pretrained(tmp, safe_serialization=True)
        loaded.tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(model_card(path, cfg, merged=True, template=loaded.template))

    return publish_dir(out, fill)


def push(out: Path, repo: str, private: bool) -> str:
    """Upload `out` to the hub; the token comes only from HF_TOKEN or the hub's login file."""
    from huggingface_hub import HfApi, get_token

    token = get_token()
    if not token:
        raise UserError(
            "no Hugging Face token found",
            where="push_to_hub",
            hint="set HF_TOKEN or run `huggingface-cli login` (tokens are never read from configs)",
        )
    api = HfApi(token=token)
    try:
        api.create_repo(repo, private=private, exist_ok=True)
        info = api.upload_folder(folder_path=str(out), repo_id=repo, commit_message="fine_tune export")
    except Exception as error:  # noqa: BLE001 - network/auth problems are the user's to fix
        from fine_tune.tracking.redact import redact_text

        raise UserError(
            f"upload to '{repo}' failed: {redact_text(str(error).splitlines()[0][:200])}",
            where="push_to_hub",
        ) from None
    return str(getattr(info, "commit_url", repo))


def main(argv: list[str]) -> None:
    args = parse_args(argv, ARGS)
    if args["dtype"] not in (None, "auto", "bfloat16", "float16", "float32"):
        raise UserError(
            f"unknown dtype {args['dtype']!r}", where="dtype", hint="bfloat16, float16 or float32"
        )
    if args["base"] not in ("original", "dequantized"):
        raise UserError(f"unknown base {args['base']!r}", where="base", hint="original or dequantized")
    run_dir, cfg = load_config(args["run"])
    merge = bool(args["merge"])
    out = Path(str(args["out"])) if args["out"] else run_dir / "export" / ("merged" if merge else "adapter")
    if merge:
        export_merged(run_dir, args["checkpoint"], args["dtype"], args["base"], out)
    else:
        export_adapter(run_dir, cfg, adapter_dir_of(run_dir, args["checkpoint"]), out)
    print(f"exported {'merged model' if merge else 'adapter'} to {out}", flush=True)
    if args["push_to_hub"]:
        url = push(out, str(args["push_to_hub"]), bool(args["private"]))
        print(f"pushed to {url}", flush=True)


if __name__ == "__main__":
    run_main(main)
