"""
sample.py: ARMOR's generation loop and CLI, on a tiny random model whose routing is planted.

  python -m pytest tests/test_sample.py -q

A random model picks text or image at random, so the tests plant the route: a few hidden dimensions are "flags" that
the decoder never writes (their rows of o_proj / down_proj are zero), set only in the embedding of chosen tokens, and
read only by chosen head rows. Then "the current token is X" deterministically makes the text head emit Y (or
<imgbos>), while every other logit, and every image code, comes from the random network with attention over the
whole context. Checked:
- Cached generation equals an uncached reference (a full forward per step, the state machine re-written plainly),
  token for token, greedy, across text -> image -> text answers; with CFG, left padding and two conversations.
- Over many seeds, budgets and sampling settings, every image span has exactly h*w codes then <imgend>, and no span
  starts without room; back-to-back images stop exactly where the budget runs out.
- cfg = 1 gives the same tokens as no guidance, also through the guided code path; same seed -> same answer;
  a batch (n answers x conversations) equals the single runs (greedy).
- A text-only answer never runs the adapter, with guidance on too; a guided image fills the unconditional rows once.
- The KV cache folds rows and heads into one batch axis without copies. (engine.py's decode path against the model's
  plain one: tests/test_engine.py.)
- The CLI writes the HTML page and PNGs for t2t, t2i, t2ti and ti2ti; --chat keeps generated images in the history.
"""

import dataclasses
import html
import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

import armor
import sample
from armor import Armor
from data import encode_conversation, make_unconditional
from sample import Sampling, generate
from tokenizer import Tokenizer
from vqgan import VQGAN, VQGANConfig, save_vqgan

pytestmark = pytest.mark.usefixtures("one_thread")

GREEDY = Sampling(0.0)
SENTENCES = ["draw a red circle", "here is a blue square", "what colour is the sky? it is blue", "Sure, here it is.",
             "done. the picture shows a sunset over the sea", "You are ARMOR."]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train_bpe(SENTENCES * 3, vocab_size=300)


def tiny_config(tok):
    cfg = armor.PRESETS["tiny"]()
    return dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, vocab_size=len(tok)), img_context_id=-1,
                               system_message="You are ARMOR.")


NL, A, X = 198, 275, 282  # "\n" ends every generation prompt; "Sure" and " d" (in " done") are planted text tokens
FLAG, BETA = 40.0, 60.0


