"""The toy world as shipped: the committed checkpoints load and answer, and the pipeline that made them
runs end to end (at tiny budgets) into a temporary folder, followed by toy/eval.py on its output."""

import json
import re
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import armor
import sample
import vqgan
from toy import pictures, world

ROOT = Path(__file__).resolve().parent.parent
TOY = ROOT / "toy"


def run(*args, cwd=ROOT):
    env = dict(os.environ, OMP_NUM_THREADS="2")
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True, env=env,
                          timeout=600)


# --- the shipped checkpoints -----------------------------------------------------------------------------------------


def test_shipped_files_fit_the_budget():
    # toy/ is also the package of the toy world's code: its folders are the shipped checkpoints
    assert {p.name for p in TOY.iterdir() if p.is_dir() and p.name != "__pycache__"} == {"armor", "base", "vqgan"}
    files = [p for d in ("armor", "base", "vqgan") for p in (TOY / d).rglob("*") if p.is_file()]
    total = sum(p.stat().st_size for p in files)
    assert total <= 50e6, f"toy/ holds {total / 1e6:.1f} MB"


def test_shipped_checkpoint_is_consistent():
    model, tok, vq = sample.load(TOY / "armor")
    c = model.config
    assert isinstance(model, armor.Armor) and vq is not None
    assert vq.config.n_embed == c.num_image_codes  # every code the visual head can write, the decoder can draw
    assert c.image_px // 2 ** (len(vq.config.ch_mult) - 1) == c.image_grid
    assert len(tok) == c.llm.vocab_size  # the base's vocabulary is the BPE's; image tokens are ARMOR's new rows
    # the base is an understanding-only InternVL: no ARMOR modules, its config has no image tokens
    base = armor.from_internvl(TOY / "base", armor=False, verbose=False)
    assert not isinstance(base, armor.Armor)
    # ARMOR's base tensors are the shipped base's, bit for bit (the LM head is the one base tensor WoHG trains)
    sd = base.state_dict()
    for k, v in model.state_dict().items():
        if k in sd and k not in armor.PARTIAL_BASE_KEYS:
            assert torch.equal(v, sd[k]), k


@pytest.mark.e2e
def test_sample_cli_draws_and_answers(tmp_path):
    """The README's first command, and a text question: the model picks the modality itself."""
    # Four answers in one batch: one drawing is a draw of chance (eval.py: scenes 0.95 over twelve; at seed 0 a
    # single answer is a green haze that the scene classifier rejects), so three of four must be auroras.
    p = run(ROOT / "sample.py", "draw an aurora", "--out", tmp_path / "a", "--seed", "0", "--n", "4")
    assert p.returncode == 0, p.stderr
    pngs = sorted((tmp_path / "a").glob("*.png"))
    htmls = sorted((tmp_path / "a").glob("*.html"))
    assert len(pngs) == 4 and len(htmls) == 4, p.stdout
    imgs = [Image.open(f).convert("RGB") for f in pngs]
    assert all(img.size == (pictures.SIZE, pictures.SIZE) for img in imgs)
    assert sum(pictures.classify_scene(img) == "aurora" for img in imgs) >= 3

    # a plain question about the world gets words and no picture (eval.py's response-modality row measures how
    # often over many phrasings; this model answers "... on a clear summer day?" with "On a clear day" and a picture)
    p = run(ROOT / "sample.py", "What colour is grass?", "--out", tmp_path / "b")
    assert p.returncode == 0, p.stderr
    assert not list((tmp_path / "b").glob("*.png")), p.stdout
    assert "green" in p.stdout.lower()


