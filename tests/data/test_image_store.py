"""The content-addressed image store: one file per distinct image, whatever its source."""

import hashlib
import os

import pytest
from PIL import Image

from deepeyes.data.image_store import ImageStore, content_key


def png(path, color) -> bytes:
    Image.new("RGB", (8, 6), color).save(path)
    return path.read_bytes()


def test_the_same_bytes_from_any_source_are_stored_once(tmp_path):
    store = ImageStore(tmp_path / "store")
    data = png(tmp_path / "a.png", (1, 2, 3))
    (tmp_path / "copy.png").write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()

    from_file = store.put_file(tmp_path / "a.png")
    assert from_file == store.put_file(tmp_path / "copy.png") == store.put(data) == tmp_path / "store" / digest[:2] / f"{digest}.png"
    assert os.stat(from_file).st_ino == os.stat(tmp_path / "a.png").st_ino  # linked, not copied
    assert store.files() == [from_file] and content_key(from_file) == content_key(tmp_path / "copy.png") == digest
    assert store.put_file(from_file) == from_file  # a stored file is its own reference

    other = store.put(png(tmp_path / "b.png", (9, 9, 9)))
    assert len(store.files()) == 2 and other != from_file
    assert not list((tmp_path / "store").glob("*/.*partial"))


def test_bytes_that_are_not_an_image_are_refused(tmp_path):
    with pytest.raises(ValueError, match="do not decode"):
        ImageStore(tmp_path).put(b"<html>not an image</html>")
    assert ImageStore(tmp_path).files() == []
