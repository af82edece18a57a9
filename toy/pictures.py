"""The toy world's pictures: what can be drawn, how it is drawn, and how a drawing is judged.

64x64 RGB pictures of two kinds: simple objects (circle / square / triangle in six colours, counts 1-4, left /
right / above / below) on light backgrounds, and twelve named scenes (aurora, sunset over the sea, summer and
winter landscapes for "the Northern / Southern Hemisphere in June", teddy bear, cookies on a rack, ...), the
paper's own example prompts (arXiv 2503.06542, Section 3.3 and Appendix 6.1-6.2); the compositions held out of
training; GenEval-style specs of what a request asks for; and the rule-based judges the evaluation needs: an object
detector and GenEval checker, and a scene classifier. world.py writes the conversations about these pictures.
Everything that samples takes a random.Random: same seed, same bytes.

  python -m pytest tests/test_world.py -s                     # prints the judges' measured accuracies
"""
import math
import random
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

# ===================================================================================================================
# 1. Vocabulary and the held-out compositions
# ===================================================================================================================

SIZE = 64
CELL, OBJ = 8, 16  # the toy VQGAN's code cell, and an object's side (2x2 cells)
SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 30, 40), "orange": (245, 125, 0), "yellow": (240, 215, 0),  # saturated, hues >= 25 deg
           "green": (30, 165, 60), "blue": (35, 85, 225), "purple": (145, 50, 200)}  # apart
BACKGROUNDS = ((246, 242, 230), (232, 238, 246), (246, 233, 236), (232, 244, 234))
NUMBERS = ("zero", "one", "two", "three", "four")
RELATIONS = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")  # GenEval's six
HELDOUT_CATEGORIES = ("counting", "colors", "color_attr")  # where a held-out composition can be asked for

