"""Write src/tuneforge/resources/default_instructions.jsonl: the small instruction set the default
`tuneforge train` run uses. Deterministic (fixed seed), Alpaca format, varied tasks with short,
checkable answers so a held-out split can measure exact-match accuracy.

Run: python scripts/make_default_data.py
"""

import json
import random
from pathlib import Path

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "Canada": "Ottawa", "Australia": "Canberra", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Brazil": "Brasília", "Argentina": "Buenos Aires", "Norway": "Oslo", "Sweden": "Stockholm",
    "Finland": "Helsinki", "Poland": "Warsaw", "Greece": "Athens", "Turkey": "Ankara", "India": "New Delhi",
    "China": "Beijing", "Mexico": "Mexico City", "Peru": "Lima", "Chile": "Santiago", "Ireland": "Dublin",
    "Austria": "Vienna", "Hungary": "Budapest", "Denmark": "Copenhagen", "Thailand": "Bangkok",
    "Vietnam": "Hanoi", "Morocco": "Rabat",
}
ANTONYMS = {
    "hot": "cold", "tall": "short", "early": "late", "happy": "sad", "open": "closed", "light": "dark",
    "fast": "slow", "strong": "weak", "full": "empty", "rich": "poor", "young": "old", "loud": "quiet",
    "wet": "dry", "hard": "soft", "first": "last", "above": "below", "begin": "end", "accept": "refuse",
}
UNITS = [
    ("kilometres", "metres", 1000), ("metres", "centimetres", 100), ("kilograms", "grams", 1000),
    ("hours", "minutes", 60), ("minutes", "seconds", 60), ("litres", "millilitres", 1000),
    ("days", "hours", 24), ("weeks", "days", 7),
]
WORDS = [
    "garden", "planet", "silver", "window", "rocket", "puzzle", "forest", "candle", "bridge", "marble",
    "python", "lantern", "harbor", "velvet", "orange", "thunder", "meadow", "crystal", "falcon", "pepper",
]
NUMBER_WORDS = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
    "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen",
]
FACTS = [
    ("What gas do plants absorb from the air for photosynthesis?", "Carbon dioxide."),
    ("How many legs does a spider have?", "Eight."),
    ("What is the boiling point of water at sea level in degrees Celsius?", "100 degrees Celsius."),
    ("Which planet is known as the Red Planet?", "Mars."),
    ("What is the largest ocean on Earth?", "The Pacific Ocean."),
    ("How many continents are there?", "Seven."),
    ("What is the chemical symbol for gold?", "Au."),
    ("Who wrote 'Romeo and Juliet'?", "William Shakespeare."),
    ("What is the freezing point of water in degrees Fahrenheit?", "32 degrees Fahrenheit."),
    ("How many sides does a hexagon have?", "Six."),
    ("What is the hardest natural substance?", "Diamond."),
    ("Which organ pumps blood through the human body?", "The heart."),
]


def examples(rng: random.Random):
    for country, capital in CAPITALS.items():
        yield {"instruction": f"What is the capital of {country}?", "input": "",
               "output": f"The capital of {country} is {capital}."}
    for word, opposite in ANTONYMS.items():
        yield {"instruction": "Give the opposite of the word.", "input": word, "output": opposite}
    for _ in range(40):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        op = rng.choice(["+", "-", "*"])
        result = {"+": a + b, "-": a - b, "*": a * b}[op]
        yield {"instruction": "Compute the result.", "input": f"{a} {op} {b}", "output": str(result)}
    for big, small, factor in UNITS:
        for amount in rng.sample(range(2, 20), 2):
            yield {"instruction": f"Convert {amount} {big} to {small}.", "input": "",
                   "output": f"{amount} {big} is {amount * factor} {small}."}
    for word in WORDS:
        yield {"instruction": "Spell the word backwards.", "input": word, "output": word[::-1]}
    for word in rng.sample(WORDS, 12):
        letter = rng.choice(sorted(set(word)))
        yield {"instruction": f"How many times does the letter '{letter}' appear in the word?",
               "input": word, "output": str(word.count(letter))}
    for _ in range(20):
        numbers = rng.sample(range(1, 100), 5)
        yield {"instruction": "Sort the numbers from smallest to largest.",
               "input": ", ".join(map(str, numbers)), "output": ", ".join(map(str, sorted(numbers)))}
    for n in rng.sample(range(len(NUMBER_WORDS)), 16):
        yield {"instruction": "Write the number in words.", "input": str(n), "output": NUMBER_WORDS[n]}
    for question, answer in FACTS:
        yield {"instruction": question, "input": "", "output": answer}
    for _ in range(16):
        words = rng.sample(WORDS, 4)
        yield {"instruction": "Put the words in alphabetical order.", "input": " ".join(words),
               "output": " ".join(sorted(words))}


def main() -> None:
    rng = random.Random(20261122)
    rows = list(examples(rng))
    rng.shuffle(rows)
    out = Path(__file__).resolve().parents[1] / "src/tuneforge/resources/default_instructions.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} examples to {out}")


if __name__ == "__main__":
    main()
