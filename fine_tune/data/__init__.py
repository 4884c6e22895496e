"""Data side of fine-tuning: formats, prompt templates, masking, packing, the data report.

Importing this package stays cheap (no torch/datasets/transformers) because configs, the CLI and
`--help` import it; the heavy libraries load inside the functions that need them.
"""

from fine_tune.data.build import DataBundle, build_data
from fine_tune.data.report import DataReport
from fine_tune.data.templates import render_prompt

__all__ = ["DataBundle", "DataReport", "build_data", "render_prompt"]