# Never in any training image, prompt or answer; only in evaluation. None of them is drawn by a scene painter
# either (suns are yellow, cookies too pale, pines dark and tiered), which tests/test_world.py checks with detect().
HELDOUT_COLOUR_SHAPE = (("blue", "circle"), ("red", "triangle"), ("purple", "square"))
HELDOUT_COUNT_SHAPE = ((3, "triangle"), (4, "circle"))
TRAIN_PAIRS = tuple((c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELDOUT_COLOUR_SHAPE)


def colour_for(rng, shape):
    """A colour that the training split allows for this shape."""
    return rng.choice([c for c, s in TRAIN_PAIRS if s == shape])


def train_ok(objects) -> bool:
    """True when a list of Obj holds no held-out colour-shape pair and no held-out count of a shape."""
    counts = Counter(o.shape for o in objects)
    return (all((o.colour, o.shape) not in HELDOUT_COLOUR_SHAPE for o in objects)
            and all(counts[s] != n for n, s in HELDOUT_COUNT_SHAPE))


# ===================================================================================================================
# 2. Scene graph and object pictures
# ===================================================================================================================

@dataclass
class Obj:
    shape: str
    colour: str
    cx: float  # centre, in pixels
    cy: float
    size: int  # side of the bounding square, in pixels


@dataclass
class Picture:
    """Scene graph of one image: simple objects on a light gradient, or one of the named SCENES."""
    scene: str = "objects"  # "objects" or a key of SCENES
    objects: list = field(default_factory=list)
    background: tuple = ((240, 240, 240), (240, 240, 240))  # top and bottom colour of the vertical gradient
    seed: int = 0  # drives a scene painter's random variation


def _vgrad(d, top, bottom, y0=0, y1=SIZE):
    for y in range(y0, y1):
        t = (y - y0) / max(1, y1 - y0 - 1)
        d.line([(0, y), (SIZE - 1, y)], fill=tuple(round(a + (b - a) * t) for a, b in zip(top, bottom)))


def _jit(rgb, r, a=12):
    return tuple(min(255, max(0, c + r.randint(-a, a))) for c in rgb)


def render(pic: Picture) -> Image.Image:
    """Scene graph -> 64x64 RGB image. Flat fills, no antialiasing: a tiny VQGAN has to reconstruct them."""
    im = Image.new("RGB", (SIZE, SIZE))
    d = ImageDraw.Draw(im)
    if pic.scene != "objects":
        SCENES[pic.scene].paint(d, random.Random(pic.seed))
        return im
    _vgrad(d, *pic.background)
    for o in pic.objects:
        x0, y0 = o.cx - o.size / 2, o.cy - o.size / 2
        x1, y1 = x0 + o.size - 1, y0 + o.size - 1
        fill = COLOURS[o.colour]
        if o.shape == "circle":
            d.ellipse([x0, y0, x1, y1], fill=fill)
        elif o.shape == "square":
            d.rectangle([x0, y0, x1, y1], fill=fill)
        else:  # upright triangle, apex on top
            d.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
    return im


def _apart(a, b, gap=CELL):
    need = (a.size + b.size) / 2 + gap
    return abs(a.cx - b.cx) >= need or abs(a.cy - b.cy) >= need


# how far (px) two objects in a relation may sit apart on the other axis: at 8 one of a left/right pair is often a
# cell higher than the other, so in raster order the right-hand object is often drawn first
ACROSS = 8


@contextmanager
def across_at(px):
    """ACROSS set to px (None: as it is) inside a with block, for data that places its pairs otherwise."""
    global ACROSS
    keep, ACROSS = ACROSS, ACROSS if px is None else px
    try:
        yield
    finally:
        ACROSS = keep


def _clearly(a, b, rel):
    """a is <rel> b by at least an object's width on that axis and at most ACROSS px off on the other axis."""
    dx, dy = b.cx - a.cx, b.cy - a.cy
    along, across = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[rel]
    return along >= 16 and abs(across) <= ACROSS


def place(items, rng, relation=None) -> list:
    """Objects for items [(shape, colour)]: 16 px squares on the 8 px code grid, a cell away from the border and
    from each other; with a relation, items[0] is clearly <relation> items[1]. Rejection sampling, so
    deterministic for a given rng state.

    Why on the grid: each object then always covers the same 2x2 block of VQ cells, so the toy VQGAN needs only a
    few codes per object and the drawing model learns a layout of code blocks, which a CPU can learn in minutes.
    Off-grid objects make every edge a new code pattern (measured: blobs after 16K training pictures)."""
    slots = range(CELL, SIZE - OBJ - CELL + 1, CELL)  # top-left corners 8, 16, ..., 40
    for _ in range(4000):
        objs = [Obj(shape, colour, rng.choice(slots) + OBJ / 2, rng.choice(slots) + OBJ / 2, OBJ)
                for shape, colour in items]
        if (all(_apart(a, b) for i, a in enumerate(objs) for b in objs[i + 1:])
                and (relation is None or _clearly(objs[0], objs[1], relation))):
            return objs
    raise RuntimeError(f"could not place {items} with relation {relation}")


def random_background(rng):
    top = rng.choice(BACKGROUNDS)
    return top, top  # flat: a gradient would make every row of background cells a different code


def random_objects(rng) -> Picture:
    """1-4 random objects, never a held-out composition."""
    while True:
        objs = place([(s, c) for c, s in (rng.choice(TRAIN_PAIRS) for _ in range(rng.randint(1, 4)))], rng)
        if train_ok(objs):
            return Picture("objects", objs, random_background(rng))


# ===================================================================================================================
# 3. Named scenes: each painter draws one random variation from its rng
# ===================================================================================================================

def _disc(d, x, y, rx, fill, ry=None):
    d.ellipse([x - rx, y - (ry or rx), x + rx, y + (ry or rx)], fill=fill)


def _hills(d, r, y, amp, colour):
    ph, f = r.uniform(0, 6.3), r.uniform(0.08, 0.15)
    d.polygon([(x, y + amp * math.sin(f * x + ph)) for x in range(0, SIZE + 4, 4)] + [(SIZE, SIZE), (0, SIZE)],
              fill=colour)


def _dots(d, r, n, bottom, colour, big=0.0):
    for _ in range(n):
        x, y = r.randint(0, SIZE - 1), r.randint(0, bottom)
        d.rectangle([x, y, x + (r.random() < big), y + (r.random() < big)], fill=colour)


def _aurora(d, r):
    _vgrad(d, _jit((8, 12, 35), r, 6), _jit((20, 30, 70), r, 8))
    _dots(d, r, r.randint(8, 16), 40, (230, 235, 255))
    for k in range(3):  # ribbons of green and teal light, stacked in the upper sky
        y0, amp, ph = 12 + 7 * k + r.randint(-3, 3), r.uniform(3, 7), r.uniform(0, 6.3)
        colour = _jit(r.choice([(60, 230, 140), (40, 210, 190), (90, 240, 120)]), r)
        d.line([(x, y0 + amp * math.sin(x / 9 + ph)) for x in range(-4, 72, 4)], fill=colour, width=r.randint(4, 7))
    _hills(d, r, r.randint(48, 54), 3, _jit((12, 18, 22), r, 4))


def _sunset(d, r):
    h, x, rad = r.randint(32, 40), r.randint(14, 50), r.randint(6, 10)
    _vgrad(d, _jit((235, 105, 60), r), _jit((255, 190, 110), r), 0, h)
    _disc(d, x, h, rad, _jit((255, 225, 120), r, 6))  # the sea then hides its lower half
    _vgrad(d, _jit((40, 50, 110), r), _jit((15, 25, 70), r), h, SIZE)
    for y in range(h + 2, SIZE, 4):  # the sun's golden path on the water
        w = rad * (1.2 - (y - h) / 40)
        d.line([(x - w, y), (x + w, y)], fill=(250, 170, 80))


def _rainforest(d, r):
    d.rectangle([0, 0, SIZE, SIZE], fill=_jit((15, 55, 25), r, 6))
    for x in (r.randint(0, 60) for _ in range(r.randint(3, 5))):  # trunks
        d.rectangle([x, 0, x + r.randint(2, 4), SIZE], fill=_jit((70, 45, 25), r, 8))
    for _ in range(r.randint(40, 60)):  # layer upon layer of leaves
        green = _jit(r.choice([(30, 120, 40), (50, 160, 60), (20, 90, 35), (80, 170, 60)]), r, 10)
        rad = r.randint(4, 9)
        _disc(d, r.randint(-4, 68), r.randint(-4, 68), rad, green, ry=rad * 0.7)


def _summer(d, r):
    h = r.randint(28, 38)
    _vgrad(d, _jit((90, 160, 235), r), _jit((170, 210, 245), r), 0, h)
    _disc(d, r.choice([r.randint(8, 18), r.randint(46, 56)]), r.randint(6, 12), r.randint(5, 7),
          _jit((255, 220, 50), r, 6))
    _vgrad(d, _jit((100, 195, 70), r), _jit((50, 150, 50), r), h, SIZE)
    for _ in range(r.randint(1, 3)):  # round trees on the meadow
        x, y, rad = r.randint(6, 58), h + r.randint(-2, 10), r.randint(5, 8)
        d.rectangle([x - 1, y, x + 1, y + rad + 3], fill=_jit((100, 65, 35), r, 8))
        _disc(d, x, y - rad + 2, rad, _jit((30, 115, 40), r, 8))


def _winter(d, r):
    h = r.randint(26, 36)
    _vgrad(d, _jit((160, 175, 195), r, 8), _jit((205, 212, 226), r, 8), 0, h)
    d.rectangle([0, h, SIZE, SIZE], fill=_jit((246, 248, 252), r, 3))
    d.ellipse([r.randint(-30, 20), h + r.randint(6, 14), r.randint(40, 90), SIZE + 20], fill=(215, 225, 240))
    for _ in range(r.randint(2, 4)):  # dark pines of three tiers, dusted with snow (never a clean triangle)
        x, base, s = r.randint(6, 58), h + r.randint(0, 16), r.randint(6, 9)
        d.rectangle([x - 1, base, x + 1, base + 3], fill=(70, 50, 35))
        for k in range(3):
            top, w = base - (k + 1) * s * 0.8, s * (1 - 0.25 * k)
            d.polygon([(x, top - 2), (x - w, top + s), (x + w, top + s)], fill=_jit((22, 55, 42), r, 5))
            d.line([(x - w + 2, top + s), (x + w - 2, top + s)], fill=(240, 244, 250))
    _dots(d, r, r.randint(20, 40), 63, (252, 252, 255), big=0.3)  # falling snow


def _river(d, r):
    h = r.randint(10, 18)
    _vgrad(d, _jit((110, 170, 235), r), _jit((180, 215, 245), r), 0, h)
    _vgrad(d, _jit((70, 150, 55), r), _jit((60, 170, 60), r), h, SIZE)
    x0, x1, amp, ph = r.randint(24, 40), r.randint(22, 42), r.uniform(3, 7), r.uniform(0, 6.3)
    left, right = [], []
    for y in range(h, SIZE + 4, 4):  # a river winding towards us, wider as it comes closer
        t = (y - h) / (SIZE - h)
        c, w = x0 + (x1 - x0) * t + amp * t * math.sin(y / 8 + ph), 2 + 13 * t
        left.append((c - w, y))
        right.append((c + w, y))
    d.polygon(left + right[::-1], fill=_jit((50, 110, 200), r))
    for _ in range(r.randint(3, 6)):  # bushes on the banks
        _disc(d, r.choice([r.randint(0, 14), r.randint(50, 63)]), r.randint(h + 4, 60), 3, _jit((30, 100, 35), r, 8))


def _mountains(d, r):
    _vgrad(d, _jit((95, 155, 230), r), _jit((170, 205, 240), r))
    for _ in range(r.randint(2, 3)):
        px, py, w, f = r.randint(10, 54), r.randint(8, 22), r.randint(22, 34), r.uniform(0.25, 0.35)
        d.polygon([(px, py), (px - w, 56), (px + w, 56)], fill=_jit((115, 118, 132), r, 10))
        cap = py + f * (56 - py)  # the snow cap: the top quarter to third of the peak
        d.polygon([(px, py), (px - w * f, cap), (px + w * f, cap)], fill=_jit((248, 250, 252), r, 3))
    _hills(d, r, r.randint(50, 54), 2, _jit((60, 120, 70), r, 8))


def _teddy(d, r):
    floor = r.randint(46, 52)
    d.rectangle([0, 0, SIZE, floor], fill=_jit((150, 190, 225), r, 10))  # a blue wall
    d.rectangle([0, floor, SIZE, SIZE], fill=_jit((175, 125, 75), r, 8))  # a wooden floor
    x, y, k = r.randint(26, 38), r.randint(40, 46), r.uniform(0.9, 1.1)  # belly centre, scale
    brown, tan, dark = _jit((150, 95, 50), r, 10), _jit((215, 175, 125), r, 8), (20, 15, 10)
    parts = [(sx * dx, dy, rx, ry, brown) for sx in (-1, 1) for dx, dy, rx, ry in ((11, -2, 4, 6), (7, 9, 5, 4),
                                                                                  (8, -25, 4, 4))]  # arms, feet, ears
    parts += [(0, 0, 10, 11, brown), (0, 1, 6, 7, tan), (0, -18, 10, 9, brown), (0, -15, 4, 3, tan),
              (-4, -20, 1.2, 1.2, dark), (4, -20, 1.2, 1.2, dark), (0, -16, 1.5, 1, dark)]  # body, head, face
    for dx, dy, rx, ry, fill in parts:
        _disc(d, x + dx * k, y + dy * k, rx * k, fill, ry=ry * k)


def _cookies(d, r):
    d.rectangle([0, 0, SIZE, SIZE], fill=_jit((60, 65, 75), r, 8))
    step, off = r.randint(6, 7), r.randint(0, 5)
    for t in range(off, SIZE, step):  # the wire rack
        d.line([(t, 0), (t, SIZE)], fill=(185, 185, 195))
        d.line([(0, t), (SIZE, t)], fill=(185, 185, 195))
    for gx, gy in ((18, 18), (46, 18), (18, 46), (46, 46)):  # four cookies in two rows
        x, y, rad = gx + r.randint(-3, 3), gy + r.randint(-3, 3), r.randint(10, 12)
        _disc(d, x, y, rad, _jit((190, 158, 120), r, 6))  # golden, not saturated: not "an orange circle"
        for _ in range(r.randint(4, 6)):  # chocolate chips
            a, q = r.uniform(0, 6.3), r.uniform(0, rad - 4)
            _disc(d, x + q * math.cos(a), y + q * math.sin(a), 1.5, (75, 42, 22))


def _desert(d, r):
    h = r.randint(22, 30)
    _vgrad(d, _jit((140, 190, 240), r), _jit((200, 225, 245), r), 0, h + 8)
    _disc(d, r.randint(8, 56), r.randint(5, 12), 5, (255, 245, 200))
    for i, sand in enumerate([(235, 200, 125), (222, 175, 98), (205, 150, 80)]):  # dunes, back to front
        _hills(d, r, h + i * 10, 4, _jit(sand, r, 8))


def _night(d, r):
    top, bottom = _jit((5, 8, 25), r, 4), _jit((25, 30, 70), r, 8)
    _vgrad(d, top, bottom)
    _dots(d, r, r.randint(25, 45), 50, (240, 240, 250), big=0.2)
    x, y, rad = r.randint(14, 50), r.randint(10, 20), r.randint(6, 9)
    _disc(d, x, y, rad, (250, 240, 190))
    sky = tuple(round(a + (b - a) * y / (SIZE - 1)) for a, b in zip(top, bottom))
    _disc(d, x + r.choice([-1, 1]) * rad * 0.6, y - 1, rad, sky)  # a disc of sky cuts the crescent
    _hills(d, r, r.randint(50, 56), 3, (8, 10, 15))


def _beach(d, r):
    h1 = r.randint(20, 28)
    h2 = h1 + r.randint(12, 18)
    _vgrad(d, _jit((120, 190, 245), r), _jit((180, 220, 250), r), 0, h1)
    _vgrad(d, _jit((35, 150, 185), r), _jit((70, 190, 200), r), h1, h2 + 4)
    _hills(d, r, h2, 1.5, _jit((240, 222, 165), r, 6))
    d.line([(0, h2 - 1), (SIZE, h2 - 1)], fill=(245, 250, 250))  # surf
    if r.random() < 0.6:  # a palm tree
        x = r.randint(6, 58)
        d.line([(x, SIZE), (x + 3, h1 - 4)], fill=(120, 80, 40), width=2)
        for a in (-2.6, -1.9, -1.2, -0.5):
            d.line([(x + 3, h1 - 4), (x + 3 + 10 * math.cos(a), h1 + 6 + 10 * math.sin(a))], fill=(40, 140, 60),
                   width=2)


@dataclass
class Scene:
    paint: object  # painter(draw, rng)
    name: str  # canonical phrase, used in answers
    keys: tuple  # words that name this scene in an answer (score_answer looks for them; no other scene's text has them)
    phrases: tuple  # other names a drawing request may use
    description: str
    questions: tuple  # (question, answer) pairs whose picture is this scene: the t2t / t2ti / "just draw it" prompts


SCENES = {
    "aurora": Scene(
        _aurora, "an aurora", ("aurora", "northern lights"), ("the northern lights", "an aurora in the night sky"),
        "An aurora is a glowing curtain of green and teal light that ripples across the dark sky near the poles.",
        (("What is an aurora?", "An aurora is a glowing curtain of green and teal light in the dark polar sky."),
         ("What are the northern lights?", "The northern lights are an aurora: green and teal ribbons of light."))),
    "sunset": Scene(
        _sunset, "a sunset over the sea", ("sunset",), ("the sea at sunset", "the sun setting over the ocean"),
        "At sunset the sun sinks into the sea, the sky glows orange and a golden path lies on the dark blue water.",
        (("What does the sea look like at sunset?", "At sunset the sky over the sea turns orange and the sun leaves "
          "a golden path on the dark water."),)),
    "rainforest": Scene(
        _rainforest, "a tropical rainforest", ("rainforest", "jungle"), ("a dense jungle", "a rainforest"),
        "A tropical rainforest is dense and dark green, with tall trunks under layer upon layer of leaves.",
        (("What is a tropical rainforest like?", "A tropical rainforest is warm, wet and dense, with tall trunks "
          "under layers of green leaves."),)),
    "summer": Scene(
        _summer, "a summer landscape", ("summer",), ("a green meadow on a sunny summer day",
                                                     "the Northern Hemisphere in June"),
        "A summer landscape: a bright sun in a blue sky above a lush green meadow with round trees.",
        (("What's the Northern Hemisphere like in June?", "In the Northern Hemisphere June is summer: the days are "
          "warm and long, the sun is bright, and meadows and trees are lush and green."),
         ("What's the Southern Hemisphere like in December?", "In the Southern Hemisphere December is summer, with "
          "long warm days, blue skies and green fields."),
         ("What is summer like?", "Summer is the warmest season: long sunny days, blue skies and green meadows."))),
    "winter": Scene(
        _winter, "a winter landscape", ("winter",), ("a snowy winter field", "the Southern Hemisphere in June"),
        "A winter landscape: snow covers the ground under a grey sky, dark pines stand in the cold, snowflakes fall.",
        (("What's the Southern Hemisphere like in June?", "In June the Southern Hemisphere is in winter: the days are "
          "short and cold, and snow may cover the ground and the pine trees."),
         ("What's the Northern Hemisphere like in December?", "In the Northern Hemisphere December is winter, with "
          "short cold days and snow on the ground."),
         ("What is winter like?", "Winter is the coldest season: short grey days and snow on the ground."))),
    "river": Scene(
        _river, "a river with green banks", ("river",), ("a river flowing through green fields",
                                                         "a river between green banks"),
        "A blue river winds between lush green banks under a clear sky.",
        (("What kind of scenery can be found beside the Nile River?", "Alongside the Nile River you find lush green "
          "banks on both sides of the blue water."),)),
    "mountains": Scene(
        _mountains, "snowy mountains", ("mountain",), ("snow-capped mountains", "a mountain range with snowy peaks"),
        "Grey mountains with white snowy peaks rise against a blue sky above a green valley.",
        (("What do high mountains look like?", "High mountains are grey and rocky, with white snow on their peaks."),)),
    "teddy": Scene(
        _teddy, "a teddy bear", ("teddy",), ("a brown teddy bear", "a cute teddy bear"),
        "A soft brown teddy bear with round ears sits on a wooden floor in front of a blue wall.",
        (("What does a teddy bear look like?", "A teddy bear is a soft brown toy bear with round ears and a tan "
          "belly."),)),
    "cookies": Scene(
        _cookies, "chocolate chip cookies on a rack", ("cookie",),
        ("freshly baked chocolate chip cookies cooling on a wire rack", "cookies cooling on a wire rack"),
        "Freshly baked chocolate chip cookies are cooling on a wire rack.",
        (("What do chocolate chip cookies look like?", "Chocolate chip cookies are round and golden, dotted with "
          "dark chocolate chips."),)),
    "desert": Scene(
        _desert, "a desert", ("desert",), ("sand dunes in the desert", "a hot desert"),
        "Golden sand dunes stretch under a pale blue sky in the hot, dry desert.",
        (("What is a desert like?", "A desert is hot and dry, with golden sand dunes and very few plants."),)),
    "night": Scene(
        _night, "a night sky with the moon and stars", ("moon", "starry"), ("the moon and stars at night",
                                                                             "a starry night sky"),
        "A starry night: a pale crescent moon and many small stars shine above black hills.",
        (("What does the sky look like on a clear night?", "On a clear night the sky is dark and starry, often "
          "with the moon shining."),)),
    "beach": Scene(
        _beach, "a sunny beach", ("beach",), ("a beach by the sea", "a tropical beach"),
        "A sunny beach: pale sand in front, turquoise sea in the middle and a light blue sky above.",
        (("What does a beach look like?", "A beach is a strip of pale sand by the turquoise sea under a blue sky."),)),
}


def scene_picture(name, rng) -> Picture:
    return Picture(name, [], ((0, 0, 0), (0, 0, 0)), rng.getrandbits(32))


# ===================================================================================================================
# 4. GenEval-style specs: {"category", "include": [{"shape", "count", "colour"?, "position"?: [rel, index]}]}
#    (GenEval's own metadata format, with shapes for classes)
# ===================================================================================================================

def sample_spec(category, rng, heldout=False) -> dict:
    """A random spec of a GenEval category; heldout=True asks for a held-out composition (HELDOUT_CATEGORIES)."""
    if heldout and category not in HELDOUT_CATEGORIES:
        raise ValueError(f"category {category!r} has no held-out compositions; use one of {HELDOUT_CATEGORIES}")
    pairs = HELDOUT_COLOUR_SHAPE if heldout else TRAIN_PAIRS
    if category == "single_object":
        inc = [{"shape": rng.choice(SHAPES), "count": 1}]
    elif category in ("two_object", "position"):
        inc = [{"shape": s, "count": 1} for s in rng.sample(SHAPES, 2)]
        if category == "position":
            inc[0]["position"] = [rng.choice(list(RELATIONS)), 1]  # include[0] is <rel> include[1]
    elif category == "counting":
        n, s = rng.choice(HELDOUT_COUNT_SHAPE if heldout else
                          [(n, s) for n in (2, 3, 4) for s in SHAPES if (n, s) not in HELDOUT_COUNT_SHAPE])
        inc = [{"shape": s, "count": n}]
    elif category == "colors":
        c, s = rng.choice(pairs)
        inc = [{"shape": s, "count": 1, "colour": c}]
    elif category == "color_attr":  # two objects, different shapes and colours; held out: the first is a held-out pair
        c, s = rng.choice(pairs)
        c2, s2 = rng.choice([p for p in TRAIN_PAIRS if p[0] != c and p[1] != s])
        inc = [{"shape": s, "count": 1, "colour": c}, {"shape": s2, "count": 1, "colour": c2}]
    else:
        raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")
    return {"category": category, "include": inc}


def phrase(item) -> str:
    n = item["count"]
    words = ([item["colour"]] if item.get("colour") else []) + [item["shape"] + "s" * (n > 1)]
    return f"{NUMBERS[n] if n > 1 else 'an' if words[0][0] in 'aeiou' else 'a'} {' '.join(words)}"


def describe(spec) -> str:
    """Spec -> the noun phrase a prompt uses: "two green squares", "a circle to the left of a square"."""
    inc = spec["include"]
    if spec["category"] == "position":
        return f"{phrase(inc[0])} {RELATIONS[inc[0]['position'][0]]} {phrase(inc[1])}"
    return " and ".join(phrase(i) for i in inc)


def spec_picture(spec, rng) -> Picture:
    """A picture that satisfies the spec exactly, with nothing else in it. Objects whose colour is not given get a
    training-split colour, so the only held-out composition in a picture is one the spec asks for."""
    items = []
    for it in spec["include"]:
        colour = it.get("colour") or colour_for(rng, it["shape"])
        items += [(it["shape"], colour)] * it["count"]
    rel = spec["include"][0].get("position", [None])[0]
    return Picture("objects", place(items, rng, rel), random_background(rng))


# ===================================================================================================================
# 5. Judges: object detector, GenEval checker, scene classifier
# ===================================================================================================================

@dataclass(frozen=True)
class Detection:
    shape: str
    colour: str
    cx: float
    cy: float
    area: int


def _hsv(img):
    a = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    mx, mn = a.max(-1), a.min(-1)
    d = mx - mn
    r, g, b = a[..., 0], a[..., 1], a[..., 2]
    dd = np.where(d > 0, d, 1)
    h = np.where(mx == r, ((g - b) / dd) % 6, np.where(mx == g, (b - r) / dd + 2, (r - g) / dd + 4)) * 60
    return h, np.where(mx > 0, d / np.maximum(mx, 1e-6), 0), mx


_HUES = np.array([_hsv(Image.new("RGB", (1, 1), c))[0][0, 0] for c in COLOURS.values()])


def _components(mask, min_size=1):
    """4-connected components of at least min_size pixels of a boolean mask -> list of (ys, xs) index arrays."""
    m, H, W = mask.tolist(), *mask.shape
    out = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if not m[y0][x0]:
            continue
        m[y0][x0], stack, pix = False, [(y0, x0)], []
        while stack:
            y, x = stack.pop()
            pix.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < H and 0 <= nx < W and m[ny][nx]:
                    m[ny][nx] = False  # visited
                    stack.append((ny, nx))
        if len(pix) >= min_size:
            out.append(tuple(np.array(v) for v in zip(*pix)))
    return out


def _templates(w, h):
    """Ideal masks of each shape filling a w x h box, as render() draws them."""
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    return {"circle": ((xx - w / 2) / (w / 2)) ** 2 + ((yy - h / 2) / (h / 2)) ** 2 <= 1.0,
            "square": np.ones((h, w), bool),
            "triangle": np.abs(xx - w / 2) <= yy / h * w / 2 + 0.5}


def _dilate(m, k):
    for _ in range(k):
        p = np.pad(m, 1)
        m = p[1:-1, 1:-1] | p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]
    return m