@pytest.mark.e2e
def test_shipped_model_draws_what_is_asked():
    """Seeded drawing requests through the library API, scored by the world's judges. The full measurement is
    eval.py (eval.md: single objects 1.00, scenes 0.95); this guards that the shipped weights are the trained ones:
    an untrained visual head draws noise, on which the detector and the scene classifier find nothing (tests in
    test_world.py). Thresholds sit well under the measured rates (P(fail) < 1% at those rates)."""
    model, tok, vq = sample.load(TOY / "armor")
    objects = [it for it in world.geneval_prompts(8, seed=7) if it["category"] == "single_object"]
    scenes = world.scene_prompts(1, seed=7)
    prompts = [it["prompt"] for it in objects] + [it["prompt"] for it in scenes]
    answers = sample.generate(model, tok, [[{"role": "user", "content": p}] for p in prompts],
                              max_new_tokens=model.config.image_grid ** 2 + 48, cfg=sample.DEFAULT_CFG, seed=0)
    assert all(a.images for a in answers)  # every request was answered with a picture
    imgs = vqgan.decode_pil(vq, torch.stack([a.images[0] for a in answers]))
    ok_objects = sum(pictures.score_image(it["spec"], im) for it, im in zip(objects, imgs))
    ok_scenes = sum(pictures.classify_scene(im) == it["scene"] for it, im in zip(scenes, imgs[len(objects):]))
    assert ok_objects >= 2, f"{ok_objects}/{len(objects)} single objects drawn right"
    assert ok_scenes >= len(scenes) // 2, f"{ok_scenes}/{len(scenes)} scenes drawn right"


CASUAL_DRAW = ["draw an aurora", "Draw an aurora.", "draw an aurora.", "draw the northern lights", "paint an aurora",
               "sketch an aurora", "draw me an aurora", "please draw an aurora", "Could you draw an aurora?",
               "draw a sunset over the sea", "draw a teddy bear", "draw a red circle", "draw two blue squares"]
CASUAL_TEXT = ["describe an aurora", "what is an aurora?", "What colour are the northern lights?",
               "tell me about a sunset over the sea"]


@pytest.mark.e2e
def test_shipped_model_starts_a_picture_for_casual_drawing_requests():
    """The first answer token of the README's `python sample.py "draw an aurora"` and of other ways people type a
    drawing request is <imgbos>; describing requests start with text. An earlier model answered "draw an aurora" in
    words: its base read the casual form as "describe an aurora" (README, the recipe). `-s`
    prints every probability."""
    from data import encode_conversation
    model, tok, _ = sample.load(TOY / "armor")
    p = {}
    for prompt in CASUAL_DRAW + CASUAL_TEXT:
        ids = encode_conversation(tok, model.config, [{"role": "user", "content": prompt}],
                                  add_generation_prompt=True).ids
        with torch.no_grad():
            logits = model(torch.tensor([ids])).text_logits[0, -1].float()
        p[prompt] = logits.softmax(-1)[model.config.imgbos_id].item()
    print("P(<imgbos>) on the first answer token: " + ", ".join(f"{k!r} {v:.3f}" for k, v in p.items()))
    assert all(p[q] > 0.5 for q in CASUAL_DRAW), p
    assert all(p[q] < 0.5 for q in CASUAL_TEXT), p


@pytest.mark.e2e
def test_prompt_reading_tells_a_read_word_from_noise():
    """eval.py's prompt-reading row. The shipped model reads the shape word (eval.md: 3.63 nats where the object
    starts) and the colour word (1.73; the model shipped before, 0.77); the same model with ARMOR's new tensors
    re-drawn at random (what stage 1 hands to stage 2) is not surprised by either: its rises are the noise floor, so
    the row measures the model and not the scorer. `-s` prints the four figures."""
    from toy import eval as ev
    model, tok, vq = sample.load(TOY / "armor")
    read = ev.eval_prompt_reading(model, tok, vq, 16, seed=1)  # colour 1.65, shape 3.34 when written
    armor.init_armor(model, seed=0)
    noise = ev.eval_prompt_reading(model, tok, vq, 16, seed=1)  # 0.20, 0.22
    print(f"prompt reading, colour / shape: shipped {read['colour']:.2f} / {read['shape']:.2f}, "
          f"re-initialised {noise['colour']:.2f} / {noise['shape']:.2f}")
    assert read["shape"] > 2.0 and read["shape"] > 4 * max(noise.values()), (read, noise)
    assert read["colour"] > 4 * max(noise.values()), (read, noise)
    assert max(noise.values()) < 0.5, noise


@pytest.mark.e2e
def test_vqgan_ceiling_counts_what_the_tokenizer_lets_through():
    """eval.py's ceiling row: the true pictures after the shipped VQGAN's round trip pass the judge almost always,
    held-out pairs less often (this VQGAN never saw them: 0.83 against 0.98 in eval.md); with the decoder's weights
    scrambled the same pictures pass (nearly) never, so the row measures the tokenizer and not the judge."""
    from toy import eval as ev
    vq = vqgan.load_vqgan(TOY / "vqgan")
    assert ev.eval_ceiling(vq, 4, seed=3)["overall"] >= 0.9
    assert ev.eval_ceiling(vq, 4, seed=3, heldout=True)["overall"] >= 0.6  # 0.83 measured at 20 per category
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in vq.decoder.parameters():
            p.copy_(p[torch.randperm(p.shape[0], generator=g)] if p.dim() else p)
    assert ev.eval_ceiling(vq, 4, seed=3)["overall"] <= 0.2


