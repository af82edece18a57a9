"""
The training data path of data.py: label masks, image spans, length limit, mixture, sources, bad data.

  python -m pytest tests/test_data.py -q

- For each of t2t, ti2t, t2i, t2ti the ids, the targets and the head every target goes to equal hand-written
  tensors: prompt positions ignored, answer text -> text head (ids <= V, <imgbos> included), codes and <imgend> ->
  visual head; input images as <img> + <IMG_CONTEXT> x tiles + </img>, output images as <imgbos> + h*w codes +
  <imgend>.
- The length limit cuts text after the last image span only, and drops an example whose image span does not fit.
- Condition dropout gives make_unconditional's ids, no pixels, and image targets only.
- Webdataset shards give t2i examples (templates, .txt and .json captions, cache keys of vqgan.py).
- The mixture is deterministic, follows its weights, walks each type's records as permutations, resumes exactly,
  and gives every rank a disjoint share of the same global batch.
- Each kind of bad record is reported by kind with its name, or raised in strict mode.

The helpers at the top build a miniature world (tokenizer, images, JSONL of the four types, a VQ code cache, a tar
shard, a tiny InternVL base directory); tests/test_train.py uses them too.
"""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import armor
import data
from data import GEN_IMAGE, BadData, ExampleBuilder, Mixture, Pool, TrainStream, make_unconditional
from tokenizer import Tokenizer

# ---------------------------------------------------------------------------------------------------------------------
# A miniature world

SYSTEM = "You are a test model."
COLOURS = {"red": (220, 30, 40), "green": (30, 165, 60), "blue": (35, 85, 225), "yellow": (240, 215, 0)}
SHAPES = ("circle", "square")
GRID, N_CODES, PX = 4, 64, 64  # the tiny preset draws 4x4 codes out of 64, 64 px


def picture(colour, shape):
    im = Image.new("RGB", (PX, PX), (240, 240, 240))
    d = ImageDraw.Draw(im)
    (d.ellipse if shape == "circle" else d.rectangle)([16, 16, 47, 47], fill=COLOURS[colour])
    return im


