"""`python -m fine_tune.data_preview [hydra overrides] [--n 3] [--split train|eval] [--tokens]`

Shows examples exactly as the model will see them, with the trained tokens marked (green on a
terminal, «between guillemets» otherwise), after the data report; a preference pair shows as its
two sequences, prompt + chosen and prompt + rejected, with the answer tokens marked. The point is
to catch a wrong template, a mask on the wrong tokens or a truncation problem before paying for a
run, as axolotl's `preprocess --debug` does. Takes the same overrides as `python -m fine_tune`;
loads no weights.

    python -m fine_tune.data_preview dataset=alpaca dataset.path=train.jsonl --n 5
    python -m fine_tune.data_preview dataset=chat dataset.path=c.jsonl dataset.template=chatml --tokens
    python -m fine_tune.data_preview dataset=orca_dpo dataset.max_length=1024 --n 1
    python -m fine_tune preview=true            # the same, from the main entry point
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from fine_tune.data.collate import IGNORE_INDEX

if TYPE_CHECKING:
    from omegaconf import DictConfig
    from transformers import PreTrainedTokenizerBase

    from fine_tune.data import DataBundle

GREEN, DIM, RESET = "\033[32m", "\033[2m", "\033[0m"


def _runs(labels: list[int]) -> list[tuple[int, int, bool]]:
    """Split positions into maximal runs of trained / not-trained tokens: (start, end, trained)."""
    out: list[tuple[int, int, bool]] = []
    start = 0
    for i in range(1, len(labels) + 1):
        if i == len(labels) or (labels[i] != IGNORE_INDEX) != (labels[start] != IGNORE_INDEX):
            out.append((start, i, labels[start] != IGNORE_INDEX))
            start = i
    return out


def render_example(
    row: dict[str, Any], tokenizer: PreTrainedTokenizerBase, color: bool = False, tokens: bool = False
) -> str:
    """One row as text with trained spans marked; `tokens=True` lists every token with id and label."""
    ids, labels = list(row["input_ids"]), list(row["labels"])
    positions = row.get("position_ids")
    if tokens:
        lines = []
        for i, (t, lab) in enumerate(zip(ids, labels, strict=True)):
            piece = tokenizer.convert_ids_to_tokens(t)
            mark = "train" if lab != IGNORE_INDEX else "-"
            boundary = "  <- new example" if positions is not None and positions[i] == 0 and i else ""
            line = f"{i:5d} {t:7d} {piece!r:24} {mark}{boundary}"
            lines.append(f"{GREEN}{line}{RESET}" if color and lab != IGNORE_INDEX else line)
        return "\n".join(lines)
    if positions is not None and list(positions).count(0) > 1:
        # a packed row: show each example on its own, as the model sees them (attention stops at starts)
        starts = [i for i, p in enumerate(positions) if p == 0] + [len(ids)]
        pieces = [
            render_example({"input_ids": ids[a:b], "labels": labels[a:b]}, tokenizer, color=color)
            for a, b in zip(starts, starts[1:], strict=False)
        ]
        return "\n[next packed example]\n".join(pieces)
    parts = []
    # Decoding a run on its own drops its leading space ("▁One" -> "One"); decode growing prefixes
    # and take the difference so the text shows exactly where the spaces are.
    decoded = [""]
    for a, b, trained in _runs(labels):
        upto = tokenizer.decode(ids[:b], skip_special_tokens=False)
        text = upto[len(decoded[-1]) :] if upto.startswith(decoded[-1]) else tokenizer.decode(ids[a:b])
        decoded.append(upto)
        if trained:
            parts.append(f"{GREEN}{text}{RESET}" if color else f"«{text}»")
        else:
            parts.append(f"{DIM}{text}{RESET}" if color else text)
    return "".join(parts)


def render_pair(
    row: dict[str, Any], tokenizer: PreTrainedTokenizerBase, color: bool = False, tokens: bool = False
) -> str:
    """A preference row as its two sequences (prompt + chosen, prompt + rejected), answers marked."""
    prompt = list(row["prompt_ids"])
    parts = []
    for name in ("chosen", "rejected"):
        answer = list(row[f"{name}_ids"])
        seq = {"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer}
        parts.append(f"[{name}]\n" + render_example(seq, tokenizer, color=color, tokens=tokens))
    return "\n".join(parts)


def _describe(row: dict[str, Any], kind: str) -> str:
    if kind == "preference":
        return " / ".join(f"{len(row[f'{c}_ids'])} {c}" for c in ("prompt", "chosen", "rejected")) + " tokens"
    n_trained = sum(1 for t in row["labels"] if t != IGNORE_INDEX)
    return f"{len(row['input_ids'])} tokens, {n_trained} trained"


def preview(
    bundle: DataBundle,
    tokenizer: PreTrainedTokenizerBase,
    n: int = 3,
    split: str = "train",
    color: bool | None = None,
    tokens: bool = False,
    stream: TextIO | None = None,
) -> None:
    """Print the data report and `n` rendered rows of `split`."""
    stream = stream or sys.stdout
    color = stream.isatty() if color is None else color
    print(bundle.report.format(), file=stream)
    data = bundle.train if split == "train" else bundle.eval
    if data is None:
        print(f"(no {split} set)", file=stream)
        return
    legend = f"{GREEN}green{RESET}" if color else "«marked»"
    marked = "answer tokens are" if bundle.kind == "preference" else "trained tokens are"
    print(f"\n{min(n, len(data))} {split} example(s); {marked} {legend}, the rest is -100:", file=stream)
    render = render_pair if bundle.kind == "preference" else render_example
    for i in range(min(n, len(data))):
        row = data[i]
        print(f"\n--- {split}[{i}]: {_describe(row, bundle.kind)} ---", file=stream)
        print(render(row, tokenizer, color=color, tokens=tokens), file=stream)
    if bundle.prompts:
        print("\ngeneration prompt (what the model gets at eval time):", file=stream)
        print(repr(bundle.prompts[0]["prompt_text"]), file=stream)


def bundle_from_config(cfg: DictConfig) -> tuple[PreTrainedTokenizerBase, DataBundle]:
    """Tokenizer and data from a composed run config, as the run builds them (no cache writes)."""
    from fine_tune.recipe import Recipe
    from fine_tune.schema import check_types

    check_types(cfg)
    recipe = Recipe(cfg, cache_data=False)
    return recipe.tokenizer, recipe.data


def preview_from_config(cfg: DictConfig, n: int = 3, split: str = "train", tokens: bool = False) -> None:
    """The `preview=true` mode of `python -m fine_tune`."""
    tokenizer, bundle = bundle_from_config(cfg)
    preview(bundle, tokenizer, n=n, split=split, tokens=tokens)


def main(argv: list[str] | None = None) -> int:
    from fine_tune.errors import EXIT_USER_ERROR, UserError, report

    parser = argparse.ArgumentParser(
        prog="python -m fine_tune.data_preview",
        description=__doc__.split("\n")[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for python -m fine_tune")
    parser.add_argument("--n", type=int, default=3, help="examples to show (default 3)")
    parser.add_argument("--split", choices=["train", "eval"], default="train")
    parser.add_argument("--tokens", action="store_true", help="one line per token: index, id, piece, label")
    parser.add_argument("--color", choices=["auto", "always", "never"], default="auto")
    args = parser.parse_intermixed_args(argv)
    try:
        from hydra import compose, initialize_config_dir

        conf = Path(__file__).resolve().parent / "conf"
        with initialize_config_dir(config_dir=str(conf), version_base="1.3", job_name="data_preview"):
            cfg = compose(config_name="config", overrides=args.overrides)
        tokenizer, bundle = bundle_from_config(cfg)
        color = {"auto": None, "always": True, "never": False}[args.color]
        preview(bundle, tokenizer, n=args.n, split=args.split, color=color, tokens=args.tokens)
    except UserError as error:
        report(error)
        return EXIT_USER_ERROR
    except Exception as error:  # Hydra's override/compose errors are the user's to fix
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException

        if isinstance(error, HydraException | OmegaConfBaseException):
            report(UserError(str(error).splitlines()[0], hint="check the overrides"))
            return EXIT_USER_ERROR
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
