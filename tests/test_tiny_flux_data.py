"""The procedural caption/image generator behind the bundled tiny FLUX (scripts/tiny_flux/data.py)."""

import re

import numpy as np
import pytest
import torch

from scripts.tiny_flux import data

OBJ = r"a (small|large) (red|orange|yellow|green|cyan|blue|purple|white) (circle|square|triangle) " \
      r"(on the left|on the right|at the top|at the bottom|in the center)"
CAPTION = re.compile(rf"^{OBJ}( and {OBJ})?, on a (black|white|gray) background$")


def test_deterministic_for_a_seed():
    a_img, a_cap = data.batch(16, seed=7, res=64)
    b_img, b_cap = data.batch(16, seed=7, res=64)
    c_img, c_cap = data.batch(16, seed=8, res=64)
    assert a_cap == b_cap and torch.equal(a_img, b_img)
    assert a_cap != c_cap and not torch.equal(a_img, c_img)


def test_captions_follow_the_grammar_and_cover_it():
    s = data.sample_scenes(2000, seed=0)
    caps = data.captions(s)
    assert all(CAPTION.match(c) for c in caps), [c for c in caps if not CAPTION.match(c)][:3]
    words = set(" ".join(caps).replace(",", " ,").split())
    assert words == set(data.VOCAB_WORDS)
    assert 0.4 < (s.n_obj == 2).mean() < 0.6
    for i in range(len(s)):  # no object has the background's colour
        bg = data.BG_NAMES[s.bg[i]]
        assert all(o[1] != bg for o in data.scene_objects(s, i))
        if s.n_obj[i] == 2:  # two objects sit on opposite sides
            assert {o[3] for o in data.scene_objects(s, i)} in ({"left", "right"}, {"top", "bottom"})
    # every value of every attribute occurs
    assert set(np.unique(s.shape)) == set(range(3)) and set(np.unique(s.color)) == set(range(8))
    assert set(np.unique(s.pos)) == set(range(5)) and set(np.unique(s.bg)) == set(range(3))


@pytest.mark.parametrize("res", [64, 128])
def test_single_object_pixels_match_the_caption(res):
    s = data.sample_scenes(150, seed=3, p_two=0.0)
    imgs = data.render(s, res)
    assert imgs.shape == (150, 3, res, res) and imgs.min() >= 0 and imgs.max() <= 1
    for i in range(len(s)):
        shape, color, size, pos = data.scene_objects(s, i)[0]
        a = data.analyze_single(imgs[i])
        assert a["found"] and a["bg"] == data.BG_NAMES[s.bg[i]], data.captions(s)[i]
        assert (a["color"], a["shape"], data.side_of(a["cx"], a["cy"])) == (color, shape, pos), data.captions(s)[i]
        # size: bounding box side ~0.2 (small) or ~0.36 (large) of the image
        assert (a["extent"] > 0.28) == (size == "large"), (data.captions(s)[i], a["extent"])


def test_two_object_pixels_match_the_caption():
    s = data.sample_scenes(100, seed=4, p_two=1.0)
    imgs = data.render(s, 128)
    for i in range(len(s)):
        a = data.to_array(imgs[i])
        assert data.nearest(data.estimate_background(a), data.BACKGROUNDS) == data.BG_NAMES[s.bg[i]]
        for k, (shape, color, size, pos) in enumerate(data.scene_objects(s, i)):
            cx, cy = np.array(data.POSITIONS[pos]) + s.jitter[i, k]
            # the object's colour at its centre (all three shapes cover a small disc around it)
            px = a[int(cy * 128) - 2 : int(cy * 128) + 3, int(cx * 128) - 2 : int(cx * 128) + 3].reshape(-1, 3)
            assert data.nearest(px.mean(0), data.COLORS) == color, data.captions(s)[i]


def test_caption_helpers_round_trip():
    s = data.scene_from_attrs([dict(shape="triangle", color="cyan", size="small", pos="top")], "black")
    assert data.captions(s) == ["a small cyan triangle at the top, on a black background"]
    a = data.analyze_single(data.render(s, 128)[0])
    assert (a["color"], a["shape"], data.side_of(a["cx"], a["cy"]), a["bg"]) == ("cyan", "triangle", "top", "black")
