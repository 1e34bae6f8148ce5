"""tiny-shapes data: caption grammar, renderer, tokenizer, and the adherence scorer."""

import numpy as np
import pytest
import torch

from fastdiff.models.shapes_data import COLORS, SHAPES, Scene, all_scenes, parse_caption, random_scenes, render
from fastdiff.models.tokenizer import word_level_bpe, write_tokenizer
from fastdiff.testing.shapes import describe, shapes_score


def test_captions_round_trip_through_the_grammar():
    scenes = all_scenes()
    assert len(scenes) == 8 * 3 * 7 * 6
    for scene in scenes:
        assert parse_caption(scene.caption) == scene
    assert Scene("orange", "square", "red").caption == "an orange square on a red background"


@pytest.mark.parametrize(
    "caption, message",
    [
        ("a red star on a blue background", "unknown shape 'star'"),
        ("a pink circle on a blue background", "unknown colour 'pink'"),
        ("a red circle at the middle of a blue background", "unknown position 'middle'"),
        ("red circle, blue background", "not in the tiny-shapes grammar"),
    ],
)
def test_captions_outside_the_grammar_are_refused(caption, message):
    with pytest.raises(ValueError, match=message):
        parse_caption(caption)


def test_renders_are_reproducible_and_in_range():
    a = render(random_scenes(6, torch.Generator().manual_seed(3)), 32, torch.Generator().manual_seed(4))
    b = render(random_scenes(6, torch.Generator().manual_seed(3)), 32, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and a.shape == (6, 3, 32, 32)
    assert a.min() >= -1 and a.max() <= 1


@pytest.mark.parametrize("size", [32, 64])
def test_scorer_is_right_on_clean_renders(size):
    g = torch.Generator().manual_seed(0)
    scenes = random_scenes(400, g)
    images = render(scenes, size, g)
    score = shapes_score(list(images), [s.caption for s in scenes])
    assert score["adherence"] == 1.0 and score["background"] == 1.0 and score["n"] == 400


def test_scorer_reads_pil_images_and_positions():
    from PIL import Image

    g = torch.Generator().manual_seed(1)
    scene = Scene("yellow", "triangle", "purple", "left")
    image = render([scene], 32, g, jitter=False)[0]
    pil = Image.fromarray(((image.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8))
    seen = describe(pil)
    assert (seen["color"], seen["shape"], seen["background"]) == ("yellow", "triangle", "purple")
    assert seen["center"][0] < 0.4


def test_scorer_counts_mistakes():
    g = torch.Generator().manual_seed(2)
    images = render([Scene("red", "circle", "blue"), Scene("red", "square", "blue")], 32, g)
    score = shapes_score(list(images), ["a red circle on a blue background", "a green square on a blue background"])
    assert score["adherence"] == 0.5 and score["color"] == 0.5 and score["shape"] == 1.0


def test_scorer_refuses_mismatched_inputs():
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        shapes_score([np.zeros((4, 4, 3))] * 2, ["a red circle on a blue background"])
    with pytest.raises(ValueError, match="at least one"):
        shapes_score([], [])


def test_word_level_vocabulary_makes_each_word_one_token(tmp_path):
    transformers = pytest.importorskip("transformers")
    words = ["a", "on", "background", *COLORS, *SHAPES]
    vocab, merges = word_level_bpe(words)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(
        write_tokenizer(tmp_path, vocab, merges, model_max_length=16)
    )
    ids = tokenizer("A Red circle on a blue background", padding="max_length", max_length=16).input_ids
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens[:8] == [
        "<|startoftext|>",
        "a</w>",
        "red</w>",
        "circle</w>",
        "on</w>",
        "a</w>",
        "blue</w>",
        "background</w>",
    ]
    assert tokens[8:] == ["<|endoftext|>"] * 8
    # unknown words still tokenize, character by character
    assert tokenizer.convert_ids_to_tokens(tokenizer("pink").input_ids)[1:-1] == ["p", "i", "n", "k</w>"]


def test_vocabulary_words_are_validated():
    with pytest.raises(ValueError, match="lowercase ASCII letters"):
        word_level_bpe(["Red"])
