"""Random-word rows in each issue-13 recipe's own data layout, long enough that every row fills the
recipe's max_length (the prompt half of it at most, so samples still have room): what a memory
measurement needs, with no hub access.
    python benchmarks/make_recipe_data.py /tmp/recipe_data      # -> /tmp/recipe_data/<recipe>.jsonl
"""

import json
import random
import sys
from pathlib import Path

# recipe -> (prompt columns, answer column, max_length); other columns of the layout are filled too
LAYOUTS = {
    "dolly_mistral_qlora": ({"instruction": 0.05, "context": 0.4}, "response", 1024, {"category": "open_qa"}),
    "law_title_mistral_instruct": ({"question_body": 0.45}, "question_title", 512, {}),
    "arxiv_mixtral_qlora": ({}, "article", 1200, {"abstract": "a short abstract ."}),
    "meta_review_mixtral": ({"Input": 0.45}, "Output", 4096, {}),
    "journal_qa_fsdp": ({"question": 0.1}, "long_answer", 1024, {"final_decision": "yes"}),
}
TOKENS_PER_WORD = 4  # random 2-9 letter words take about 3.6 Mistral (v1) tokens each

random.seed(0)
WORDS = [
    "".join(random.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(random.randint(2, 9)))
    for _ in range(5000)
]


def text(tokens: int) -> str:
    return " ".join(random.choice(WORDS) for _ in range(max(tokens // TOKENS_PER_WORD, 1)))


def main(out: Path, rows: int = 96) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for recipe, (prompt, answer, max_length, fixed) in LAYOUTS.items():
        with open(out / f"{recipe}.jsonl", "w") as f:
            for _ in range(rows):
                row = {column: text(int(share * max_length)) for column, share in prompt.items()}
                row[answer] = text(2 * max_length)  # longer than what is left: truncated to max_length
                f.write(json.dumps({**row, **fixed}) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
