"""Random-word documents of ~250 tokens for the end-to-end run: packed 8 to a 2048-token row."""

import json
import random
import sys

random.seed(0)
words = [
    "".join(random.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(random.randint(2, 9)))
    for _ in range(5000)
]
with open(sys.argv[1], "w") as f:
    for _ in range(2400):
        f.write(json.dumps({"text": " ".join(random.choice(words) for _ in range(70))}) + "\n")
