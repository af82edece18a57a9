"""
Measure the toy world's ARMOR: does it draw what it is asked, know when to draw, and still understand?

  python -m toy.eval                              # toy/armor vs toy/base -> one Markdown table, also eval.md
  python -m toy.eval --model runs/toy/stage3 --vqgan runs/toy/vqgan --stages runs/toy/stage1 runs/toy/stage2
                                                # a train.py run (it names no VQGAN), understanding per stage
  python -m toy.eval --cfg-sweep 1,1.5,2,3,4,6 --seed 99   # the guidance sweep behind sample.py's default --cfg
  python -m toy.eval --quick                      # fewer prompts (a smoke run)
  python -m toy.eval --gallery figures/gallery.png  # a captioned sheet of the model's own drawings
  python -m toy.eval --base-only runs/toy/base --seed 7   # a base alone: its understanding in both phrasings

Sections (prompts are seeded; world.py holds the prompt sets, pictures.py the rule-based judges, validated in
tests/test_world.py):
  generation    GenEval's six categories on the object world (single object, two objects, counting, colours,
                position, colour attribution), scored by pictures.detect / pictures.check; held-out compositions apart;
                and the ceiling the VQGAN allows (the true pictures after an encode-decode round trip, same judge)
  scenes        drawing requests for the twelve scenes, scored by pictures.classify_scene
  reading       teacher-forced: how much the codes of a true picture depend on the colour and the shape words
  code context  how much a VQGAN code depends on the pixels around its cell (0: equal cells, equal codes)
  understanding ti2t questions on rendered images; accuracy of the base MLLM and of each stage, and the
                retention ratio (the paper's "Und.", Table 4); again in phrasings never seen in training
  modality      "what to generate": the response modality (text / image / text+image) for held-out phrasings
                of t2t, ti2t, t2i and t2ti prompts (and ti2ti)
  ti2ti         image in, text + image out (never trained, Section 6.2.1): text fact right, image right
"""

import argparse
import json
import os
import random
import sys
import time

import torch

from sample import IMAGE_DEFAULT, Sampling, generate, load

from . import pictures, world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GREEDY = Sampling(0.0)
DEFAULT_MODEL = os.path.join(ROOT, "toy", "armor")


def batched(items, size):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def answer_all(model, tok, prompts, images=None, cfg=1.0, seed=0, batch=64, max_new_tokens=None, image=IMAGE_DEFAULT):
    """Greedy text, sampled codes (seeded): one answer per prompt, in order."""
    c = model.config
    budget = max_new_tokens or c.image_grid ** 2 + 48  # room for a sentence and one image
    out = []
    images = images or [[] for _ in prompts]
    for k, chunk in enumerate(batched(list(zip(prompts, images)), batch)):
        convs = [[{"role": "user", "content": p}] for p, _ in chunk]
        out += generate(model, tok, convs, [ims for _, ims in chunk], max_new_tokens=budget, text=GREEDY,
                        image=image, cfg=cfg, seed=seed + k)
    return out


def modality(ans):
    has_text = any(isinstance(s, str) and s.strip() for s in ans.segments)
    has_img = bool(ans.images)
    return "text+image" if has_text and has_img else "image" if has_img else "text"


def first_image(vq, ans):
    from vqgan import decode_pil
    return decode_pil(vq, ans.images[0][None])[0] if ans.images else None


# -----------------------------------------------------------------------------------------------------------------


def eval_generation(model, tok, vq, n, cfg, seed, heldout=False, phrasing="train"):
    items = world.geneval_prompts(n, seed, heldout=heldout, phrasing=phrasing)
    answers = answer_all(model, tok, [it["prompt"] for it in items], cfg=cfg, seed=seed)
    per = {}
    for it, ans in zip(items, answers):
        img = first_image(vq, ans)
        per.setdefault(it["category"], []).append(img is not None and pictures.score_image(it["spec"], img))
    return geneval_scores(per)


