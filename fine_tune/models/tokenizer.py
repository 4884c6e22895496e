"""Tokenizers: the model's own from the hub or a local dir, or Mistral's real tokenizer shipped by the
`mistral-common` package, so tiny models train on real Mistral token ids with no hub access."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from fine_tune.errors import UserError
from fine_tune.utils.io import publish_dir

# Tokenizer files that mistral-common ships, by the name used in `model.tokenizer`.
MISTRAL_COMMON_TOKENIZERS = {
    "mistral_v1": "tokenizer.model.v1",  # Mistral-7B-v0.1 / Mixtral-8x7B vocabulary (32,000 pieces)
    "mistral_v3": "mistral_instruct_tokenizer_240323.model.v3",  # 32,768 pieces, [INST] as control tokens
    "mistral_v7": "mistral_instruct_tokenizer_241114.model.v7",  # v3 vocabulary + [SYSTEM_PROMPT] tokens
}


def cache_root() -> Path:
    """Where derived artefacts (converted tokenizers, materialised tiny models) are kept between runs."""
    return Path(os.environ.get("FINE_TUNE_CACHE", Path.home() / ".cache" / "fine_tune"))


def mistral_common_tokenizer(name: str) -> Any:
    """A SentencePiece model shipped by mistral-common as a fast HF tokenizer.

    Converting SentencePiece to `tokenizer.json` takes seconds, so the result is cached (written to a
    temporary directory, then renamed into place) and later runs load it in milliseconds.
    """
    import mistral_common
    from transformers import AutoTokenizer

    source = Path(mistral_common.__file__).parent / "data" / MISTRAL_COMMON_TOKENIZERS[name]
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
    target = cache_root() / "tokenizers" / f"{name}-{digest}"
    if not (target / "tokenizer.json").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
            work = Path(scratch)
            shutil.copy(source, work / "tokenizer.model")
            config = {
                "tokenizer_class": "LlamaTokenizer",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "add_bos_token": True,
                "add_eos_token": False,
                "legacy": False,
                "model_max_length": 32768,
            }
            (work / "tokenizer_config.json").write_text(json.dumps(config))
            converted = AutoTokenizer.from_pretrained(work)
        # replace=False: another process may win the race; its copy is identical
        publish_dir(target, converted.save_pretrained, replace=False)
    return AutoTokenizer.from_pretrained(target)


def build_tokenizer(spec: str | None, name_or_path: str | None, trust_remote_code: bool = False) -> Any:
    """Load the tokenizer named by `model.tokenizer`, else the one saved with the model."""
    if spec in MISTRAL_COMMON_TOKENIZERS:
        tokenizer = mistral_common_tokenizer(spec)
    else:
        source = spec or name_or_path
        if not source:
            raise UserError(
                "no tokenizer to load",
                where="model.tokenizer",
                hint=f"set it to one of {sorted(MISTRAL_COMMON_TOKENIZERS)} or a hub id / local directory",
            )
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as error:
            from fine_tune.models.hub import offline_note

            raise UserError(
                f"cannot load a tokenizer from '{source}' ({type(error).__name__}{offline_note(source)})",
                where="model.tokenizer" if spec else "model.name_or_path",
                hint="give a local directory holding tokenizer files, or a hub id with hub access "
                "(huggingface-cli login; HF_HUB_OFFLINE unset); without the hub, Mistral/Mixtral use "
                "model.tokenizer=mistral_v1 (and model.init=random for a dry run)",
            ) from None
    if tokenizer.pad_token is None:
        # Padding positions are masked out of the loss, so any id works; unk keeps EOS unambiguous.
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer
