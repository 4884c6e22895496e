"""File readers (JSONL/JSON/CSV/Parquet, globs, dirs), the conf/dataset options, the preview, and the
promise that importing fine_tune.data stays light."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import CONF, FIXTURES, ROOT, SHARED_DATA, cli, compose

from fine_tune.data import build_data, render_prompt

IGNORE = -100
ROWS = [
    {"instruction": "Double it.", "input": "21", "output": "42"},
    {"instruction": "Name the capital of Chile.", "input": "", "output": "Santiago."},
]


def ids_of(bundle) -> list[list[int]]:
    return [r["input_ids"] for r in bundle.train]


def test_every_file_type_gives_the_same_rows(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    (tmp_path / "d.json").write_text(json.dumps(ROWS), encoding="utf-8")
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": ROWS}), encoding="utf-8")
    (tmp_path / "d.csv").write_text(
        "\ufeff"  # a BOM, as Excel writes it
        + 'instruction,input,output\nDouble it.,21,42\n"Name the capital of Chile.",,Santiago.\n',
        encoding="utf-8",
    )
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "d.parquet")
    results = {
        name: ids_of(build_data(format="alpaca", path=str(tmp_path / name), tokenizer=tok, max_length=64))
        for name in ("d.jsonl", "d.json", "wrapped.json", "d.csv", "d.parquet")
    }
    reference = results.pop("d.jsonl")
    assert len(reference) == 2
    for name, got in results.items():
        assert got == reference, name


def test_directory_glob_and_list_paths(tmp_path, tok):
    for i, row in enumerate(ROWS):
        (tmp_path / f"part{i}.jsonl").write_text(json.dumps(row) + "\n", encoding="utf-8")
    by_dir = build_data(format="alpaca", path=str(tmp_path), tokenizer=tok, max_length=64)
    by_glob = build_data(format="alpaca", path=str(tmp_path / "part*.jsonl"), tokenizer=tok, max_length=64)
    by_list = build_data(
        format="alpaca",
        path=[str(tmp_path / "part0.jsonl"), str(tmp_path / "part1.jsonl")],
        tokenizer=tok,
        max_length=64,
    )
    assert ids_of(by_dir) == ids_of(by_glob) == ids_of(by_list) and len(by_dir.train) == 2


def test_field_remapping(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"question": "Double it.\n\n21", "answer": "42"}) + "\n", encoding="utf-8")
    remapped = build_data(
        format="alpaca",
        path=str(path),
        fields={"instruction": "question", "output": "answer"},
        tokenizer=tok,
        max_length=64,
    )
    (tmp_path / "ref.jsonl").write_text(json.dumps(ROWS[0]) + "\n", encoding="utf-8")
    reference = build_data(format="alpaca", path=str(tmp_path / "ref.jsonl"), tokenizer=tok, max_length=64)
    assert ids_of(remapped) == ids_of(reference)


def test_system_prompt_goes_where_mistral_puts_it(tok):
    bundle = build_data(
        format="alpaca",
        path=str(FIXTURES / "alpaca.jsonl"),
        system_prompt="Be brief.",
        tokenizer=tok,
        max_length=128,
    )
    text = tok.decode(bundle.train[1]["input_ids"])
    assert text.startswith("<s> [INST] Be brief.\n\nWhat is the capital of Peru? [/INST]")
    chatml = render_prompt(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], tok, "chatml"
    )
    assert tok.decode(chatml).startswith("<s> <|im_start|>system\nBe brief.<|im_end|>")


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF / "dataset").glob("*.yaml")))
def test_every_dataset_option_composes_and_builds(option, tok, tmp_path):
    """Each conf/dataset/*.yaml, composed by Hydra and instantiated the way fine_tune.run does."""
    from hydra.utils import instantiate

    fixture = {
        "alpaca": "alpaca.jsonl",
        "local": "alpaca.jsonl",
        "dolly": "dolly.jsonl",
        "qa": "qa.csv",
        "law_title": "law_title.jsonl",
        "text": "text.jsonl",
        "chat": "chat.jsonl",
        "preference": "preference_chat.jsonl",
    }
    shared_files = {"shared_alpaca": "gsm8k_train.alpaca.json", "orca_dpo": "orca_dpo_pairs.jsonl"}
    overrides = [f"dataset={option}"]
    if option in fixture:
        overrides.append(f"dataset.path={FIXTURES / fixture[option]}")
    if option == "qa":
        overrides += ["dataset.fields.question=question", "dataset.fields.answer=answer"]
    if option in shared_files:
        shared = SHARED_DATA / shared_files[option]
        if not shared.is_file():
            pytest.skip("shared data not present")
        overrides += [f"dataset.path=[{shared}]", "dataset.max_samples=50", "dataset.max_eval_samples=5"]
    cfg = compose(overrides)
    text = (CONF / "dataset" / f"{option}.yaml").read_text()
    assert text.startswith("# ") and "python -m fine_tune" in text.split("_target_")[0]  # header with example
    bundle = instantiate(
        cfg.dataset, tokenizer=tok, max_length=512, packing=False, seed=1, cache_dir=None, _convert_="all"
    )
    assert len(bundle.train) > 0
    if bundle.kind == "preference":
        assert all(r["chosen_ids"] != r["rejected_ids"] for r in bundle.train)
    else:
        assert all(any(t != IGNORE for t in r["labels"]) for r in bundle.train)


def test_preview_marks_exactly_the_trained_tokens(tok):
    import io

    from fine_tune.data_preview import preview, render_example

    bundle = build_data(format="alpaca", path=str(FIXTURES / "alpaca.jsonl"), tokenizer=tok, max_length=64)
    row = bundle.train[1]
    assert (
        render_example(row, tok) == "<s> [INST] What is the capital of Peru? [/INST]« The capital of Peru is "
        "Lima.</s>»"
    )
    lines = render_example(row, tok, tokens=True).splitlines()
    assert [line.endswith("train") for line in lines] == [t != IGNORE for t in row["labels"]]
    out = io.StringIO()
    preview(bundle, tok, n=2, stream=out)
    assert out.getvalue().count("--- train[") == 2 and "rows read 6" in out.getvalue()


@pytest.mark.subprocess
def test_preview_cli_runs_with_hydra_overrides():
    data = f"dataset.path={FIXTURES / 'alpaca.jsonl'}"
    proc = cli(["dataset=alpaca", data, "--n", "1", "dataset.max_length=64"], module="fine_tune.data_preview")
    assert proc.returncode == 0, proc.stderr
    assert "«" in proc.stdout and "train[0]" in proc.stdout
    bad = cli(["dataset=alpaca", "dataset.path=/nope.jsonl"], module="fine_tune.data_preview", timeout=300)
    assert bad.returncode == 2 and "file not found" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.subprocess
def test_importing_fine_tune_data_stays_light():
    code = (
        "import sys, fine_tune.data; print(sorted(m for m in ('torch', 'datasets', 'transformers') if m in "
        "sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stderr


def test_preview_splits_packed_rows_into_their_examples(tok):
    from fine_tune.data_preview import render_example

    packed = build_data(
        format="alpaca", path=str(FIXTURES / "alpaca.jsonl"), tokenizer=tok, max_length=128, packing=True
    )
    row = packed.train[0]
    n_examples = row["position_ids"].count(0)
    text = render_example(row, tok)
    assert n_examples > 1 and text.count("[next packed example]") == n_examples - 1
    assert text.count("<s>") == n_examples and text.count("</s>»") == n_examples