@torch.no_grad()
def planted(tok, routes, seed=0, imgbos_noise=0.0):
    """Tiny Armor with O(1)-scaled random weights and planted transitions {current token: next token}.
    imgbos_noise > 0 gives the <imgbos> row a random direction too, so free text starts images at random steps."""
    cfg = tiny_config(tok)
    m = Armor(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    for name, p in m.named_parameters():
        r = torch.randn(p.shape, generator=g)
        if p.dim() == 1:
            p.copy_(1.0 + 0.1 * r if name.endswith("weight") and "norm" in name else 0.1 * r)
        elif "embed" in name:
            p.copy_(0.5 * r)
        else:
            p.copy_(r * 1.5 / p[0].numel() ** 0.5)
    V = cfg.llm.vocab_size
    flags = list(range(len(routes)))
    for layer in m.language_model.model.layers:  # the decoder never writes the flag dimensions
        layer.self_attn.o_proj.weight[flags] = 0
        layer.mlp.down_proj.weight[flags] = 0
    m.language_model.model.embed_tokens.weight[:, flags] = 0
    m.armor.embed_new.weight[:, flags] = 0
    m.language_model.model.norm.weight[flags] = 1
    m.language_model.lm_head.weight[:, flags] = 0
    m.armor.imgbos_head.weight.copy_(torch.randn(1, cfg.llm.hidden_size, generator=g) * imgbos_noise)
    m.armor.imgbos_head.weight[:, flags] = 0
    for k, (src, dst) in zip(flags, routes.items()):
        table = m.language_model.model.embed_tokens.weight if src < V else m.armor.embed_new.weight
        table[src if src < V else src - V, k] = FLAG
        head = m.armor.imgbos_head.weight[0] if dst == cfg.imgbos_id else m.language_model.lm_head.weight[dst]
        head[k] = BETA
    return m


def route(tok, cfg, kind):
    """Planted answers: t2t = "Sure d" + <|im_end|>; t2i = one image; t2ti = "Sure", image, " d"; free = "Sure",
    image, " d", then whatever the random network says."""
    bos, end = cfg.imgbos_id, cfg.imgend_id
    return {"t2t": {NL: A, A: X, X: tok.im_end}, "t2i": {NL: bos, end: tok.im_end},
            "t2ti": {NL: A, A: bos, end: X, X: tok.im_end}, "free": {NL: A, A: bos, end: X}}[kind]


def ask(text, answer=None, codes=()):
    conv = [{"role": "user", "content": text}]
    if answer is not None:
        conv += [{"role": "assistant", "content": answer, "codes": list(codes)},
                 {"role": "user", "content": "and again"}]
    return conv


def spans_ok(ids, cfg, budget):
    """Every image span: <imgbos>, exactly h*w codes, <imgend>; nothing of the visual vocabulary outside a span."""
    hw, i, n = cfg.image_grid ** 2, 0, 0
    assert len(ids) <= budget
    while i < len(ids):
        if ids[i] == cfg.imgbos_id:
            span = ids[i + 1:i + 2 + hw]
            assert len(span) == hw + 1, "an image span started without room for h*w codes and <imgend>"
            assert all(cfg.code_offset <= t < cfg.total_vocab for t in span[:hw]) and span[hw] == cfg.imgend_id
            i, n = i + hw + 2, n + 1
        else:
            assert ids[i] < cfg.imgbos_id, f"visual token {ids[i]} outside an image span"
            i += 1
    return n


@torch.no_grad()
def reference(model, tok, conv, max_new, cfg_scale=1.0):
    """Uncached greedy generation: one full forward of the whole sequence per step, the switching written plainly."""
    c = model.config
    e = encode_conversation(tok, c, conv, [], [g for m in conv for g in m.get("codes", [])], add_generation_prompt=True)
    ids = torch.tensor([e.ids])
    uids = make_unconditional(ids, torch.tensor([e.user]), c)
    out, codes, hw = [], 0, c.image_grid ** 2
    bias = torch.zeros(c.llm.vocab_size + 1)
    bias[c.img_context_id] = float("-inf")
    while len(out) < max_new:
        if out and out[-1] == c.imgbos_id or 0 < codes < hw:  # visual mode
            lg = model(ids).image_logits[0, -1, 2:]
            if cfg_scale != 1.0:
                u = model(uids).image_logits[0, -1, 2:]
                lg = u + cfg_scale * (lg - u)
            t, codes = int(lg.argmax()) + c.code_offset, codes + 1
        elif codes == hw:
            t, codes = c.imgend_id, 0
        else:
            lg = model(ids).text_logits[0, -1] + bias
            if max_new - len(out) < hw + 2:
                lg[c.imgbos_id] = float("-inf")
            t = int(lg.argmax())
        out.append(t)
        if t == tok.im_end:
            break
        ids, uids = torch.cat([ids, torch.tensor([[t]])], 1), torch.cat([uids, torch.tensor([[t]])], 1)
    return out


# --- generation -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_cached_equals_uncached_text_image_text(tok, cfg_scale):
    m = planted(tok, route(tok, tiny_config(tok), "free"), seed=1)
    c, hw = m.config, m.config.image_grid ** 2
    convs = [ask("draw a red circle"), ask("what colour is the sky? it is blue. draw it")]  # different lengths
    budget = 2 + hw + 2 + 12
    got = generate(m, tok, convs, max_new_tokens=budget, text=GREEDY, image=GREEDY, cfg=cfg_scale)
    for conv, a in zip(convs, got):
        ref = reference(m, tok, conv, budget, cfg_scale)
        assert a.ids == ref
        # text -> image -> text: "Sure", <imgbos>, codes, <imgend>, " d", then free text
        assert a.ids[:2] == [A, c.imgbos_id] and a.ids[2 + hw] == c.imgend_id and a.ids[3 + hw] == X
        assert len(a.ids) > 4 + hw and spans_ok(a.ids, c, budget) >= 1
        assert isinstance(a.segments[0], str) and a.segments[1].shape == (4, 4) and isinstance(a.segments[2], str)
    # the two prompts draw different images (the guided rows do not leak into each other)
    assert not torch.equal(got[0].segments[1], got[1].segments[1])


def test_guided_second_image_catches_up_on_the_text_between(tok):
    # With guidance the unconditional rows read only the columns that precede a code: before the second image they
    # catch up on the <imgend> and the text after the first (columns only the conditional rows had read).
    c = tiny_config(tok)
    hw, bos, end = c.image_grid ** 2, c.imgbos_id, c.imgend_id
    m = planted(tok, {NL: A, A: bos, end: X, X: bos}, seed=2)  # "Sure", image, " d", image, " d", ...
    convs = [ask("draw a red circle"), ask("what colour is the sky? it is blue. draw it")]
    budget = 2 * (hw + 3) + 4
    got = generate(m, tok, convs, max_new_tokens=budget, text=GREEDY, image=GREEDY, cfg=3.0)
    for conv, a in zip(convs, got):
        assert a.ids == reference(m, tok, conv, budget, 3.0)
        assert a.ids[hw + 3:hw + 5] == [X, bos] and spans_ok(a.ids, c, budget) == 2


def test_guidance_changes_codes_and_scale_one_changes_nothing(tok):
    m = planted(tok, route(tok, tiny_config(tok), "t2ti"), seed=2)
    conv = [ask("draw a red circle")]
    kw = dict(max_new_tokens=40, text=GREEDY, image=GREEDY)
    plain = generate(m, tok, conv, cfg=1.0, **kw)[0].ids
    # a scale of 1 + 1e-6 runs the guided path (unconditional rows, lazy catch-up) and must give the same tokens
    via_guided = generate(m, tok, conv, cfg=1.0 + 1e-6, **kw)[0].ids
    assert plain == via_guided == reference(m, tok, conv[0], 40)
    assert generate(m, tok, conv, cfg=4.0, **kw)[0].ids != plain  # guidance does act on the codes


def test_same_seed_same_answer_and_seeds_differ(tok):
    m = planted(tok, route(tok, tiny_config(tok), "free"), seed=3, imgbos_noise=3.0)
    conv = [ask("draw a red circle")]
    kw = dict(max_new_tokens=60, text=Sampling(1.0, 50, 0.95), image=Sampling(1.0), cfg=2.0)
    a = generate(m, tok, conv, seed=7, **kw)[0].ids
    assert generate(m, tok, conv, seed=7, **kw)[0].ids == a
    assert any(generate(m, tok, conv, seed=s, **kw)[0].ids != a for s in (8, 9))


def test_batch_equals_single_runs(tok):
    m = planted(tok, route(tok, tiny_config(tok), "free"), seed=4, imgbos_noise=3.0)
    convs = [ask("draw a red circle"), ask("here is a blue square, what colour is the sky?"), ask("done")]
    kw = dict(max_new_tokens=45, text=GREEDY, image=GREEDY, cfg=2.5)
    batch = generate(m, tok, convs, n=2, **kw)
    assert [a.conversation for a in batch] == [0, 0, 1, 1, 2, 2]
    for i, conv in enumerate(convs):
        (single,) = generate(m, tok, [conv], **kw)
        assert batch[2 * i].ids == batch[2 * i + 1].ids == single.ids


def test_spans_complete_over_many_seeds_budgets_and_settings(tok):
    rng = np.random.default_rng(0)
    c = tiny_config(tok)
    hw, spans, short = c.image_grid ** 2, 0, 0
    for trial in range(12):
        m = planted(tok, route(tok, c, "free"), seed=10 + trial, imgbos_noise=4.0)
        budget = int(rng.integers(hw, 3 * hw + 6))
        t = Sampling(float(rng.choice([0.0, 0.7, 1.5])), int(rng.choice([0, 5, 40])), float(rng.choice([1.0, 0.8])))
        im = Sampling(float(rng.choice([0.0, 1.0, 2.0])), int(rng.choice([0, 8])), float(rng.choice([1.0, 0.5])))
        answers = generate(m, tok, [ask("draw a red circle"), ask("the sky is blue")], n=2, max_new_tokens=budget,
                           text=t, image=im, cfg=float(rng.choice([1.0, 3.0])), seed=trial)
        for a in answers:
            spans += spans_ok(a.ids, c, budget)
            short += budget - len(a.ids) < hw + 2 and not a.finished  # ran into the end: <imgbos> had to be masked
            assert len(a.images) == sum(t == c.imgbos_id for t in a.ids)
    assert spans >= 20 and short >= 10  # the runs really drew, and really reached the end of their budgets


def test_back_to_back_images_stop_where_the_budget_does(tok):
    c = tiny_config(tok)
    hw = c.image_grid ** 2
    m = planted(tok, {NL: c.imgbos_id, c.imgend_id: NL}, seed=5)  # image, "\n", image, "\n", ...
    budget = 2 * (hw + 3) + hw + 1  # one token short of a third image after the second "\n"
    (a,) = generate(m, tok, [ask("draw")], max_new_tokens=budget, text=GREEDY, image=Sampling(1.0))
    assert spans_ok(a.ids, c, budget) == 2 and len(a.images) == 2
    assert a.ids[hw + 2] == NL and a.ids[2 * hw + 5] == NL and c.imgbos_id not in a.ids[2 * hw + 6:]


def test_text_only_answer_never_runs_the_adapter(tok):
    # decoder=m: every call goes to the model's own methods, where the spies sit (engine.py's decoder hands the same
    # calls to the same methods or to its own kernels: tests/test_engine.py)
    c = tiny_config(tok)
    m = planted(tok, route(tok, c, "t2t"), seed=6)
    calls, adapt = [], m.adapt  # every adapter run of the plain path goes through adapt
    m.adapt = lambda *a, **k: calls.append(1) or adapt(*a, **k)
    seen = []
    ext = m.extend
    m.extend = lambda state, ids, pixels=None: seen.append(ids.shape) or ext(state, ids, pixels)
    (a,) = generate(m, tok, [ask("what colour is the sky?")], max_new_tokens=30, text=GREEDY, cfg=3.0, decoder=m)
    assert a.ids == [A, X, tok.im_end] and a.finished and a.segments == [tok.decode([A, X])]
    assert calls == [] and all(s[0] == 1 for s in seen)  # no adapter, and the unconditional row never ran
    # with an image the unconditional row catches up once, in one call over the prompt and the text so far
    m2 = planted(tok, route(tok, c, "t2ti"), seed=6)
    ext2, seen2, calls2, adapt2 = m2.extend, [], [], m2.adapt
    m2.extend = lambda state, ids, pixels=None: seen2.append(tuple(ids.shape)) or ext2(state, ids, pixels)
    m2.adapt = lambda *a, **k: calls2.append(1) or adapt2(*a, **k)
    generate(m2, tok, [ask("what colour is the sky?")], max_new_tokens=40, text=GREEDY, cfg=3.0, decoder=m2)
    assert len(calls2) > 1  # the spy sees the adapter: the catch-up, then the image's decode steps
    L = len(encode_conversation(tok, c, ask("what colour is the sky?"), add_generation_prompt=True).ids)
    # the prefill (all but the last prompt column), the steps that read the last prompt column and "Sure", the
    # unconditional row's catch-up to <imgbos>, then both rows
    assert seen2[:5] == [(1, L - 1), (1, 1), (1, 1), (1, L + 1), (2, 1)]


# --- the KV cache -----------------------------------------------------------------------------------------------


def test_kv_cache_folds_rows_and_heads_without_copies():
    # A decode step's attention matmuls fold (B, n_kv) into one batch axis; with keys and values side by side per row
    # that fold copied the whole cache every layer and step. .view raises where a copy would be needed.
    cache = armor.KVCache(3, 4, 2, 10, 8, torch.float32, "cpu")
    for c in (cache, cache.rows(slice(1, 3))):
        B = c.k.shape[1]
        for t in (c.k[1, :, :, :6], c.v[2, :, :, :6]):
            assert t.transpose(-1, -2).reshape(B * 2, 8, 6).data_ptr() == t.data_ptr()  # no copy
            t.view(B * 2, 6, 8)
    cache.update(1, 0, torch.ones(4, 2, 3, 8), torch.full((4, 2, 3, 8), 2.0))
    kv = cache.kv[1]  # layer 1: keys, then values
    assert kv[0, :, :, :3].eq(1).all() and kv[1, :, :, :3].eq(2).all() and kv[:, :, :, 3:].eq(0).all()


def test_sample_token_filters():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0, 1.0]]).repeat(400, 1)
    assert sample_token_set(logits, Sampling(1.0, 1, 1.0), g) == {1}
    assert sample_token_set(logits, Sampling(1.0, 2, 1.0), g) == {1, 2}
    assert sample_token_set(logits, Sampling(1.0, 0, 0.3), g) == {1}  # the top token alone holds > 30%
    assert sample_token_set(logits, Sampling(1.0, 0, 0.7), g) == {1, 2}
    assert sample_token_set(logits, Sampling(5.0), g) == {0, 1, 2, 3, 4}
    assert sample_token_set(logits, Sampling(0.0), g) == {1}