def _shape_questions(n, seed):
    """Single-object pictures asked "What shape is the <colour> object?": the colour is in the question, so the
    answer's shape word is right only if the model reads the shape from the picture."""
    import random
    rng, out = random.Random(seed), []
    for i in range(n):
        s, c = rng.choice(pictures.SHAPES), rng.choice(list(pictures.COLOURS))
        pic = pictures.Picture("objects", pictures.place([(s, c)], rng), pictures.random_background(rng))
        out.append({"id": f"shape-{seed}-{i}", "type": "ti2t", "image": [pictures.render(pic)], "out_images": [],
                    "conversations": [{"from": "human", "value": f"<image>\nWhat shape is the {c} object?"},
                                      {"from": "gpt", "value": f"The {s} is {c}."}],
                    "spec": {"kind": "shape", "answer": s}})
    return out


@pytest.mark.e2e
def test_base_learns_to_read_shapes(tmp_path):
    """The base recipe's learning rate lets a base trained from scratch read shapes: 500 steps of stage 0 on
    single-object shape questions answer held-out ones right. At the 2e-3 the base once trained with, the shape
    word's loss stayed at ln 3 (chance) on this task for 400 steps, and the base answered shape questions no better
    than by guessing: colours, which a mean over the picture gives, were all it read. (With the ViT's position
    embeddings at unit scale, armor.init_weights', shapes come later than at 0.02, where 250 steps did.)"""
    import train
    from tokenizer import Tokenizer
    from toy import eval as ev
    from toy import pipeline
    path = world.write_dataset(_shape_questions(3000, seed=1), str(tmp_path), "ti2t")
    _, batch, lr, _ = pipeline.TRAIN[0]
    model = train.main(["--stage", "0", "--preset", "toy", "--tokenizer", str(TOY / "base"), "--data", f"ti2t={path}",
                        "--steps", "500", "--batch-size", str(batch), "--lr", str(lr), "--warmup", "25",
                        "--dtype", pipeline._amp(), "--out", str(tmp_path / "base"), "--save-every", "1000"]).eval()
    held = _shape_questions(150, seed=2)
    answers = ev.base_answers(model, Tokenizer.from_dir(TOY / "base"),
                              [q["conversations"][0]["value"] for q in held], [q["image"] for q in held])
    right = sum(world.score_answer(q["spec"], a) for q, a in zip(held, answers)) / len(held)
    assert right >= 0.9, (right, answers[:5])


