"""The shapes dataset and the measure of its samples (prompt_colours)."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image

from difftrain.train.synthetic import (
    COLOURS,
    SHAPES,
    caption_for,
    draw_shape,
    parse_caption,
    prompt_colours,
    write_shapes_dataset,
)


def test_a_drawn_shape_shows_its_caption_and_other_captions_do_not():
    rng = random.Random(5)
    for shape in SHAPES:
        image = draw_shape(64, shape, "red", "white", rng)
        seen = prompt_colours(image, caption_for(shape, "red", "white"))
        assert seen.shows_prompt, seen
        assert seen.background_distance < 30 and seen.shape_distance < 30, seen
        assert not prompt_colours(image, caption_for(shape, "blue", "white")).shows_prompt
        assert not prompt_colours(image, caption_for(shape, "white", "red")).shows_prompt


def test_colour_noise_shows_no_prompt():
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    seen = prompt_colours(Image.fromarray(pixels), "a red circle on a white background")
    assert not seen.shows_prompt
    assert seen.background_distance > 100, seen


def test_a_caption_of_another_form_is_refused_by_name():
    assert parse_caption("a red circle on a white background") == ("circle", "red", "white")
    with pytest.raises(ValueError, match="a purple circle on a white background"):
        parse_caption("a purple circle on a white background")


def test_backgrounds_limit_the_backgrounds_and_leave_them_out_of_the_shapes(tmp_path):
    write_shapes_dataset(tmp_path, 30, backgrounds=("white",))
    captions = [parse_caption(p.read_text()) for p in sorted(tmp_path.glob("*.txt"))]
    assert {bg for _, _, bg in captions} == {"white"}
    assert {colour for _, colour, _ in captions} == set(COLOURS) - {"white"}
