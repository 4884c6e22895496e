"""Data side of fine-tuning: formats, prompt templates, masking, packing, the data report.

    bundle = build_data(cfg.dataset, tokenizer=tok, seed=42, cache_dir=dir)   # dataset.max_length, .packing
    bundle.train / bundle.eval / bundle.test   datasets.Dataset: input_ids, labels (-100 = not trained)
    bundle.collator                           padding collator, or padding-free packed one
    bundle.report.format()                    what was read, dropped, how long, how much is trained
    bundle.prompts, bundle.template           held-out prompts; render_prompt(msgs, tok, bundle.template)

    pairs = build_preference_data(cfg.dataset, tokenizer=tok, max_length=1024, seed=42, cache_dir=dir)
    pairs.train / pairs.eval / pairs.test      datasets.Dataset: prompt_ids, chosen_ids, rejected_ids
    pairs.kind == "preference", pairs.collator is None (TRL's preference collator pads these rows)

Importing this package stays cheap (no torch/datasets/transformers) because configs, the CLI and
`--help` import it; the heavy libraries load inside the functions that need them.
"""

from fine_tune.data.build import DataBundle, build_data
from fine_tune.data.preference import build_preference_data
from fine_tune.data.report import DataReport, PreferenceReport
from fine_tune.data.templates import render_prompt

__all__ = [
    "DataBundle",
    "DataReport",
    "PreferenceReport",
    "build_data",
    "build_preference_data",
    "render_prompt",
]