def sample_token_set(logits, s, g):
    return set(sample.sample_token(logits, s, g).tolist())


def test_sample_token_draws_as_multinomial():
    # sample_token writes torch.multinomial's one-sample draw out (no host-side checks, so a CUDA graph can hold it):
    # from the same generator state it picks the same tokens, with every filter, and with the noise passed in
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1)) * 3
    for s in (Sampling(1.0), Sampling(0.7, 10, 1.0), Sampling(1.3, 0, 0.8), Sampling(0.9, 20, 0.9)):
        for seed in range(20):
            x = logits / s.temperature
            if s.top_k:
                x = x.masked_fill(x < torch.topk(x, s.top_k).values[:, -1:], float("-inf"))
            if s.top_p < 1:
                srt, idx = x.sort(-1, descending=True)
                p = srt.softmax(-1)
                x = torch.full_like(x, float("-inf")).scatter(-1, idx, srt.masked_fill(p.cumsum(-1) - p > s.top_p,
                                                                                      float("-inf")))
            want = torch.multinomial(x.softmax(-1), 1, generator=torch.Generator().manual_seed(seed))[:, 0]
            got = sample.sample_token(logits, s, torch.Generator().manual_seed(seed))
            noise = torch.empty(3, 50).exponential_(generator=torch.Generator().manual_seed(seed))
            assert torch.equal(got, want) and torch.equal(sample.sample_token(logits, s, noise=noise), want)


