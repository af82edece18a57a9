"""Toy world: a procedural world small enough to train a whole ARMOR on a CPU, rich enough to measure it.

pictures.py draws its pictures (objects and twelve named scenes) and judges drawings. This file writes what is
said about them: conversations of every data type (t2t, ti2t, t2i, t2ti; ti2ti for evaluation only) with paraphrased
requests, a held-out split of compositions and phrasings, the base MLLM's text pool, and the evaluation's prompt
sets with their answer and modality scorers. Everything that samples takes a seed or a random.Random: same seed, same
bytes.

  python -m toy.world sample --out /tmp/world                 # contact sheet: world_sample.png
  python -m toy.world export --out toy_data --n 2000          # train: t2t/ti2t/t2i/t2ti .jsonl + images/
  python -m toy.world export --out toy_data --n 200 --split heldout   # evaluation prompts, ti2ti included
  python -m pytest tests/test_world.py -s                     # prints the judges' measured accuracies
"""
import argparse
import json
import os
import random
import re
import sys
import textwrap
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict

from PIL import Image, ImageDraw

from . import pictures
from .pictures import (CATEGORIES, colour_for, COLOURS, describe, HELDOUT_CATEGORIES, HELDOUT_COLOUR_SHAPE,
                      HELDOUT_COUNT_SHAPE, NUMBERS, phrase, Picture, place, random_background,
                      random_objects, RELATIONS, render, sample_spec, scene_picture, SCENES, score_image, SHAPES,
                      spec_picture, TRAIN_PAIRS)

# ===================================================================================================================
# 1. Conversations (Section 3.3, Appendix 6.1): t2t, ti2t, t2i, t2ti for training; ti2ti for evaluation only
# ===================================================================================================================

TYPES = ("t2t", "ti2t", "t2i", "t2ti")  # the four trained types; ti2ti emerges (Section 6.2.1)
MODALITY = {"t2t": "text", "ti2t": "text", "t2i": "image", "t2ti": "text+image", "ti2ti": "text+image"}

# Requests are frames x verbs, so the held-out phrasings are new combinations of words the world does use (a toy
# model cannot know what a word it never met means): the pairs with (frame + verb) % (number of frames) == 2 are held
# out. "{x}" is the object, "{q}" the question a text-then-image request (or a "just draw it") starts with.
FRAMES = ("Please {v} {x}.", "Could you {v} {x}?", "Can you help me {v} {x}?", "{V} {x}.",
          "I would like you to {v} {x}.", "Would you {v} {x}, please?")
ASK_AND_DRAW = ("{q} Can you {v} it for me?", "{q} Please explain, and {v} it.", "{q} Tell me, and {v} it too.",
                "{q} Explain it, and {v} it too.", "{q} Answer, and {v} it afterwards.")  # text, then the picture
FACT_AND_DRAW = ("{q} {V} {x} for me.", "{q} Also, please {v} {x}.", "{q} Then {v} {x}.", "{q} After that, {v} {x}.")
JUST_DRAW = ("{q} Just {v} it.", "{q} {V} it, no words needed.", "{q} Only {v} it, please.",
             "{q} Without any words, {v} it.")  # the picture only
DRAW_VERBS = ("draw", "paint", "sketch", "create an image of", "show me a picture of", "generate an image of")
DESCRIBE_VERBS = ("describe", "tell me about", "explain", "give me a description of", "tell me in words about",
                  "talk about")


# Questions about a picture are question frames x wordings in the same way ("{Q}": the question itself).
QUESTION_FRAMES = ("{Q}", "Look at the picture. {Q}", "Here is an image. {Q}",
                   "I have a question about this picture. {Q}", "Please look carefully. {Q}",
                   "{Q} Take a close look first.")


def _hold_out(grid):
    """(training phrasings, held-out phrasings) of grid[i][j], frame i with wording j: the pairs with
    (i + j) % (number of frames) == 2 are held out, so every frame and every wording is still met in training."""
    pairs = [((i + j) % len(grid) == 2, t) for i, row in enumerate(grid) for j, t in enumerate(row)]
    return [t for held, t in pairs if not held], [t for held, t in pairs if held]


def _compose(frames, verbs):
    """Every frame with every verb; each "{}" is a slot, in order."""
    return _hold_out([[f.format(v=v, V=v[0].upper() + v[1:], x="{}", q="{}") for v in verbs] for f in frames])


def _ask(*wordings):
    """Every question frame with every wording of a question."""
    return _hold_out([[f.format(Q=w) for w in wordings] for f in QUESTION_FRAMES])


