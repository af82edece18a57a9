"""
What the toy models carry and what they can learn, measured directly rather than through the whole pipeline.

  python -m toy.probe tokens [--model toy/base]    # a linear probe: does each visual token say where in the picture
                                                   #   it is (its 4x4 grid cell)? held-out accuracy; chance 1/16
  python -m toy.probe relation [--steps 400] [--layers 4] [--heads 4] [--by shape|colour] [--form open|yesno|sides]
                               [--pos-std 1]
                                                   # a base trained from scratch (stage 0) on one task only: "Where
                                                   #   is the circle compared to the square?"; held-out accuracy of
                                                   #   the relation it names (four relations: chance 0.25), and of
                                                   #   its axis alone (left/right or above/below: chance 0.5)
  python -m toy.probe relation --model runs/toy/base [--form open]
                                                   # the same held-out questions asked of a base as it is
  python -m toy.probe draw [--steps 1500] [--share 1] [--across 8]
                                                   # the shipped ARMOR trained further (stage 2) on drawing data of
                                                   #   which --share are position requests ("a circle above a
                                                   #   square"), their two objects at most --across px apart on the
                                                   #   other axis; GenEval-style overall, scenes, and how often each
                                                   #   relation and its opposite are drawn, before and after
  python -m toy.probe heldout [--model toy/armor] [--n 20] [--seeds 1234 7 99]
                                                   # what ARMOR draws when asked for a held-out composition: for a
                                                   #   colour-shape pair never drawn in training, the pair itself, the
                                                   #   shape in another colour, the colour on another shape, or
                                                   #   neither; for a held-out count, the count it drew
  python -m toy.probe codes [--vqgan toy/vqgan] [--n 2000]
                                                   # what one VQ code says about its cell: how many codes carry the
                                                   #   object cells, and how many colours and cell kinds (colour,
                                                   #   shape, quarter) each code stands for

Placing objects relative to each other is the hardest thing the toy world asks, in reading and in drawing (the
README's position row). `tokens` asks whether the picture's side carries positions; `relation` asks whether an LLM of
a given depth and width learns to compare two of them within minutes, before a full `python -m toy` run is spent on
it. `draw` asks the same of drawing: whether stage 2's trainable parts (new rows, adapter, visual head, over the
frozen LLM) can learn to place two objects at all when given nothing else to learn. `codes` asks what the drawing
model's vocabulary says: whether one VQ code names one colour and one kind of cell. Each prints its figures;
`relation` and `draw` keep their runs in runs/probe/ (train.py --resume).
"""

import argparse
import json
import math
import os
import random
import sys

import torch
import torch.nn.functional as F

from . import pictures, pipeline, world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(ROOT, "toy", "base")
OUT = os.path.join(ROOT, "runs", "probe")


def object_pictures(n, seed):
    rng = random.Random(seed)
    return [pictures.render(pictures.random_objects(rng)) for _ in range(n)]


@torch.enable_grad()
def linear_probe(x, y, n_train, classes, steps=500):
    """Multinomial logistic regression on standardised features; accuracy on the rows past n_train."""
    mu, sd = x[:n_train].mean(0), x[:n_train].std(0).clamp(min=1e-6)
    x = ((x - mu) / sd).detach()
    w = torch.zeros(x.shape[1], classes, device=x.device, requires_grad=True)
    b = torch.zeros(classes, device=x.device, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=1e-2)
    for _ in range(steps):
        loss = F.cross_entropy(x[:n_train] @ w + b, y[:n_train]) + 1e-4 * w.pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return ((x[n_train:] @ w + b).argmax(1) == y[n_train:]).float().mean().item()


@torch.no_grad()
def token_positions(model_dir, n_train=300, n_test=100, seed=0):
    """Held-out accuracy of a linear probe reading each visual token's grid cell from its feature (what the LLM
    receives: InternViT -> pixel shuffle -> mlp1). A token that does not carry its cell leaves the LLM only the
    order of the <IMG_CONTEXT> rows to tell where things are."""
    import armor
    from data import load_image
    model = armor.from_internvl(model_dir, armor=False, verbose=False).eval()
    c = model.config
    feats = [model.extract_feature(load_image(im, c.vision.image_size, c.max_tiles))[0]
             for im in object_pictures(n_train + n_test, seed)]
    k = c.tokens_per_tile
    x, y = torch.cat(feats).float(), torch.arange(k).repeat(len(feats))
    return linear_probe(x, y, n_train * k, k)


