"""`python -m fine_tune.generate run=<run dir> [prompt="..."]`: talk to a trained adapter.

With `prompt=` it answers once and exits (scripts, smoke tests); with `prompts=<file>` it answers
every line of the file in batches of `batch_size` (one JSON line {prompt, completion} each); without
either, it opens a chat loop that keeps the conversation, so multi-turn behaviour can be tried.
Tokens stream as they are generated (one prompt at a time). Greedy by default, so the same prompt
gives the same answer as the samples logged during training (both go through fine_tune.generation).

  python -m fine_tune.generate run=outputs/train/2026-11-23_10-00-00 prompt="Convert 3 km to m."
  python -m fine_tune.generate run=<dir> prompts=questions.txt > answers.jsonl
  python -m fine_tune.generate run=<dir> checkpoint=latest          # a run that has not finished
  python -m fine_tune.generate run=<dir> temperature=0.7 max_new_tokens=512 system="Be brief."
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fine_tune.errors import UserError
from fine_tune.inference import LoadedRun, load_run, parse_args, run_main

ARGS: dict[str, Any] = {
    "run": None,  # the run directory
    "prompt": None,  # one prompt; none: interactive chat
    "prompts": None,  # a text file, one prompt per line: answered in batches, JSON lines out
    "batch_size": 8,  # prompts per generate call with prompts=
    "checkpoint": None,  # latest | <checkpoint dir>: use a checkpoint's adapter instead of adapter/
    "system": None,  # a system message before the conversation
    "max_new_tokens": 256,
    "temperature": 0.0,  # 0: greedy (reproducible)
    "top_p": 1.0,
    "show_prompt": False,  # print the rendered prompt (exactly what the model sees) first
    "stream": True,
    "decode": "auto",  # auto | dynamic | compiled (fine_tune.generation: compiled pays on long work)
}


def respond(loaded: LoadedRun, messages: list[dict[str, str]], args: dict[str, Any]) -> str:
    """One assistant turn for `messages`, rendered with the run's training template."""
    from transformers import TextStreamer

    from fine_tune.data import render_prompt
    from fine_tune.generation import generate_batch

    tokenizer = loaded.tokenizer
    ids = render_prompt(messages, tokenizer, loaded.template)
    if args["show_prompt"]:
        print(f"[prompt] {tokenizer.decode(ids)}", flush=True)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if args["stream"] else None
    text = generate_batch(loaded.model, tokenizer, [ids], streamer=streamer, **_decoding(args))[0]
    if not args["stream"]:
        print(text, flush=True)
    return text


def answer_file(loaded: LoadedRun, path: str, args: dict[str, Any]) -> None:
    """Every non-empty line of `path` as a user turn, `batch_size` prompts per generate call."""
    from fine_tune.data.templates import encode_prompts
    from fine_tune.generation import choose_decode, generate_batch

    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"no such file '{file}'", where="prompts", hint="a text file, one prompt per line")
    lines = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    size = int(args["batch_size"])
    if size < 1:
        raise UserError(f"must be >= 1, got {size}", where="batch_size")
    # the whole file's one-token steps decide whether compiling the step pays
    steps = -(-len(lines) // size) * int(args["max_new_tokens"])
    options = {**_decoding(args), "decode": choose_decode(args["decode"], loaded.model, steps)}
    for start in range(0, len(lines), size):
        batch = lines[start : start + size]
        prompts = [_with_system([{"role": "user", "content": text}], args["system"]) for text in batch]
        ids = encode_prompts(prompts, loaded.template, loaded.tokenizer)  # the run's resolved template
        for text, completion in zip(
            batch, generate_batch(loaded.model, loaded.tokenizer, ids, **options), strict=True
        ):
            print(json.dumps({"prompt": text, "completion": completion}, ensure_ascii=False), flush=True)


def _decoding(args: dict[str, Any]) -> dict[str, Any]:
    from fine_tune.generation import DECODE

    if args["decode"] not in DECODE:
        raise UserError(f"got {args['decode']!r}", where="decode", hint=f"one of {', '.join(DECODE)}")
    return {
        "max_new_tokens": int(args["max_new_tokens"]),
        "temperature": float(args["temperature"] or 0),
        "top_p": float(args["top_p"]),
        "decode": args["decode"],
    }


def chat(loaded: LoadedRun, args: dict[str, Any]) -> None:
    """A terminal conversation; /reset forgets the history, /exit or Ctrl-D leaves."""
    print(f"chatting with {loaded.adapter_dir} (template {loaded.template}); /reset, /exit", flush=True)
    history: list[dict[str, str]] = []
    while True:
        try:
            line = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            history.clear()
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        print("model> ", end="", flush=True)
        answer = respond(loaded, _with_system(history, args["system"]), args)
        history.append({"role": "assistant", "content": answer.strip()})


def _with_system(messages: list[dict[str, str]], system: str | None) -> list[dict[str, str]]:
    return ([{"role": "system", "content": str(system)}] if system else []) + messages


def main(argv: list[str]) -> None:
    args = parse_args(argv, ARGS)
    if args["prompt"] is not None and args["prompts"] is not None:
        raise UserError("prompt= and prompts= together", where="prompts", hint="give one of them")
    loaded = load_run(args["run"], args["checkpoint"])
    if args["prompts"] is not None:
        answer_file(loaded, args["prompts"], args)
    elif args["prompt"] is None:
        chat(loaded, args)
    else:
        respond(
            loaded, _with_system([{"role": "user", "content": str(args["prompt"])}], args["system"]), args
        )


if __name__ == "__main__":
    run_main(main)
