"""Generates the shipped sample data set (fine_tune/resources/data/sample_instructions*.jsonl).

The sample exists so that `python -m fine_tune` runs out of the box and a tiny model visibly learns
something: every answer follows from the question by a rule (arithmetic, conversion, lookup, string
edits), in a consistent style, so the loss falls fast. Rerun to regenerate; output is deterministic.

    python -m fine_tune.data.make_sample
"""

from __future__ import annotations

import json
import random

CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Portugal": "Lisbon",
    "Japan": "Tokyo",
    "Canada": "Ottawa",
    "Australia": "Canberra",
    "Brazil": "Brasília",
    "Egypt": "Cairo",
    "Kenya": "Nairobi",
    "India": "New Delhi",
    "Mexico": "Mexico City",
    "Norway": "Oslo",
    "Sweden": "Stockholm",
    "Finland": "Helsinki",
    "Poland": "Warsaw",
    "Greece": "Athens",
    "Turkey": "Ankara",
    "Argentina": "Buenos Aires",
    "Chile": "Santiago",
    "Peru": "Lima",
    "Ireland": "Dublin",
    "Austria": "Vienna",
    "Hungary": "Budapest",
    "Vietnam": "Hanoi",
    "Thailand": "Bangkok",
    "South Korea": "Seoul",
    "Morocco": "Rabat",
    "Nigeria": "Abuja",
    "Ghana": "Accra",
    "Netherlands": "Amsterdam",
    "Belgium": "Brussels",
    "Denmark": "Copenhagen",
    "Switzerland": "Bern",
    "Czechia": "Prague",
    "Romania": "Bucharest",
    "New Zealand": "Wellington",
    "Colombia": "Bogotá",
    "Indonesia": "Jakarta",
}
DEFINITIONS = {
    "photosynthesis": "the process by which plants use sunlight, water and carbon dioxide to make sugar and "
    "release oxygen",
    "an isotope": "one of several forms of the same element whose atoms have different numbers of neutrons",
    "inflation": "a general rise in prices over time, which lowers what a unit of money can buy",
    "a prime number": "a whole number greater than 1 whose only divisors are 1 and itself",
    "an algorithm": "a finite list of precise steps that solves a problem or computes a result",
    "evaporation": "the change of a liquid into a gas at its surface, below its boiling point",
    "a metaphor": "a figure of speech that describes one thing as if it were another",
    "gravity": "the force by which masses attract each other",
    "a compiler": "a program that translates source code into a lower-level language a machine can run",
    "an ecosystem": "a community of living things together with the environment they interact with",
    "a democracy": "a system of government in which citizens choose their leaders by voting",
    "a vaccine": "a preparation that trains the immune system to recognise a germ without causing illness",
    "erosion": "the wearing away of rock or soil by water, wind or ice",
    "a hypothesis": "a testable explanation proposed before it has been confirmed by evidence",
    "a noun": "a word that names a person, place, thing or idea",
    "a verb": "a word that describes an action, state or occurrence",
    "a fraction": "a number that represents a part of a whole, written as one integer over another",
    "a perimeter": "the total length of the boundary of a two-dimensional shape",
    "friction": "the force that resists the sliding of one surface over another",
    "a cell": "the smallest unit of life that can function on its own",
    "a budget": "a plan that sets out expected income and spending for a period",
    "an atom": "the smallest unit of a chemical element, made of a nucleus and electrons",
    "latitude": "the angular distance of a place north or south of the equator",
    "a synonym": "a word that means the same or nearly the same as another word",
    "an antonym": "a word with the opposite meaning of another word",
    "a glacier": "a large, slowly moving mass of ice formed from compacted snow",
    "a database": "an organised collection of data that can be stored, searched and updated",
    "a recipe": "a set of instructions for preparing a dish, with ingredients and steps",
    "a volcano": "an opening in the Earth's crust through which molten rock, ash and gases escape",
    "an orbit": "the curved path of an object around a star, planet or moon",
}
# fmt: off
NAMES = ["Ana", "Ben", "Chloé", "Dev", "Elif", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kofi", "Lena",
         "Mateo", "Nia", "Omar", "Priya", "Quinn", "Rosa", "Sami", "Tara"]
ITEMS = ["apples", "pencils", "stickers", "marbles", "books", "cookies", "stamps", "seashells"]
WORDS = ["planet", "garden", "rocket", "window", "silver", "market", "pillow", "violin", "harbor",
         "lantern", "meadow", "puzzle", "candle", "bridge", "forest", "tunnel", "anchor", "basket",
         "copper", "dragon"]
# fmt: on