# --- the pipeline ----------------------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_pipeline_quick_end_to_end(tmp_path):
    """python -m toy --quick: every step (data, BPE, VQGAN, code cache, base, stages 1-3, ship) at tiny budgets;
    then a rerun skips everything, and python -m toy.eval --quick scores the result."""
    args = ["--quick", "--ship", tmp_path / "ship", "--data", tmp_path / "data", "--runs", tmp_path / "runs"]
    p = run("-m", "toy", *args)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for d in ("armor", "base", "vqgan"):
        assert (tmp_path / "ship" / d / "config.json").exists()
    meta = json.loads((tmp_path / "ship" / "armor" / "config.json").read_text())
    assert meta["base"] == "../base" and meta["vqgan"] == "../vqgan"
    # ARMOR ships its matrices as int8 rows (the repository's size budget), and they load within half a step
    from safetensors.torch import load_file
    stored = load_file(tmp_path / "ship" / "armor" / "model.safetensors")
    q, s = stored["armor.visual_head.weight"], stored["armor.visual_head.weight" + armor.INT8_SCALE]
    assert q.dtype == torch.int8 and stored["armor.adapter_norm.weight"].dtype == torch.float16
    trained = armor.from_pretrained(str(tmp_path / "runs" / "stage3"), verbose=False)
    shipped = armor.from_pretrained(str(tmp_path / "ship" / "armor"), verbose=False)
    err = (shipped.armor.visual_head.weight - trained.armor.visual_head.weight).abs()
    assert (err <= s / 2 + 1e-3 * trained.armor.visual_head.weight.abs()).all()  # + the fp16 step it went through
    # the base was trained on understanding data only
    log = (tmp_path / "runs" / "base" / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(line)["loss_img"] in (None, 0, 0.0) for line in log)
    p = run("-m", "toy", *args)  # everything exists: only the ship step runs again
    assert p.returncode == 0 and "train.py" not in p.stdout, p.stdout[-2000:]
    # the code cache is reused only with the VQGAN that made it (its fp16 copy too), not with another one
    from toy import pipeline
    paths = pipeline.paths(tmp_path / "data", tmp_path / "runs", tmp_path / "ship")
    pipeline.make_codes(paths, tmp_path / "runs" / "vqgan")
    pipeline.make_codes(paths, tmp_path / "ship" / "vqgan")
    with pytest.raises(SystemExit, match="codes of another VQGAN"):
        pipeline.make_codes(paths, TOY / "vqgan")
    p = run("-m", "toy.eval", "--model", tmp_path / "ship" / "armor", "--quick", "--out", tmp_path / "eval.md")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    table = (tmp_path / "eval.md").read_text()
    for row in ("training compositions", "held-out compositions", "scene accuracy", "understanding (ti2t accuracy)",
                "understanding by question kind", "response modality, overall", "ti2ti"):
        assert row in table
    # a train.py run names the VQGAN its code cache was made with: eval.py scores it with no other flag
    stage3, vq = tmp_path / "runs" / "stage3", tmp_path / "runs" / "vqgan"
    assert json.loads((stage3 / "config.json").read_text())["vqgan"] == str(vq)
    p = run("-m", "toy.eval", "--model", stage3, "--quick", "--out", tmp_path / "run.md")
    assert p.returncode == 0 and "held-out compositions" in (tmp_path / "run.md").read_text(), p.stderr[-3000:]
    # the response modality alone, of a stage-1 run (its text head already chooses words or a picture): one line
    p = run("-m", "toy.eval", "--model", tmp_path / "runs" / "stage1", "--modality", "--quick")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert re.search(r"^response modality \(seed 1234\): t2t [01]\.\d{3}, .*t2ti [01]\.\d{3}, .*overall [01]\.\d{3}$",
                     p.stdout, re.M), p.stdout[-2000:]
    # a base alone: its understanding in both phrasings, one line each with every question kind
    p = run("-m", "toy.eval", "--base-only", tmp_path / "runs" / "base", "--quick")
    lines = [line for line in p.stdout.splitlines() if line.startswith("understanding of ")]
    assert p.returncode == 0 and len(lines) == 2, p.stdout[-3000:] + p.stderr[-3000:]
    assert "train phrasings" in lines[0] and "unseen phrasings" in lines[1]
    assert all(re.search(r"phrasings \(seed 1234\): [01]\.\d{3} \(\w+.* [01]\.\d{3}\)$", line) for line in lines)
    p = run("-m", "toy.eval", "--base-only", tmp_path / "fig")  # no base there: one line, no traceback
    assert p.returncode != 0 and "error:" in p.stderr and "Traceback" not in p.stderr
    # the upper-bound arm on this run: one stage from its base with every weight trainable, for as many examples as
    # stages 1-3 saw together, scored beside its WoHG model (stage 3), whose LLM stayed the base's
    p = run("-m", "toy.ablations", "upper-bound", "--run", tmp_path / "runs", "--n", "1", "--seeds", "1",
            "--figures", tmp_path / "fig")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    arm = tmp_path / "runs" / "upper_bound_runs_12"  # 3 stages x 4 steps x batch 4 = 48 examples, at batch 4
    table = (tmp_path / "fig" / "upper_bound.md").read_text()
    assert "48 examples" in table and "| WoHG" in table and "| one stage, everything trainable" in table
    base = armor.from_internvl(str(tmp_path / "runs" / "base"), armor=False, verbose=False)
    key = "model.layers.0.mlp.down_proj.weight"
    w0 = dict(base.language_model.named_parameters())[key]
    for d, trained in ((stage3, False), (arm, True)):
        w = dict(armor.from_pretrained(str(d), verbose=False).language_model.named_parameters())[key]
        assert (not torch.equal(w, w0)) == trained, d