def geneval_scores(per):
    """{category: [bool]} -> accuracy per category, and GenEval's overall: the mean of the category scores."""
    acc = {k: sum(v) / len(v) for k, v in per.items()}
    acc["overall"] = sum(acc.values()) / len(acc)
    return acc


def eval_ceiling(vq, n, seed, heldout=False):
    """What the VQGAN lets through: the same prompts' ground-truth renders, encoded and decoded, then judged. A model
    that drew every code right would score this, so it bounds the generation rows above."""
    from vqgan import decode_pil, encode_pil
    items, rng = world.geneval_prompts(n, seed, heldout=heldout), random.Random(f"ceiling/{seed}")
    per = {}
    for it in items:
        img = pictures.render(pictures.spec_picture(it["spec"], rng))
        rec = decode_pil(vq, encode_pil(vq, [img], pictures.SIZE))[0]
        per.setdefault(it["category"], []).append(pictures.score_image(it["spec"], rec))
    return geneval_scores(per)


def eval_code_context(vq, n, seed):
    """H(code | the cell's own pixels) in nats over n random object pictures (vqgan.context_entropy): how much a
    code depends on what lies around its cell, which the drawing model must then guess ahead."""
    from vqgan import preprocess

    from .vqgan_train import context_entropy
    rng = random.Random(f"code-context/{seed}")
    pics = [pictures.render(pictures.random_objects(rng)) for _ in range(n)]
    return context_entropy(vq, torch.stack([preprocess(p, pictures.SIZE) for p in pics]))


@torch.no_grad()
def eval_prompt_reading(model, tok, vq, n, seed):
    """How much the drawing depends on each word of the request, teacher-forced: the codes of a true "a <colour>
    <shape>" picture are scored under the right request and under one naming another colour (or shape). Returns the
    mean over n pictures of the largest per-code rise of the image loss (nats). A model that reads the word is
    surprised where the object starts; one that ignores it scores 0 (the same request twice gives exactly 0)."""
    import torch.nn.functional as F

    from data import encode_conversation
    from vqgan import encode_pil
    c, V = model.config, model.config.llm.vocab_size
    rng = random.Random(f"prompt-reading/{seed}")

    def code_losses(request, codes):  # (h*w,) image loss of each code
        e = encode_conversation(tok, c, [{"role": "user", "content": request},
                                         {"role": "assistant", "content": "<gen_image>"}], out_codes=[codes])
        dev = model.armor.visual_head.weight.device
        ids, targets = torch.tensor([e.ids], device=dev), torch.tensor([e.targets], device=dev)
        out = model(ids, targets=targets, alpha=0.0, beta=1.0)
        return F.cross_entropy(out.image_logits.float(), targets[targets > V] - (V + 1), reduction="none")

    items = [it for it in world.geneval_prompts(n, seed) if it["category"] == "colors"]
    rise = {"colour": [], "shape": []}
    for it in items:
        spec, item = it["spec"], it["spec"]["include"][0]
        codes = encode_pil(vq, [pictures.render(pictures.spec_picture(spec, rng))], pictures.SIZE)[0]
        right = code_losses(it["prompt"], codes)
        for k, choices in (("colour", pictures.COLOURS), ("shape", pictures.SHAPES)):
            other = dict(spec, include=[dict(item, **{k: rng.choice([x for x in choices if x != item[k]])})])
            request = it["prompt"].replace(pictures.describe(spec), pictures.describe(other))
            rise[k].append((code_losses(request, codes) - right).max().item())
    return {k: sum(v) / len(v) for k, v in rise.items()}


def eval_scenes(model, tok, vq, n, cfg, seed):
    items = world.scene_prompts(n, seed)
    answers = answer_all(model, tok, [it["prompt"] for it in items], cfg=cfg, seed=seed)
    ok = [(img := first_image(vq, a)) is not None and pictures.classify_scene(img) == it["scene"]
          for it, a in zip(items, answers)]
    return sum(ok) / len(ok)