# Where each of two objects in a relation sits: place() keeps them three slots apart on the relation's axis, so the
# first is on one side of the picture and the second on the other.
SIDES = {"left of": ("on the left", "on the right"), "right of": ("on the right", "on the left"),
         "above": ("at the top", "at the bottom"), "below": ("at the bottom", "at the top")}


def relation_questions(n, seed, by="shape", form="open"):
    """Two objects of different shapes and colours, one clearly <relation> the other; asked where the first is,
    naming the objects by shape ("the circle") or by colour ("the red object"). form="yesno" asks as the base's
    training set did before it asked open questions ("Is the circle above the square?", the asked relation or its
    opposite, each half the time), answered "The circle is below the square, so no.": the relation first.
    form="sides" asks the open question and answers with each object's side first ("The circle is on the left and
    the square on the right, so the circle is to the left of the square.")."""
    rng, out = random.Random(seed), []
    for i in range(n):
        (s1, s2), (c1, c2) = rng.sample(pictures.SHAPES, 2), rng.sample(list(pictures.COLOURS), 2)
        n1, n2 = (s1, s2) if by == "shape" else (f"{c1} object", f"{c2} object")
        key = rng.choice(list(pictures.RELATIONS))
        rel = pictures.RELATIONS[key]  # "left of" -> "to the left of"
        pic = pictures.Picture("objects", pictures.place([(s1, c1), (s2, c2)], rng, key),
                               pictures.random_background(rng))
        q, a = f"Where is the {n1} compared to the {n2}?", f"The {n1} is {rel} the {n2}."
        if form == "sides":  # each object's side of the picture first, then the relation that follows from them
            first, second = SIDES[key]
            a = f"The {n1} is {first} and the {n2} {second}, so the {n1} is {rel} the {n2}."
        if form == "yesno":
            yes = rng.random() < 0.5
            asked = pictures.RELATIONS[key if yes else pictures.OPPOSITE[key]]
            q, a = f"Is the {n1} {asked} the {n2}?", f"The {n1} is {rel} the {n2}, so {'yes' if yes else 'no'}."
        out.append({"id": f"rel-{seed}-{i}", "type": "ti2t", "image": [pictures.render(pic)], "out_images": [],
                    "conversations": [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}],
                    "answer": f"{n1} is {rel} the {n2}", "relation": key})
    return out