# --- toy/probe.py ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("by,form", [("shape", "open"), ("colour", "open"), ("shape", "yesno"), ("shape", "sides")])
def test_relation_questions_answer_what_the_picture_shows(by, form):
    """The relation probe's answers are right about its own pictures: the detector finds both objects, and the
    first named is where the answer says (a wrong answer key would make the probe measure nothing); a yes/no
    question is answered yes exactly when it asks the relation the picture holds, which it does half the time; the
    sides an answer states first are where the detector finds the two objects."""
    from toy import probe
    keys = {v: k for k, v in pictures.RELATIONS.items()}
    qs = probe.relation_questions(40, seed=5, by=by, form=form)
    if form == "yesno":
        yes = [q["conversations"][1]["value"].endswith("so yes.") for q in qs]
        assert all(y == (f" {pictures.RELATIONS[q['relation']]} the " in q["conversations"][0]["value"])
                   for q, y in zip(qs, yes))
        assert 10 < sum(yes) < 30
    for q in qs:
        s1, rest = q["answer"].split(" is ", 1)
        rel, s2 = next((keys[v], rest[len(v) + 5:]) for v in keys if rest.startswith(v + " the "))
        assert rel == q["relation"]
        name = (lambda d: d.shape) if by == "shape" else (lambda d: f"{d.colour} object")
        dets = {name(d): d for d in pictures.detect(q["image"][0])}
        assert set(dets) == {s1, s2}, (q["answer"], dets)
        assert pictures.relation_holds(dets[s1], dets[s2], rel), q["answer"]
        assert not pictures.relation_holds(dets[s2], dets[s1], rel), q["answer"]
        if form == "sides":
            side = {"left": lambda d: d.cx < 32, "right": lambda d: d.cx > 32,
                    "top": lambda d: d.cy < 32, "bottom": lambda d: d.cy > 32}
            said = re.findall(r"(?:on the|at the) (left|right|top|bottom)", q["conversations"][1]["value"])
            assert len(said) == 2 and side[said[0]](dets[s1]) and side[said[1]](dets[s2]), q["conversations"]


def test_drawing_probe_data_asks_for_the_positions_its_pictures_show():
    """toy.probe draw's data: at share 1 every t2i record asks for two objects in a relation that its picture
    holds and no t2ti comes with them; at share 0.5 half of them do, the recipe's own records fill the rest, and
    t2ti records keep every kind of drawing in the mix."""
    from toy import probe
    only = probe.drawing_data(12, 1.0)
    assert len(only["t2i"]) == 12 and only["t2ti"] == []
    for rec in only["t2i"]:
        spec = rec["meta"]["image_spec"]
        assert spec["category"] == "position" and pictures.describe(spec) in rec["conversations"][0]["value"]
        (a, b), rel = spec["include"], spec["include"][0]["position"][0]
        dets = {d.shape: d for d in pictures.detect(rec["out_images"][0])}
        assert pictures.relation_holds(dets[a["shape"]], dets[b["shape"]], rel), rec["conversations"][0]["value"]
    half = probe.drawing_data(12, 0.5)
    cats = [(r["meta"]["image_spec"] or {}).get("category") for r in half["t2i"]]
    assert 6 <= cats.count("position") < 12 and len(half["t2i"]) == 12 and len(half["t2ti"]) == 4


def test_heldout_probe_names_what_a_drawing_made_of_the_request():
    """toy.probe heldout: rendered pictures, detected as toy.eval detects drawings, are sorted into the pair itself,
    the shape in another colour, the colour on another shape, or neither; a count request into the count drawn."""
    from toy import probe
    rng = random.Random(0)
    red_triangle = {"category": "colors", "include": [{"shape": "triangle", "count": 1, "colour": "red"}]}
    for drawn, kind in (([("triangle", "red")], "pair"), ([("triangle", "orange")], "shape"),
                        ([("circle", "red")], "colour"), ([("square", "blue")], "neither"),
                        ([("circle", "red"), ("triangle", "red")], "pair"), ([], "neither")):
        pic = pictures.Picture("objects", pictures.place(drawn, rng), pictures.random_background(rng))
        assert probe.heldout_kind(red_triangle, pictures.detect(pictures.render(pic))) == kind, drawn
    three = {"category": "counting", "include": [{"shape": "triangle", "count": 3}]}
    for n in (2, 3, 4):
        items = [("triangle", "green")] * n + [("circle", "blue")] * (n < 4)  # five do not fit the picture
        pic = pictures.Picture("objects", pictures.place(items, rng), pictures.random_background(rng))
        assert probe.heldout_kind(three, pictures.detect(pictures.render(pic))) == n


