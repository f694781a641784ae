"""The shapes domain: determinism and caption <-> attribute agreement."""

import re

import numpy as np

from swd_core.toy import shapes


def test_dataset_is_deterministic_from_the_seed():
    a = list(shapes.dataset(3, 20))
    b = list(shapes.dataset(3, 20))
    assert [s.caption for _, s, _ in a] == [s.caption for _, s, _ in b]
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for (_, _, x), (_, _, y) in zip(a, b))
    # sample i depends only on (seed, i): a window starting later matches
    c = list(shapes.dataset(3, 5, start=10))
    assert [s.caption for _, s, _ in c] == [s.caption for _, s, _ in a[10:15]]
    assert [s.caption for _, s, _ in shapes.dataset(4, 20)] != [s.caption for _, s, _ in a]


def test_dataset_covers_the_required_variety():
    samples = [s for _, s, _ in shapes.dataset(0, 2000)]
    objs = [o for s in samples for o in s.objects]
    assert {o.shape for o in objs} == set(shapes.SHAPES) and len(shapes.SHAPES) >= 4
    assert {o.color for o in objs} == set(shapes.COLORS) and len(shapes.COLORS) >= 6
    assert {o.size for o in objs} == {"small", "large"}
    assert {(o.row, o.col) for o in objs} == set(shapes.POSITIONS)
    assert {s.background for s in samples} == set(shapes.BACKGROUNDS) and len(shapes.BACKGROUNDS) >= 2
    assert {s.relation for s in samples if s.relation} == set(shapes.RELATIONS)
    assert not any((o.color, o.shape) in shapes.HELD_OUT_PAIRS for o in objs)  # never in training
    assert len({s.caption.split()[0] for s in samples}) >= 2  # wording varies


def test_captions_state_exactly_the_attributes_behind_them():
    for _, s, img in shapes.dataset(1, 500):
        words = s.caption.split()
        assert len(words) + 2 <= shapes.MAX_CAPTION_TOKENS
        for o in s.objects:
            assert f"{o.color} {o.shape}" in s.caption
        if s.stated["background"]:
            assert s.caption.endswith(f"on a {s.background} background")
        else:
            assert "background" not in s.caption
        size_words = {w for ws in shapes.SIZE_WORDS.values() for w in ws}
        assert bool(size_words & set(words)) == s.stated["size"]
        if s.stated["size"]:
            for o in s.objects:
                assert re.search(rf"({'|'.join(shapes.SIZE_WORDS[o.size])}) {o.color} {o.shape}", s.caption)
        if len(s.objects) == 1:
            assert (shapes.POSITIONS[(s.objects[0].row, s.objects[0].col)] in s.caption) == s.stated["position"]
        else:
            a, b = s.objects
            assert shapes.RELATIONS[s.relation] in s.caption and shapes.relation_holds(s.relation, a, b)
            assert (a.row, a.col) != (b.row, b.col)


def test_rendered_pixels_show_the_attributes():
    s = shapes.ShapesSample("a large red square in the center on a black background",
                            [shapes.ShapeObject("square", "red", "large", 1, 1)], "black")
    img = np.asarray(shapes.render(s))
    assert tuple(img[32, 32]) == shapes.COLORS["red"] and tuple(img[2, 2]) == shapes.BACKGROUNDS["black"]
    small_square = shapes.ShapesSample("", [shapes.ShapeObject("square", "red", "small", 1, 1)], "black")
    small = np.asarray(shapes.render(small_square))
    red = lambda a: (np.abs(a.astype(int) - shapes.COLORS["red"]).sum(-1) < 30).sum()  # noqa: E731
    # fully red pixels fill a square of side 2 x half-extent, less the blended rim (measured 18² and 10²)
    for a, size in ((img, "large"), (small, "small")):
        assert 2 * shapes.SIZES[size] - 3 <= red(a) ** 0.5 <= 2 * shapes.SIZES[size], size


def test_held_out_prompts_are_fixed_and_include_unseen_combinations():
    ev = shapes.held_out_prompts()
    assert len(ev) >= 512 and [s.caption for s in ev] == [s.caption for s in shapes.held_out_prompts()]
    assert len({s.caption for s in ev}) == len(ev)
    assert sum(len(s.objects) == 2 for s in ev) == len(ev) // 2
    unseen = [s for s in ev if any((o.color, o.shape) in shapes.HELD_OUT_PAIRS for o in s.objects)]
    assert len(unseen) >= len(ev) // 6
    train = {s.caption for _, s, _ in shapes.dataset(2, 5000)}
    assert all(s.caption not in train for s in unseen)


def test_validation_prompts_are_disjoint_from_the_evaluation_set():
    val = shapes.validation_prompts(192)
    assert [s.caption for s in val] == [s.caption for s in shapes.validation_prompts(192)]
    assert not {s.caption for s in val} & {s.caption for s in shapes.held_out_prompts()}
    assert sum(len(s.objects) == 2 for s in val) == 96  # composed like the evaluation set
    assert len({s.caption for s in val}) == 192