def records():
    """A few records of each type, in the record format toy/world.py writes."""
    out = {k: [] for k in ("t2t", "ti2t", "t2i", "t2ti")}
    n = 0
    for c in COLOURS:
        for s in SHAPES:
            img = f"images/{c}_{s}.png"
            out["t2t"].append({"id": f"t2t-{n}", "type": "t2t", "conversations": [
                {"from": "human", "value": f"What colour is a {c} {s}?"}, {"from": "gpt", "value": f"It is {c}."}]})
            out["ti2t"].append({"id": f"ti2t-{n}", "type": "ti2t", "image": [img], "conversations": [
                {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": f"A {c} {s}."}]})
            out["t2i"].append({"id": f"t2i-{n}", "type": "t2i", "out_images": [img], "conversations": [
                {"from": "human", "value": f"Draw a {c} {s}."}, {"from": "gpt", "value": GEN_IMAGE}]})
            out["t2ti"].append({"id": f"t2ti-{n}", "type": "t2ti", "out_images": [img], "conversations": [
                {"from": "human", "value": f"What is a {s}? Show me a {c} one."},
                {"from": "gpt", "value": f"A {s} is a shape. Here is a {c} one: {GEN_IMAGE}"}]})
            n += 1
    return out


def write_jsonl(path, recs):
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in recs))


def write_code_cache(root, keys, seed=0):
    """The cache format of vqgan.py (codes.u16 + index.jsonl + meta.json) with random codes."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    codes = np.random.default_rng(seed).integers(0, N_CODES, (len(keys), GRID, GRID)).astype(np.uint16)
    (root / "codes.u16").write_bytes(codes.tobytes())
    (root / "index.jsonl").write_text("".join(
        json.dumps({"key": k, "offset": i * GRID * GRID, "h": GRID, "w": GRID}) + "\n" for i, k in enumerate(keys)))
    (root / "meta.json").write_text(json.dumps({"vqgan": "test", "config": {"n_embed": N_CODES}, "size": PX,
                                                "grid": [GRID, GRID], "complete": True}))
    return {k: codes[i] for i, k in enumerate(keys)}


def write_tar(path, samples):
    """samples: [(key, {ext: bytes})] -> a webdataset shard."""
    with tarfile.open(path, "w") as tf:
        for key, members in samples:
            for ext, payload in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))


def png_bytes(im):
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def tiny_config(tok, **kw):
    d = armor.PRESETS["tiny"]().to_dict()
    d["llm"]["vocab_size"], d["img_context_id"], d["system_message"] = len(tok), -1, SYSTEM
    d.update(kw)
    return armor.ArmorConfig(**d)


def make_world(root):
    """Everything a training run needs, under root: images/, {t2t,ti2t,t2i,t2ti}.jsonl, codes/, shards/t2i-0.tar,
    tok/ (tokenizer.json) and base/ (a random tiny InternVL2.5 in the released layout, with its tokenizer)."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    for c in COLOURS:
        for s in SHAPES:
            picture(c, s).save(root / "images" / f"{c}_{s}.png")
    recs = records()
    for k, v in recs.items():
        write_jsonl(root / f"{k}.jsonl", v)
    (root / "shards").mkdir(exist_ok=True)
    tar_samples = [(f"s{i:03d}", {"png": png_bytes(picture(c, s)), "txt": f"a {c} {s}".encode()})
                   for i, (c, s) in enumerate([("red", "circle"), ("blue", "square"), ("green", "circle")])]
    write_tar(root / "shards" / "t2i-0.tar", tar_samples)
    keys = sorted({p for v in recs.values() for r in v for p in r.get("out_images", [])})
    keys += [f"t2i-0.tar/{k}.png" for k, _ in tar_samples]
    write_code_cache(root / "codes", keys)
    texts = [SYSTEM, "system user assistant", "Draw a picture of"] + [t["value"] for v in recs.values() for r in v
                                                                      for t in r["conversations"]]
    tok = Tokenizer.train_bpe(texts * 4, 400, root / "tok")
    cfg = tiny_config(tok)
    torch.manual_seed(0)
    base = armor.InternVL(cfg)
    armor.init_weights(base)
    armor.save_internvl(base, root / "base")
    tok.save(root / "base")
    return tok, cfg


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    tok, cfg = make_world(root)
    return root, tok, cfg


# ---------------------------------------------------------------------------------------------------------------------
# Label masks and image spans, hand-written per type


def route(targets, V):
    """Per position: '-' no target, 'T' text head (target <= V), 'I' visual head."""
    return "".join("-" if t < 0 else "T" if t <= V else "I" for t in targets.tolist())


def check_layout(ex, expected_ids, answer):
    """ids equal; targets[p] = ids[p + 1] exactly where p + 1 lies in the answer span [a, b), else -100."""
    assert ex.ids.tolist() == expected_ids
    a, b = answer
    want = [expected_ids[p + 1] if a <= p + 1 < b else -100 for p in range(len(expected_ids))]
    assert ex.targets.tolist() == want


def test_masks_t2t(world):
    root, tok, cfg = world
    V, e = cfg.llm.vocab_size, lambda s: tok.encode(s)
    raw = data.JsonlSource(root / "t2t.jsonl").get(0)
    ex = ExampleBuilder(tok, cfg, 512)(raw)
    prompt = e(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\nWhat colour is a red circle?<|im_end|>\n"
               f"<|im_start|>assistant\n")
    answer = e("It is red.") + [tok.im_end]
    check_layout(ex, prompt + answer + e("\n"), (len(prompt), len(prompt) + len(answer)))
    assert route(ex.targets, V) == "-" * (len(prompt) - 1) + "T" * len(answer) + "--"
    assert ex.pixels is None and ex.name == "t2t.jsonl:1 (t2t-0)"


def test_masks_ti2t(world):
    root, tok, cfg = world
    V, e = cfg.llm.vocab_size, lambda s: tok.encode(s)
    ex = ExampleBuilder(tok, cfg, 512)(data.JsonlSource(root / "ti2t.jsonl").get(1))
    # a 64 px square image with 28 px tiles and at most 4: a 2x2 grid + the thumbnail = 5 tiles of 1 token each
    assert cfg.tokens_per_tile == 1 and tuple(ex.pixels.shape) == (5, 3, 28, 28)
    image = [tok.img_start] + [tok.img_context] * 5 + [tok.img_end]
    prompt = (e(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n") + image +
              e("\nWhat is this?<|im_end|>\n<|im_start|>assistant\n"))
    answer = e("A red square.") + [tok.im_end]
    check_layout(ex, prompt + answer + e("\n"), (len(prompt), len(prompt) + len(answer)))
    assert route(ex.targets, V) == "-" * (len(prompt) - 1) + "T" * len(answer) + "--"
    torch.testing.assert_close(ex.pixels, data.load_image(root / "images/red_square.png", 28, 4), rtol=0, atol=0)


@pytest.fixture(scope="module")
def cache(world):
    from vqgan import CodeCache

    return CodeCache(world[0] / "codes")


def test_masks_t2i(world, cache):
    root, tok, cfg = world
    V, e = cfg.llm.vocab_size, lambda s: tok.encode(s)
    ex = ExampleBuilder(tok, cfg, 512, codes=cache)(data.JsonlSource(root / "t2i.jsonl").get(0))
    codes = cache.get("images/red_circle.png").astype(np.int64).flatten().tolist()  # row-major, 16 codes
    image = [cfg.imgbos_id] + [cfg.code_offset + c for c in codes] + [cfg.imgend_id]
    assert cfg.imgbos_id == V and cfg.imgend_id == V + 1 and cfg.code_offset == V + 3
    prompt = e(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\nDraw a red circle.<|im_end|>\n"
               f"<|im_start|>assistant\n")
    check_layout(ex, prompt + image + [tok.im_end] + e("\n"), (len(prompt), len(prompt) + 19))
    # "assistant\n" predicts <imgbos> with the text head; the codes and <imgend> go to the visual head; after
    # <imgend> the text head predicts <|im_end|>
    assert route(ex.targets, V) == "-" * (len(prompt) - 1) + "T" + "I" * 17 + "T" + "--"
    assert ex.pixels is None


def test_masks_t2ti(world, cache):
    root, tok, cfg = world
    V, e = cfg.llm.vocab_size, lambda s: tok.encode(s)
    ex = ExampleBuilder(tok, cfg, 512, codes=cache)(data.JsonlSource(root / "t2ti.jsonl").get(3))
    codes = cache.get("images/green_square.png").astype(np.int64).flatten().tolist()
    image = [cfg.imgbos_id] + [cfg.code_offset + c for c in codes] + [cfg.imgend_id]
    prompt = e(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\nWhat is a square? Show me a green one."
               f"<|im_end|>\n<|im_start|>assistant\n")
    text = e("A square is a shape. Here is a green one: ")
    check_layout(ex, prompt + text + image + [tok.im_end] + e("\n"), (len(prompt), len(prompt) + len(text) + 19))
    assert route(ex.targets, V) == "-" * (len(prompt) - 1) + "T" * len(text) + "T" + "I" * 17 + "T" + "--"


def test_ti2ti_and_multi_turn_keep_every_answer(world, cache):
    root, tok, cfg = world
    V = cfg.llm.vocab_size
    rec = {"conversations": [{"from": "human", "value": "<image>\nMake it blue."},
                             {"from": "gpt", "value": GEN_IMAGE},
                             {"from": "human", "value": "And now?"}, {"from": "gpt", "value": "Done."}],
           "image": "images/red_circle.png", "out_images": ["images/blue_circle.png"]}
    ex = ExampleBuilder(tok, cfg, 512, codes=cache)(data.record_to_raw(rec, root, "r"))
    r = route(ex.targets, V)
    # answer 1: <imgbos>, 17 visual, <|im_end|>; answer 2: "Done." + <|im_end|>; the second question: no targets
    assert r.count("I") == 17 and "T" + "I" * 17 + "T" in r
    assert r.rstrip("-").endswith("T" * (len(tok.encode("Done.")) + 1))
    assert int((ex.ids == tok.img_context).sum()) == len(ex.pixels) == 5


# ---------------------------------------------------------------------------------------------------------------------
# Length limit and condition dropout


def test_length_limit_cuts_text_after_images_only(world, cache):
    root, tok, cfg = world
    raw = data.JsonlSource(root / "t2ti.jsonl").get(0)
    full = ExampleBuilder(tok, cfg, 512, codes=cache)(raw)
    end = data.image_span_end(full.ids, tok, cfg)
    assert full.ids[end - 1] == cfg.imgend_id and end == len(full.ids) - 2  # then <|im_end|> and "\n"
    cut = ExampleBuilder(tok, cfg, end, codes=cache)(raw)  # the text after the image goes, the image stays
    assert torch.equal(cut.ids, full.ids[:end]) and torch.equal(cut.targets, full.targets[:end])
    with pytest.raises(BadData, match="too long") as e:
        ExampleBuilder(tok, cfg, end - 1, codes=cache)(raw)  # would split the image: dropped
    assert e.value.kind == "too_long"
    # a text-only answer cut before any target is dropped too
    t2t = data.JsonlSource(root / "t2t.jsonl").get(0)
    n_prompt = int((ExampleBuilder(tok, cfg, 512)(t2t).targets < 0).sum()) - 2
    with pytest.raises(BadData, match="too long"):
        ExampleBuilder(tok, cfg, n_prompt - 1)(t2t)


def test_condition_dropout_is_the_unconditional_form(world, cache):
    root, tok, cfg = world
    V = cfg.llm.vocab_size
    rec = {"conversations": [{"from": "human", "value": "<image>\nDraw this in blue."},
                             {"from": "gpt", "value": f"Here: {GEN_IMAGE}"}],
           "image": ["images/red_circle.png"], "out_images": ["images/blue_circle.png"]}
    raw = data.record_to_raw(rec, root, "r")
    cond = ExampleBuilder(tok, cfg, 512, codes=cache)(raw)
    unc = ExampleBuilder(tok, cfg, 512, codes=cache)(raw, uncond=True)
    enc = data.encode_conversation(tok, cfg, raw.messages, [Image.open(root / "images/red_circle.png")],
                                   [cache.get("images/blue_circle.png")])
    user = torch.tensor(enc.user)
    assert torch.equal(unc.ids, make_unconditional(cond.ids, user, cfg))
    assert int((unc.ids == cfg.imgpad_id).sum()) == int(user.sum()) > 7  # the question, its image included
    assert not bool((unc.ids == tok.img_context).any()) and unc.pixels is None
    assert torch.equal(unc.targets, torch.where(cond.targets > V, cond.targets, -100))
    # text-only examples are never dropped: they would have nothing left to learn
    t2t = ExampleBuilder(tok, cfg, 512)(data.JsonlSource(root / "t2t.jsonl").get(0), uncond=True)
    assert not bool((t2t.ids == cfg.imgpad_id).any())


# ---------------------------------------------------------------------------------------------------------------------
# Sources and the mixture


def test_webdataset_shards_are_t2i(world, cache, tmp_path):
    root, tok, cfg = world
    src = data.TarSource([root / "shards" / "t2i-0.tar"], templates=("Paint {caption}!",))
    assert len(src) == 3
    raw = src.get(1)
    assert raw.messages == [{"role": "user", "content": "Paint a blue square!"},
                            {"role": "assistant", "content": GEN_IMAGE}]
    assert raw.out_images[0][0] == "t2i-0.tar/s001.png" and "t2i-0.tar/s001.png" in cache  # vqgan.py's key
    ex = ExampleBuilder(tok, cfg, 512, codes=cache)(raw)
    assert route(ex.targets, cfg.llm.vocab_size).count("I") == 17
    # .json captions, templates picked by the draw, and broken samples reported by kind
    write_tar(tmp_path / "x.tar", [("a", {"jpg": png_bytes(picture("red", "circle")),
                                          "json": json.dumps({"caption": "a red circle"}).encode()}),
                                   ("b", {"txt": b"no image"}), ("c", {"png": b"not a png", "txt": b"x"}),
                                   ("d", {"png": png_bytes(picture("red", "circle"))}), ("e", {"json": b"{"})])
    src = data.TarSource([tmp_path / "x.tar"], templates=("A {caption}", "B {caption}"))
    assert [src.get(0, u).messages[0]["content"] for u in (0.1, 0.9)] == ["A a red circle", "B a red circle"]
    assert src.get(0).out_images[0][1]().size == (PX, PX)
    kinds = []
    for i in range(1, 5):
        try:
            ExampleBuilder(tok, cfg, 512, codes=cache)(src.get(i))
        except BadData as e:
            kinds.append(e.kind)
    assert kinds == ["missing_image", "missing_codes", "empty", "missing_image"]


def test_mixture_deterministic_weighted_permuted_resumable():
    sizes = {"t2t": 5, "t2i": 7}
    m = Mixture(sizes, {"t2t": 1.0, "t2i": 3.0}, seed=3)
    picks = m.take(4000)
    assert picks == Mixture(sizes, {"t2t": 1.0, "t2i": 3.0}, seed=3).take(4000)
    assert picks != Mixture(sizes, {"t2t": 1.0, "t2i": 3.0}, seed=4).take(4000)
    share = sum(p.kind == "t2i" for p in picks) / len(picks)
    assert abs(share - 0.75) < 0.03
    for kind, n in sizes.items():  # each epoch of a type visits each of its records once
        seq = [p.record for p in picks if p.kind == kind]
        for e in range(len(seq) // n):
            assert sorted(seq[e * n:(e + 1) * n]) == list(range(n))
        assert seq[:n] != seq[n:2 * n]  # a fresh order per epoch
    m2 = Mixture(sizes, {"t2t": 1.0, "t2i": 3.0}, seed=3)
    m2.take(123)
    state = json.loads(json.dumps(m2.state_dict()))  # plain data, as stored in ckpt.pt
    m3 = Mixture(sizes, {"t2t": 1.0, "t2i": 3.0}, seed=3)
    m3.load_state_dict(state)
    assert m3.take(50) == picks[123:173]


def test_ranks_share_the_global_batch(world, cache):
    root, tok, cfg = world
    pools = {k: Pool(k, [data.JsonlSource(root / f"{k}.jsonl")]) for k in ("t2t", "t2i")}
    builder = ExampleBuilder(tok, cfg, 512, codes=cache)
    w = {"t2t": 1.0, "t2i": 1.0}

    def names(stream):
        sd = stream.next_step()
        return [n for b in sd.batches for n in b.names]
    one = TrainStream(pools, w, builder, micro_batch=2, grad_accum=2, seed=1)
    ranks = [TrainStream(pools, w, builder, micro_batch=2, grad_accum=1, rank=r, world=2, seed=1) for r in (0, 1)]
    for _ in range(3):
        mine = [names(s) for s in ranks]
        assert mine[0] + mine[1] == names(one) and not set(mine[0]) & set(mine[1])


# ---------------------------------------------------------------------------------------------------------------------
# Bad data


def bad_world(root):
    """One good record of each type plus one bad record of every kind -> {kind: name} of the bad ones."""
    root = Path(root)
    (root / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    bad = [
        ("t2t", '{"id": "cut", "conversations": [{"from": "human", "value": "Hi"}'),  # malformed: torn JSON
        ("t2t", json.dumps({"id": "who", "conversations": [{"from": "robot", "value": "Hi"}]})),  # malformed role
        ("t2t", json.dumps({"id": "nothing"})),  # empty
        ("ti2t", json.dumps({"id": "lost", "image": ["images/nowhere.png"], "conversations": [
            {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "Hm."}]})),  # missing image
        ("ti2t", json.dumps({"id": "broken", "image": ["images/broken.png"], "conversations": [
            {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "Hm."}]})),  # unreadable
        ("t2i", json.dumps({"id": "nocodes", "out_images": ["images/uncached.png"], "conversations": [
            {"from": "human", "value": "Draw."}, {"from": "gpt", "value": GEN_IMAGE}]})),  # missing codes
        ("t2ti", json.dumps({"id": "long", "out_images": ["images/red_circle.png"], "conversations": [
            {"from": "human", "value": "Draw. " * 200}, {"from": "gpt", "value": GEN_IMAGE}]})),  # too long
    ]
    lines = {k: [json.dumps(r) for r in v] for k, v in records().items()}
    names = {}
    for kind, line in bad:
        lines[kind].append(line)
        names.setdefault(kind, []).append(f"bad_{kind}.jsonl:{len(lines[kind])}")
    for k, v in lines.items():
        (root / f"bad_{k}.jsonl").write_text("\n".join(v) + "\n")
    return names


def test_each_bad_record_is_named_and_counted(world, cache):
    root, tok, cfg = world
    names = bad_world(root)
    builder = ExampleBuilder(tok, cfg, 200, codes=cache)
    got = {}
    for k in names:
        src = data.JsonlSource(root / f"bad_{k}.jsonl")
        for i in range(len(src)):
            try:
                builder(src.get(i))
            except BadData as e:
                got[e.name.split(" ")[0]] = e.kind
    assert got == {names["t2t"][0]: "malformed", names["t2t"][1]: "malformed", names["t2t"][2]: "empty",
                   names["ti2t"][0]: "missing_image", names["ti2t"][1]: "unreadable_image",
                   names["t2i"][0]: "missing_codes", names["t2ti"][0]: "too_long"}
    # in a stream: skipped and reported; in strict mode: the first one is the error
    pools = {k: Pool(k, [data.JsonlSource(root / f"bad_{k}.jsonl")]) for k in names}
    w = {k: 1.0 for k in names}
    stream = TrainStream(pools, w, builder, micro_batch=8, grad_accum=1, seed=0)
    seen = set()
    for _ in range(20):
        seen |= {e.kind for e in stream.next_step().bad}
    assert seen == set(data.BAD_KINDS)
    strict = TrainStream(pools, w, builder, micro_batch=8, grad_accum=1, seed=0, strict=True)
    sd = strict.next_step()
    while sd.error is None:
        sd = strict.next_step()
    assert isinstance(sd.error, BadData) and sd.batches == []