def test_code_meanings_tell_a_code_per_cell_from_one_that_drops_colour():
    """toy.probe codes: an encoder whose code is the cell's pixels names one colour and one kind per code (both
    entropies 0, as many codes as kinds, held-out pairs' cells all new); one that drops the colour (its code is the
    cell's shape alone) stands for all six colours, about ln 6 nats, and the held-out pairs reuse its codes."""
    import math

    import numpy as np
    from toy import probe

    def cells(img, colour_blind):
        a = np.asarray(img.convert("RGB"), dtype=np.int64)
        if colour_blind:  # object pixels -> 1, background -> 0: what is left is the shape
            a = (np.abs(a - a[:1, :1]).sum(-1, keepdims=True) > 30).astype(np.int64)
        c = a.reshape(8, 8, 8, 8, -1).transpose(0, 2, 1, 3, 4).reshape(8, 8, -1)
        return [[hash(c[y, x].tobytes()) for x in range(8)] for y in range(8)]

    exact = probe.code_meanings(lambda img: np.array(cells(img, False), dtype=object), 60)
    blind = probe.code_meanings(lambda img: np.array(cells(img, True), dtype=object), 60)
    assert exact["h_colour"] == exact["h_kind"] == 0 and exact["heldout_reused"] == 0
    squares = sum(s == "square" for _, s in pictures.TRAIN_PAIRS)
    assert exact["codes"] >= exact["kinds"] == 4 * len(pictures.TRAIN_PAIRS) - 3 * squares
    assert blind["h_colour"] > 0.8 * math.log(len(pictures.COLOURS)) and blind["heldout_reused"] == 1
    assert blind["codes"] < exact["codes"]


def test_linear_probe_reads_a_planted_position_and_not_noise():
    """toy.probe's linear probe: held-out accuracy 1 where the class is written into the features, chance where it
    is not."""
    from toy import probe
    g = torch.Generator().manual_seed(0)
    y = torch.arange(16).repeat(200)
    noise = torch.randn(len(y), 32, generator=g)
    planted = noise + 8 * torch.nn.functional.one_hot(y, 32).float()
    assert probe.linear_probe(planted, y, 16 * 150, 16) == 1.0
    assert probe.linear_probe(noise, y, 16 * 150, 16) < 0.2


def test_relation_probe_asks_a_given_base_without_training(tmp_path, monkeypatch, capsys):
    """toy.probe relation --model DIR: that base (and its tokenizer) answers the held-out questions; nothing is
    trained, and training options with it are a one-line error."""
    from toy import probe
    ask = probe.relation_questions
    monkeypatch.setattr(probe, "relation_questions", lambda n, seed, **kw: ask(6, seed, **kw))
    monkeypatch.setattr(probe, "OUT", str(tmp_path / "probe"))
    probe.main(["relation", "--model", str(TOY / "base")])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"{TOY / 'base'}: held-out relation questions (open") and "held-out accuracy" in line
    assert not (tmp_path / "probe").exists()
    with pytest.raises(SystemExit, match="asks that base as it is"):
        probe.main(["relation", "--model", str(TOY / "base"), "--steps", "10"])


def test_relation_scores_split_the_axis_from_the_direction():
    """toy.probe relation's figures: answers that name the opposite relation are on the right axis every time and
    right never; a perfect answer sheet scores 1 everywhere."""
    from toy import probe
    held = probe.relation_questions(100, seed=3)
    first, second = (lambda q: q["answer"].split(" is ")[0]), (lambda q: q["answer"].rsplit(" the ", 1)[1])
    opposite = [f"The {first(q)} is {pictures.RELATIONS[pictures.OPPOSITE[q['relation']]]} the {second(q)}."
                for q in held]
    assert probe.relation_scores(held, opposite) == {"all": 0.0, "axis": 1.0, "left/right": 0.0, "above/below": 0.0}
    perfect = probe.relation_scores(held, ["The " + q["answer"] + "." for q in held])
    assert perfect == {"all": 1.0, "axis": 1.0, "left/right": 1.0, "above/below": 1.0}