def _word_problem(rng: random.Random) -> dict[str, str]:
    name, plural = rng.choice(NAMES), rng.choice(ITEMS)
    kind = rng.randrange(4)
    a, b = rng.randint(3, 60), rng.randint(2, 30)
    if kind == 0:
        q = f"{name} has {a} {plural} and buys {b} more. How many {plural} does {name} have now?"
        ans = f"{name} starts with {a} {plural} and adds {b}: {a} + {b} = {a + b}. The answer is {a + b}."
    elif kind == 1:
        a = a + b
        q = f"{name} had {a} {plural} and gave away {b}. How many {plural} are left?"
        ans = f"{name} gives away {b} of {a}: {a} - {b} = {a - b}. The answer is {a - b}."
    elif kind == 2:
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        q = f"There are {a} boxes with {b} {plural} in each box. How many {plural} are there in total?"
        ans = f"{a} boxes of {b} {plural} each make {a} × {b} = {a * b}. The answer is {a * b}."
    else:
        b = rng.randint(2, 9)
        a = b * rng.randint(2, 12)
        q = f"{name} shares {a} {plural} equally among {b} friends. How many {plural} does each friend get?"
        ans = f"Dividing {a} {plural} among {b} friends gives {a} ÷ {b} = {a // b}. The answer is {a // b}."
    return {"instruction": "Solve the word problem and show your working.", "input": q, "output": ans}


CONVERSIONS = [  # (from, singular from, to, factor)
    ("kilometres", "kilometre", "metres", 1000),
    ("metres", "metre", "centimetres", 100),
    ("kilograms", "kilogram", "grams", 1000),
    ("hours", "hour", "minutes", 60),
    ("minutes", "minute", "seconds", 60),
    ("litres", "litre", "millilitres", 1000),
    ("days", "day", "hours", 24),
    ("feet", "foot", "inches", 12),
    ("yards", "yard", "feet", 3),
    ("weeks", "week", "days", 7),
]


def _conversion(rng: random.Random) -> dict[str, str]:
    src, one, dst, factor = rng.choice(CONVERSIONS)
    n = rng.randint(2, 40)
    if rng.random() < 0.5:
        return {
            "instruction": f"Convert {n} {src} to {dst}.",
            "input": "",
            "output": f"One {one} is {factor} {dst}, so {n} {src} = {n} × {factor} = {n * factor} {dst}.",
        }
    return {
        "instruction": f"Convert {n * factor} {dst} to {src}.",
        "input": "",
        "output": f"There are {factor} {dst} in one {one}, so {n * factor} {dst} = {n * factor} ÷ {factor}"
        f" = {n} {src}.",
    }


def _capital(country: str, capital: str, rng: random.Random) -> dict[str, str]:
    instruction, given, output = [
        (f"What is the capital of {country}?", "", f"The capital of {country} is {capital}."),
        ("Name the capital city of the country below.", country, f"The capital of {country} is {capital}."),
        (f"Which country has {capital} as its capital?", "", f"{capital} is the capital of {country}."),
    ][rng.randrange(3)]
    return {"instruction": instruction, "input": given, "output": output}


def _string_task(rng: random.Random) -> dict[str, str]:
    word = rng.choice(WORDS)
    kind = rng.randrange(5)
    if kind == 0:
        return {"instruction": "Reverse the letters of the word.", "input": word, "output": word[::-1]}
    if kind == 1:
        return {"instruction": "Write the word in capital letters.", "input": word, "output": word.upper()}
    if kind == 2:
        vowels = sum(ch in "aeiou" for ch in word)
        return {
            "instruction": "Count the vowels in the word.",
            "input": word,
            "output": f'The word "{word}" has {vowels} vowels: '
            + ", ".join(ch for ch in word if ch in "aeiou")
            + ".",
        }
    if kind == 3:
        words = rng.sample(WORDS, 4)
        return {
            "instruction": "Sort these words alphabetically.",
            "input": ", ".join(words),
            "output": ", ".join(sorted(words)),
        }
    return {
        "instruction": "How many letters does the word have?",
        "input": word,
        "output": f'The word "{word}" has {len(word)} letters.',
    }


def _definition(term: str, meaning: str, rng: random.Random) -> dict[str, str]:
    ask = rng.choice(["Define {t} in one sentence.", "What is {t}?", "Explain briefly what {t} is."])
    head = term[0].upper() + term[1:]
    return {"instruction": ask.format(t=term), "input": "", "output": f"{head} is {meaning}."}


def generate(seed: int = 7) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(train, validation): a seeded split with no exact duplicate prompts across (or within) them."""
    rng = random.Random(seed)
    rows: list[dict[str, str]] = []
    rows += [_word_problem(rng) for _ in range(130)]
    rows += [_conversion(rng) for _ in range(90)]
    for country, capital in CAPITALS.items():
        rows.append(_capital(country, capital, rng))
        rows.append(_capital(country, capital, rng))
    rows += [_string_task(rng) for _ in range(90)]
    for term, meaning in DEFINITIONS.items():
        rows.append(_definition(term, meaning, rng))
        rows.append(_definition(term, meaning, rng))
    unique: dict[str, dict[str, str]] = {}
    for row in rows:
        unique.setdefault(row["instruction"] + "\x00" + row["input"], row)
    rows = list(unique.values())
    rng.shuffle(rows)
    n_val = 40
    return rows[n_val:], rows[:n_val]


def main() -> None:
    from fine_tune.data.pipeline import SAMPLE_TRAIN, SAMPLE_VALIDATION
    from fine_tune.utils.io import atomic_write_text

    train, val = generate()
    for path, rows in ((SAMPLE_TRAIN, train), (SAMPLE_VALIDATION, val)):
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        print(f"{path}: {len(rows)} rows")


if __name__ == "__main__":
    main()