def test_text_streams_in_short_windows_that_add_up(tok, monkeypatch):
    # Streaming decodes a few ids per new token, not the whole text so far; the pieces add up to the text, and the
    # bytes of a multi-byte character (the tokenizer spells them as separate ids) wait until it is whole.
    text = "Sure, here it is: a café by the sea, 日本の海 and a red circle. done"
    ids = tok.encode(text, add_bos=False)
    assert tok.decode(ids) == text and any(tok.decode(ids[:k]).endswith("\ufffd") for k in range(len(ids)))
    seen, decode = [], tok.decode
    monkeypatch.setattr(tok, "decode", lambda i, *a: seen.append(len(i)) or decode(i, *a))
    row, pieces = sample._Row(), []
    for t in ids:
        row.text_ids.append(t)
        sample._stream(0, row, tok, lambda r, s: pieces.append(s))
    assert len(pieces) > len(text) // 4 and not any("\ufffd" in p for p in pieces)
    assert max(seen) <= 8 < len(ids)  # short windows
    sample._end_text(0, row, tok, lambda r, s: pieces.append(s))
    assert "".join(pieces) == text and row.segments == [text]


# --- CLI --------------------------------------------------------------------------------------------------------


def write_checkpoint(path, model, tok):
    torch.manual_seed(0)
    vq = VQGAN(VQGANConfig(embed_dim=8, n_embed=64, z_channels=8, ch=8, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1,
                           resolution=64, num_groups=4))
    save_vqgan(vq, path / "vq")
    armor.save_pretrained(model, path, vqgan=os.path.relpath(path / "vq"))  # relative to the working directory
    tok.save(path)
    assert json.loads((path / "config.json").read_text())["vqgan"] == "vq"  # stored relative to the checkpoint
    return path