# (training phrasings, held-out phrasings). Held-out ones never reach training; the modality test asks with them.
TEMPLATES = {
    "draw": _compose(FRAMES, DRAW_VERBS),
    "just_draw": _compose(JUST_DRAW, DRAW_VERBS),
    "ask_and_draw": _compose(ASK_AND_DRAW, DRAW_VERBS),
    "fact_and_draw": _compose(FACT_AND_DRAW, DRAW_VERBS),
    "describe": _compose(FRAMES, DESCRIBE_VERBS),
    "q_colour": (["What colour is the {}?", "Which colour does the {} have?"], ["Tell me the colour of the {}."]),
    "q_count": (["How many {}s are there?", "Count the {}s in the picture."], ["What is the number of {}s here?"]),
    "q_total": (["How many objects are there?", "How many shapes are in the picture?"],
                ["Count all the shapes you see."]),
    "q_which": (["Which shape is {}?", "What shape is the {} object?"], ["Name the {} shape."]),
    "q_where": (["Where is the {} compared to the {}?", "Where is the {} relative to the {}?"],
                ["How is the {} placed next to the {}?"]),
    "q_scene": (["What scene is this?", "What does this picture show?", "Where was this picture taken?"],
                ["What am I looking at?"]),
    "q_about": (["What is this photo about?", "Describe the image.", "Describe this picture in detail."],
                ["Can you explain this image?"]),
    "q_shows": (["Does the picture show {}?", "Is this a picture of {}?"], ["Would you say this image shows {}?"]),
}
# The base's questions asked in composed phrasings (pipeline --questions composed): every question frame with four
# wordings, the kind's training ones, its held-out one (kept out bare, so eval.py's unseen phrasing stays unseen) and
# a fourth. Plain, the shipped recipe, asks in the two or three training wordings alone, and its base answered 0.65
# of the questions in a held-out wording against 0.93 in its own; a composed base, 0.97 in both (python -m toy.eval
# --base-only, docs/toy_history.md).
FOURTH = {"q_colour": "What is the colour of the {}?", "q_count": "How many {}s do you see?",
          "q_total": "What is the total number of objects?", "q_which": "What is the shape of the {} object?",
          "q_where": "Where is the {} in relation to the {}?", "q_shows": "Does this image show {}?"}
COMPOSED_QUESTIONS = {key: _ask(train[0], train[1], held[0], train[2] if len(train) > 2 else FOURTH[key])[0]
                      for key, (train, held) in TEMPLATES.items() if key.startswith("q_")}
QUESTIONS = "plain"  # how training records ask about a picture: "plain" or "composed" (questions_as)


@contextmanager
def questions_as(form):
    """QUESTIONS set to form ("plain" or "composed") inside a with block, for a base of the other recipe."""
    global QUESTIONS
    if form not in ("plain", "composed"):
        raise ValueError(f"questions are 'plain' or 'composed', not {form!r}")
    keep, QUESTIONS = QUESTIONS, form
    try:
        yield
    finally:
        QUESTIONS = keep


DRAW_LIKE = ("Can you help me draw one similar to this picture?", "Draw one like it.",
             "Please draw another picture like this one.")
SHAPE_FACTS = {  # shape -> {question kind: answer}
    "circle": {"sides": "A circle has no straight sides; it is one round curve.",
               "corners": "A circle has no corners; it is perfectly round."},
    "square": {"sides": "A square has four equal sides.", "corners": "A square has four corners, all right angles."},
    "triangle": {"sides": "A triangle has three sides.", "corners": "A triangle has three corners."},
}
FACT_QUESTIONS = {"sides": ("How many sides does a {} have?", "How many edges does a {} have?"),
                  "corners": ("How many corners does a {} have?", "Does a {} have corners?")}
COLOUR_FACTS = (
    ("What colour is snow?", "Snow is white."),
    ("What colour is grass in summer?", "In summer grass is green."),
    ("What colour is the sky on a clear day?", "On a clear day the sky is blue."),
    ("What colour are the northern lights?", "The northern lights are mostly green, sometimes teal."),
    ("What colour is the sky at sunset?", "At sunset the sky turns orange and gold."),
    ("What colour is a teddy bear usually?", "A teddy bear is usually brown."),
    ("What colour is the sea near a tropical beach?", "Near a tropical beach the sea is turquoise."),
    ("What colour do you get by mixing blue and yellow?", "Mixing blue and yellow gives green."),
    ("What colour do you get by mixing red and yellow?", "Mixing red and yellow gives orange."),
    ("What colour do you get by mixing red and blue?", "Mixing red and blue gives purple."),
)
NOT_IN_WORLD = ("athletes exercising", "a busy city street", "a cat sleeping on a sofa", "a plate of pasta")


