"""`python -m fine_tune.generate` answers through the training template, like the training samples.

The tool runs in this process (`run_tool`): what it answers is the claim here; the command line
itself is run by test_run_dir.py (a clean run) and test_bad_inputs.py (its errors)."""

from __future__ import annotations

import pytest
from helpers import read_jsonl, run_tool, tiny_run


@pytest.mark.subprocess
def test_generate_matches_the_sample_logged_at_the_last_eval():
    run = tiny_run()
    rows = [r for r in read_jsonl(run / "samples.jsonl") if r["step"] == 8]
    assert rows
    sample = rows[0]
    # The sample's prompt was rendered by the data pipeline; feed generate the user text only.
    instruction = sample["prompt"].split("[INST] ", 1)[1].rsplit(" [/INST]", 1)[0]
    output = run_tool(
        "fine_tune.generate",
        [f"run={run}", f"prompt={instruction}", "max_new_tokens=16", "show_prompt=true"],
    )
    lines = output.splitlines()
    assert lines[0] == f"[prompt] {sample['prompt']}"  # the same template, token for token
    assert sample["completion"].strip() and sample["completion"].strip() in output


@pytest.mark.subprocess
def test_chat_loop_reads_turns_until_eof():
    run = tiny_run()
    output = run_tool(
        "fine_tune.generate",
        [f"run={run}", "max_new_tokens=4", "show_prompt=true"],
        stdin="Hello there\nAnd again\n",
    )
    prompts = [line for line in output.splitlines() if "[prompt]" in line]
    assert len(prompts) == 2
    # The second turn carries the first one: the conversation is kept.
    assert "Hello there" in prompts[1] and "And again" in prompts[1] and prompts[1].count("[INST]") == 2