@pytest.mark.parametrize("kind, with_image, n_images, n_texts", [
    ("t2t", False, 0, 1), ("t2i", False, 1, 0), ("t2ti", False, 1, 2), ("t2ti", True, 1, 2)])  # last: ti2ti
def test_cli_writes_html_and_pngs(tok, tmp_path, capsys, kind, with_image, n_images, n_texts):
    ckpt = write_checkpoint(tmp_path / "ckpt", planted(tok, route(tok, tiny_config(tok), kind), seed=7), tok)
    argv = ["--model", str(ckpt), "--out", str(tmp_path / "out"), "--greedy", "--max-new-tokens", "40"]
    if with_image:
        Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "in.png")
        argv += ["--image", str(tmp_path / "in.png")]
    sample.main(argv + ["draw a red circle"])
    out = capsys.readouterr()
    page = (tmp_path / "out" / "answer.html").read_text()
    pngs = sorted((tmp_path / "out").glob("*.png"))
    assert len(pngs) == n_images and page.count("<img ") == n_images
    for p in pngs:
        assert Image.open(p).size == (64, 64) and str(p) in out.out and p.name in page
    texts = re.findall(r"<h3>assistant</h3>(.*)", page, re.S)[0].count("<p>") - n_images
    assert texts == n_texts and str(tmp_path / "out" / "answer.html") in out.out
    if kind != "t2i":
        assert html.escape(tok.decode([A])) in page and tok.decode([A]) in out.out  # streamed and on the page
    assert "time to first token" in out.err and "peak memory" in out.err