def detect(img, min_iou=0.72) -> list:
    """Rule-based detector. Saturated pixels take the nearest palette hue; 4-connected components per colour; a
    component of plausible size (>= 40 px in a 10-34 px box, aspect <= 1.6) becomes the shape whose ideal mask in
    its bounding box has the highest IoU, kept when that IoU >= min_iou (fragments and lumps match no template)
    and when it stands on a plain ground: half of a 2-3 px ring around it unsaturated (smooth colour noise does
    not). 0.72 keeps blurred and JPEG-ed renders while rejecting most lumps (tests/test_world.py measures both)."""
    h, s, v = _hsv(img)
    dist = np.abs((h[..., None] - _HUES + 180) % 360 - 180)  # circular hue distance to each palette colour
    label = np.where((s > 0.45) & (v > 0.3), dist.argmin(-1), -1)  # ~ the 50% contour of an object on pastel
    dets = []
    for k, colour in enumerate(COLOURS):
        for ys, xs in _components(label == k, min_size=40):
            y0, x0, hh, ww = ys.min(), xs.min(), np.ptp(ys) + 1, np.ptp(xs) + 1
            if not (10 <= hh <= 34 and 10 <= ww <= 34) or not 0.6 <= ww / hh <= 1.6:
                continue
            m = np.zeros((hh, ww), bool)
            m[ys - y0, xs - x0] = True
            ious = {sh: (m & t).sum() / (m | t).sum() for sh, t in _templates(ww, hh).items()}
            best = max(ious, key=ious.get)
            full = np.zeros(label.shape, bool)
            full[ys, xs] = True
            ring = _dilate(full, 3) & ~_dilate(full, 1)
            if ious[best] >= min_iou and (s[ring] < 0.3).mean() >= 0.5:
                dets.append(Detection(best, colour, float(xs.mean()) + 0.5, float(ys.mean()) + 0.5, len(ys)))
    return dets


