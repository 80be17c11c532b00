"""Generated corpus slices: JSON records and arithmetic word problems with worked answers.

Everything here is produced from a seeded ``random.Random`` and small word lists written for this
project, so the slices are reproducible and carry no third-party licence.

* JSON records follow three schemas (:data:`SCHEMAS`): people, products and reviews (a review's
  text agrees with its 1-5 rating). Records are written compact or indented, sometimes after a
  one-line description, so the model sees JSON in several layouts.
* Word problems are ``Q: ... A: ... The answer is N.``: one or two arithmetic steps, each step
  written out, the last sentence always in that exact form (self-consistency parses it).
"""

from __future__ import annotations

import json
import random
from typing import Callable

FIRST = (
    "Alice Ben Carla David Elena Farid Grace Hugo Ines Jonas Keiko Liam Maya Noah Olga Pablo Quinn Rosa "
    "Samir Tara Umar Vera Wei Xenia Yusuf Zoe Amara Bruno Chloe Diego Emma Felix Greta Hana Ivan Julia "
    "Kofi Lena Marco Nina Oscar Priya Rafael Sofia Tomas Uma Victor Wanda Yara Tom Anna Sam Max Lucy Omar Mia Leo"
).split()
LAST = (
    "Smith Garcia Chen Okafor Novak Rossi Kim Silva Jensen Patel Dubois Haddad Tanaka Murphy Kowalski "
    "Nguyen Schmidt Costa Ivanova Moreau Lindqvist Mensah Alvarez Becker Sato Walsh Fischer Ortiz Park Reyes"
).split()
CITIES = (
    "Lisbon Nairobi Osaka Toronto Lyon Krakow Austin Melbourne Bergen Quito Porto Seoul Dublin Accra Leeds "
    "Denver Turin Gdansk Hanoi Tampere"
).split()
JOBS = (
    "teacher nurse engineer baker carpenter pilot librarian chemist farmer designer plumber editor "
    "architect electrician translator gardener"
).split()
SKILLS = "cooking welding python drawing singing chess statistics sailing pottery accounting spanish juggling".split()
ADJ = "Compact Classic Solar Quiet Rugged Smart Bright Folding Wireless Ceramic Vintage Steel".split()
NOUNS = "Lamp Kettle Backpack Speaker Blender Tent Notebook Bicycle Heater Umbrella Teapot Drone Clock Fan".split()
CATEGORIES = ("kitchen", "outdoors", "electronics", "office", "home", "travel")
TAGS = ("new", "sale", "eco", "bestseller", "gift", "limited", "refurbished")
DOMAINS = ("example.com", "mail.test", "post.example.org")

POSITIVE = (
    "Works great and feels solid.", "I love it, the best purchase this year.", "Excellent quality, very happy.",
    "Beautiful design and easy to use.", "Fantastic value, highly recommended.", "Perfect for my needs, works well.",
    "Great product, friendly support and fast delivery.", "Wonderful, my whole family enjoys it.",
)
MIXED = (
    "It is okay, nothing special.", "Does the job, but the manual is confusing.", "Decent for the price.",
    "Average quality, shipping was slow.", "Fine overall, a bit noisy.",
)
NEGATIVE = (
    "Broke after two days, very disappointed.", "Terrible quality, a waste of money.", "It stopped working, awful.",
    "Poor design and bad support. I hate it.", "Cheap and flimsy, I regret buying it.", "The worst product I have owned.",
    "Useless, it failed on the first use.",
)
TITLES = {
    5: ("Love it", "Excellent", "Best buy ever", "Wonderful"),
    4: ("Very good", "Great value", "Happy with it"),
    3: ("It is fine", "Average", "Okay"),
    2: ("Disappointing", "Not great", "Poor"),
    1: ("Terrible", "Awful", "Do not buy"),
}

# Field names and value kinds of each schema (the JSON-schema constraint demos rely on these).
SCHEMAS: dict[str, dict[str, str]] = {
    "person": {"name": "string", "age": "integer", "email": "string", "city": "string",
               "occupation": "string", "skills": "array of strings"},
    "product": {"id": "string", "name": "string", "price": "number", "category": "string",
                "in_stock": "boolean", "tags": "array of strings"},
    "review": {"product": "string", "rating": "integer 1-5", "title": "string", "text": "string",
               "reviewer": "string", "verified": "boolean"},
}


def _person(r: random.Random) -> dict:
    first, last = r.choice(FIRST), r.choice(LAST)
    return {
        "name": f"{first} {last}",
        "age": r.randint(18, 90),
        "email": f"{first.lower()}.{last.lower()}@{r.choice(DOMAINS)}",
        "city": r.choice(CITIES),
        "occupation": r.choice(JOBS),
        "skills": r.sample(SKILLS, r.randint(1, 3)),
    }


def _product(r: random.Random) -> dict:
    return {
        "id": f"P-{r.randint(1000, 9999)}",
        "name": f"{r.choice(ADJ)} {r.choice(NOUNS)}",
        "price": round(r.uniform(2, 400), 2),
        "category": r.choice(CATEGORIES),
        "in_stock": r.random() < 0.7,
        "tags": r.sample(TAGS, r.randint(0, 3)),
    }


def review_text(r: random.Random, rating: int) -> str:
    """One or two sentences whose sentiment agrees with ``rating`` (1-5)."""
    pool = POSITIVE if rating >= 4 else NEGATIVE if rating <= 2 else MIXED
    sents = r.sample(pool, 2 if r.random() < 0.4 else 1)
    return " ".join(sents)


