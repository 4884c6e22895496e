"""`python -m fine_tune.generate run=<run dir> [prompt="..."]`: talk to a trained adapter.

With `prompt=` it answers once and exits (scripts, smoke tests); without, it opens a chat loop that
keeps the conversation, so multi-turn behaviour can be tried. Tokens stream as they are generated.
Greedy by default, so the same prompt gives the same answer as the samples logged during training.

  python -m fine_tune.generate run=outputs/train/2026-11-23_10-00-00 prompt="Convert 3 km to m."
  python -m fine_tune.generate run=<dir> checkpoint=latest          # a run that has not finished
  python -m fine_tune.generate run=<dir> temperature=0.7 max_new_tokens=512 system="Be brief."
"""

from __future__ import annotations

from typing import Any

from fine_tune.inference import LoadedRun, load_run, parse_args, run_main

ARGS: dict[str, Any] = {
    "run": None,  # the run directory
    "prompt": None,  # one prompt; none: interactive chat
    "checkpoint": None,  # latest | <checkpoint dir>: use a checkpoint's adapter instead of adapter/
    "system": None,  # a system message before the conversation
    "max_new_tokens": 256,
    "temperature": 0.0,  # 0: greedy (reproducible)
    "top_p": 1.0,
    "show_prompt": False,  # print the rendered prompt (exactly what the model sees) first
    "stream": True,
}


def respond(loaded: LoadedRun, messages: list[dict[str, str]], args: dict[str, Any]) -> str:
    """One assistant turn for `messages`, rendered with the run's training template."""
    import torch
    from transformers import TextStreamer

    from fine_tune.data import render_prompt

    tokenizer = loaded.tokenizer
    ids = render_prompt(messages, tokenizer, loaded.template)
    if args["show_prompt"]:
        print(f"[prompt] {tokenizer.decode(ids)}", flush=True)
    device = next(loaded.model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    sampling = float(args["temperature"] or 0) > 0
    options: dict[str, Any] = {"do_sample": sampling}
    if sampling:
        options.update(temperature=float(args["temperature"]), top_p=float(args["top_p"]))
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if args["stream"] else None
    with torch.no_grad():
        output = loaded.model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=int(args["max_new_tokens"]),
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            streamer=streamer,
            **options,
        )
    text = tokenizer.decode(output[0, len(ids) :], skip_special_tokens=True)
    if not args["stream"]:
        print(text, flush=True)
    return text


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
    loaded = load_run(args["run"], args["checkpoint"])
    if args["prompt"] is None:
        chat(loaded, args)
    else:
        respond(
            loaded, _with_system([{"role": "user", "content": str(args["prompt"])}], args["system"]), args
        )


if __name__ == "__main__":
    run_main(main)