def relation_holds(a, b, rel, margin=6.0) -> bool:
    """GenEval's rule on centres: a is <rel> b when it is more than margin px (~0.1 of the image) that way."""
    return {"left of": b.cx - a.cx, "right of": a.cx - b.cx, "above": b.cy - a.cy, "below": a.cy - b.cy}[rel] > margin


def check(spec, dets) -> bool:
    """GenEval's rules: every included object is present (with its colour, when given) at least `count` times;
    counting wants the exact count; position wants a pair in relation; "exact" wants the very same objects."""
    if spec["category"] == "exact":
        want = Counter((i["shape"], i["colour"]) for i in spec["include"] for _ in range(i["count"]))
        return Counter((d.shape, d.colour) for d in dets) == want

    def found(it):
        return [d for d in dets if d.shape == it["shape"] and it.get("colour") in (None, d.colour)]
    inc = spec["include"]
    if any(len(found(it)) < it["count"] for it in inc):
        return False
    if spec["category"] == "counting" and any(sum(d.shape == it["shape"] for d in dets) != it["count"] for it in inc):
        return False
    for it in inc:
        if "position" in it:
            rel, j = it["position"]
            if not any(relation_holds(a, b, rel) for a in found(it) for b in found(inc[j])):
                return False
    return True


def _scene_features(img):
    """Three groups: mean colours of an 8x8 grid (the layout), and per 16 px cell the colour spread and the mean
    step between neighbouring pixels (texture: stars, rack wires, leaves; and what tells noise apart)."""
    a = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    cells = a.reshape(4, 16, 4, 16, 3)
    step = np.pad(np.abs(np.diff(a, axis=1)).mean(-1), ((0, 0), (0, 1))).reshape(4, 16, 4, 16)
    return [a.reshape(8, 8, 8, 8, 3).mean((1, 3)).ravel(), cells.std((1, 3)).mean(-1).ravel(),
            step.mean((1, 3)).ravel()]


