"""Shared helpers for the data tests (imported explicitly: this is not an auto-loaded conftest).

The tokenizer is Mistral's real v1 tokenizer from mistral-common, so the tests exercise the ids the
models see, without the hub.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures" / "data"
# The workspace's public data, next to the repository (FINE_TUNE_SHARED_DATA for a checkout elsewhere).
SHARED_DATA = Path(
    os.environ.get("FINE_TUNE_SHARED_DATA", Path(__file__).parents[1] / ".." / "shared" / "data")
)


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


@functools.cache
def mistral_common(version: str, finetuning: bool = False):
    """mistral-common's tokenizer `version` (v1/v3/v7); `finetuning` accepts conversations that end
    with the assistant (the default validator wants a final user turn, a prompt)."""
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    base = getattr(MistralTokenizer, version)()
    if not finetuning:
        return base
    return MistralTokenizer(
        base.instruct_tokenizer,
        validator=type(base._chat_completion_request_validator)(ValidationMode.finetuning),
        request_normalizer=base._instruct_request_normalizer,
    )


def reference(version: str, conversation, final_user: str | None = None) -> list[int]:
    """Ids from mistral-common for (role, content) turns; a training conversation (ending with the
    assistant) in fine-tuning mode, or a prompt when `final_user` is given."""
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    messages = [kinds[role](content=content) for role, content in conversation]
    if final_user is not None:
        messages.append(UserMessage(content=final_user))
    tokenizer = mistral_common(version, finetuning=final_user is None)
    return tokenizer.encode_chat_completion(ChatCompletionRequest(messages=messages)).tokens


def tokenizer_for(version: str):
    from fine_tune.models.tokenizer import mistral_common_tokenizer

    return mistral_common_tokenizer(f"mistral_{version}")
