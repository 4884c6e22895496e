"""Prompt formats, rendered straight to token ids with a per-token "trained" mask.

Two ways of rendering, because they have different sources of truth:

* `mistral` is defined by Mistral's reference tokenizer (mistral-common), which encodes each message
  on its own with sentencepiece. We do the same, segment by segment, with the same sentencepiece
  model when we can find it: the HF fast tokenizer converted from it splits runs of spaces
  differently ("a.  B"), and the model was trained on sentencepiece's splits.
* `chatml`, `qa` and the model's own `chat_template` are defined as strings. We render the whole
  string, tokenize it once and mark the tokens whose characters fall inside assistant turns, so the
  ids are exactly what the tokenizer gives for the full text (no seams between pieces).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fine_tune.data.formats import Example
from fine_tune.errors import UserError
from fine_tune.schema import TEMPLATES

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class Encoded:
    input_ids: list[int]
    trained: list[bool]


# ---- sentencepiece lookup: find the .model file matching the HF tokenizer, if any -----------------
_SP_CACHE: dict[str, Any] = {}


def _vocab_fingerprint(pieces: list[str]) -> str:
    return hashlib.sha256("\x00".join(pieces).encode("utf-8")).hexdigest()


def _hf_pieces(tokenizer) -> list[str]:
    vocab = tokenizer.get_vocab()
    pieces = [""] * len(vocab)
    for piece, idx in vocab.items():
        if 0 <= idx < len(pieces):
            pieces[idx] = piece
    return pieces


def _match_sentencepiece(tokenizer) -> tuple[Any | None, bool]:
    """(processor, is_mistral): the sentencepiece model whose vocabulary is exactly the tokenizer's.

    Looks at the tokenizer's own `vocab_file` first, then at the models bundled with mistral-common
    (v1/v2/v3/v7), which cover the Mistral/Mixtral checkpoints this project fine-tunes; a saved HF
    tokenizer (tokenizer.json only) loses its .model file, and this finds it again. `is_mistral` says
    the vocabulary is one of Mistral's.
    """
    try:
        import sentencepiece as spm
    except ImportError:  # pragma: no cover - a dependency of the project
        return None, False
    pieces = _hf_pieces(tokenizer)
    key = _vocab_fingerprint(pieces)
    if key in _SP_CACHE:
        return _SP_CACHE[key]
    candidates: list[tuple[Path, bool]] = []
    vocab_file = getattr(tokenizer, "vocab_file", None) or tokenizer.init_kwargs.get("vocab_file")
    if vocab_file and str(vocab_file).endswith(".model") and os.path.isfile(vocab_file):
        candidates.append((Path(vocab_file), False))
    try:
        import mistral_common

        data = Path(mistral_common.__file__).parent / "data"
        candidates += [(p, True) for p in sorted(data.glob("*.model.v*")) if "m1" not in p.suffix]
    except ImportError:  # pragma: no cover
        pass

    def same(path: Path) -> Any:
        sp = spm.SentencePieceProcessor(model_file=str(path))
        n = sp.get_piece_size()
        return sp if n == len(pieces) and all(sp.id_to_piece(i) == pieces[i] for i in range(n)) else None

    found = next(((sp, b) for path, b in candidates if (sp := same(path)) is not None), (None, False))
    if found[0] is not None and not found[1]:
        # the tokenizer's own .model file: is it one of Mistral's all the same?
        found = (found[0], any(b and same(path) is not None for path, b in candidates))
    _SP_CACHE[key] = found
    return found


def _usable_cores() -> int:
    """Cores this process may run on (a container's share, not the host's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS / Windows
        return os.cpu_count() or 1


class SegmentEncoder:
    """Encodes text segments the way mistral-common does (sentencepiece, dummy prefix, no BOS/EOS)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prefer_sentencepiece: bool = True) -> None:
        self.tokenizer = tokenizer
        self.sp = _match_sentencepiece(tokenizer)[0] if prefer_sentencepiece else None
        self.backend = "sentencepiece" if self.sp is not None else "hf"

    def encode_many(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        if self.sp is not None:
            return self.sp.encode(texts, num_threads=_usable_cores())
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]


# ---- template choice ------------------------------------------------------------------------------
def special_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int | None:
    """The id of `token` when the tokenizer has it as one (control) token."""
    idx = tokenizer.convert_tokens_to_ids(token)
    if idx is None or idx == tokenizer.unk_token_id:
        return None
    return int(idx)


def resolve_template(name: str | None, tokenizer: PreTrainedTokenizerBase, fmt_default: str = "auto") -> str:
    """The concrete template for `name` (auto: Mistral's format for Mistral tokenizers, else the
    tokenizer's chat_template when it has one, else Mistral's format)."""
    name = name or fmt_default
    if name not in TEMPLATES:
        raise UserError(
            f"unknown template {name!r}", where="dataset.template", hint=f"use one of {list(TEMPLATES)}"
        )
    if name == "auto":
        # A Mistral vocabulary gets Mistral's reference format even when the tokenizer carries a Jinja
        # chat_template: the template's string, tokenized whole by the HF tokenizer, differs from the
        # reference ids (e.g. "<s>[INST]" vs "<s>▁[INST]", runs of spaces). Other models get their own
        # chat_template; with neither, the [INST] format.
        if fmt_default != "auto":
            name = fmt_default
        elif _match_sentencepiece(tokenizer)[1] or not getattr(tokenizer, "chat_template", None):
            name = "mistral"
        else:
            name = "chat_template"
    if name == "chat_template" and not getattr(tokenizer, "chat_template", None):
        raise UserError(
            "the tokenizer has no chat_template",
            where="dataset.template",
            hint="use dataset.template=mistral (or chatml / qa)",
        )
    if name == "mistral":
        if special_id(tokenizer, "[SYSTEM_PROMPT]") is not None:
            name = "mistral_v7"
        elif special_id(tokenizer, "[INST]") is not None:
            name = "mistral_v3"
        else:
            name = "mistral_v1"
    if name in ("mistral_v3", "mistral_v7") and special_id(tokenizer, "[INST]") is None:
        raise UserError(
            f"template {name} needs [INST] as a control token, which this tokenizer lacks",
            where="dataset.template",
            hint="use dataset.template=mistral_v1 (or mistral to detect)",
        )
    return name


# ---- Mistral: segment plans, encoded in one batch per call ----------------------------------------
def merge_consecutive(messages: list[dict[str, str]], keep_system: bool = False) -> list[dict[str, str]]:
    """Join consecutive same-role messages with a blank line, as mistral-common's normalizer does."""
    out: list[dict[str, str]] = []
    for m in messages:
        if out and out[-1]["role"] == m["role"] and (m["role"] != "system" or not keep_system):
            out[-1] = {"role": m["role"], "content": out[-1]["content"] + "\n\n" + m["content"]}
        else:
            out.append({"role": m["role"], "content": m["content"]})
    return out


def _mistral_plan(messages: list[dict[str, str]], variant: str, tokenizer) -> list[tuple[str, Any, bool]]:
    """A list of (kind, payload, trained): kind "ids" (payload list[int]) or "text" (to encode).

    Mirrors mistral-common's InstructTokenizerV1/V3/V7: v1 puts the system prompt in the first user
    message and writes [INST] as text; v3 uses control tokens and puts it in the last user message
    (and strips trailing spaces of assistant turns); v7 is v3 with system messages encoded in place
    between [SYSTEM_PROMPT] control tokens.
    """
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    messages = merge_consecutive(messages, keep_system=variant == "mistral_v7")
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system") or None
    turns = [m for m in messages if m["role"] != "system"]
    user_idx = [i for i, m in enumerate(turns) if m["role"] == "user"]
    first_user, last_user = (user_idx[0], user_idx[-1]) if user_idx else (-1, -1)
    eos_ids = [eos] if eos is not None else []
    plan: list[tuple[str, Any, bool]] = [("ids", [bos] if bos is not None else [], False)]
    if variant == "mistral_v1":
        for i, m in enumerate(turns):
            if m["role"] == "user":
                content = f"{system}\n\n{m['content']}" if (system and i == first_user) else m["content"]
                plan.append(("text", f"[INST] {content} [/INST]", False))
            else:
                plan.append(("text", m["content"], True))
                plan.append(("ids", eos_ids, True))
        return plan
    inst, end_inst = special_id(tokenizer, "[INST]"), special_id(tokenizer, "[/INST]")
    v7 = variant == "mistral_v7"
    for i, m in enumerate(messages if v7 else turns):  # v7: system messages in place; v2/v3: none left
        if m["role"] == "system":
            start, end = special_id(tokenizer, "[SYSTEM_PROMPT]"), special_id(tokenizer, "[/SYSTEM_PROMPT]")
            plan += [("ids", [start], False), ("text", m["content"], False), ("ids", [end], False)]
        elif m["role"] == "user":
            in_last = system and not v7 and i == last_user
            content = f"{system}\n\n{m['content']}" if in_last else m["content"]
            plan += [("ids", [inst], False), ("text", content, False), ("ids", [end_inst], False)]
        else:
            plan += [("text", m["content"].rstrip(" "), True), ("ids", eos_ids, True)]
    return plan


def _encode_plans(plans: list[list[tuple[str, Any, bool]]], encoder: SegmentEncoder) -> list[Encoded]:
    texts = [payload for plan in plans for kind, payload, _ in plan if kind == "text"]
    encoded = iter(encoder.encode_many(texts))
    out = []
    for plan in plans:
        ids: list[int] = []
        trained: list[bool] = []
        for kind, payload, train in plan:
            piece = payload if kind == "ids" else next(encoded)
            ids.extend(piece)
            trained.extend([train] * len(piece))
        out.append(Encoded(ids, trained))
    return out


# ---- string templates: full text + trained character spans ----------------------------------------
def _string_render(
    messages: list[dict[str, str]], template: str, tokenizer, add_generation_prompt: bool = False
) -> tuple[str, list[tuple[int, int]]]:
    text = ""
    spans: list[tuple[int, int]] = []
    if template == "chat_template":
        return _chat_template_render(messages, tokenizer, add_generation_prompt)
    if template == "chatml":
        for m in messages:
            if m["role"] == "assistant":
                text += "<|im_start|>assistant\n"
                start = len(text)
                text += m["content"] + "<|im_end|>"
                spans.append((start, len(text)))
                text += "\n"
            else:
                text += f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
        if add_generation_prompt:
            text += "<|im_start|>assistant\n"
        return text, spans
    if template == "qa":
        for m in messages:
            if m["role"] == "system":
                text += m["content"] + "\n\n"
            elif m["role"] == "user":
                text += (
                    "\n" if text and not text.endswith("\n") else ""
                ) + f"### Question: {m['content']}\n### Answer:"
            else:
                start = len(text)
                text += " " + m["content"]
                spans.append((start, len(text)))
        return text, spans
    raise AssertionError(template)  # pragma: no cover


def _chat_template_render(messages, tokenizer, add_generation_prompt):
    """Locate assistant turns in a Jinja chat template's output, for completion-only masks.

    First by rendering growing prefixes (exact, includes whatever closes the turn, e.g. EOS); if the
    template does not render prefix by prefix (some move the system prompt into the last user turn),
    by finding each assistant text in order, plus the EOS text right after it.
    """

    def render(msgs, gen):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    full = render(messages, add_generation_prompt)
    spans = []
    try:
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = render(messages[:i], True)
            upto = render(messages[: i + 1], False)
            if not (full.startswith(upto) and upto.startswith(before)):
                raise ValueError("not prefix-consistent")
            spans.append((len(before), len(upto)))
        return full, spans
    except Exception:  # templates may also refuse prefixes (raise_exception on roles)
        spans = []
    pos = 0
    eos = tokenizer.eos_token or ""
    for m in messages:
        if m["role"] != "assistant":
            continue
        text = m["content"].strip()
        start = full.find(text, pos)
        if start < 0:
            raise UserError(
                "cannot find an assistant turn in the chat_template's output, so it cannot be trained on",
                where="dataset.template",
                hint="use dataset.template=mistral or chatml",
            )
        end = start + len(text)
        after = len(full[end:]) - len(full[end:].lstrip(" "))
        if eos and full.startswith(eos, end + after):
            end += after + len(eos)
        spans.append((start, end))
        pos = end
    return full, spans


def _encode_strings(
    items: list[tuple[str, list[tuple[int, int]]]], tokenizer, add_bos: bool
) -> list[Encoded]:
    if not items:
        return []
    texts = [t for t, _ in items]
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for (_, spans), ids, offsets in zip(items, enc["input_ids"], enc["offset_mapping"], strict=True):
        trained = [any(s < b and e > a for a, b in spans) for s, e in offsets]
        ids = list(ids)
        if add_bos and tokenizer.bos_token_id is not None and (not ids or ids[0] != tokenizer.bos_token_id):
            ids, trained = [tokenizer.bos_token_id, *ids], [False, *trained]
        out.append(Encoded(ids, trained))
    return out


# ---- public entry points --------------------------------------------------------------------------
def encode_examples(
    examples: list[Example],
    template: str,
    tokenizer: PreTrainedTokenizerBase,
    encoder: SegmentEncoder | None = None,
    prompt: bool = False,
) -> list[Encoded]:
    """Encode many examples in one batch per backend (the tokenizers are parallel inside); with
    `prompt`, each up to where the assistant's answer starts (`encode_prompts`)."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    # the final EOS is trained so that generation learns to stop
    tail = [eos] if eos is not None and not prompt else []
    if template == "none":
        texts = [
            ex.text if ex.text is not None else "\n\n".join(m["content"] for m in ex.messages)
            for ex in examples
        ]
        head = [bos] if bos is not None else []
        ids = (encoder or SegmentEncoder(tokenizer)).encode_many(texts)
        return [Encoded([*head, *x, *tail], [True] * (len(head) + len(x) + len(tail))) for x in ids]
    if template.startswith("mistral"):
        encoder = encoder or SegmentEncoder(tokenizer)
        return _encode_plans([_mistral_plan(ex.messages, template, tokenizer) for ex in examples], encoder)
    items = [
        _string_render(ex.messages, template, tokenizer, add_generation_prompt=prompt) for ex in examples
    ]
    out = _encode_strings(items, tokenizer, add_bos=template != "chat_template")
    for e in out if template != "chat_template" else ():
        e.input_ids += tail
        e.trained += [True] * len(tail)
    return out


def render_prompt(
    messages_or_text: str | list[dict[str, str]],
    tokenizer: PreTrainedTokenizerBase,
    template: str = "auto",
    encoder: SegmentEncoder | None = None,
) -> list[int]:
    """Prompt ids for generation, in exactly the format used for training (no answer, no EOS).

    A trailing assistant message is dropped, so a training conversation can be passed as is.
    """
    given = messages_or_text
    if isinstance(given, str):
        given = {"role": "user", "content": given}
    messages = [dict(m) for m in ([given] if isinstance(given, dict) else given)]
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return encode_prompts([messages], resolve_template(template, tokenizer), tokenizer, encoder)[0]


def encode_prompts(
    prompts: list[list[dict[str, str]]],
    template: str,
    tokenizer: PreTrainedTokenizerBase,
    encoder: SegmentEncoder | None = None,
) -> list[list[int]]:
    """Many prompts (conversations ending with the user) at once, each rendered up to where the
    assistant's answer starts; `template` is a resolved name (see `resolve_template`)."""
    examples = [Example("", messages) for messages in prompts]
    return [e.input_ids for e in encode_examples(examples, template, tokenizer, encoder, prompt=True)]


def template_fingerprint(
    template: str, tokenizer: PreTrainedTokenizerBase, encoder: SegmentEncoder | None
) -> str:
    """What the cache key needs to know about how text becomes ids."""
    parts = [
        template,
        getattr(tokenizer, "chat_template", None) or "",
        encoder.backend if encoder else "",
        _vocab_fingerprint(_hf_pieces(tokenizer)),
        str(tokenizer.bos_token_id),
        str(tokenizer.eos_token_id),
        type(tokenizer).__name__,
    ]
    return hashlib.sha256("\x01".join(parts).encode()).hexdigest()[:16]