def relation(steps, layers, heads, kv_heads, pos_std=None, by="shape", form="open", n_train=4000, n_test=200):
    """Stage 0 from scratch on relation questions only, at the base recipe's batch and learning rate, with the toy
    LLM's depth and heads overridden, and the ViT's class and position embeddings drawn at pos_std (default
    armor.init_weights' 1.0, InternViT's own torch.randn; 0.02 was the toy base's before); -> ask_relations' (scores,
    examples)."""
    import armor
    import train
    from tokenizer import Tokenizer
    variant = ("" if by == "shape" else f"_{by}") + ("" if form == "open" else f"_{form}")
    name = f"relation_l{layers}_h{heads}_kv{kv_heads}_s{steps}" + f"_pos{pos_std or 1:g}" + variant
    out = os.path.join(OUT, name)
    data = os.path.join(OUT, "relation_data" + variant)
    if not os.path.exists(os.path.join(data, "ti2t.jsonl")):
        world.write_dataset(relation_questions(n_train, seed=1, by=by, form=form), data, "ti2t")
    cfg = armor.PRESETS["toy"]().to_dict()
    cfg["llm"].update(num_layers=layers, num_heads=heads, num_kv_heads=kv_heads)
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, name + ".json"), "w") as f:
        json.dump(cfg, f)
    _, batch, lr, _ = pipeline.TRAIN[0]
    init_weights = armor.init_weights

    @torch.no_grad()
    def init_at_pos_std(module, std=0.02):  # train.py's stage-0 init, then the ViT's position scale redrawn
        init_weights(module, std)
        for m in module.modules():
            if pos_std and isinstance(m, armor.VisionEmbeddings):
                torch.nn.init.normal_(m.class_embedding, std=pos_std)
                torch.nn.init.normal_(m.position_embedding, std=pos_std)
    armor.init_weights = init_at_pos_std
    try:
        model = train.main(["--stage", "0", "--preset", os.path.join(OUT, name + ".json"), "--tokenizer", BASE,
                            "--data", f"ti2t={os.path.join(data, 'ti2t.jsonl')}", "--steps", str(steps),
                            "--batch-size", str(batch), "--lr", str(lr), "--warmup", str(max(1, steps // 16)),
                            "--dtype", pipeline._amp(), "--out", out, "--save-every", "200", "--resume"]).eval()
    finally:
        armor.init_weights = init_weights
    return ask_relations(model, Tokenizer.from_dir(BASE), by, form, n_test)


def ask_relations(model, tok, by="shape", form="open", n=200):
    """A base's held-out relation answers -> (relation_scores, three examples)."""
    from . import eval as ev
    held = relation_questions(n, seed=2, by=by, form=form)
    answers = ev.base_answers(model, tok, [q["conversations"][0]["value"] for q in held], [q["image"] for q in held])
    return relation_scores(held, answers), answers[:3]


AXIS = {"left of": "left/right", "right of": "left/right", "above": "above/below", "below": "above/below"}


def relation_scores(held, answers):
    """{"all": accuracy, "axis": the named relation on the right axis, "left/right": accuracy on questions whose
    answer is left or right of, "above/below": the same for above or below}. A model that sees two objects side
    by side (or stacked) but not which is which gets the axis right and the direction at chance."""
    said = [next((k for k, v in pictures.RELATIONS.items() if f" is {v} the " in a), None) for a in answers]
    right = [q["answer"] in a for q, a in zip(held, answers)]
    out = {"all": sum(right) / len(held),
           "axis": sum(s is not None and AXIS[s] == AXIS[q["relation"]] for q, s in zip(held, said)) / len(held)}
    for ax in ("left/right", "above/below"):
        on = [r for q, r in zip(held, right) if AXIS[q["relation"]] == ax]
        out[ax] = sum(on) / max(1, len(on))
    return out


def object_cells(pic, codes):
    """[(object, [its 4 codes: top-left, top-right, bottom-left, bottom-right])] of a picture and its (8, 8) codes:
    every object covers a 2x2 block of cells (pictures.place)."""
    out = []
    for o in pic.objects:
        x, y = int(o.cx - o.size / 2) // pictures.CELL, int(o.cy - o.size / 2) // pictures.CELL
        out.append((o, [int(codes[y + q // 2, x + q % 2]) for q in range(4)]))
    return out


def _entropy(counts):
    t = sum(counts.values())
    return -sum(n / t * math.log(n / t) for n in counts.values() if n)


@torch.no_grad()
def code_meanings(encode, n, seed=0):
    """Over n random object pictures (training compositions), encode(PIL image) -> (8, 8) codes: the codes used by
    object cells, the cell kinds seen (colour, shape, and the quarter but for squares), H(colour | code) and
    H(kind | code) in nats (0: every code names one colour, one kind), and the share of the cells of held-out
    colour-shape pairs (pictures.HELDOUT_COLOUR_SHAPE, never in a training picture) whose code some training
    picture's cell also has."""
    from collections import Counter, defaultdict
    rng, kinds = random.Random(f"codes/{seed}"), defaultdict(Counter)
    for _ in range(n):
        pic = pictures.random_objects(rng)
        for o, cells in object_cells(pic, encode(pictures.render(pic))):
            for q, c in enumerate(cells):  # a square's four quarters look alike: one kind
                kinds[c][(o.colour, o.shape, None if o.shape == "square" else q)] += 1
    total = sum(sum(k.values()) for k in kinds.values())
    h_kind = sum(sum(k.values()) / total * _entropy(k) for k in kinds.values())
    h_colour = 0.0
    for k in kinds.values():
        by_colour = Counter()
        for (colour, _, _), m in k.items():
            by_colour[colour] += m
        h_colour += sum(k.values()) / total * _entropy(by_colour)
    seen, reused = 0, 0
    for colour, shape in pictures.HELDOUT_COLOUR_SHAPE:
        for _ in range(max(1, n // 20)):  # the pair beside one object of a training pair
            other = rng.choice(pictures.TRAIN_PAIRS)
            pic = pictures.Picture("objects", pictures.place([(shape, colour), other[::-1]], rng),
                                   pictures.random_background(rng))
            for c in object_cells(pic, encode(pictures.render(pic)))[0][1]:
                seen, reused = seen + 1, reused + (c in kinds)
    return dict(codes=len(kinds), kinds=len({x for k in kinds.values() for x in k}), h_colour=h_colour,
                h_kind=h_kind, heldout_reused=reused / seen)


def vqgan_encoder(vq_dir):
    """PIL image -> its (8, 8) VQ codes under the VQGAN in vq_dir."""
    from vqgan import encode_pil, load_vqgan
    vq = load_vqgan(vq_dir).float().eval()
    return lambda img: encode_pil(vq, [img], pictures.SIZE)[0].view(pictures.SIZE // pictures.CELL, -1)


def drawing_data(n, share, seed=1, across=None):
    """n stage-2 t2i records, a share of them position requests ("draw a circle above a square") and the rest the
    recipe's own t2i mixture (which asks for positions in one request of twelve); below share 1, the recipe's t2ti
    records too (n / 3), so every kind of drawing stays in the mix. Colours are named as in the recipe."""
    rng, k = random.Random(f"probe-draw/{seed}"), round(n * share)
    with pictures.across_at(across):
        pos = [world.make_record("t2i", rng, rid=f"pos-{seed}-{i}", category="position") for i in range(k)]
    named = random.Random(f"probe-draw-named/{seed}")
    pos = [world.with_colours(r) if named.random() < pipeline.NAME_COLOURS else r for r in pos]
    t2i = pos + world.make_mixture("t2i", n - k, seed, name_colours=pipeline.NAME_COLOURS)
    random.Random(seed).shuffle(t2i)
    return {"t2i": t2i, "t2ti": world.make_mixture("t2ti", n // 3, seed) if share < 1 else []}


@torch.no_grad()
def drawn(model, tok, vq, items, seed):
    """The detections (pictures.detect) in the first picture of the model's answer to each item's prompt, at
    sample.py's guidance; [] where it drew none."""
    import sample
    from . import eval as ev
    answers = ev.answer_all(model, tok, [it["prompt"] for it in items], cfg=sample.DEFAULT_CFG, seed=seed)
    return [pictures.detect(img) if img is not None else [] for img in (ev.first_image(vq, a) for a in answers)]


@torch.no_grad()
def drawing_scores(model_dir, seed, n=20):
    """GenEval-style overall and scenes (toy.eval's), and {relation: [prompts, both objects drawn, relation holds,
    its opposite holds]} over the evaluation's position prompts: a model blind to the relation draws it and its
    opposite about equally often."""
    import sample
    from . import eval as ev
    model, tok, vq = sample.load(model_dir, vqgan=os.path.join(ROOT, "toy", "vqgan"))
    gen = ev.eval_generation(model, tok, vq, n, sample.DEFAULT_CFG, seed)
    scenes = ev.eval_scenes(model, tok, vq, max(1, n // 4), sample.DEFAULT_CFG, seed)
    items = [it for it in world.geneval_prompts(n * 4, seed) if it["category"] == "position"]
    rel = {r: [0, 0, 0, 0] for r in pictures.RELATIONS}
    for it, dets in zip(items, drawn(model, tok, vq, items, seed)):
        spec, (a, b) = it["spec"], it["spec"]["include"]
        r = a["position"][0]
        flipped = {**spec, "include": [{**a, "position": [pictures.OPPOSITE[r], 1]}, b]}
        both = {**spec, "category": "two_object", "include": [{k: v for k, v in a.items() if k != "position"}, b]}
        for i, ok in enumerate((True, pictures.check(both, dets), pictures.check(spec, dets),
                                pictures.check(flipped, dets))):
            rel[r][i] += ok
    return gen, scenes, rel


def heldout_kind(spec, dets):
    """What a drawing (its detections) made of a held-out request: a "colors" request gets "pair", "shape" (the shape
    drawn, in another colour only), "colour" (the colour drawn, on another shape only) or "neither"; a "counting"
    request gets the number of objects of its shape drawn."""
    want = spec["include"][0]
    if spec["category"] == "counting":
        return sum(d.shape == want["shape"] for d in dets)
    if any(d.shape == want["shape"] and d.colour == want["colour"] for d in dets):
        return "pair"
    return ("shape" if any(d.shape == want["shape"] for d in dets) else
            "colour" if any(d.colour == want["colour"] for d in dets) else "neither")


def heldout_drawings(model_dir, n, seeds):
    """{(category, request): Counter(heldout_kind)} over the evaluation's held-out "colors" and "counting" prompts
    (toy.eval's, n per category and seed) drawn by the ARMOR in model_dir."""
    from collections import Counter, defaultdict
    import sample
    model, tok, vq = sample.load(model_dir)
    out = defaultdict(Counter)
    for seed in seeds:
        items = [it for it in world.geneval_prompts(n, seed, heldout=True) if it["category"] in ("colors", "counting")]
        for it, dets in zip(items, drawn(model, tok, vq, items, seed)):
            spec, want = it["spec"], it["spec"]["include"][0]
            request = f"{want['count']} {want['shape']}s" if spec["category"] == "counting" else \
                f"{want['colour']} {want['shape']}"
            out[(spec["category"], request)][heldout_kind(spec, dets)] += 1
    return out


def draw(steps, share, lr, seeds, across=None, n_train=6000):
    """Stage 2 continued from the shipped ARMOR on drawing_data at the recipe's batch; -> {model: [scores per seed]}."""
    import train
    tag = f"p{share:g}" + ("" if across is None else f"_a{across:g}")
    name = f"draw_{tag}_s{steps}_lr{lr:g}"
    out, data = os.path.join(OUT, name), os.path.join(OUT, f"draw_data_{tag}")
    sets = None
    for kind in ("t2i", "t2ti"):
        if not os.path.exists(os.path.join(data, kind + ".jsonl")):
            sets = sets or drawing_data(n_train, share, across=across)
            world.write_dataset(sets[kind], data, kind)
    _, batch, _, warmup = pipeline.TRAIN[2]
    train.main(["--stage", "2", "--init", os.path.join(ROOT, "toy", "armor"),
                "--vqgan", os.path.join(ROOT, "toy", "vqgan")]
               + [x for kind in ("t2i", "t2ti") if os.path.getsize(os.path.join(data, kind + ".jsonl"))
                  for x in ("--data", f"{kind}={os.path.join(data, kind + '.jsonl')}")]
               + ["--steps", str(steps), "--batch-size", str(batch), "--lr", str(lr),
                  "--warmup", str(min(warmup, steps // 10 + 1)), "--dtype", pipeline._amp(), "--out", out,
                  "--save-every", "500", "--resume"])
    return {name: [drawing_scores(path, s) for s in seeds]
            for name, path in (("shipped", os.path.join(ROOT, "toy", "armor")), (f"+{steps} steps", out))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("which", choices=["tokens", "relation", "draw", "codes", "heldout"])
    ap.add_argument("--model", help="tokens: the base MLLM directory (default toy/base); relation: a base to ask "
                    "instead of training one; heldout: the ARMOR to ask (default toy/armor)")
    ap.add_argument("--steps", type=int, help="relation: stage-0 steps (default 400); draw: stage-2 steps (1500)")
    ap.add_argument("--layers", type=int, help="relation: LLM layers (default: the toy preset's)")
    ap.add_argument("--heads", type=int, help="relation: attention heads (default: the toy preset's)")
    ap.add_argument("--kv-heads", type=int, help="relation: key/value heads (default: the toy preset's)")
    ap.add_argument("--by", choices=["shape", "colour"], default="shape",
                    help="relation: name the two objects by shape (\"the circle\") or colour (\"the red object\")")
    ap.add_argument("--form", choices=["open", "yesno", "sides"], default="open",
                    help="relation: ask where the first object is, or yes/no about a relation (as the base's data "
                    "did), or where, answered with each object's side first")
    ap.add_argument("--pos-std", type=float, help="relation: init scale of the ViT's class and position embeddings "
                    "(default 1: armor.init_weights', InternViT's own)")
    ap.add_argument("--share", type=float, default=1.0, help="draw: share of position requests in the t2i data "
                    "(1: nothing else; below 1, the recipe's t2i and t2ti records fill the rest)")
    ap.add_argument("--lr", type=float, default=pipeline.TRAIN[2][2], help="draw: stage-2 learning rate")
    ap.add_argument("--across", type=float, help="draw: how far apart (px) the position requests' two objects may "
                    "sit on the other axis (pictures.ACROSS, default 8; 0 puts a left/right pair on one row)")
    ap.add_argument("--seeds", type=int, nargs="+", help="draw, heldout: evaluation seeds (default 1234 7; heldout: "
                    "1234 7 99, the README table's)")
    ap.add_argument("--vqgan", help="codes: the VQGAN directory (default toy/vqgan)")
    ap.add_argument("--n", type=int, help="codes: object pictures to encode (default 2000); heldout: prompts per "
                    "category and seed (default 20, toy.eval's)")
    args = ap.parse_args(argv)
    if not 0 < args.share <= 1:
        sys.exit(f"error: --share is a share in (0, 1], got {args.share}")
    if args.which == "tokens":
        args.model = args.model or BASE
        print(f"{args.model}: visual token -> its grid cell, held-out accuracy {token_positions(args.model):.3f} "
              f"(chance {1 / 16:.3f})")
        return
    if args.which == "codes":
        vq_dir = args.vqgan or os.path.join(ROOT, "toy", "vqgan")
        args.n = args.n or 2000
        m = code_meanings(vqgan_encoder(vq_dir), args.n)
        print(f"{vq_dir}, {args.n} object pictures: {m['codes']} codes carry every object cell, of {m['kinds']} cell "
              f"kinds (colour x shape x quarter, a square's quarters one kind); H(colour | code) "
              f"{m['h_colour']:.2f} nats, H(kind | code) {m['h_kind']:.2f} nats (0 when a code names one colour, "
              f"one kind); cells of held-out colour-shape pairs whose code a training picture also has: "
              f"{m['heldout_reused']:.3f}")
        return
    if args.which == "heldout":
        model_dir = args.model or os.path.join(ROOT, "toy", "armor")
        seeds = args.seeds or [1234, 7, 99]
        for (category, request), kinds in sorted(heldout_drawings(model_dir, args.n or 20, seeds).items()):
            if category == "counting":
                said = "objects of its shape drawn: " + ", ".join(f"{k} in {v}" for k, v in sorted(kinds.items()))
            else:
                said = (f"the pair {kinds['pair']}, the shape in another colour {kinds['shape']}, the colour on "
                        f"another shape {kinds['colour']}, neither {kinds['neither']}")
            print(f"{category}, {request!r} ({sum(kinds.values())} requests, seeds {', '.join(map(str, seeds))}): "
                  f"{said}")
        return
    if args.which == "draw":
        args.seeds = args.seeds or [1234, 7]
        for name, per_seed in draw(args.steps or 1500, args.share, args.lr, args.seeds, args.across).items():
            for seed, (gen, scenes, rel) in zip(args.seeds, per_seed):
                right = sum(v[2] for v in rel.values()) / max(1, sum(v[0] for v in rel.values()))
                cells = ", ".join(f"{r} {h}/{n} (opposite {o})" for r, (n, b, h, o) in rel.items())
                print(f"{name}, seed {seed}: GenEval-style {gen['overall']:.3f}, scenes {scenes:.3f}; relation drawn "
                      f"right {right:.3f}: {cells}", flush=True)
        return
    import armor
    if args.model:  # a base as it is: only asked
        if any(v is not None for v in (args.steps, args.layers, args.heads, args.kv_heads, args.pos_std)):
            sys.exit("error: relation --model asks that base as it is; --steps, --layers, --heads, --kv-heads and "
                     "--pos-std are for training one")
        from tokenizer import Tokenizer
        model = armor.from_internvl(args.model, armor=False, verbose=False).eval()
        acc, examples = ask_relations(model, Tokenizer.from_dir(args.model), args.by, args.form)
        print(f"{args.model}: held-out relation questions ({args.form}, objects named by {args.by}): "
              f"{_relation_figures(acc, examples)}")
        return
    args.steps = args.steps or 400
    llm = armor.PRESETS["toy"]().llm
    layers, heads = args.layers or llm.num_layers, args.heads or llm.num_heads
    kv = args.kv_heads or min(llm.num_kv_heads, heads)
    if heads % kv or llm.hidden_size % heads:
        sys.exit(f"error: {heads} heads need a key/value head count dividing them and dividing {llm.hidden_size}")
    acc, examples = relation(args.steps, layers, heads, kv, args.pos_std, args.by, args.form)
    print(f"relation questions, {layers} layers x {heads} heads ({kv} kv), ViT position init std "
          f"{args.pos_std or 1:g}, objects named by {args.by}, {args.form} questions, {args.steps} steps: "
          f"{_relation_figures(acc, examples)}")


def _relation_figures(acc, examples):
    return (f"held-out accuracy {acc['all']:.3f} (chance 0.25); the right axis {acc['axis']:.3f} (chance 0.5); on "
            f"left/right questions {acc['left/right']:.3f}, on above/below ones {acc['above/below']:.3f} (chance 0.5 "
            f"once the axis is right); e.g. {examples}")


if __name__ == "__main__":
    main()
