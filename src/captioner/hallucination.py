"""Object hallucination: CHAIR (Rohrbach et al. 2018, "Object hallucination in image captioning").

A caption *hallucinates* when it names one of COCO's 80 object categories that none of the photo's
reference captions names. Words are mapped to categories with the synonym list below (after Rohrbach et
al.'s, plurals included); two-word names are matched first, so "hot dog" is food, "teddy bear" a toy,
and neither a dog nor a bear. Reported, on the 0-100 scale like the other scores:

  CHAIR-s   captions that name at least one hallucinated object / all captions
  CHAIR-i   hallucinated objects / all objects named (each category counted once per caption)
  grounded  captions that name at least one object a reference names / all captions
            (a caption that names nothing hallucinates nothing, but it is not grounded either)

The reference side uses the captions only (not COCO's segmentations), so it works on any data set.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from captioner.vocab import tokenize

# category: its names and synonyms (singular; plurals are added below)
SYNONYMS: dict[str, tuple[str, ...]] = {
    "person": (
        "person",
        "people",
        "man",
        "men",
        "woman",
        "women",
        "boy",
        "girl",
        "child",
        "children",
        "kid",
        "baby",
        "toddler",
        "adult",
        "lady",
        "gentleman",
        "guy",
        "teenager",
        "teen",
        "player",
        "skier",
        "snowboarder",
        "skateboarder",
        "skater",
        "surfer",
        "rider",
        "biker",
        "cyclist",
        "bicyclist",
        "worker",
        "chef",
        "cook",
        "baker",
        "officer",
        "policeman",
        "cop",
        "soldier",
        "student",
        "crowd",
        "mother",
        "father",
        "daughter",
        "son",
        "brother",
        "sister",
        "friend",
        "bride",
        "groom",
        "batter",
        "catcher",
        "pitcher",
        "umpire",
        "tourist",
        "pedestrian",
        "passenger",
        "driver",
        "swimmer",
        "runner",
        "climber",
        "hiker",
        "dancer",
        "athlete",
        "spectator",
        "infant",
        "youngster",
        "someone",
        "individual",
        "male",
        "female",
        "cowboy",
        "doctor",
        "nurse",
        "customer",
        "vendor",
        "wrestler",
    ),
    "bicycle": ("bicycle", "bike", "tricycle", "unicycle"),
    "car": ("car", "automobile", "van", "minivan", "sedan", "suv", "taxi", "cab", "jeep"),
    "motorcycle": ("motorcycle", "motorbike", "motor bike", "scooter", "moped", "dirt bike"),
    "airplane": ("airplane", "plane", "jet", "aircraft", "airliner", "jetliner"),
    "bus": ("bus", "trolley"),
    "train": ("train", "locomotive", "tram", "subway"),
    "truck": ("truck", "pickup", "lorry", "hauler", "firetruck", "fire truck"),
    "boat": ("boat", "ship", "liner", "sailboat", "kayak", "canoe", "yacht", "ferry", "raft", "rowboat"),
    "traffic light": ("traffic light", "stop light", "stoplight", "traffic signal", "street light"),
    "fire hydrant": ("fire hydrant", "hydrant"),
    "stop sign": ("stop sign",),
    "parking meter": ("parking meter",),
    "bench": ("bench",),
    "bird": (
        "bird",
        "ostrich",
        "owl",
        "seagull",
        "gull",
        "goose",
        "duck",
        "parakeet",
        "parrot",
        "pigeon",
        "dove",
        "swan",
        "eagle",
        "hawk",
        "crow",
        "robin",
        "penguin",
        "flamingo",
        "pelican",
        "chicken",
        "hen",
        "rooster",
    ),
    "cat": ("cat", "kitten", "kitty"),
    "dog": ("dog", "puppy", "pup", "poodle", "terrier", "retriever", "collie", "beagle", "dachshund"),
    "horse": ("horse", "pony", "foal", "stallion", "mare", "colt"),
    "sheep": ("sheep", "lamb", "ram"),
    "cow": ("cow", "cattle", "bull", "calf", "ox", "oxen", "steer"),
    "elephant": ("elephant",),
    "bear": ("bear", "polar bear", "grizzly"),
    "zebra": ("zebra",),
    "giraffe": ("giraffe",),
    "backpack": ("backpack", "knapsack", "rucksack"),
    "umbrella": ("umbrella", "parasol"),
    "handbag": ("handbag", "purse", "bag", "pocketbook", "clutch"),
    "tie": ("tie", "necktie", "bow tie"),
    "suitcase": ("suitcase", "luggage", "suit case"),
    "frisbee": ("frisbee", "flying disc"),
    "skis": ("ski", "skis"),
    "snowboard": ("snowboard",),
    "sports ball": ("ball", "football", "soccer ball", "basketball", "baseball", "volleyball", "softball"),
    "kite": ("kite",),
    "baseball bat": ("baseball bat", "bat"),
    "baseball glove": ("baseball glove", "glove", "mitt"),
    "skateboard": ("skateboard", "skate board"),
    "surfboard": ("surfboard", "surf board", "paddleboard"),
    "tennis racket": ("tennis racket", "racket", "racquet"),
    "bottle": ("bottle",),
    "wine glass": ("wine glass", "wineglass"),
    "cup": ("cup", "mug"),
    "fork": ("fork",),
    "knife": ("knife", "knives"),
    "spoon": ("spoon",),
    "bowl": ("bowl",),
    "banana": ("banana",),
    "apple": ("apple",),
    "sandwich": ("sandwich", "burger", "hamburger", "cheeseburger"),
    "orange": ("orange",),
    "broccoli": ("broccoli",),
    "carrot": ("carrot",),
    "hot dog": ("hot dog", "hotdog"),
    "pizza": ("pizza",),
    "donut": ("donut", "doughnut"),
    "cake": ("cake", "cupcake", "cheesecake"),
    "chair": ("chair", "stool"),
    "couch": ("couch", "sofa"),
    "potted plant": ("potted plant", "plant", "houseplant"),
    "bed": ("bed",),
    "dining table": ("dining table", "table", "desk"),
    "toilet": ("toilet", "urinal"),
    "tv": ("tv", "television", "monitor"),
    "laptop": ("laptop", "computer", "notebook"),
    "mouse": ("mouse",),
    "remote": ("remote", "remote control", "controller"),
    "keyboard": ("keyboard",),
    "cell phone": ("cell phone", "phone", "cellphone", "smartphone", "mobile phone"),
    "microwave": ("microwave",),
    "oven": ("oven", "stove"),
    "toaster": ("toaster",),
    "sink": ("sink",),
    "refrigerator": ("refrigerator", "fridge", "freezer"),
    "book": ("book", "novel"),
    "clock": ("clock",),
    "vase": ("vase",),
    "scissors": ("scissors",),
    "teddy bear": ("teddy bear", "teddy", "stuffed animal", "teddybear"),
    "hair drier": ("hair drier", "hair dryer", "hairdryer", "blow dryer"),
    "toothbrush": ("toothbrush", "tooth brush"),
}

_IRREGULAR = {
    "person": "people",
    "man": "men",
    "woman": "women",
    "child": "children",
    "mouse": "mice",
    "knife": "knives",
    "goose": "geese",
    "calf": "calves",
    "ox": "oxen",
    "foot": "feet",
}


def plural(name: str) -> str:
    head, _, last = name.rpartition(" ")
    if last in _IRREGULAR:
        last = _IRREGULAR[last]
    elif last.endswith(("s", "x", "ch", "sh")):
        last += "es"
    elif last.endswith("y") and last[-2:-1] not in "aeiou":
        last = last[:-1] + "ies"
    else:
        last += "s"
    return f"{head} {last}".strip()


def _build_lookup() -> dict[tuple[str, ...], str]:
    lookup: dict[tuple[str, ...], str] = {}
    for category, names in SYNONYMS.items():
        for name in names:
            for form in (name, plural(name)):
                lookup.setdefault(tuple(form.split()), category)
    return lookup


_LOOKUP = _build_lookup()
_LONGEST = max(len(k) for k in _LOOKUP)


def objects(caption: str) -> set[str]:
    """The COCO categories a caption names; the longest name wins ("hot dog" before "dog")."""
    words = tokenize(caption)
    found, i = set(), 0
    while i < len(words):
        for n in range(min(_LONGEST, len(words) - i), 0, -1):
            category = _LOOKUP.get(tuple(words[i : i + n]))
            if category is not None:
                found.add(category)
                i += n
                break
        else:
            i += 1
    return found


def chair(captions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """CHAIR-s, CHAIR-i and grounded (0-100) of generated `captions` against each image's `references`."""
    hallucinating = grounded = mentions = invented = 0
    for key, caption in captions.items():
        named = objects(caption)
        truth = set().union(*map(objects, references[key])) if references[key] else set()
        wrong = named - truth
        hallucinating += bool(wrong)
        grounded += bool(named & truth)
        mentions += len(named)
        invented += len(wrong)
    n = max(len(captions), 1)
    return {
        "CHAIR-s": 100.0 * hallucinating / n,
        "CHAIR-i": 100.0 * invented / max(mentions, 1),
        "grounded": 100.0 * grounded / n,
    }


def invented_objects(captions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> Iterable[str]:
    """Every hallucinated category, once per caption: what `Counter` turns into "29 invent a dog"."""
    for key, caption in captions.items():
        truth = set().union(*map(objects, references[key])) if references[key] else set()
        yield from sorted(objects(caption) - truth)