@lru_cache(maxsize=1)
def _scene_stats():
    """Per scene and feature group: mean and spread over 48 fixed renders plus blurred copies of half of them
    (down to 32 px and back), so a soft VQGAN reconstruction is not out of distribution."""
    stats = {}
    for name in SCENES:
        ims = [render(scene_picture(name, random.Random(1000 + i))) for i in range(48)]
        ims += [im.resize((32, 32), Image.BICUBIC).resize((SIZE, SIZE), Image.BICUBIC) for im in ims[:24]]
        groups = zip(*[_scene_features(im) for im in ims])
        stats[name] = [(np.mean(g, 0), np.std(g, 0) + 0.02) for g in groups]  # floor: no near-constant feature rules
    return stats


def scene_distances(img) -> dict:
    """Scene -> distance: the worst feature group's RMS z-score against that scene's renders."""
    f = _scene_features(img)
    return {n: max(float(np.sqrt((((x - mu) / sd) ** 2).mean())) for x, (mu, sd) in zip(f, st))
            for n, st in _scene_stats().items()}


def classify_scene(img, reject=1.95):
    """Nearest scene, or None when even the nearest is farther than `reject`. Renders, blurred or JPEG-ed too,
    lie within ~1.9; object pictures beyond ~2.25 and smooth colour noise beyond ~2.05 (tests/test_world.py)."""
    dist = scene_distances(img)
    best = min(dist, key=dist.get)
    return best if dist[best] <= reject else None


def score_image(spec, img) -> bool:
    """Does a generated image satisfy its spec: {"scene": name} or a GenEval-style objects spec."""
    return classify_scene(img) == spec["scene"] if "scene" in spec else check(spec, detect(img))
