"""A 5x7 pixel font for the sample tasks.

Drawing text with our own bitmaps (instead of a FreeType font) makes the generated PNGs
byte-identical on every machine, and gives tests an exact way to read the text back.
"""

from __future__ import annotations

from PIL import Image, ImageDraw

GLYPH_WIDTH = 5
GLYPH_HEIGHT = 7

# Rows top to bottom; "#" is ink.
_GLYPHS: dict[str, tuple[str, ...]] = {
    "0": (".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."),
    "1": ("..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."),
    "2": (".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"),
    "3": ("#####", "...#.", "..#..", "...#.", "....#", "#...#", ".###."),
    "4": ("...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."),
    "5": ("#####", "#....", "####.", "....#", "....#", "#...#", ".###."),
    "6": ("..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."),
    "7": ("#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."),
    "8": (".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."),
    "9": (".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."),
    "+": (".....", "..#..", "..#..", "#####", "..#..", "..#..", "....."),
    "-": (".....", ".....", ".....", "#####", ".....", ".....", "....."),
    "*": (".....", "#...#", ".#.#.", "..#..", ".#.#.", "#...#", "....."),
    "=": (".....", ".....", "#####", ".....", "#####", ".....", "....."),
    "?": (".###.", "#...#", "....#", "...#.", "..#..", ".....", "..#.."),
    " ": (".....",) * GLYPH_HEIGHT,
}

CHARACTERS = frozenset(_GLYPHS)


def glyph_rows(char: str) -> tuple[str, ...]:
    """The bitmap of one character, rows top to bottom ("#" is ink)."""
    return _GLYPHS[char]


def text_size(text: str, scale: int) -> tuple[int, int]:
    """Width and height in pixels of `text` drawn at `scale` (one pixel gap between glyphs)."""
    width = len(text) * (GLYPH_WIDTH + 1) - 1
    return width * scale, GLYPH_HEIGHT * scale


def draw_text(
    image: Image.Image, xy: tuple[int, int], text: str, scale: int, color: tuple[int, int, int]
) -> None:
    """Draw `text` with its top-left corner at `xy`, each font pixel a `scale`x`scale` square."""
    draw = ImageDraw.Draw(image)
    x0, y0 = xy
    for index, char in enumerate(text):
        left = x0 + index * (GLYPH_WIDTH + 1) * scale
        for row, line in enumerate(_GLYPHS[char]):
            for column, pixel in enumerate(line):
                if pixel == "#":
                    x = left + column * scale
                    y = y0 + row * scale
                    draw.rectangle((x, y, x + scale - 1, y + scale - 1), fill=color)
