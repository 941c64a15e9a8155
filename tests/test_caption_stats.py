"""The offline noun tagger against hand-tagged captions, and the caption statistics built on it."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import webdataset as wds

from pixart_lightning.data.caption_stats import caption_statistics, format_table, read_captions, write_statistics
from pixart_lightning.data.nouns import lemmatize, nouns, tag, tokenize
from pixart_lightning.data.shards import DataError

# Hand-tagged nouns (lemmatised), short alt-text style first, then dense LLaVA style. Noun-noun compounds count
# both words ("coffee table"), material nouns used as modifiers are nouns ("brick building"), adjectives and
# participles before a noun are not ("left side", "checkered tablecloth"), "front" in "in front of" is a noun.
GOLD: list[tuple[str, list[str]]] = [
    ("Red apples in a wooden bowl on a kitchen table.", ["apple", "bowl", "kitchen", "table"]),
    ("A man riding a bike down a busy street.", ["man", "bike", "street"]),
    ("Portrait of a young woman with long brown hair.", ["portrait", "woman", "hair"]),
    ("Two dogs playing with a ball in the park.", ["dog", "ball", "park"]),
    ("Aerial view of a city at night", ["view", "city", "night"]),
    ("Stock photo of a businessman holding a cup of coffee", ["stock", "photo", "businessman", "cup", "coffee"]),
    ("Vintage car parked in front of an old brick building", ["car", "front", "brick", "building"]),
    ("Close-up of a butterfly on a yellow flower", ["close-up", "butterfly", "flower"]),
    ("Snow-covered mountains reflected in a calm lake at sunrise", ["mountain", "lake", "sunrise"]),
    ("Children's bedroom with bunk beds and colorful toys", ["child", "bedroom", "bunk", "bed", "toy"]),
    ("Fresh vegetables for sale at a farmers market.", ["vegetable", "sale", "farmer", "market"]),
    ("Black and white photograph of a lighthouse during a storm", ["photograph", "lighthouse", "storm"]),
    (
        "The image features a wooden table with a red cup and a small plate of cookies placed on it.",
        ["image", "table", "cup", "plate", "cookie"],
    ),
    (
        "In the background, there are several trees and a blue sky with a few white clouds.",
        ["background", "tree", "sky", "cloud"],
    ),
    (
        "The scene depicts a busy city street filled with people walking on the sidewalks, while cars and buses "
        "drive past tall buildings.",
        ["scene", "city", "street", "people", "sidewalk", "car", "bus", "building"],
    ),
    (
        "A woman is sitting on a bench in the park, reading a book and enjoying the sunny weather.",
        ["woman", "bench", "park", "book", "weather"],
    ),
    (
        "The kitchen is well-lit and contains a stove, a refrigerator, and a sink, with various utensils hanging on "
        "the wall.",
        ["kitchen", "stove", "refrigerator", "sink", "utensil", "wall"],
    ),
    (
        "A brown dog is lying on the grass next to a frisbee, looking up at its owner.",
        ["dog", "grass", "frisbee", "owner"],
    ),
    (
        "The man is wearing a black jacket and a baseball cap, and he appears to be talking on his cell phone.",
        ["man", "jacket", "baseball", "cap", "cell", "phone"],
    ),
    (
        "On the left side of the image, a small boat is floating on the calm water near the shore.",
        ["side", "image", "boat", "water", "shore"],
    ),
    (
        "The overall atmosphere of the scene is peaceful and inviting, making it a perfect spot for relaxation.",
        ["atmosphere", "scene", "spot", "relaxation"],
    ),
    (
        "The room is decorated with a large sofa, a coffee table, and a bookshelf filled with books.",
        ["room", "sofa", "coffee", "table", "bookshelf", "book"],
    ),
    (
        "Several horses are grazing in a green field surrounded by a wooden fence, with mountains visible in the "
        "distance.",
        ["horse", "field", "fence", "mountain", "distance"],
    ),
    (
        "A plate of spaghetti with tomato sauce and fresh basil leaves sits on a checkered tablecloth.",
        ["plate", "spaghetti", "tomato", "sauce", "basil", "leaf", "tablecloth"],
    ),
    (
        "The photo shows a group of young children playing soccer on a grassy field during a sunny afternoon.",
        ["photo", "group", "child", "soccer", "field", "afternoon"],
    ),
    (
        "A cat is curled up on a windowsill, basking in the warm sunlight that streams through the glass.",
        ["cat", "windowsill", "sunlight", "glass"],
    ),
    (
        "There is a traffic light at the intersection, and a red stop sign can be seen on the corner.",
        ["traffic", "light", "intersection", "stop", "sign", "corner"],
    ),
    (
        "The woman in the painting wears a blue dress and holds an umbrella, standing beside a river.",
        ["woman", "painting", "dress", "umbrella", "river"],
    ),
]

# Written after the word lists were frozen, in two batches, and measured before fixing what each batch revealed (the
# figures in the nouns module docstring); kept as a regression set.
HELD_OUT: list[tuple[str, list[str]]] = [
    ("A golden retriever puppy chewing on a stick in the backyard.", ["retriever", "puppy", "stick", "backyard"]),
    (
        "Sunset over the ocean with palm trees silhouetted against an orange sky",
        ["sunset", "ocean", "palm", "tree", "sky"],
    ),
    ("Bowl of ramen with a soft-boiled egg, sliced pork and green onions", ["bowl", "ramen", "egg", "pork", "onion"]),
    ("Young girl blowing out candles on her birthday cake", ["girl", "candle", "birthday", "cake"]),
    (
        "Modern living room interior with a gray couch and a large window",
        ["living", "room", "interior", "couch", "window"],
    ),
    ("Hikers walking along a rocky trail in the mountains", ["hiker", "trail", "mountain"]),
    (
        "The image shows a red double-decker bus driving down a street lined with shops and restaurants.",
        ["image", "bus", "street", "shop", "restaurant"],
    ),
    (
        "A young boy in a yellow raincoat is jumping into a puddle, splashing water everywhere.",
        ["boy", "raincoat", "puddle", "water"],
    ),
    (
        "In the foreground, a vase of sunflowers sits on a rustic wooden table, and a window behind it lets in soft "
        "natural light.",
        ["foreground", "vase", "sunflower", "table", "window", "light"],
    ),
    (
        "The bride and groom are standing under an arch decorated with white roses, while guests watch from their "
        "seats.",
        ["bride", "groom", "arch", "rose", "guest", "seat"],
    ),
    (
        "A laptop, a notebook, and a pair of glasses are arranged neatly on a desk next to a steaming mug of tea.",
        ["laptop", "notebook", "pair", "glass", "desk", "mug", "tea"],
    ),
    (
        "Two cyclists ride side by side on a country road bordered by fields of lavender.",
        ["cyclist", "side", "side", "country", "road", "field", "lavender"],
    ),
    (
        "The street is lined with colorful houses, and a few pedestrians can be seen strolling along the sidewalk.",
        ["street", "house", "pedestrian", "sidewalk"],
    ),
    (
        "A chef in a white uniform is preparing a dish in a busy restaurant kitchen, surrounded by pots and pans.",
        ["chef", "uniform", "dish", "restaurant", "kitchen", "pot", "pan"],
    ),
    (
        "An elderly man sits on a park bench feeding pigeons, with autumn leaves scattered on the ground around him.",
        ["man", "park", "bench", "pigeon", "autumn", "leaf", "ground"],
    ),
    (
        "The painting depicts a stormy sea with large waves crashing against the rocks and a small ship struggling in "
        "the distance.",
        ["painting", "sea", "wave", "rock", "ship", "distance"],
    ),
    ("Men's leather wallet with coin pocket, brown", ["man", "leather", "wallet", "coin", "pocket"]),
    ("Beautiful sunset at the beach in Bali, Indonesia", ["sunset", "beach", "bali", "indonesia"]),
    ("Wedding rings on a white pillow", ["wedding", "ring", "pillow"]),
    ("Happy family having a picnic in the park on a summer day", ["family", "picnic", "park", "summer", "day"]),
    ("Watercolor illustration of a fox in the forest", ["watercolor", "illustration", "fox", "forest"]),
    ("Used Toyota sedan for sale in Chicago", ["toyota", "sedan", "sale", "chicago"]),
    (
        "The image captures a serene mountain landscape with a crystal-clear lake reflecting the snow-capped peaks.",
        ["image", "mountain", "landscape", "lake", "peak"],
    ),
    (
        "A group of friends is gathered around a campfire at night, roasting marshmallows and laughing.",
        ["group", "friend", "campfire", "night", "marshmallow"],
    ),
    (
        "The bakery display case is filled with an assortment of pastries, including croissants, muffins, and "
        "cupcakes topped with pink frosting.",
        ["bakery", "display", "case", "assortment", "pastry", "croissant", "muffin", "cupcake", "frosting"],
    ),
    (
        "A black cat with green eyes is peeking out from behind a curtain, its tail curled around its paws.",
        ["cat", "eye", "curtain", "tail", "paw"],
    ),
    (
        "The photograph shows an old farmhouse surrounded by rolling hills covered in wildflowers under a clear blue "
        "sky.",
        ["photograph", "farmhouse", "hill", "wildflower", "sky"],
    ),
    (
        "Several people are waiting at the bus stop, some of them looking at their phones while others chat.",
        ["people", "bus", "stop", "phone"],
    ),
    (
        "A man in a suit is giving a presentation to a small audience in a conference room with a large screen "
        "behind him.",
        ["man", "suit", "presentation", "audience", "conference", "room", "screen"],
    ),
    (
        "The close-up shot highlights the intricate details of a butterfly's wings, with vibrant blue and black "
        "patterns.",
        ["close-up", "shot", "detail", "butterfly", "wing", "pattern"],
    ),
    (
        # a known miss: the tagger reads "sets" here as a plural noun (as in "tea sets.")
        "Fishing boats are docked in a small harbor, and seagulls fly above the calm water as the sun sets.",
        ["fishing", "boat", "harbor", "seagull", "water", "sun"],
    ),
    (
        "A little girl holds a bunch of balloons while her father takes a picture with his camera.",
        ["girl", "bunch", "balloon", "father", "picture", "camera"],
    ),
]


def precision_recall(gold: list[tuple[str, list[str]]]) -> tuple[float, float]:
    """Noun precision and recall of ``nouns`` over sentences, counting repeats (multiset overlap per sentence)."""
    hits = predicted = expected = 0
    for sentence, want in gold:
        got = Counter(nouns(sentence))
        hits += sum((got & Counter(want)).values())
        predicted += sum(got.values())
        expected += len(want)
    return hits / predicted, hits / expected


@pytest.mark.parametrize("gold", [GOLD, HELD_OUT], ids=["gold", "held-out"])
def test_noun_precision_and_recall(gold):
    precision, recall = precision_recall(gold)
    assert precision >= 0.85, precision
    assert recall >= 0.85, recall


@pytest.mark.parametrize(
    "sentence, word, expected",
    [
        ("The image features a wooden table.", "features", "VERB"),
        ("The features of her face are soft.", "features", "NOUN"),
        ("A man leaves the room.", "leaves", "VERB"),
        ("Green leaves cover the ground.", "leaves", "NOUN"),
        ("a red stop sign", "stop", "NOUN"),
        ("a sleeping cat on the sofa", "sleeping", "ADJ"),
        ("a can of soda", "can", "NOUN"),
        ("the sign can be seen", "can", "VERB"),
        ("people walk along the beach", "walk", "VERB"),
        ("a walk along the beach", "walk", "NOUN"),
        ("she wants to light the candles", "light", "VERB"),
        ("a light blue shirt", "light", "ADJ"),
        ("the living room", "living", "NOUN"),
        ("a living creature", "living", "ADJ"),
        ("A woman painting a fence.", "painting", "VERB"),
        ("The painting shows a ship.", "painting", "NOUN"),
        ("the back of the car", "back", "NOUN"),
        ("he looks back at the dog", "back", "ADV"),
        ("a cat inside the box", "inside", "ADP"),
        ("her father", "father", "NOUN"),  # not "fat" + "-her"
        ("a taller tree", "taller", "ADJ"),
        ("a grassy field", "grassy", "ADJ"),
        ("She walked to Paris.", "Paris", "NOUN"),
    ],
)
def test_context_decides_ambiguous_words(sentence, word, expected):
    assert dict(tag(tokenize(sentence)))[word] == expected


def test_tokenize_and_tag_shapes():
    tokens = tokenize("Children's toys, a 3-year-old boy and a close-up; it's sunny.")
    assert tokens == [
        "Children", "'s", "toys", ",", "a", "3-year-old", "boy", "and", "a", "close-up", ";", "it", "'s", "sunny", ".",
    ]  # fmt: skip
    tags = tag(tokens)
    assert [t for t, _ in tags] == tokens
    assert {t for _, t in tags} <= {"NOUN", "VERB", "ADJ", "ADV", "DET", "PRON", "ADP", "CONJ", "NUM", "PUNCT", "OTHER"}
    assert dict(tags)["'s"] == "VERB"  # "it's": the second "'s" wins in the dict; the first is possessive
    assert tags[1] == ("'s", "OTHER")
    assert nouns("Children's toys, a 3-year-old boy and a close-up; it's sunny.") == ["child", "toy", "boy", "close-up"]
    assert nouns("") == [] and tag([]) == []


@pytest.mark.parametrize(
    "plural, singular",
    [
        ("cats", "cat"), ("boxes", "box"), ("berries", "berry"), ("leaves", "leaf"), ("knives", "knife"),
        ("shelves", "shelf"), ("sleeves", "sleeve"), ("children", "child"), ("women", "woman"), ("firemen", "fireman"),
        ("feet", "foot"), ("mice", "mouse"), ("buses", "bus"), ("glasses", "glass"), ("dishes", "dish"),
        ("benches", "bench"), ("tomatoes", "tomato"), ("shoes", "shoe"), ("photos", "photo"), ("cookies", "cookie"),
        ("skies", "sky"), ("houses", "house"), ("toys", "toy"), ("skis", "ski"), ("T-Shirts", "t-shirt"),
        ("bus", "bus"), ("grass", "grass"), ("cactus", "cactus"), ("tennis", "tennis"), ("series", "series"),
        ("people", "people"), ("jeans", "jeans"), ("canvas", "canvas"), ("Dog", "dog"),
    ],
)  # fmt: skip
def test_lemmatize(plural, singular):
    assert lemmatize(plural) == singular


def test_statistics_arithmetic():
    captions = {
        "original": ["a cat", "two cats", "a cat and a dog", None, "   "],
        "dense": [],
    }
    stats = caption_statistics(captions, valid_min_count=2)
    original = stats["original"]
    assert original["captions"] == 3 and original["missing"] == 2
    assert original["words_mean"] == 3.0 and original["words_median"] == 2
    assert original["total_nouns"] == 4 and original["distinct_nouns"] == 2
    assert original["valid_distinct_nouns"] == 1  # cat: 3 > 2; dog: 1
    assert original["valid_ratio"] == 0.5
    assert original["nouns_per_caption"] == pytest.approx(4 / 3)
    assert original["top_nouns"] == [["cat", 3], ["dog", 1]]
    assert stats["dense"]["captions"] == 0 and stats["dense"]["words_mean"] is None
    assert stats["dense"]["valid_ratio"] is None and stats["dense"]["nouns_per_caption"] is None
    # "more than" the threshold: a noun seen exactly valid_min_count times is not valid
    assert caption_statistics(captions, valid_min_count=3)["original"]["valid_distinct_nouns"] == 0
    assert caption_statistics(captions, valid_min_count=0)["original"]["valid_distinct_nouns"] == 2


def test_top_nouns_are_the_20_most_frequent_then_alphabetical():
    words = [f"{chr(ord('a') + i)}zeb" for i in range(25)]  # unknown words: nouns by default
    texts = [" and ".join(words), words[-1], words[-1], words[-2]]
    top = caption_statistics({"c": texts})["c"]["top_nouns"]
    assert len(top) == 20
    assert top[:3] == [["yzeb", 3], ["xzeb", 2], ["azeb", 1]]


def write_shard(path, samples):
    """Text fields are written UTF-8 encoded, bytes verbatim (to plant a caption that is not UTF-8)."""
    with wds.TarWriter(str(path), encoder=False) as sink:
        for sample in samples:
            sink.write({k: v.encode() if isinstance(v, str) and k != "__key__" else v for k, v in sample.items()})


@pytest.fixture
def shards(tmp_path):
    """Two shards: five samples, one caption not UTF-8, one blank, one sample without a dense caption."""
    write_shard(tmp_path / "shard-000.tar", [
        {"__key__": "s0", "jpg": b"\xff\xd8", "txt": "A cat on a sofa.", "dense.txt": "The image features a cat."},
        {"__key__": "s1", "txt": b"caf\xe9 with a dog", "dense.txt": "A dog sits in a cafe."},
        {"__key__": "s2", "txt": "Two dogs in a park"},
    ])  # fmt: skip
    write_shard(tmp_path / "shard-001.tar", [
        {"__key__": "s3", "txt": "   ", "dense.txt": "A red cup on a wooden table."},
        {"__key__": "s4", "txt": "A cup", "dense.txt": "A cup of coffee and a plate of cookies."},
    ])  # fmt: skip
    return tmp_path


def test_read_captions_from_shards(shards):
    expected = {
        "txt": ["A cat on a sofa.", None, "Two dogs in a park", None, "A cup"],
        "dense.txt": [
            "The image features a cat.", "A dog sits in a cafe.", None, "A red cup on a wooden table.",
            "A cup of coffee and a plate of cookies.",
        ],
    }  # fmt: skip
    assert read_captions(str(shards)) == expected
    assert read_captions(f"{shards}/shard-{{000..001}}.tar") == expected
    assert read_captions(str(shards / "shard-001.tar"), keys=("dense.txt",)) == {"dense.txt": expected["dense.txt"][3:]}


def test_read_captions_errors(tmp_path):
    with pytest.raises(DataError, match="no .tar shards"):
        read_captions(str(tmp_path))
    with pytest.raises(DataError, match="2 of 2 shards do not exist"):
        read_captions(f"{tmp_path}/shard-{{0..1}}.tar")
    with pytest.raises(ValueError, match="caption key"):
        read_captions(str(tmp_path), keys=())


def test_table_and_json_from_shards(shards, tmp_path):
    captions = read_captions(str(shards))
    stats = caption_statistics({"original": captions["txt"], "dense": captions["dense.txt"]}, valid_min_count=1)
    assert stats["original"]["missing"] == 2 and stats["dense"]["missing"] == 1
    # original: 5 + 5 + 2 words; nouns cat sofa | dog park | cup -> 5 total, 5 distinct, none seen twice
    # dense: 5 + 6 + 7 + 9 words; nouns image cat | dog cafe | cup table | cup coffee plate cookie -> 10 total,
    # 9 distinct, only "cup" seen more than once
    table = format_table(stats)
    lines = table.splitlines()
    assert lines[0].split() == ["captions", "words/caption", "total", "nouns", "distinct", "nouns", "valid",
                                "distinct", "(VN/DN)", "nouns/caption"]  # fmt: skip
    assert lines[2].split() == ["original", "3", "4.00", "5", "5", "0", "(0.0%)", "1.67"]
    assert lines[3].split() == ["dense", "4", "6.75", "10", "9", "1", "(11.1%)", "2.50"]
    assert "more than 1 times" in lines[-1]

    out = tmp_path / "reports" / "caption_stats.json"
    write_statistics(stats, out)
    out.write_text("stale")  # overwritten whole
    write_statistics(stats, out)
    assert json.loads(out.read_text()) == stats
    assert [p.name for p in out.parent.iterdir()] == ["caption_stats.json"]  # no temporary file left behind
