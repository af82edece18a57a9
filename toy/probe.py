"""
What a toy base carries and what it can learn, measured directly rather than through the whole pipeline.

  python -m toy.probe tokens [--model toy/base]    # a linear probe: does each visual token say where in the picture
                                                   #   it is (its 4x4 grid cell)? held-out accuracy; chance 1/16
  python -m toy.probe relation [--steps 400] [--layers 4] [--heads 4]
                                                   # a base trained from scratch (stage 0) on one task only: "Where
                                                   #   is the circle compared to the square?"; held-out accuracy of
                                                   #   the relation it names (four relations: chance 0.25)

Placing objects relative to each other is the hardest thing the toy world asks, in reading and in drawing (the
README's position row). `tokens` asks whether the picture's side carries positions; `relation` asks whether an LLM of
a given depth and width learns to compare two of them within minutes, before a full `python -m toy` run is spent on
it. Both print one line of figures; `relation` keeps its run in runs/probe/ (train.py --resume).
"""

import argparse
import json
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


def relation_questions(n, seed):
    """Two objects of different shapes and colours, one clearly <relation> the other; asked where the first is."""
    rng, out = random.Random(seed), []
    for i in range(n):
        (s1, s2), (c1, c2) = rng.sample(pictures.SHAPES, 2), rng.sample(list(pictures.COLOURS), 2)
        key = rng.choice(list(pictures.RELATIONS))
        rel = pictures.RELATIONS[key]  # "left of" -> "to the left of"
        pic = pictures.Picture("objects", pictures.place([(s1, c1), (s2, c2)], rng, key),
                               pictures.random_background(rng))
        out.append({"id": f"rel-{seed}-{i}", "type": "ti2t", "image": [pictures.render(pic)], "out_images": [],
                    "conversations": [{"from": "human", "value": f"<image>\nWhere is the {s1} compared to the {s2}?"},
                                      {"from": "gpt", "value": f"The {s1} is {rel} the {s2}."}],
                    "answer": f"{s1} is {rel} the {s2}"})
    return out


def relation(steps, layers, heads, kv_heads, n_train=4000, n_test=200):
    """Stage 0 from scratch on relation questions only, at the base recipe's batch and learning rate, with the toy
    LLM's depth and heads overridden; returns held-out accuracy."""
    import armor
    import train
    from tokenizer import Tokenizer
    from . import eval as ev
    name = f"relation_l{layers}_h{heads}_kv{kv_heads}"
    out = os.path.join(OUT, name)
    data = os.path.join(OUT, "relation_data")
    if not os.path.exists(os.path.join(data, "ti2t.jsonl")):
        world.write_dataset(relation_questions(n_train, seed=1), data, "ti2t")
    cfg = armor.PRESETS["toy"]().to_dict()
    cfg["llm"].update(num_layers=layers, num_heads=heads, num_kv_heads=kv_heads)
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, name + ".json"), "w") as f:
        json.dump(cfg, f)
    _, batch, lr, _ = pipeline.TRAIN[0]
    model = train.main(["--stage", "0", "--preset", os.path.join(OUT, name + ".json"), "--tokenizer", BASE,
                        "--data", f"ti2t={os.path.join(data, 'ti2t.jsonl')}", "--steps", str(steps),
                        "--batch-size", str(batch), "--lr", str(lr), "--warmup", str(max(1, steps // 16)),
                        "--dtype", pipeline._amp(), "--out", out, "--save-every", "200", "--resume"]).eval()
    held = relation_questions(n_test, seed=2)
    answers = ev.base_answers(model, Tokenizer.from_dir(BASE), [q["conversations"][0]["value"] for q in held],
                              [q["image"] for q in held])
    return sum(q["answer"] in a for q, a in zip(held, answers)) / len(held), answers[:3]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("which", choices=["tokens", "relation"])
    ap.add_argument("--model", default=BASE, help="tokens: the base MLLM directory")
    ap.add_argument("--steps", type=int, default=400, help="relation: stage-0 steps")
    ap.add_argument("--layers", type=int, help="relation: LLM layers (default: the toy preset's)")
    ap.add_argument("--heads", type=int, help="relation: attention heads (default: the toy preset's)")
    ap.add_argument("--kv-heads", type=int, help="relation: key/value heads (default: the toy preset's)")
    args = ap.parse_args(argv)
    if args.which == "tokens":
        print(f"{args.model}: visual token -> its grid cell, held-out accuracy {token_positions(args.model):.3f} "
              f"(chance {1 / 16:.3f})")
        return
    import armor
    llm = armor.PRESETS["toy"]().llm
    layers, heads = args.layers or llm.num_layers, args.heads or llm.num_heads
    kv = args.kv_heads or min(llm.num_kv_heads, heads)
    if heads % kv or llm.hidden_size % heads:
        sys.exit(f"error: {heads} heads need a key/value head count dividing them and dividing {llm.hidden_size}")
    acc, examples = relation(args.steps, layers, heads, kv)
    print(f"relation questions, {layers} layers x {heads} heads ({kv} kv), {args.steps} steps: held-out accuracy "
          f"{acc:.3f} (chance 0.25); e.g. {examples}")


if __name__ == "__main__":
    main()
