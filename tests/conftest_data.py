"""Shared helpers for the data tests (imported explicitly: this is not an auto-loaded conftest).

The tokenizer is Mistral's real v1 tokenizer from mistral-common, so the tests exercise the ids the
models see, without the hub.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures" / "data"
SHARED_DATA = Path(__file__).parents[1] / ".." / "shared" / "data"


def _build(model_file: str):
    import mistral_common
    from transformers import AutoTokenizer

    data = os.path.join(os.path.dirname(mistral_common.__file__), "data")
    td = tempfile.mkdtemp(prefix="ft-tok-")
    shutil.copy(os.path.join(data, model_file), os.path.join(td, "tokenizer.model"))
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": False,
    }
    with open(os.path.join(td, "tokenizer_config.json"), "w") as handle:
        json.dump(config, handle)
    return AutoTokenizer.from_pretrained(td)


@functools.cache
def mistral_v1_tokenizer():
    try:
        from fine_tune.models.tokenizer import mistral_v1_tokenizer as core_builder
    except ImportError:
        return _build("tokenizer.model.v1")
    return core_builder()


@functools.cache
def mistral_v3_tokenizer():
    """v3 vocabulary (32768) where [INST]/[/INST] are control tokens."""
    return _build("mistral_instruct_tokenizer_240323.model.v3")


def saved_copy(tokenizer, path: Path):
    """The tokenizer after save_pretrained/from_pretrained: tokenizer.json only, no .model file."""
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(str(path))
    return AutoTokenizer.from_pretrained(str(path))
