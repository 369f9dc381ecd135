"""A small synthetic dataset that exercises every tool, for tests and the one-box default run.

Three task families, each solvable only through one kind of tool call, so that a tiny model
can learn the protocol from them:

- perception: a 224x224 image with a small box in each corner; the question names one corner,
  whose content (a 5x7-pixel digit or a small colored square) is only legible after cropping
  and zooming with code;
- arithmetic: "What is 4837 * 29?" (the expression is also drawn in the image); answered by
  running code;
- lookup: a question about a fictional island ("What is the capital of the island of
  Veldoria?") whose answer is only in the local text corpus; the image is the island's flag,
  and half of the questions name the island only through the flag, so the agent must use
  image search first.

Everything is drawn from seeded `random.Random` streams and our own bitmap font, so the same
parameters give byte-identical files. Lookup islands in the test split never appear in train.

The "learning" recipe (bench/learning.py) makes every family learnable by a tiny model (2 layers,
width 64) in minutes, by keeping each copy it must make one it can make:

- perception asks for the color (red, green or blue) of the one square drawn in the image's
  corners; the cold-start code crops the image row by row and prints, for every pixel row of the
  square, the strongest channel of its most saturated pixel, so the answer is one word that stdout
  repeats (LEARNING_SQUARE times);
- arithmetic has fixed widths (4 x 2 and 5 + 5 digits, 6-digit results; no subtraction);
- islands are named by two common words and their facts are a fixed word and a common word
  (Port Slate), each word one Qwen2.5 token seen in many train tasks, so a held-out name or fact
  is a new pair of known tokens. A quarter of the lookups ask about an island no page or flag
  index knows: the right answer is UNKNOWN_ANSWER, reached by searching and finding only other
  islands (a search that misses leaves the model in a state the trajectories cover);
- the RL tasks (rl_train) hold twice as many perception tasks as tasks of each other family; the
  cold start covers the first `n_per_family` of each.

`no_tool` makes the cold start deliberately imperfect: per family, that share of the trajectories
answers at once without any tool, leaving reinforcement learning something to fix.

Layout of a generated dataset (image paths in every file are relative to that file)::

    rl_train.jsonl  rl_test.jsonl      Record rows (deepeyes.data.schema)
    sft_train.jsonl                    SFTRecord rows: one cold-start trajectory per train task
    corpus.jsonl                       text search corpus: {"title","link","snippet","date","text"}
    image_index.jsonl                  image search index: {"image_sha256", "results": [{"title","image"}]}
    images/{perception,arithmetic,lookup}/   task images (PNG)
    images/search/                     image search result thumbnails
    images/sft/                        images returned by the code cells of the trajectories
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from deepeyes.cache import build_once, cache_root
from deepeyes.data import glyphs
from deepeyes.data.readers import read_records
from deepeyes.data.schema import Record
from deepeyes.data.trajectories import cold_start_trajectory, direct_answer_trajectory
from deepeyes.data.writers import write_records, write_sft_records

# Part of the cache key: bump whenever the generated files change, including when
# deepeyes.tools.search ranks differently (trajectories embed its results).
GENERATOR_VERSION = 11  # 11: the learning recipe's square is 12 pixels; no subtraction

FAMILIES = ("perception", "arithmetic", "lookup")
RECIPES = ("default", "learning")
DATA_SOURCE = "sample"

INK = (20, 20, 20)
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 180),
    "orange": (240, 130, 30),
}
# The learning recipe's perception colors: each is the one strong channel of its RGB value, so a
# short cell names it (deepeyes.data.trajectories).
LEARNING_COLORS = ("red", "green", "blue")
# The side of the learning recipe's square in pixels: the measuring cell prints its color once per
# pixel row, and the answer copies it (deepeyes.data.trajectories).
LEARNING_SQUARE = 12
# The learning recipe's RL tasks hold this many perception tasks per task of each other family (the
# extra ones have no cold-start trajectory): perception is where RL must discover a tool, and with
# the families in equal parts a GRPO step of 8 prompts saw 2-3 perception prompts, too few for the
# crop-and-measure rollouts to stand out at every seed (bench seed 1: no crops gained in 8 steps).
LEARNING_RL_PERCEPTION = 2
_FLAG_COLORS = {**COLORS, "black": INK, "white": (250, 250, 250)}


@dataclass(frozen=True)
class SampleDataset:
    """Paths of one generated sample dataset."""

    root: Path
    rl_train: Path
    rl_test: Path
    sft_train: Path
    corpus: Path
    image_index: Path

    @classmethod
    def at(cls, root: Path) -> SampleDataset:
        root = Path(root)
        return cls(
            root=root,
            rl_train=root / "rl_train.jsonl",
            rl_test=root / "rl_test.jsonl",
            sft_train=root / "sft_train.jsonl",
            corpus=root / "corpus.jsonl",
            image_index=root / "image_index.jsonl",
        )


def generate_sample_data(
    out_dir: Path,
    n_per_family: int = 32,
    seed: int = 0,
    n_test_per_family: int | None = None,
    recipe: str = "default",
    no_tool: Mapping[str, float] | None = None,
) -> SampleDataset:
    """Write the sample dataset into `out_dir`: `n_per_family` train tasks per family and
    `n_test_per_family` (default: half as many) test tasks per family. `recipe` and `no_tool`:
    see the module docstring."""
    if n_test_per_family is None:
        n_test_per_family = n_per_family // 2
    if n_per_family < 0 or n_test_per_family < 0:
        raise ValueError(f"task counts must be >= 0, got {n_per_family} train and {n_test_per_family} test")
    no_tool = _check_recipe(recipe, no_tool)
    dataset = SampleDataset.at(out_dir)
    for family in (*FAMILIES, "search", "sft"):
        (dataset.root / "images" / family).mkdir(parents=True, exist_ok=True)

    islands = _make_islands(random.Random(f"{seed}:islands"), n_per_family + n_test_per_family + 8, recipe)
    train_islands = islands[:n_per_family]
    test_islands = islands[n_per_family : n_per_family + n_test_per_family]
    unlisted = {island.name for split in (train_islands, test_islands) for index, island in enumerate(split)
                if _lookup_variant(index, recipe) == "unlisted"}
    listed = [island for island in islands if island.name not in unlisted]
    _write_corpus(dataset.corpus, listed, random.Random(f"{seed}:corpus"))
    _write_flags_and_image_index(dataset, listed, random.Random(f"{seed}:image-index"))
    for island in islands:
        if island.name in unlisted:  # its flag is the task's image, but no image search knows it
            _save(_draw_flag(island.flag, FLAG_SIZE), _flag_path(dataset.root, island))

    cold_start_ids: list[str] = []  # the train tasks with a cold-start trajectory, families interleaved
    for path, split, count, split_islands in (
        (dataset.rl_train, "train", n_per_family, train_islands),
        (dataset.rl_test, "test", n_test_per_family, test_islands),
    ):
        per_round = LEARNING_RL_PERCEPTION if recipe == "learning" and split == "train" else 1
        perception, arithmetic, lookup = (
            _perception_tasks(dataset.root, split, count * per_round, random.Random(f"{seed}:perception:{split}"), recipe),
            _arithmetic_tasks(dataset.root, split, count, random.Random(f"{seed}:arithmetic:{split}"), recipe),
            _lookup_tasks(dataset.root, split, split_islands, recipe),
        )
        # Interleaved so that any prefix of the file has the families in proportion.
        write_records(path, [task for index in range(count) for task in (
            *perception[index * per_round : (index + 1) * per_round], arithmetic[index], lookup[index])])
        if split == "train":
            cold_start_ids = [task.id for group in zip(perception[:count], arithmetic, lookup) for task in group]

    # Imported here: deepeyes.tools imports deepeyes.data.schema, so a module-level import
    # would be circular. The trajectories show exactly what the search tools return at RL time.
    from deepeyes.tools.search import LocalImageSearch, LocalTextSearch

    text_search = LocalTextSearch.from_jsonl(dataset.corpus)
    image_search = LocalImageSearch.from_jsonl(dataset.image_index)
    train = {record.id: record for record in read_records(dataset.rl_train)}
    records = [train[record_id] for record_id in cold_start_ids]
    without_tools = _pick_without_tools(records, no_tool, random.Random(f"{seed}:no-tool"))
    trajectories = [
        direct_answer_trajectory(record) if record.id in without_tools
        else cold_start_trajectory(record, text_search, image_search, dataset.root / "images" / "sft", recipe)
        for record in records
    ]
    write_sft_records(dataset.sft_train, trajectories)
    return dataset


def _check_recipe(recipe: str, no_tool: Mapping[str, float] | None) -> dict[str, float]:
    if recipe not in RECIPES:
        raise ValueError(f"sample data recipe {recipe!r}: expected one of {', '.join(RECIPES)}")
    no_tool = dict(no_tool or {})
    for family, share in no_tool.items():
        if family not in FAMILIES or not 0.0 <= share <= 1.0:
            raise ValueError(f"no_tool[{family!r}]={share}: expected a family of {FAMILIES} and a share in [0, 1]")
    return no_tool


def _pick_without_tools(records: list[Record], no_tool: dict[str, float], rng: random.Random) -> set[str]:
    """Ids of the train tasks whose cold start answers without a tool: per family, a seeded
    choice of round(share x tasks)."""
    chosen: set[str] = set()
    for family, share in sorted(no_tool.items()):
        ids = [record.id for record in records if record.family == family]
        chosen.update(rng.sample(ids, round(share * len(ids))))
    return chosen


def ensure_sample_data(
    cache_dir: Path | None = None,
    n_per_family: int = 32,
    seed: int = 0,
    n_test_per_family: int | None = None,
    recipe: str = "default",
    no_tool: Mapping[str, float] | None = None,
) -> SampleDataset:
    """The sample dataset for these parameters, generated on first use.

    It lives in `cache_dir/sample-<hash of parameters>`; `cache_dir` defaults to
    `$DEEPEYES_CACHE/data` (`~/.cache/deepeyes/data`). It is built atomically (`build_once`), so
    concurrent callers (several ranks, several jobs) never see a half-written dataset.
    """
    if n_test_per_family is None:
        n_test_per_family = n_per_family // 2
    params = {
        "version": GENERATOR_VERSION,
        "n_per_family": n_per_family,
        "n_test_per_family": n_test_per_family,
        "seed": seed,
    }
    no_tool = _check_recipe(recipe, no_tool)
    if recipe != "default" or any(no_tool.values()):  # the default dataset keeps its cache key
        params |= {"recipe": recipe, "no_tool": no_tool}
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    root = Path(cache_dir or cache_root() / "data") / f"sample-{digest}"
    build_once(root, lambda staging: generate_sample_data(staging, n_per_family, seed, n_test_per_family, recipe, no_tool))
    return SampleDataset.at(root)


# ---------------------------------------------------------------------------------------------
# perception

PERCEPTION_SIZE = 224
CORNER = 56  # side of the corner square the agent should crop
_BOX = 20  # the small box inside the corner square
# The corners as questions name them.
_REGIONS = {
    "upper-left": (0, 0),
    "upper-right": (PERCEPTION_SIZE - CORNER, 0),
    "lower-left": (0, PERCEPTION_SIZE - CORNER),
    "lower-right": (PERCEPTION_SIZE - CORNER, PERCEPTION_SIZE - CORNER),
}


def crop_box(region: str) -> tuple[int, int, int, int]:
    """The corner square (left, top, right, bottom) that holds the box of `region`."""
    left, top = _REGIONS[region]
    return left, top, left + CORNER, top + CORNER


def _perception_tasks(root: Path, split: str, count: int, rng: random.Random, recipe: str) -> list[Record]:
    variants = ("color",) if recipe == "learning" else ("digit", "color")
    tasks = []
    for index in range(count):
        variant = variants[index % len(variants)]
        image = Image.new("RGB", (PERCEPTION_SIZE,) * 2, tuple(rng.randint(200, 240) for _ in range(3)))
        _draw_clutter(image, rng)
        if recipe == "learning":  # only the asked corner's box holds a square; the others are empty
            target = rng.randrange(len(_REGIONS))
            contents = [rng.choice(LEARNING_COLORS) if i == target else None for i in range(len(_REGIONS))]
        else:
            contents = rng.sample("0123456789" if variant == "digit" else sorted(COLORS), len(_REGIONS))
        for region, content in zip(_REGIONS, contents):
            _draw_corner_box(image, region, variant, content, rng, LEARNING_SQUARE if recipe == "learning" else 6)
        if recipe != "learning":  # drawn after the boxes, as before the learning recipe existed
            target = rng.randrange(len(_REGIONS))
        region, answer = list(_REGIONS)[target], contents[target]
        if variant == "digit":
            question = f"What digit is written in the small box in the {region} corner of the image?"
        else:
            question = f"What color is the small square in the box in the {region} corner of the image?"
        record_id = f"perception-{split}-{index:05d}"
        tasks.append(
            Record(
                id=record_id,
                question=question,
                images=(_save(image, root / "images" / "perception" / f"{record_id}.png"),),
                answer=answer,
                family="perception",
                data_source=DATA_SOURCE,
                metadata={"variant": variant, "region": region, "crop_box": list(crop_box(region))},
            )
        )
    return tasks


def _draw_clutter(image: Image.Image, rng: random.Random) -> None:
    """Muted shapes in the central cross, away from the corners (and never in palette colors)."""
    draw = ImageDraw.Draw(image)
    low, high = CORNER, PERCEPTION_SIZE - CORNER
    for _ in range(rng.randint(3, 6)):
        if rng.random() < 0.5:  # horizontal band
            x0, x1 = sorted(rng.sample(range(PERCEPTION_SIZE), 2))
            y0, y1 = sorted(rng.sample(range(low, high), 2))
        else:  # vertical band
            x0, x1 = sorted(rng.sample(range(low, high), 2))
            y0, y1 = sorted(rng.sample(range(PERCEPTION_SIZE), 2))
        color = tuple(rng.randint(90, 200) for _ in range(3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x0, y0, x1, y1), fill=color)


def _draw_corner_box(image: Image.Image, region: str, variant: str, content: str | None, rng: random.Random,
                     square: int) -> None:
    left, top = _REGIONS[region]
    x = left + rng.randint(2, CORNER - _BOX - 2)
    y = top + rng.randint(2, CORNER - _BOX - 2)
    ImageDraw.Draw(image).rectangle((x, y, x + _BOX - 1, y + _BOX - 1), fill=(250, 250, 250), outline=(120, 120, 120))
    if content is None:
        return
    if variant == "digit":
        glyphs.draw_text(image, (x + (_BOX - glyphs.GLYPH_WIDTH) // 2, y + (_BOX - glyphs.GLYPH_HEIGHT) // 2), content, 1, INK)
    else:
        inset = (_BOX - square) // 2
        ImageDraw.Draw(image).rectangle((x + inset, y + inset, x + inset + square - 1, y + inset + square - 1), fill=COLORS[content])


# ---------------------------------------------------------------------------------------------
# arithmetic

ARITHMETIC_SIZE = (224, 56)


# The learning recipe's operand ranges: per operator, operands and result have a fixed number of
# digits (4 x 2 -> 6, 5 + 5 -> 6), so copying them is copying at fixed distances. There is no
# subtraction: a garbled copy of the operands keeps their leading digits (5-9, 2-9), and with these
# two operators their result still has 6 digits; 5 - 5 digits ended in 4 (68686 - 60507, a copy
# that mixed the operands), and the model, which had only ever copied 5 digits there, left the
# answer empty (bench seed 1: 3 of 16 held-out arithmetic questions failed the format after SFT).
_FIXED_WIDTH_OPERANDS = {"*": ((5000, 9999), (20, 99)), "+": ((50000, 99999), (50000, 99999))}


def _arithmetic_tasks(root: Path, split: str, count: int, rng: random.Random, recipe: str) -> list[Record]:
    tasks = []
    for index in range(count):
        operators = "".join(_FIXED_WIDTH_OPERANDS) if recipe == "learning" else "*+-"
        op = operators[index % len(operators)]
        if recipe == "learning":
            (a_low, a_high), (b_low, b_high) = _FIXED_WIDTH_OPERANDS[op]
            a, b = rng.randint(a_low, a_high), rng.randint(b_low, b_high)
        elif op == "*":
            a, b = rng.randint(100, 9999), rng.randint(11, 99)
        elif op == "+":
            a, b = rng.randint(1000, 99999), rng.randint(1000, 99999)
        else:
            a = rng.randint(1000, 99999)
            b = rng.randint(100, a - 1)
        expression = f"{a} {op} {b}"
        answer = {"*": a * b, "+": a + b, "-": a - b}[op]
        image = Image.new("RGB", ARITHMETIC_SIZE, tuple(rng.randint(215, 250) for _ in range(3)))
        text = f"{expression} = ?"
        width, height = glyphs.text_size(text, 2)
        glyphs.draw_text(image, ((ARITHMETIC_SIZE[0] - width) // 2, (ARITHMETIC_SIZE[1] - height) // 2), text, 2, INK)
        record_id = f"arithmetic-{split}-{index:05d}"
        tasks.append(
            Record(
                id=record_id,
                question=f"What is {expression}?",
                images=(_save(image, root / "images" / "arithmetic" / f"{record_id}.png"),),
                answer=str(answer),
                family="arithmetic",
                data_source=DATA_SOURCE,
                metadata={"expression": expression},
            )
        )
    return tasks


# ---------------------------------------------------------------------------------------------
# lookup

FLAG_SIZE = (168, 112)
THUMBNAIL_SIZE = (84, 56)
IMAGE_SEARCH_RESULTS = 3

# (question template, search query template) per attribute.
UNKNOWN_ANSWER = "unknown"  # the answer to a lookup about an island no page knows
LOOKUP_ATTRIBUTES = {
    "capital": ("What is the capital of {subject}?", "capital of {name}"),
    "currency": ("What is the currency of {subject}?", "currency of {name}"),
    "highest mountain": ("What is the highest mountain on {subject}?", "highest mountain on {name}"),
}
_FLAG_LAYOUTS = {"horizontal": 3, "vertical": 3, "cross": 2, "disc": 2, "diagonal": 2, "canton": 2}

_ONSETS = ("b", "d", "k", "l", "m", "n", "r", "s", "t", "v", "z", "th", "gr", "br", "st", "f", "h")
_VOWELS = ("a", "e", "i", "o", "u", "ae", "io")
_ENDINGS = ("ria", "nia", "dor", "land", "mere", "holm", "ssa", "vel", "tia", "ros")
_SEAS = ("Amber", "Glass", "Salt", "Quiet", "Iron", "Pearl")
# The learning recipe's island names: two words, each one token of the Qwen2.5 vocabulary (with its
# leading space) and each in many train islands' names, so a test island's name is a new pair of
# tokens the model has seen. Made-up names split into 2-5 rare pieces, some seen only in test names:
# the tiny model garbled them when it copied one into a search query, and the garbled, open-ended
# copy broke the tool call's JSON (at bench seed 2, 12 of 16 held-out lookups failed the format
# after SFT). A copy of two known tokens, right or wrong, ends where every copy in training ends.
_NAME_WORDS = (
    ("Coral", "Copper", "Silver", "Golden", "Crystal", "Cedar", "Maple", "Stone", "Ivory", "Jade", "Azure",
     "Scarlet", "Velvet", "Frost", "Ember", "Willow", "Raven", "Falcon", "Thunder", "Shadow", "Lunar", "Solar"),
    ("Rock", "Reef", "Crown", "Harbor", "Haven", "Point", "Ridge", "Shore", "Cliff", "Moon", "Star", "Peak",
     "Vale", "Cove", "Gate", "Hill", "Field", "Spring", "Wood", "Lake", "Tower", "Garden", "Bridge"),
)
# The learning recipe's facts: the attribute's word (Port, Crown, Mount) and one of these words, each
# one token with its leading space. With made-up facts, the queries were right after SFT but the
# answers were not: the model garbled the copy of "Mount Graerio" and never closed the answer tag
# (bench seed 0: 4 of 16 held-out lookups failed the format after SFT, all this way).
_FACT_WORDS = ("Ash", "Birch", "Brook", "Clay", "Dawn", "Elm", "Fern", "Flint", "Glen", "Hawk", "Holly", "Iris",
               "Marsh", "Oak", "Pine", "Reed", "Rose", "Sage", "Slate", "Thorn", "Vine", "Aspen", "Basil", "Ferry")


@dataclass(frozen=True)
class Island:
    name: str
    capital: str
    currency: str
    highest_mountain: str
    sea: str
    settled: int
    flag: tuple[str, tuple[str, ...]]  # layout, color names

    @property
    def slug(self) -> str:
        return self.name.lower().replace(" ", "-")

    def fact(self, attribute: str) -> str:
        return {"capital": self.capital, "currency": self.currency, "highest mountain": self.highest_mountain}[attribute]


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables))


def _make_islands(rng: random.Random, count: int, recipe: str) -> list[Island]:
    if recipe == "learning" and count > len(_NAME_WORDS[0]) * len(_NAME_WORDS[1]):
        raise ValueError(f"the learning recipe names at most {len(_NAME_WORDS[0]) * len(_NAME_WORDS[1])} islands, not {count}")
    islands: list[Island] = []
    names: set[str] = set()
    flags: set[tuple[str, tuple[str, ...]]] = set()
    while len(islands) < count:
        if recipe == "learning":
            name = " ".join(rng.choice(words) for words in _NAME_WORDS)
        else:
            name = (_word(rng, 2) + rng.choice(_ENDINGS)).capitalize()
        layout = rng.choice(sorted(_FLAG_LAYOUTS))
        flag = (layout, tuple(rng.sample(sorted(_FLAG_COLORS), _FLAG_LAYOUTS[layout])))
        if name in names or flag in flags:
            continue
        names.add(name)
        flags.add(flag)
        if recipe == "learning":
            capital, currency, mountain = (f"{prefix} {rng.choice(_FACT_WORDS)}" for prefix in ("Port", "Crown", "Mount"))
        else:
            capital = rng.choice(("Port {}", "{} Bay", "New {}", "{}ton")).format(_word(rng, 2).capitalize())
            currency, mountain = _word(rng, 2) + rng.choice(("el", "ar", "o")), f"Mount {_word(rng, 2).capitalize()}"
        islands.append(
            Island(
                name=name,
                capital=capital,
                currency=currency,
                highest_mountain=mountain,
                sea=rng.choice(_SEAS),
                settled=rng.randint(1100, 1850),
                flag=flag,
            )
        )
    return islands


def _lookup_variant(index: int, recipe: str) -> str:
    """How the `index`-th lookup of a split names its island: by name, only by its flag, or (a
    quarter of the learning recipe's) by the name of an island the corpus does not list."""
    if recipe == "learning" and index % 4 == 2:
        return "unlisted"
    return ("named", "flag")[index % 2]


def _lookup_tasks(root: Path, split: str, islands: list[Island], recipe: str) -> list[Record]:
    tasks = []
    for index, island in enumerate(islands):
        attribute = list(LOOKUP_ATTRIBUTES)[index % len(LOOKUP_ATTRIBUTES)]
        variant = _lookup_variant(index, recipe)
        subject = "the island whose flag is shown in the image" if variant == "flag" else f"the island of {island.name}"
        question, query = LOOKUP_ATTRIBUTES[attribute]
        tasks.append(
            Record(
                id=f"lookup-{split}-{index:05d}",
                question=question.format(subject=subject),
                images=(_flag_path(root, island),),
                answer=UNKNOWN_ANSWER if variant == "unlisted" else island.fact(attribute),
                family="lookup",
                data_source=DATA_SOURCE,
                metadata={
                    "variant": variant,
                    "entity": island.name,
                    "attribute": attribute,
                    "query": query.format(name=island.name),
                },
            )
        )
    return tasks


def _write_corpus(path: Path, islands: list[Island], rng: random.Random) -> None:
    """Per island: one short page per fact, titled like the query that finds it, plus pages
    that name the island without stating any fact (history, travel) as distractors."""
    docs = []
    for island in islands:
        link = f"https://islands.example/wiki/{island.name.replace(' ', '_')}"
        for attribute, (_, query) in LOOKUP_ATTRIBUTES.items():
            title = query.format(name=island.name)
            docs.append(
                _doc(
                    title[0].upper() + title[1:],
                    f"{link}#{attribute.replace(' ', '_')}",
                    f"The {title} is {island.fact(attribute)}.",
                    rng,
                    f"{island.name} is an island in the {island.sea} Sea.",
                )
            )
        neighbour = rng.choice([other for other in islands if other is not island])
        docs += [
            _doc(
                f"History of {island.name}",
                f"{link}/History",
                f"{island.name} was first settled in {island.settled} by fishermen from {neighbour.name}.",
                rng,
                f"Trade with {neighbour.name} shaped the island for centuries.",
            ),
            _doc(
                f"Travel guide: {island.name}",
                f"https://travel.example/{island.slug}",
                f"Visitors to {island.name} come for its beaches and the ferry across the {island.sea} Sea.",
                rng,
                "Ferries run twice a week in summer.",
            ),
        ]
    rng.shuffle(docs)
    path.write_text("".join(json.dumps(doc) + "\n" for doc in docs), encoding="utf-8")


def _doc(title: str, link: str, snippet: str, rng: random.Random, more: str) -> dict[str, str]:
    date = f"{rng.randint(2015, 2024)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    return {"title": title, "link": link, "snippet": snippet, "date": date, "text": f"{snippet} {more}"}


def _flag_path(root: Path, island: Island) -> Path:
    return root / "images" / "lookup" / f"flag-{island.slug}.png"


def _write_flags_and_image_index(dataset: SampleDataset, islands: list[Island], rng: random.Random) -> None:
    """Each flag image is indexed with its own thumbnail first, then other islands' flags."""
    thumbnails = {
        island.name: _save(_draw_flag(island.flag, THUMBNAIL_SIZE), dataset.root / "images" / "search" / f"flag-{island.slug}.png")
        for island in islands
    }
    rows = []
    for island in islands:
        image = _save(_draw_flag(island.flag, FLAG_SIZE), _flag_path(dataset.root, island))
        others = rng.sample([other for other in islands if other is not island], IMAGE_SEARCH_RESULTS - 1)
        results = [
            {"title": f"Flag of {result.name}", "image": thumbnails[result.name].relative_to(dataset.root).as_posix()}
            for result in (island, *others)
        ]
        rows.append({"image_sha256": hashlib.sha256(image.read_bytes()).hexdigest(), "results": results})
    dataset.image_index.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def _draw_flag(flag: tuple[str, tuple[str, ...]], size: tuple[int, int]) -> Image.Image:
    layout, names = flag
    colors = [_FLAG_COLORS[name] for name in names]
    width, height = size
    image = Image.new("RGB", size, colors[0])
    draw = ImageDraw.Draw(image)
    if layout == "horizontal":
        for index, color in enumerate(colors):
            draw.rectangle((0, index * height // 3, width, (index + 1) * height // 3), fill=color)
    elif layout == "vertical":
        for index, color in enumerate(colors):
            draw.rectangle((index * width // 3, 0, (index + 1) * width // 3, height), fill=color)
    elif layout == "cross":
        bar = height // 5
        draw.rectangle((width // 3 - bar // 2, 0, width // 3 + bar // 2, height), fill=colors[1])
        draw.rectangle((0, height // 2 - bar // 2, width, height // 2 + bar // 2), fill=colors[1])
    elif layout == "disc":
        radius = height // 4
        draw.ellipse((width // 2 - radius, height // 2 - radius, width // 2 + radius, height // 2 + radius), fill=colors[1])
    elif layout == "diagonal":
        draw.polygon([(0, height), (width, 0), (width, height)], fill=colors[1])
    else:  # canton
        draw.rectangle((0, 0, width // 2, height // 2), fill=colors[1])
    return image


def _save(image: Image.Image, path: Path) -> Path:
    image.save(path, format="PNG")
    return path
