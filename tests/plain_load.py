"""Load an export the way its users do, with transformers (+ PEFT) alone, never `fine_tune`.

    python tests/plain_load.py <model dir> <adapter dir or "-"> <inputs.pt> <logits.pt>

Loads the model in float32 (plus the PEFT adapter, if any), writes its logits on the saved inputs,
and prints one JSON line: how many adapter numbers PEFT holds, how many the file has, whether they
are the file's, the warnings raised while loading, and whether `fine_tune` was imported. Tests call
`in_plain_process`, which runs this file in a fresh interpreter.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM


def load(model_dir: str, adapter_dir: str | None) -> tuple[torch.nn.Module, dict]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    report = {"lora_names": sum("lora" in name for name, _ in model.named_parameters())}
    if adapter_dir is None:
        return model, report
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    model = PeftModel.from_pretrained(model, adapter_dir)
    held = get_peft_model_state_dict(model)
    saved = load_file(f"{adapter_dir}/adapter_model.safetensors")
    report.update(
        adapter_numbers=sum(p.numel() for name, p in model.named_parameters() if "lora_" in name),
        file_numbers=sum(t.numel() for t in saved.values()),
        same_keys=sorted(held) == sorted(saved),
        same_values=all(torch.equal(held[k], saved[k]) for k in saved if k in held),
    )
    return model, report


def main(model_dir: str, adapter_dir: str, inputs_path: str, logits_path: str) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, report = load(model_dir, None if adapter_dir == "-" else adapter_dir)
    inputs = torch.load(inputs_path)
    with torch.no_grad():
        torch.save(model.eval()(**inputs).logits.float(), logits_path)
    report["warnings"] = [str(w.message) for w in caught]
    report["fine_tune_imported"] = any(name.split(".")[0] == "fine_tune" for name in sys.modules)
    assert not report["fine_tune_imported"]
    print(json.dumps(report))


def in_plain_process(model_dir: Path, adapter_dir: Path | None, inputs: Path) -> tuple[dict, torch.Tensor]:
    """Load report and logits of `model_dir` (+ adapter) on the saved `inputs`, computed by this file
    in a process that never imports fine_tune."""
    out = inputs.with_name(f"logits-{model_dir.name}-{adapter_dir.name if adapter_dir else 'none'}.pt")
    args = [str(model_dir), str(adapter_dir or "-"), str(inputs), str(out)]
    result = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["fine_tune_imported"] is False
    return report, torch.load(out)


if __name__ == "__main__":
    main(*sys.argv[1:])