@torch.no_grad()
def base_answers(model, tok, prompts, images, max_new_tokens=40, batch=64):
    """Greedy text answers of the plain base MLLM (armor.InternVL: no ARMOR modules, its own LM head)."""
    from data import encode_conversation
    c, out, dev = model.config, [], model.mlp1[1].weight.device
    for chunk in batched(list(zip(prompts, images)), batch):
        encs = [encode_conversation(tok, c, [{"role": "user", "content": p}], ims, add_generation_prompt=True)
                for p, ims in chunk]
        B, L = len(encs), max(len(e.ids) for e in encs)
        ids = torch.full((B, L), tok.pad, dtype=torch.long, device=dev)
        pad = torch.tensor([L - len(e.ids) for e in encs], device=dev)
        for r, e in enumerate(encs):
            ids[r, L - len(e.ids):] = torch.tensor(e.ids, device=dev)
        pixels = [e.pixels.to(dev) for e in encs if e.pixels is not None]
        state = model.new_state(B, L + max_new_tokens, pad=pad)
        h = model.extend(state, ids, torch.cat(pixels) if pixels else None)[:, -1]
        gen, done = [[] for _ in range(B)], [False] * B
        for _ in range(max_new_tokens):
            logits = model.text_logits(h)
            logits[:, c.img_context_id] = float("-inf")
            nxt = logits.argmax(-1)
            for r, t in enumerate(nxt.tolist()):
                if not done[r]:
                    done[r] = t == tok.im_end
                    if not done[r]:
                        gen[r].append(t)
            if all(done):
                break
            h = model.extend(state, nxt[:, None])[:, -1]
        out += [tok.decode(g, skip_special=True) for g in gen]
    return out


def question_kind(spec):
    """The ti2t question's kind for the per-kind row."""
    return {"yesno": "scene yes/no", "relation": "position"}.get(spec["kind"], spec["kind"])


def eval_understanding(model, tok, items, is_base=False, by_kind=False):
    """ti2t accuracy; by_kind: (accuracy, {question kind: accuracy})."""
    prompts, images = [it["prompt"] for it in items], [[it["image"]] for it in items]
    if is_base:
        texts = base_answers(model, tok, prompts, images)
    else:
        texts = [a.text for a in answer_all(model, tok, prompts, images, max_new_tokens=40)]
    ok = [world.score_answer(it["spec"], t) for it, t in zip(items, texts)]
    if not by_kind:
        return sum(ok) / len(ok)
    kinds = {}
    for it, o in zip(items, ok):
        kinds.setdefault(question_kind(it["spec"]), []).append(o)
    return sum(ok) / len(ok), {k: sum(v) / len(v) for k, v in sorted(kinds.items())}


def eval_modality(model, tok, n, seed):
    items = world.modality_set(n, seed)
    answers = answer_all(model, tok, [it["prompt"] for it in items], [it["image"] for it in items], seed=seed)
    per = {}
    for it, ans in zip(items, answers):
        per.setdefault(it["type"], []).append(modality(ans) == it["expected"])
    acc = {k: sum(v) / len(v) for k, v in per.items()}
    trained = [x for k, v in per.items() if k != "ti2ti" for x in v]
    acc["overall"] = sum(trained) / len(trained)  # the four trained types; ti2ti reported on its own
    return acc


def eval_ti2ti(model, tok, vq, n, cfg, seed):
    items = world.ti2ti_set(n, seed)
    answers = answer_all(model, tok, [it["prompt"] for it in items], [[it["image"]] for it in items], cfg=cfg,
                         seed=seed)
    scores = [world.score_ti2ti(it["spec"], a.text.replace("<gen_image>", " "), first_image(vq, a))
              for it, a in zip(items, answers)]
    return {"text": sum(t for t, _ in scores) / n, "image": sum(i for _, i in scores) / n,
            "both": sum(t and i for t, i in scores) / n,
            "modality": sum(modality(a) == "text+image" for a in answers) / n}


