"""Shared helpers for the data tests (imported explicitly: this is not an auto-loaded conftest).

The tokenizer is Mistral's real v1 tokenizer from mistral-common, so the tests exercise the ids the
models see, without the hub.
"""

from __future__ import annotations

import functools
from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures" / "data"
SHARED_DATA = Path(__file__).parents[1] / ".." / "shared" / "data"


@functools.cache
def mistral_v1_tokenizer():
    from fine_tune.models.tokenizer import mistral_common_tokenizer

    return mistral_common_tokenizer("mistral_v1")


@functools.cache
def mistral_v3_tokenizer():
    """v3 vocabulary (32768) where [INST]/[/INST] are control tokens."""
    from fine_tune.models.tokenizer import mistral_common_tokenizer

    return mistral_common_tokenizer("mistral_v3")


def saved_copy(tokenizer, path: Path):
    """The tokenizer after save_pretrained/from_pretrained: tokenizer.json only, no .model file."""
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(str(path))
    return AutoTokenizer.from_pretrained(str(path))