def _pick(rng, key, tpl):
    train, held = TEMPLATES[key]
    if tpl == "train" and QUESTIONS == "composed" and key in COMPOSED_QUESTIONS:
        train = COMPOSED_QUESTIONS[key]
    return rng.choice(train if tpl == "train" else held)


# The share of training drawing and describing requests that are a bare imperative ("Draw {}.", "Describe {}."), the
# form people type most (the README's `python sample.py "draw an aurora"`). As one frame in six, a toy base read the
# casual "draw an aurora" like "explain an aurora in the night sky" (its nearest training prompt in the base's hidden
# states) and the ARMOR built on it answered that request in words (tests/test_toy.py checks the shipped one).
BARE = 0.3
_BARE = {key: tuple(sorted(set(_compose((FRAMES[3],), verbs)[0]) & set(TEMPLATES[key][0])))  # "{V} {x}." x verbs,
         for key, verbs in (("draw", DRAW_VERBS), ("describe", DESCRIBE_VERBS))}                # held-out ones left out


def _request(rng, key, tpl):
    """A training conversation's drawing / describing request template (key "draw" or "describe"): a share BARE of
    them bare imperatives. The evaluation's prompt sets keep _pick's uniform choice."""
    if tpl == "train" and rng.random() < BARE:
        return rng.choice(_BARE[key])
    return _pick(rng, key, tpl)


def _casual(rng, text):
    """People type "draw an aurora": a lower-case start (p 0.5) and no final full stop or question mark (p 0.3)."""
    if rng.random() < 0.5:
        text = text[0].lower() + text[1:]
    if rng.random() < 0.3:
        text = text.rstrip(".?")
    return text


def _is(n, noun):
    return f"There is one {noun}." if n == 1 else f"There are {NUMBERS[n]} {noun}s."


def _groups_phrase(objects):
    """'a red circle and two blue squares', groups ordered left to right."""
    groups = Counter((o.colour, o.shape) for o in sorted(objects, key=lambda o: o.cx))
    parts = [phrase({"shape": s, "count": n, "colour": c}) for (c, s), n in groups.items()]
    return ", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0]


def _target_picture(rng, pair):
    """The object `pair` = (colour, shape) plus 0-2 others that share neither its shape nor its colour (so never
    three of a shape: no held-out count)."""
    others = [p for p in TRAIN_PAIRS if p[0] != pair[0] and p[1] != pair[1]]
    items = [pair] + [rng.choice(others) for _ in range(rng.randint(0, 2))]
    return Picture("objects", place([(s, c) for c, s in items], rng), random_background(rng))


def _scene_ti2t(rng, tpl):
    name = rng.choice(list(SCENES))
    sc, pic, k = SCENES[name], scene_picture(name, rng), rng.randrange(3)
    if k == 0:
        return pic, _pick(rng, "q_scene", tpl), f"This is {sc.name}.", {"kind": "scene", "answer": name}
    if k == 1:
        return pic, _pick(rng, "q_about", tpl), sc.description, {"kind": "scene", "answer": name}
    yes = rng.random() < 0.5
    other = rng.choice([s.name for n, s in SCENES.items() if n != name] + list(NOT_IN_WORLD))
    q = _pick(rng, "q_shows", tpl).format(sc.name if yes else other)
    # the answer names what the picture shows first and then judges: a toy base that had to say yes or no first
    # answered at chance (while naming the scene right every time), as one word must then carry the comparison
    a = f"It shows {sc.name}, so yes." if yes else f"It shows {sc.name}, so no, not {other}."
    return pic, q, a, {"kind": "yesno", "answer": "yes" if yes else "no", "scene": name}


