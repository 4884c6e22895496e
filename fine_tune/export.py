"""`python -m fine_tune.export run=<run dir> [merge=true] [out=...] [push_to_hub=<repo>]`.

Two products, because they serve different users: the adapter alone (megabytes, PEFT format, needs
the base model) for people who already have the base, and a merged model (base + LoRA folded into
the weights, no PEFT needed) that plain `AutoModelForCausalLM.from_pretrained` loads, for serving.
A quantized base is merged into its unquantized weights (loaded in `dtype`): merging into 4-bit
weights would round the adapter away. Both get a model card that says what was trained on what,
with which settings, to which metrics. Outputs are written into a temporary sibling and renamed,
so an interrupted export never leaves a half model under the final name.

  python -m fine_tune.export run=outputs/train/2026-11-23_10-00-00                  # -> <run>/export/adapter
  python -m fine_tune.export run=<dir> merge=true dtype=bfloat16 out=/models/my-mistral
  python -m fine_tune.export run=<dir> push_to_hub=me/my-adapter   # needs HF_TOKEN or huggingface-cli login
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from fine_tune.errors import UserError
from fine_tune.inference import (
    adapter_dir_of,
    has_expert_adapter,
    load_config,
    load_run,
    parse_args,
    run_main,
)
from fine_tune.utils.format import format_metric
from fine_tune.utils.io import publish_dir

ARGS: dict[str, Any] = {
    "run": None,
    "merge": False,  # true: base + LoRA merged into one model; false: the adapter alone
    "out": None,  # default <run>/export/adapter or <run>/export/merged
    "checkpoint": None,  # latest | <checkpoint dir>: export a checkpoint's adapter
    "dtype": None,  # merged weights: bfloat16 | float16 | float32; default: the run's model.dtype
    "push_to_hub": None,  # a hub repo id, e.g. me/my-adapter
    "private": True,  # a new hub repo is private
}


def model_card(run_dir: Path, cfg: Any, merged: bool, template: str | None) -> str:
    """README.md for the hub: base model, data set, training config and final metrics (redacted)."""
    from omegaconf import OmegaConf

    from fine_tune.tracking.redact import redact
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
        f"- **Data set**: {data_source} (format {dataset.get('format')}, "
        f"{report.get('train_examples', '?')} train / {report.get('eval_examples', '?')} eval examples)",
        f"- **Prompt template**: {template or report.get('template') or dataset.get('template')}",
        f"- **LoRA**: r={cfg.lora.r}, alpha={cfg.lora.lora_alpha}, targets {targets}"
        + (", experts" if cfg.lora.get("experts") else ""),
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
        *(
            [
                "from transformers import AutoModelForCausalLM, AutoTokenizer",
                "model = AutoModelForCausalLM.from_pretrained('<this directory or repo>')",
                "tokenizer = AutoTokenizer.from_pretrained('<this directory or repo>')",
            ]
            if merged
            else [
                "from peft import PeftModel",
                "from transformers import AutoModelForCausalLM",
                f"base = AutoModelForCausalLM.from_pretrained('{model.get('name_or_path') or '<base>'}')",
                "model = PeftModel.from_pretrained(base, '<this directory or repo>')",
            ]
        ),
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


def export_adapter(run_dir: Path, cfg: Any, adapter: Path, out: Path) -> Path:
    from fine_tune.inference import template_of
    from fine_tune.run import build_tokenizer, quiet_libraries

    quiet_libraries()
    tokenizer = build_tokenizer(cfg)
    template = template_of(run_dir, cfg, tokenizer)

    def fill(tmp: Path) -> None:
        for path in adapter.iterdir():
            if path.is_file() and (path.name.startswith(("adapter_", "expert_adapter"))):
                shutil.copy2(path, tmp / path.name)
        tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(model_card(run_dir, cfg, merged=False, template=template))

    return publish_dir(out, fill)


def export_merged(run_dir: Path, checkpoint: str | None, dtype: str | None, out: Path) -> Path:
    from omegaconf import OmegaConf

    path, cfg = load_config(run_dir)
    if has_expert_adapter(adapter_dir_of(path, checkpoint)):
        raise UserError(
            "merging expert adapters into a full model is not supported",
            where="merge",
            hint="export the adapter alone (merge=false); serve it on the 4-bit base with fine_tune.generate",
        )
    unquantized = OmegaConf.create({"_target_": "fine_tune.models.quant.build_quant_config", "kind": "none"})
    loaded = load_run(run_dir, checkpoint, quant=unquantized, dtype=dtype)
    merged = loaded.model.merge_and_unload()
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
    run_dir, cfg = load_config(args["run"])
    merge = bool(args["merge"])
    if args["dtype"] not in (None, "auto", "bfloat16", "float16", "float32"):
        raise UserError(
            f"unknown dtype {args['dtype']!r}", where="dtype", hint="bfloat16, float16 or float32"
        )
    out = Path(str(args["out"])) if args["out"] else run_dir / "export" / ("merged" if merge else "adapter")
    if merge:
        export_merged(run_dir, args["checkpoint"], args["dtype"], out)
    else:
        export_adapter(run_dir, cfg, adapter_dir_of(run_dir, args["checkpoint"]), out)
    print(f"exported {'merged model' if merge else 'adapter'} to {out}", flush=True)
    if args["push_to_hub"]:
        url = push(out, str(args["push_to_hub"]), bool(args["private"]))
        print(f"pushed to {url}", flush=True)


if __name__ == "__main__":
    run_main(main)
