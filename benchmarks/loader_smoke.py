"""The streaming 4-bit loader on CUDA: a tiny Mixtral saved with save_pretrained, loaded expert by expert,
equals quantizing the whole model in memory."""

import sys
import tempfile
from pathlib import Path

import torch
import transformers

from fine_tune.models.moe import load_pretrained_moe_4bit, quantize_fused_experts, replace_linear_with_4bit

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import tiny_mixtral_config  # noqa: E402

cfg = tiny_mixtral_config(hidden_size=256, intermediate_size=512)  # the tests' tiny Mixtral, 4x wider
torch.manual_seed(0)
m = transformers.MixtralForCausalLM(cfg).to(torch.bfloat16)
d = tempfile.mkdtemp()
m.save_pretrained(d)
torch.cuda.reset_peak_memory_stats()
loaded = load_pretrained_moe_4bit(d, "nf4", True, torch.bfloat16, device="cuda", dtype=torch.bfloat16)
print(
    "loader peak MiB",
    torch.cuda.max_memory_allocated() / 2**20,
    "held MiB",
    torch.cuda.memory_allocated() / 2**20,
)
m = m.cuda()
quantize_fused_experts(m, "nf4", True, torch.bfloat16)
replace_linear_with_4bit(m, "nf4", True, torch.bfloat16)
ids = torch.randint(0, 256, (2, 64), device="cuda")
with torch.no_grad():
    a, b = loaded(ids).logits, m.eval()(ids).logits
print("cuda loader vs quantized-in-memory max |diff|", (a - b).abs().max().item())
print(loaded.fine_tune_param_counts)