GALLERY = ["Draw an aurora.", "Draw a sunset over the sea.", "Draw a tropical rainforest.", "Draw snowy mountains.",
           "Draw a teddy bear.", "Draw chocolate chip cookies on a rack.",
           "What does the Southern Hemisphere look like in June? Draw it.", "Draw a river with green banks."]


def gallery(model, tok, vq, cfg, seed, path, n_objects=8):
    """A captioned sheet of the model's own answers: scene requests, GenEval-style prompts, held-out compositions
    (marked), each caption the prompt and the text part of the answer."""
    import textwrap

    from PIL import Image, ImageDraw
    prompts = [(p, "") for p in GALLERY]
    prompts += [(it["prompt"], "") for it in world.geneval_prompts(2, seed)[::3][:n_objects // 2]]
    prompts += [(it["prompt"], "held out: ") for it in world.geneval_prompts(2, seed, heldout=True)[:n_objects // 2]]
    answers = answer_all(model, tok, [p for p, _ in prompts], cfg=cfg, seed=seed)
    cols, tw, th = 8, 140, 200
    sheet = Image.new("RGB", (cols * tw, -(-len(prompts) // cols) * th), "white")
    d = ImageDraw.Draw(sheet)
    for i, ((p, tag), a) in enumerate(zip(prompts, answers)):
        x, y = (i % cols) * tw + 6, (i // cols) * th + 4
        img = first_image(vq, a)
        if img is not None:
            sheet.paste(img.resize((128, 128), Image.NEAREST), (x, y))
        said = " ".join(s.strip() for s in a.segments if isinstance(s, str) and s.strip())
        caption = tag + p + (f" -> {said}" if said else "")
        d.multiline_text((x, y + 131), "\n".join(textwrap.wrap(caption, 24)[:5]), fill="black", spacing=1)
    sheet.save(path)
    print(f"wrote {path}")


# -----------------------------------------------------------------------------------------------------------------


def fmt(x):
    return f"{x:.3f}"


def base_understanding(path, n, seed, device):
    """A base MLLM's ti2t accuracy on the understanding set of eval.md, in both phrasings, without an ARMOR: how a
    base of another recipe compares before any WoHG stage is trained on it."""
    import armor
    from tokenizer import Tokenizer

    try:
        base = armor.from_internvl(path, armor=False, device=device, verbose=False, tokenizer=True).eval()
    except (armor.CheckpointError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    tok = Tokenizer.from_dir(path)
    for phrasing in ("train", "unseen"):
        acc, kinds = eval_understanding(base, tok, world.understanding_set(5 * n, seed, phrasing=phrasing),
                                        is_base=True, by_kind=True)
        print(f"understanding of {path}, {phrasing} phrasings (seed {seed}): {fmt(acc)} ("
              + ", ".join(f"{k} {fmt(v)}" for k, v in kinds.items()) + ")", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m toy.eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL, help="ARMOR checkpoint directory")
    ap.add_argument("--base", help="the base InternVL directory (default: the checkpoint's own base)")
    ap.add_argument("--vqgan", help="VQGAN weights (file or folder), overriding the checkpoint's (a train.py run "
                         "names none)")
    ap.add_argument("--stages", nargs="*", default=None,
                    help="earlier-stage checkpoints to score for understanding (default, for the shipped model: "
                         "runs/toy/stage1 and stage2 when they exist)")
    ap.add_argument("--cfg", type=float, default=None, help="guidance scale (default: sample.py's)")
    ap.add_argument("--cfg-sweep", help="comma-separated guidance scales: generation overall per scale")
    ap.add_argument("--n", type=int, default=20, help="prompts per GenEval category")
    ap.add_argument("--seed", type=int, default=1234, help="evaluation seed (prompts and sampling)")
    ap.add_argument("--quick", action="store_true", help="a few prompts per section")
    ap.add_argument("--out", help="where the Markdown table goes (eval.md; figures/cfg_sweep.md for --cfg-sweep)")
    ap.add_argument("--gallery", help="only write a captioned sheet of the model's drawings to this PNG")
    ap.add_argument("--base-only", metavar="DIR", help="only a base MLLM's understanding (an InternVL directory "
                    "with its tokenizer, as train.py --stage 0 writes it): ti2t accuracy by question kind, in the "
                    "training phrasings and in unseen ones")
    ap.add_argument("--modality", action="store_true", help="only the response modality per request type, in unseen "
                    "phrasings: one line (a stage-1 run already chooses between words and a picture)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    import armor
    import sample

    torch.manual_seed(0)
    if args.base_only:
        return base_understanding(args.base_only, 3 if args.quick else args.n, args.seed, args.device)
    try:
        model, tok, vq = load(args.model, base=args.base, vqgan=args.vqgan, device=args.device)
    except (armor.CheckpointError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    n = 3 if args.quick else args.n
    if args.modality:  # the text head alone picks the modality: no VQGAN needed
        mod = eval_modality(model, tok, max(1, n // 2) * 2, args.seed)
        print(f"response modality (seed {args.seed}): " + ", ".join(f"{k} {fmt(v)}" for k, v in mod.items()))
        return
    if vq is None:
        sys.exit(f"error: {args.model} names no VQGAN; pass --vqgan DIR")
    cfg = sample.DEFAULT_CFG if args.cfg is None else args.cfg
    t0 = time.time()

    if args.gallery:
        return gallery(model, tok, vq, cfg, args.seed, args.gallery)
    if args.cfg_sweep:
        rows = ["| cfg | GenEval overall | held-out overall | scenes |", "|---|---|---|---|"]
        for s in [float(x) for x in args.cfg_sweep.split(",")]:
            g = eval_generation(model, tok, vq, n, s, args.seed)
            h = eval_generation(model, tok, vq, n, s, args.seed, heldout=True)
            sc = eval_scenes(model, tok, vq, max(1, n // 4), s, args.seed)
            rows.append(f"| {s:g} | {fmt(g['overall'])} | {fmt(h['overall'])} | {fmt(sc)} |")
            print(rows[-1], flush=True)
        text = "\n".join(rows)
        print(text)
        with open(args.out or os.path.join(ROOT, "figures", "cfg_sweep.md"), "w") as f:
            f.write(text + "\n")
        return

    lines = [f"Toy-world evaluation of `{os.path.relpath(args.model, ROOT)}` (cfg {cfg:g}, seed {args.seed}, "
             f"`python -m toy.eval{' --quick' if args.quick else ''}`)", ""]
    gen = eval_generation(model, tok, vq, n, cfg, args.seed)
    unseen = eval_generation(model, tok, vq, n, cfg, args.seed, phrasing="unseen")
    held = eval_generation(model, tok, vq, n, cfg, args.seed, heldout=True)
    cats = pictures.CATEGORIES

    def row(name, acc, bold):  # one generation row: the six categories ("-" where a set has none), then overall
        overall = f"**{fmt(acc['overall'])}**" if bold else fmt(acc["overall"])
        return f"| {name} | " + " | ".join(fmt(acc[c]) if c in acc else "-" for c in cats) + f" | {overall} |"

    lines += ["| generation (GenEval-style) | " + " | ".join(cats) + " | overall |",
              "|---|" + "---|" * (len(cats) + 1),
              row("training compositions", gen, True),
              row("training compositions, unseen phrasings", unseen, True),
              row("held-out compositions", held, True),
              row("VQGAN round trip of the true pictures, training compositions", eval_ceiling(vq, n, args.seed), False),
              row("VQGAN round trip, held-out compositions", eval_ceiling(vq, n, args.seed, heldout=True), False)]
    lines.append("")
    print("\n".join(lines[-8:]), flush=True)
    scenes = eval_scenes(model, tok, vq, max(1, n // 4), cfg, args.seed)
    reading = eval_prompt_reading(model, tok, vq, 2 * n, args.seed)
    code_context = eval_code_context(vq, 20 * n, args.seed)

    items = world.understanding_set(5 * n, args.seed)
    base_dir = os.path.join(args.model, json.load(open(os.path.join(args.model, "config.json")))["base"]) \
        if args.base is None else args.base
    base = armor.from_internvl(base_dir, armor=False, device=args.device, verbose=False).eval()
    und, kinds = {}, {}
    und["base"], kinds["base"] = eval_understanding(base, tok, items, is_base=True, by_kind=True)
    # the same kinds of question in phrasings never seen in training: what the base understands beyond its templates
    unseen_items = world.understanding_set(5 * n, args.seed, phrasing="unseen")
    unseen = {"base": eval_understanding(base, tok, unseen_items, is_base=True, by_kind=True)}
    del base
    stages = args.stages
    if stages is None and os.path.samefile(args.model, DEFAULT_MODEL):  # the shipped model: the pipeline's stages
        stages = [p for p in (os.path.join(ROOT, "runs", "toy", f"stage{s}") for s in (1, 2))
                  if os.path.exists(os.path.join(p, "config.json"))]
    for s in stages or []:
        m, stok, _ = load(s, device=args.device)
        und[os.path.basename(os.path.normpath(s))] = eval_understanding(m, stok, items)
        del m
    und["final"], kinds["final"] = eval_understanding(model, tok, items, by_kind=True)
    unseen["final"] = eval_understanding(model, tok, unseen_items, by_kind=True)
    mod = eval_modality(model, tok, max(1, n // 2) * 2, args.seed)
    ti = eval_ti2ti(model, tok, vq, 2 * n, cfg, args.seed)

    lines += ["| measure | value |", "|---|---|",
              f"| scene accuracy ({len(pictures.SCENES)} scenes) | **{fmt(scenes)}** |",
              f"| prompt reading: largest rise of a code's loss (nats) when the request names another colour / "
              f"another shape | {reading['colour']:.2f} / {reading['shape']:.2f} |",
              f"| VQGAN codes: H(code \\| the cell's own pixels), nats, object pictures | {code_context:.2f} |"]
    for k, v in und.items():
        lines.append(f"| understanding (ti2t accuracy), {k} | {fmt(v)}" +
                     (f" (retention {fmt(v / und['base'])})" if k != "base" and und["base"] else "") + " |")
    def by_kind(name, base_kinds, final_kinds):
        return f"| {name}, base / final | " + ", ".join(
            f"{k} {fmt(v)} / {fmt(final_kinds[k])}" for k, v in base_kinds.items()) + " |"

    (ub, ub_kinds), (uf, uf_kinds) = unseen["base"], unseen["final"]
    lines += [by_kind("understanding by question kind", kinds["base"], kinds["final"]),
              f"| understanding in unseen phrasings, base / final | {fmt(ub)} / {fmt(uf)} |",
              by_kind("understanding by question kind, unseen phrasings", ub_kinds, uf_kinds)]
    if und["base"]:
        lines.append(f"| understanding retention, final / base | **{fmt(und['final'] / und['base'])}** |")
    else:
        lines.append("| understanding retention, final / base | - (the base answers nothing right) |")
    for k in world.MODALITY:
        lines.append(f"| response modality, {k} | {fmt(mod[k])} |")
    lines.append(f"| response modality, overall (t2t, ti2t, t2i, t2ti) | **{fmt(mod['overall'])}** |")
    lines.append(f"| ti2ti (untrained): text right / image right / both / answered text+image | "
                 f"{fmt(ti['text'])} / {fmt(ti['image'])} / {fmt(ti['both'])} / {fmt(ti['modality'])} |")
    lines += ["", f"({time.time() - t0:.0f} s on {torch.get_num_threads()} threads)"]
    text = "\n".join(lines)
    print(text)
    with open(args.out or os.path.join(ROOT, "eval.md"), "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
