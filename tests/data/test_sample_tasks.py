import hashlib
import json
import os
import re
import subprocess
import sys
from collections import Counter

import pytest
from PIL import Image

from deepeyes.data import ensure_sample_data, generate_sample_data, read_records, read_sft_records
from deepeyes.data import glyphs
from deepeyes.data.sample_tasks import COLORS, FAMILIES, INK

from .conftest import N_PER_FAMILY


def tree(root):
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def test_same_seed_gives_identical_bytes(sample, tmp_path):
    again = generate_sample_data(tmp_path / "again", n_per_family=N_PER_FAMILY, seed=0)
    assert tree(again.root) == tree(sample.root)


def test_same_seed_gives_identical_bytes_across_processes(sample, tmp_path):
    """Set and dict-of-hash orders change with PYTHONHASHSEED; the output must not."""
    script = "import sys; from pathlib import Path; from deepeyes.data import generate_sample_data; "
    script += f"generate_sample_data(Path(sys.argv[1]), n_per_family={N_PER_FAMILY}, seed=0)"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "other")], env=env, check=True)
    assert tree(tmp_path / "other") == tree(sample.root)


def test_different_seed_gives_different_tasks(sample, tmp_path):
    other = generate_sample_data(tmp_path / "other", n_per_family=N_PER_FAMILY, seed=1)
    for name in ("rl_train.jsonl", "rl_test.jsonl", "corpus.jsonl", "image_index.jsonl"):
        assert (other.root / name).read_bytes() != (sample.root / name).read_bytes()