def test_cli_n_answers_and_chat_history(tok, tmp_path, capsys, monkeypatch):
    ckpt = write_checkpoint(tmp_path / "ckpt", planted(tok, route(tok, tiny_config(tok), "t2ti"), seed=8), tok)
    sample.main(["--model", str(ckpt), "--out", str(tmp_path / "n"), "--n", "3", "--max-new-tokens", "30",
                 "draw a red circle"])
    for j in range(3):
        assert (tmp_path / "n" / f"answer{j}.html").is_file() and (tmp_path / "n" / f"answer{j}_image0.png").is_file()
    seen = []
    real = sample.generate
    monkeypatch.setattr(sample, "generate", lambda model, tok, convs, *a, **k: seen.append(convs[0][:]) or
                        real(model, tok, convs, *a, **k))
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("draw a red circle\nnow a blue one\n"))
    sample.main(["--model", str(ckpt), "--out", str(tmp_path / "chat"), "--chat", "--greedy"])
    assert len(seen) == 2 and seen[1][1]["role"] == "assistant" and len(seen[1][1]["codes"]) == 1
    assert seen[1][1]["codes"][0].shape == (4, 4) and "<gen_image>" in seen[1][1]["content"]
    page = (tmp_path / "chat" / "chat.html").read_text()
    assert page.count("<h3>user</h3>") == 2 and page.count("<img ") == 2


def test_cli_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sample, "DEFAULT_TOY", tmp_path / "toy" / "armor")
    for argv, code, named in ((["draw an aurora"], 2, "toy checkpoint is missing"),
                              (["--model", str(tmp_path), "hi"], 1, f"no config.json in {tmp_path}"),
                              (["--image", str(tmp_path / "nope.png"), "hi"], 2, f"--image {tmp_path / 'nope.png'}")):
        with pytest.raises(SystemExit) as e:
            sample.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == code and err.count("\n") == 1 and named in err