def _objects_ti2t(rng, comp, tpl, kind=None):
    """A question about an objects picture; with comp="heldout" the picture holds a held-out composition and the
    question asks about exactly that. kind: that kind of question instead of a random one."""
    kind = kind or rng.choice(["colour", "which", "count"] if comp == "heldout" else
                              ["colour", "which", "count", "total", "where", "describe"])
    if kind in ("colour", "which"):
        c, s = rng.choice(HELDOUT_COLOUR_SHAPE if comp == "heldout" else TRAIN_PAIRS)
        pic = _target_picture(rng, (c, s))
        if kind == "colour":
            return pic, _pick(rng, "q_colour", tpl).format(s), f"The {s} is {c}.", {"kind": "colour", "answer": c}
        return pic, _pick(rng, "q_which", tpl).format(c), f"The {s} is {c}.", {"kind": "shape", "answer": s}
    if kind == "count":
        n, s = rng.choice(HELDOUT_COUNT_SHAPE if comp == "heldout" else
                          [(n, s) for n in range(1, 5) for s in SHAPES if (n, s) not in HELDOUT_COUNT_SHAPE])
        while True:  # n of shape s, plus up to 4 - n objects of other shapes
            items = [(s, colour_for(rng, s)) for _ in range(n)]
            items += [(t, c) for c, t in (rng.choice([p for p in TRAIN_PAIRS if p[1] != s])
                                          for _ in range(rng.randint(0, 4 - n)))]
            objs = place(items, rng)
            if all(Counter(o.shape for o in objs)[t] != m for m, t in HELDOUT_COUNT_SHAPE if t != s):
                pic = Picture("objects", objs, random_background(rng))
                return (pic, _pick(rng, "q_count", tpl).format(s), _is(n, s),
                        {"kind": "count", "answer": n})
    if kind == "where":
        a, b = rng.sample(SHAPES, 2)
        third = [t for t in SHAPES if t not in (a, b)] * (rng.random() < 0.5)  # sometimes, the third shape too
        items = [(t, colour_for(rng, t)) for t in [a, b] + third]
        rel = rng.choice(list(RELATIONS))
        pic = Picture("objects", place(items, rng, rel), random_background(rng))
        # asked open, not yes/no ("Is the circle above the square?"): with the relation named in the question, a
        # toy base learnt to restate it and never which way round the objects were (python -m toy.probe relation
        # --form yesno)
        q, ans = _pick(rng, "q_where", tpl).format(a, b), f"The {a} is {RELATIONS[rel]} the {b}."
        return pic, q, ans, {"kind": "relation", "answer": f"{a} is {RELATIONS[rel]} the {b}"}
    pic = random_objects(rng)
    if kind == "total":
        n = len(pic.objects)
        return pic, _pick(rng, "q_total", tpl), _is(n, "object"), {"kind": "count", "answer": n}
    phrase = _groups_phrase(pic.objects)
    groups = [p.strip() for p in re.split(r",| and ", phrase)]
    return pic, _pick(rng, "q_about", tpl), f"The image shows {phrase}.", {"kind": "describe", "answer": groups}