def test_layout_and_every_file_validates(sample):
    assert {p.name for p in sample.root.iterdir()} == {
        "rl_train.jsonl", "rl_test.jsonl", "sft_train.jsonl", "corpus.jsonl", "image_index.jsonl", "images",
    }
    assert len(read_records(sample.rl_train)) == 3 * N_PER_FAMILY
    assert len(read_records(sample.rl_test)) == 3 * (N_PER_FAMILY // 2)
    assert len(read_sft_records(sample.sft_train)) == 3 * N_PER_FAMILY
    for record in read_records(sample.rl_train) + read_records(sample.rl_test):
        for image in record.images:
            with Image.open(image) as opened:
                assert opened.format == "PNG" and max(opened.size) <= 224


def test_families_are_balanced_and_interleaved(sample):
    for path, n in ((sample.rl_train, N_PER_FAMILY), (sample.rl_test, N_PER_FAMILY // 2)):
        records = read_records(path)
        assert Counter(r.family for r in records) == {family: n for family in FAMILIES}
        assert [r.family for r in records[:3]] == list(FAMILIES)
    lookup = [r for r in read_records(sample.rl_train) if r.family == "lookup"]
    assert {(r.metadata["attribute"], r.metadata["variant"]) for r in lookup} == {
        (attribute, variant) for attribute in ("capital", "currency", "highest mountain") for variant in ("named", "flag")
    }


def test_arithmetic_answers_are_correct(sample):
    records = [r for r in read_records(sample.rl_train) + read_records(sample.rl_test) if r.family == "arithmetic"]
    assert {re.search(r"[*+-]", r.question).group() for r in records} == {"*", "+", "-"}
    for record in records:
        a, op, b = re.fullmatch(r"What is (\d+) ([*+-]) (\d+)\?", record.question).groups()
        expected = {"*": int(a) * int(b), "+": int(a) + int(b), "-": int(a) - int(b)}[op]
        assert record.answer == str(expected)


def ink_glyph(crop):
    """The 5x7 bitmap of the INK pixels in `crop`, as glyph rows."""
    pixels = crop.load()
    ink = {(x, y) for x in range(crop.width) for y in range(crop.height) if pixels[x, y] == INK}
    xs, ys = [x for x, _ in ink], [y for _, y in ink]
    left, top = min(xs), min(ys)
    return tuple(
        "".join("#" if (left + column, top + row) in ink else "." for column in range(glyphs.GLYPH_WIDTH))
        for row in range(glyphs.GLYPH_HEIGHT)
    ), (max(xs) - left + 1, max(ys) - top + 1)


def test_perception_answer_is_visible_in_the_named_corner(sample):
    records = [r for r in read_records(sample.rl_train) + read_records(sample.rl_test) if r.family == "perception"]
    assert {r.metadata["variant"] for r in records} == {"digit", "color"}
    for record in records:
        region = record.metadata["region"]
        assert region in record.question
        with Image.open(record.images[0]) as image:
            crop = image.convert("RGB").crop(tuple(record.metadata["crop_box"]))
        if record.metadata["variant"] == "digit":
            rows, size = ink_glyph(crop)
            assert size[0] <= glyphs.GLYPH_WIDTH and size[1] == glyphs.GLYPH_HEIGHT
            assert rows == glyphs.glyph_rows(record.answer)
        else:
            colors = Counter(crop.get_flattened_data())
            assert colors[COLORS[record.answer]] == 36
            assert [name for name, rgb in COLORS.items() if colors[rgb]] == [record.answer]


def test_lookup_facts_are_in_the_corpus_and_test_islands_are_unseen(sample):
    corpus = [json.loads(line) for line in sample.corpus.read_text().splitlines()]
    assert all(set(doc) == {"title", "link", "snippet", "date", "text"} for doc in corpus)
    by_title = {doc["title"]: doc for doc in corpus}
    train, test = (
        [r for r in read_records(path) if r.family == "lookup"] for path in (sample.rl_train, sample.rl_test)
    )
    for record in train + test:
        entity, query = record.metadata["entity"], record.metadata["query"]
        assert by_title[query[0].upper() + query[1:]]["snippet"] == f"The {query} is {record.answer}."
        assert (entity in record.question) == (record.metadata["variant"] == "named")
        assert f"History of {entity}" in by_title and f"Travel guide: {entity}" in by_title
    assert not {r.metadata["entity"] for r in train} & {r.metadata["entity"] for r in test}
    # Distractor islands: in the corpus, never asked about.
    assert len([doc for doc in corpus if doc["title"].startswith("History of ")]) > len(train) + len(test)


def test_image_index_finds_every_flag(sample):
    index = {}
    for line in sample.image_index.read_text().splitlines():
        row = json.loads(line)
        index[row["image_sha256"]] = row["results"]
    for record in read_records(sample.rl_train) + read_records(sample.rl_test):
        results = index.get(hashlib.sha256(record.images[0].read_bytes()).hexdigest())
        if record.family != "lookup":
            assert results is None
            continue
        assert results[0]["title"] == f"Flag of {record.metadata['entity']}"
        assert len({result["title"] for result in results}) == len(results) == 3
        for result in results:
            assert (sample.image_index.parent / result["image"]).is_file()


def test_ensure_sample_data_builds_once_under_deepeyes_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPEYES_CACHE", str(tmp_path))
    first = ensure_sample_data(n_per_family=3, seed=5)
    assert first.root.parent == tmp_path / "data" and first.root.name.startswith("sample-")
    stamp = first.rl_train.stat().st_mtime_ns
    again = ensure_sample_data(n_per_family=3, seed=5)
    assert again == first and again.rl_train.stat().st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "data").iterdir()] == [first.root.name]  # no temporary dir left
    assert ensure_sample_data(n_per_family=3, seed=6).root != first.root
    assert ensure_sample_data(tmp_path / "elsewhere", n_per_family=3, seed=5).root.parent == tmp_path / "elsewhere"


def test_ensure_sample_data_when_another_process_finishes_first(tmp_path, monkeypatch):
    def racing(out_dir, *args):
        generate_sample_data(out_dir, *args)
        # Meanwhile another process renamed its copy into place: ".sample-<hash>.<random>" → "sample-<hash>".
        generate_sample_data(out_dir.parent / out_dir.name[1:].rsplit(".", 1)[0], *args)

    monkeypatch.setattr("deepeyes.data.sample_tasks.generate_sample_data", racing)
    dataset = ensure_sample_data(tmp_path, n_per_family=3)
    assert [path.name for path in tmp_path.iterdir()] == [dataset.root.name]
    assert len(read_records(dataset.rl_train)) == 9


def test_ensure_sample_data_leaves_nothing_behind_on_failure(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("deepeyes.data.sample_tasks.generate_sample_data", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        ensure_sample_data(tmp_path, n_per_family=3)
    assert list(tmp_path.iterdir()) == []