def _review(r: random.Random) -> dict:
    rating = r.choice((1, 2, 3, 4, 5, 5, 4, 1))
    return {
        "product": f"{r.choice(ADJ)} {r.choice(NOUNS)}",
        "rating": rating,
        "title": r.choice(TITLES[rating]),
        "text": review_text(r, rating),
        "reviewer": r.choice(FIRST),
        "verified": r.random() < 0.8,
    }


_MAKERS: dict[str, Callable[[random.Random], dict]] = {"person": _person, "product": _product, "review": _review}
_INTROS = {
    "person": ("A person record in JSON:", "Person:", "JSON for one person:"),
    "product": ("A product record in JSON:", "Product:", "Catalog entry (JSON):"),
    "review": ("A customer review in JSON:", "Review:", "Review record (JSON):"),
}


def json_record(r: random.Random) -> str:
    """One JSON document: a record of a random schema, in a random layout."""
    kind = r.choice(tuple(_MAKERS))
    rec = _MAKERS[kind](r)
    style = r.random()
    body = json.dumps(rec, indent=2) if style < 0.35 else json.dumps(rec)
    if r.random() < 0.6:
        return f"{r.choice(_INTROS[kind])}\n{body}"
    return body


def json_list(r: random.Random) -> str:
    """A short JSON array of records of one schema."""
    kind = r.choice(tuple(_MAKERS))
    recs = [_MAKERS[kind](r) for _ in range(r.randint(2, 3))]
    return f"A list of {kind}s in JSON:\n" + json.dumps(recs)


# --------------------------------------------------------------------------- word problems
ITEMS = ("apples", "books", "marbles", "stickers", "cookies", "coins", "pencils", "stamps", "shells", "cards")
PRICED = ("pens", "notebooks", "tickets", "mugs", "plants", "candles", "muffins", "batteries")


def _problem(r: random.Random) -> tuple[str, str, int]:
    """(question, worked answer without the final sentence, result)."""
    name, other = r.sample(FIRST, 2)
    item = r.choice(ITEMS)
    kind = r.randrange(9)
    if kind == 0:
        a, b = r.randint(2, 60), r.randint(2, 40)
        return (f"{name} has {a} {item} and finds {b} more. How many {item} does {name} have now?",
                f"{name} starts with {a} {item}. {a} + {b} = {a + b}.", a + b)
    if kind == 1:
        a = r.randint(10, 90)
        b = r.randint(1, a - 1)
        return (f"{name} had {a} {item} and gave {b} to {other}. How many {item} are left?",
                f"{a} - {b} = {a - b}.", a - b)
    if kind == 2:
        a, b = r.randint(2, 12), r.randint(2, 12)
        return (f"There are {a} boxes with {b} {item} in each box. How many {item} are there in total?",
                f"{a} boxes of {b} {item} make {a} * {b} = {a * b}.", a * b)
    if kind == 3:
        b, q = r.randint(2, 9), r.randint(2, 12)
        a = b * q
        return (f"{name} shares {a} {item} equally among {b} friends. How many {item} does each friend get?",
                f"{a} / {b} = {q}.", q)
    if kind == 4:
        price, n = r.randint(2, 9), r.randint(2, 6)
        cost = price * n
        paid = r.choice([p for p in (10, 20, 50, 100) if p >= cost])
        thing = r.choice(PRICED)
        return (f"{thing.capitalize()} cost {price} dollars each. {name} buys {n} {thing} and pays with "
                f"{paid} dollars. How much change does {name} get?",
                f"{n} {thing} cost {n} * {price} = {cost} dollars. {paid} - {cost} = {paid - cost}.", paid - cost)
    if kind == 5:
        a, b, c = r.randint(5, 40), r.randint(2, 30), r.randint(1, 20)
        c = min(c, a + b - 1)
        return (f"{name} has {a} {item}, gets {b} more from {other}, then loses {c}. How many {item} does "
                f"{name} have?", f"{a} + {b} = {a + b}. {a + b} - {c} = {a + b - c}.", a + b - c)
    if kind == 6:
        a, d = r.randint(3, 30), r.randint(2, 20)
        return (f"{name} has {a} {item}. {other} has {d} more than {name}. How many {item} do they have "
                f"together?", f"{other} has {a} + {d} = {a + d}. Together: {a} + {a + d} = {2 * a + d}.", 2 * a + d)
    if kind == 7:
        per_day, days = r.randint(2, 15), r.randint(2, 7)
        return (f"{name} reads {per_day} pages every day. How many pages does {name} read in {days} days?",
                f"{per_day} * {days} = {per_day * days}.", per_day * days)
    a, b = r.randint(2, 9), r.randint(2, 9)
    extra = r.randint(1, 20)
    return (f"A shelf has {a} rows of {b} {item} and {extra} loose {item}. How many {item} are there?",
            f"{a} * {b} = {a * b}. {a * b} + {extra} = {a * b + extra}.", a * b + extra)


def word_problem(r: random.Random) -> str:
    """``Q: <question> A: <worked steps> The answer is N.``"""
    q, work, ans = _problem(r)
    return f"Q: {q}\nA: {work} The answer is {ans}."


def generated_documents(seed: int, n_json: int, n_math: int) -> dict[str, list[str]]:
    """The two generated slices, ``{"json": [...], "arithmetic": [...]}`` (deterministic in seed)."""
    r = random.Random(seed)
    docs_json = [json_list(r) if r.random() < 0.1 else json_record(r) for _ in range(n_json)]
    r = random.Random(seed + 1)
    docs_math = []
    for _ in range(n_math):
        # Some documents hold two problems in a row: a prompt can show one as a few-shot example.
        k = 2 if r.random() < 0.3 else 1
        docs_math.append("\n\n".join(word_problem(r) for _ in range(k)))
    return {"json": docs_json, "arithmetic": docs_math}