def make_record(kind, rng, compositions="train", templates="train", rid="0", category=None) -> dict:
    """One conversation record. compositions="heldout": objects in it come from the held-out compositions (where
    the type allows); templates="heldout": the request is phrased with held-out templates only. category: for t2i,
    always an object request of that GenEval category (toy/probe.py's data), not a scene half the time; for ti2t,
    always a question of that kind about an objects picture ("where": the base's extra position questions)."""
    comp, tpl = compositions, templates
    images, out, answer_spec, image_spec = [], [], None, None
    if kind == "t2t":
        u = rng.random()
        if tpl == "train" and u < 0.3:
            shape, which = rng.choice(SHAPES), rng.choice(list(FACT_QUESTIONS))
            human, gpt = rng.choice(FACT_QUESTIONS[which]).format(shape), SHAPE_FACTS[shape][which]
        elif tpl == "train" and u < 0.45:
            human, gpt = rng.choice(COLOUR_FACTS)
        else:
            name = rng.choice(list(SCENES))
            sc = SCENES[name]
            if tpl == "train" and u < 0.7:
                human, gpt = rng.choice(sc.questions)
            else:
                human, gpt = _request(rng, "describe", tpl).format(rng.choice((sc.name,) + sc.phrases)), sc.description
            answer_spec = {"kind": "scene", "answer": name}
    elif kind == "ti2t" and category:
        pic, q, gpt, answer_spec = _objects_ti2t(rng, comp, tpl, category)
        images, human = [pic], f"<image>\n{q}"
    elif kind == "ti2t":
        pic, q, gpt, answer_spec = (_scene_ti2t(rng, tpl) if comp == "train" and rng.random() < 0.4
                                    else _objects_ti2t(rng, comp, tpl))
        images, human = [pic], f"<image>\n{q}"
    elif kind == "t2i":
        if category or rng.random() < 0.5:
            image_spec = sample_spec(category or rng.choice(HELDOUT_CATEGORIES if comp == "heldout" else CATEGORIES),
                                     rng, heldout=comp == "heldout")
            human, pic = _request(rng, "draw", tpl).format(describe(image_spec)), spec_picture(image_spec, rng)
        else:
            name = rng.choice(list(SCENES))
            sc, image_spec = SCENES[name], {"scene": name}
            if rng.random() < 0.3:
                human = _pick(rng, "just_draw", tpl).format(rng.choice(sc.questions)[0])
            else:
                human = _request(rng, "draw", tpl).format(rng.choice((sc.name,) + sc.phrases))
            pic = scene_picture(name, rng)
        out, gpt = [pic], "<gen_image>"
    elif kind == "t2ti":
        if rng.random() < 0.5:
            name = rng.choice(list(SCENES))
            q, a = rng.choice(SCENES[name].questions)
            human, image_spec = _pick(rng, "ask_and_draw", tpl).format(q), {"scene": name}
            pic = scene_picture(name, rng)
        else:  # "How many corners does a square have? Draw two green squares for me."
            cat = rng.choice(("counting", "colors") if comp == "heldout" else ("single_object", "counting", "colors"))
            image_spec = sample_spec(cat, rng, heldout=comp == "heldout")
            item = image_spec["include"][0]
            if comp == "train" and cat == "counting" and rng.random() < 0.5:
                item["colour"] = colour_for(rng, item["shape"])
            which = rng.choice(list(FACT_QUESTIONS))
            q, a = rng.choice(FACT_QUESTIONS[which]).format(item["shape"]), SHAPE_FACTS[item["shape"]][which]
            human, pic = _pick(rng, "fact_and_draw", tpl).format(q, describe(image_spec)), spec_picture(image_spec, rng)
        out, gpt = [pic], f"{a}\n<gen_image>"
    elif kind == "ti2ti":  # image in, text + image out; never trained (Section 6.2.1)
        like = rng.choice(DRAW_LIKE)
        if rng.random() < 0.5:
            pic, q, a, answer_spec = _scene_ti2t(rng, tpl)
            image_spec, new = {"scene": pic.scene}, scene_picture(pic.scene, rng)
        else:
            pic = random_objects(rng)
            s = rng.choice([o.shape for o in pic.objects])
            n = sum(o.shape == s for o in pic.objects)
            q, a, answer_spec = _pick(rng, "q_count", tpl).format(s), _is(n, s), {"kind": "count", "answer": n}
            items = [(o.shape, o.colour) for o in pic.objects]
            if rng.random() < 0.5:  # "draw it again, but make the squares green"
                c2 = colour_for(rng, s)
                like = f"Draw it again, but make the {s}{'s' * (n > 1)} {c2}."
                items = [(t, c2 if t == s else c) for t, c in items]
            image_spec = {"category": "exact", "include": [{"shape": t, "colour": c, "count": k}
                                                           for (t, c), k in Counter(items).items()]}
            new = Picture("objects", place(items, rng), random_background(rng))
        images, out, human, gpt = [pic], [new], f"<image>\n{q} {like}", f"{a}\n<gen_image>"
    else:
        raise ValueError(f"unknown conversation type {kind!r}; expected one of {TYPES + ('ti2ti',)}")
    if tpl == "train" and kind in ("t2t", "t2i", "t2ti"):
        human = _casual(rng, human)
    return {"id": rid, "type": kind,
            "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}],
            "image": [render(p) for p in images], "out_images": [render(p) for p in out],
            "meta": {"compositions": comp, "templates": tpl, "answer_spec": answer_spec, "image_spec": image_spec,
                     "pictures": {"in": [asdict(p) for p in images], "out": [asdict(p) for p in out]}}}


CANNOT_DRAW = "I cannot draw {}, but I can read pictures."


def drawn_phrase(image_spec) -> str:
    """What a drawing request asks for, as a noun phrase: "two red circles", "an aurora"."""
    return SCENES[image_spec["scene"]].name if "scene" in image_spec else describe(image_spec)


def base_text_mixture(n, seed, refusals=0.5) -> list:
    """The base MLLM's text data: t2t records, and (a share `refusals`) the requests of t2i and t2ti records answered
    the way a read-only MLLM answers them: in words, saying it cannot draw what was asked for ("I cannot draw two
    red circles, but ..."). A real InternVL2.5 has met countless "draw ..." requests; without these the toy base
    never learns that the verb matters, its hidden states do not tell "draw an aurora" from "describe an aurora",
    and WoHG's stage 1 (which trains only the heads and the new rows on top of the frozen LLM) cannot learn when to
    start an image. The refusal restates the request because a real MLLM's states carry every word of it; a toy base
    whose refusal was one fixed sentence carried the shape on but not the colour, and the drawing model built on it
    ignored colour words (README, the toy world's recipe). Half the records are refusals: with 0.3 the toy base
    answered "draw an aurora" (lower-case, no full stop) as if asked "describe an aurora", and the ARMOR built on it
    answered that request in words. Used for stage 0 only."""
    rng = random.Random(f"base-t2t/{seed}")
    out = []
    for i in range(n):
        if rng.random() >= refusals:
            out.append(make_record("t2t", rng, rid=f"base-t2t-{seed}-{i}"))
            continue
        rec = make_record(rng.choice(("t2i", "t2ti")), rng, rid=f"base-refusal-{seed}-{i}")
        said = rec["conversations"][1]["value"].replace("<gen_image>", "").strip()
        refusal = CANNOT_DRAW.format(drawn_phrase(rec["meta"]["image_spec"]))
        rec["conversations"][1]["value"] = f"{said} {refusal}".strip()
        rec.update(type="t2t", out_images=[])
        out.append(rec)
    return out


def make_mixture(kind, n, seed, split="train", name_colours=0.0, across=None, more=None) -> list:
    """n records of one type. split="train": training compositions and phrasings only; "heldout": evaluation
    prompts (held-out compositions where the type has objects to hold out, held-out phrasings). name_colours: the
    share of training t2i object requests that do not name colours rewritten to name the colours drawn (with_colours);
    0 (the data of the toy model shipped before pipeline.NAME_COLOURS) leaves every byte as it was. Training t2i
    only: across sets pictures.ACROSS for its pictures (None: as it is), and more ({GenEval category: count}) mixes
    in that many more object requests of each category (None or {}: none)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    if kind == "ti2ti" and split == "train":
        raise ValueError("ti2ti is for evaluation only (the paper never trains it); use split='heldout' or ti2ti_set")
    if not 0.0 <= name_colours <= 1.0:
        raise ValueError(f"name_colours is a share in [0, 1], got {name_colours}")
    more = {c: k for c, k in (more or {}).items() if k}
    drawing = kind == "t2i" and split == "train"
    if not drawing and (across is not None or more):
        raise ValueError("across and more are for training t2i records")
    if set(more) - set(CATEGORIES):
        raise ValueError(f"more asks for categories {sorted(set(more) - set(CATEGORIES))}, not among {CATEGORIES}")
    with pictures.across_at(across):
        rng = random.Random(f"{kind}/{split}/{seed}")
        out = [make_record(kind, rng, split, split, f"{kind}-{split}-{seed}-{i}") for i in range(n)]
        # each category its own stream (the records above stay as they were), positions first: with_colours below
        # draws along the list, so the records of data made with extra positions alone stay as they were too
        for cat in sorted(more, key=lambda c: (c != "position", CATEGORIES.index(c))):
            extra = random.Random(f"{kind}/{split}/{seed}/" + ("positions" if cat == "position" else f"more/{cat}"))
            out += [make_record(kind, extra, rid=f"{kind}-{split}-{seed}-{cat}-{i}", category=cat)
                    for i in range(more[cat])]
    if drawing and name_colours > 0:
        named = random.Random(f"name-colours/{seed}")  # its own stream: the records and pictures stay as they were
        out = [with_colours(r) if named.random() < name_colours else r for r in out]
    if more:
        random.Random(f"shuffle/{seed}").shuffle(out)
    return out


def image_right_after(rec) -> dict:
    """A t2ti record whose picture follows the last word of its answer ("... white snow on their peaks.<gen_image>")
    instead of a line break; other records come back unchanged. The BPE merges a full stop and the line break after
    it into one token (".\n"), so with the break the choice to draw is made at that token, against the lone full
    stop, which a read-only base, taught "... peaks. I cannot draw ...", prefers; without it the choice falls to the
    <imgbos> row of the text head, the row WoHG trains for it (the paper's forward switching, Table 1)."""
    if rec["type"] != "t2ti":
        return rec
    asked, said = rec["conversations"]
    return {**rec, "conversations": [asked, {**said, "value": said["value"].replace("\n<gen_image>", "<gen_image>")}]}


UNCOLOURED = ("single_object", "two_object", "counting", "position")  # the GenEval categories whose requests name none


def with_colours(rec) -> dict:
    """A t2i object request that names no colour, rewritten to name the colours its picture has ("paint a blue square
    to the left of a green circle"); other records come back unchanged. Only "colors" and "color_attr" requests name
    colours, so the drawing model meets the colour words on few pictures; the picture, the rest of the wording and
    the record's id are kept, and image_spec gains the colours."""
    spec = rec["meta"]["image_spec"]
    if rec["type"] != "t2i" or spec.get("category") not in UNCOLOURED:
        return rec
    drawn = {o["shape"]: o["colour"] for o in rec["meta"]["pictures"]["out"][0]["objects"]}
    coloured = {**spec, "include": [{**it, "colour": drawn[it["shape"]]} for it in spec["include"]]}
    human = rec["conversations"][0]["value"]
    if describe(spec) not in human:  # every training frame has the object after the verb; kept as is if not
        return rec
    asked = {**rec["conversations"][0], "value": human.replace(describe(spec), describe(coloured), 1)}
    return {**rec, "conversations": [asked] + rec["conversations"][1:], "meta": {**rec["meta"], "image_spec": coloured}}


# ===================================================================================================================
# 2. Evaluation sets and scorers
# ===================================================================================================================

def geneval_prompts(n_per_category, seed, heldout=False, phrasing="train") -> list:
    """GenEval-style drawing prompts: [{category, prompt, spec}], n per category. heldout=True: only held-out
    compositions (counting, colors, color_attr). phrasing="train" asks in the training phrasings (only the picture is
    new); "unseen" in the held-out frame x verb templates, which no training record uses (the modality row's), so a
    score that holds there does not hang on the wording the model was trained on."""
    if phrasing not in ("train", "unseen"):
        raise ValueError(f"phrasing must be 'train' or 'unseen', not {phrasing!r}")
    rng = random.Random(f"geneval/{heldout}/{seed}" + ("" if phrasing == "train" else "/unseen"))
    tpl = "train" if phrasing == "train" else "heldout"
    out = []
    for cat in (HELDOUT_CATEGORIES if heldout else CATEGORIES):
        for _ in range(n_per_category):
            spec = sample_spec(cat, rng, heldout)
            out.append({"category": cat, "prompt": _pick(rng, "draw", tpl).format(describe(spec)), "spec": spec})
    return out


def scene_prompts(n_per_scene, seed) -> list:
    """Drawing requests for every scene: [{scene, prompt}], by canonical name or another phrase of the scene."""
    rng = random.Random(f"scenes/{seed}")
    return [{"scene": name, "prompt": _pick(rng, "draw", "train").format(rng.choice((sc.name,) + sc.phrases))}
            for name, sc in SCENES.items() for _ in range(n_per_scene)]


def understanding_set(n, seed, heldout=False, phrasing="train") -> list:
    """ti2t items [{image, question, prompt, answer, spec}]; heldout=True: questions about held-out compositions;
    phrasing="unseen": asked in the held-out phrasings only (as the modality test asks)."""
    rng = random.Random(f"understanding/{heldout}/{seed}" + ("" if phrasing == "train" else f"/{phrasing}"))
    tpl = {"train": "train", "unseen": "heldout"}[phrasing]
    items = []
    for i in range(n):
        rec = make_record("ti2t", rng, "heldout" if heldout else "train", tpl, f"und-{i}")
        prompt = rec["conversations"][0]["value"]
        items.append({"image": rec["image"][0], "question": prompt.replace("<image>\n", ""), "prompt": prompt,
                      "answer": rec["conversations"][1]["value"], "spec": rec["meta"]["answer_spec"]})
    return items


def _has_scene(text, name):
    return any(k in text for k in SCENES[name].keys)


def score_answer(spec, text) -> bool:
    """Is the key fact in the answer, with no contradicting fact (another colour, shape, number or scene)?"""
    t = text.lower()
    words = re.findall(r"[a-z0-9]+", t)
    kind, ans = spec["kind"], spec["answer"]
    if kind == "colour":
        return ans in words and not any(c in words for c in COLOURS if c != ans)
    if kind == "shape":
        return {w[:-1] if w.endswith("s") else w for w in words} & set(SHAPES) == {ans}
    if kind == "count":
        return {NUMBERS.index(w) if w in NUMBERS else int(w) for w in words if w in NUMBERS or w.isdigit()} == {ans}
    if kind == "yesno":  # the judgement, not its opposite, and for a scene the scene the picture shows
        return ans in words and ({"yes", "no"} - {ans}).isdisjoint(words) and (
            "scene" not in spec or _has_scene(t, spec["scene"]))
    if kind == "scene":
        return _has_scene(t, ans) and not any(_has_scene(t, n) for n in SCENES if n != ans)
    if kind == "describe":
        return all(p in t for p in ans)
    if kind == "relation":  # the relation asked about, and no other one
        return ans in t and sum(bool(re.search(rf"\b{r}\b", t)) for r in RELATIONS.values()) == 1
    raise ValueError(f"unknown answer spec kind {kind!r}")


def modality_set(n, seed) -> list:
    """n prompts per type, phrased with held-out templates: [{type, prompt, image, expected}]; expected is the
    response modality, "text", "image" or "text+image"."""
    items = []
    for kind in MODALITY:
        rng = random.Random(f"modality/{kind}/{seed}")
        for i in range(n):
            rec = make_record(kind, rng, "train", "heldout", f"mod-{kind}-{i}")
            items.append({"type": kind, "prompt": rec["conversations"][0]["value"], "image": rec["image"],
                          "expected": MODALITY[kind]})
    return items


def ti2ti_set(n, seed) -> list:
    """Image + question + "draw one like it" items: [{image, prompt, answer, reference, spec}], where spec holds
    "answer" (for score_answer) and "image" (for score_image); reference is one correct drawing."""
    rng = random.Random(f"ti2ti/{seed}")
    items = []
    for i in range(n):
        rec = make_record("ti2ti", rng, "train", "train", f"ti2ti-{i}")
        items.append({"image": rec["image"][0], "prompt": rec["conversations"][0]["value"],
                      "answer": rec["conversations"][1]["value"].replace("\n<gen_image>", ""),
                      "reference": rec["out_images"][0],
                      "spec": {"answer": rec["meta"]["answer_spec"], "image": rec["meta"]["image_spec"]}})
    return items


def score_ti2ti(spec, text, img) -> tuple:
    """(text right, image right) for a ti2ti answer; img None when the model drew nothing."""
    return score_answer(spec["answer"], text), img is not None and score_image(spec["image"], img)


# ===================================================================================================================
# 3. Files and the command line
# ===================================================================================================================

def write_dataset(records, out_dir, name) -> str:
    """records -> out_dir/<name>.jsonl, images as PNGs under out_dir/images/ ("image"/"out_images" become
    relative paths). Written to a temporary name and renamed, so a killed export leaves no half file."""
    from tqdm import tqdm
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    path = os.path.join(out_dir, f"{name}.jsonl")
    with open(path + ".tmp", "w") as f:
        for rec in tqdm(records, desc=name, unit="rec", leave=False):
            row = dict(rec)
            for key, tag in (("image", "in"), ("out_images", "out")):
                row[key] = [f"images/{rec['id']}-{tag}{j}.png" for j in range(len(rec[key]))]
                for im, rel in zip(rec[key], row[key]):
                    im.save(os.path.join(out_dir, rel))
            f.write(json.dumps(row) + "\n")
    os.replace(path + ".tmp", path)
    return path


def contact_sheet(seed=0) -> Image.Image:
    """Two renders of every scene, two of every GenEval category and four held-out compositions, captioned."""
    rng = random.Random(seed)
    tiles = [(render(scene_picture(n, rng)), SCENES[n].name) for n in SCENES for _ in range(2)]
    specs = [(sample_spec(c, rng), "") for c in CATEGORIES for _ in range(2)]
    specs += [(sample_spec(c, rng, heldout=True), "held out: ") for c in ("colors", "colors", "counting", "color_attr")]
    tiles += [(render(spec_picture(s, rng)), tag + describe(s)) for s, tag in specs]
    cols, tw, th = 8, 140, 172
    sheet = Image.new("RGB", (cols * tw, -(-len(tiles) // cols) * th), "white")
    d = ImageDraw.Draw(sheet)
    for i, (im, caption) in enumerate(tiles):
        x, y = (i % cols) * tw + 6, (i // cols) * th + 4
        sheet.paste(im.resize((128, 128), Image.NEAREST), (x, y))
        d.multiline_text((x, y + 131), "\n".join(textwrap.wrap(caption, 24)), fill="black", spacing=1)
    return sheet


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m toy.world", description="ARMOR toy world: contact sheet and datasets.")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sample", help="write a contact sheet of scenes and object prompts")
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=0)
    e = sub.add_parser("export", help="write .jsonl datasets of every type, with PNGs")
    e.add_argument("--out", required=True)
    e.add_argument("--n", type=int, default=1000, help="records per type")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--split", choices=("train", "heldout"), default="train")
    args = p.parse_args(argv)
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as err:
        p.error(f"cannot create --out {args.out!r}: {err}")
    if args.cmd == "sample":
        path = os.path.join(args.out, "world_sample.png")
        contact_sheet(args.seed).save(path)
        print(f"wrote {path}")
        return
    if args.n <= 0:
        p.error(f"--n must be positive, got {args.n}")
    for kind in TYPES + (("ti2ti",) if args.split == "heldout" else ()):
        path = write_dataset(make_mixture(kind, args.n, args.seed, args.split), args.out, f"{kind}_{args.split}")
        print(f"wrote {path} ({args.n} records)")


if __name__ == "__main__":
    sys.exit(main())
