"""
engine.py: the CPU decode engine against the model's plain decode path (armor.py), and its kernels.

  python -m pytest tests/test_engine.py -q

- sample.generate through the engine gives the same greedy tokens as through the model alone (decoder=model), fp32:
  text only, text -> image -> text, CFG, a left-padded batch of two conversations x two answers, and the shipped toy
  model; and the engine really ran its decode steps (the spy counts them).
- bf16 (and fp32) decode steps: the engine's logits equal the plain path's within a stated tolerance, one and two rows,
  with big groups split (no stacked copy).
- The kernels: fast_linear equals F.linear on stacked groups, row-major; bf16 through the oneDNN-prepacked weight
  within one bf16 rounding, at one and two rows; rms_norm_step equals rms_norm within a few ulps.
- A decode step's ids checked in Python embed as model.embed does, and <IMG_CONTEXT> without pixels is refused.
- The packed weights follow in-place weight changes and are not copied along with the model.
"""

import copy
import dataclasses

import pytest
import torch

import armor
import engine
import sample
from armor import Armor
from sample import Sampling, generate
from test_sample import ask, planted, route, tiny_config, tok  # noqa: F401 (tok: the fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

GREEDY = Sampling(0.0)


@pytest.fixture
def steps(monkeypatch):
    """Counts the engine's decode steps, by stack: {"llm": n, "adapter": n}."""
    n = {"llm": 0, "adapter": 0}
    run = engine.step_blocks

    def counted(model, blocks, *args):
        n["llm" if blocks is model.language_model.model.layers else "adapter"] += 1
        return run(model, blocks, *args)

    monkeypatch.setattr(engine, "step_blocks", counted)
    return n


# --- generate: the engine's tokens are the plain path's -------------------------------------------------------------


CASES = {  # route, conversations, n, cfg
    "text only": ("t2t", ["what colour is the sky?"], 1, 1.0),
    "text-image-text": ("free", ["draw a red circle"], 1, 1.0),
    "cfg": ("free", ["draw a red circle", "what colour is the sky? it is blue. draw it"], 1, 3.0),
    "padded batch": ("free", ["draw a red circle", "here is a blue square, what colour is the sky?"], 2, 1.0),
}


@pytest.mark.parametrize("case", CASES)
def test_engine_tokens_equal_plain_path(tok, steps, case):
    kind, prompts, n, cfg = CASES[case]
    c = tiny_config(tok)
    m = planted(tok, route(tok, c, kind), seed=1, imgbos_noise=0.0 if kind == "t2t" else 3.0)
    convs = [ask(p) for p in prompts]
    kw = dict(n=n, max_new_tokens=2 + c.image_grid ** 2 + 2 + 10, text=GREEDY, image=GREEDY, cfg=cfg)
    fast = generate(m, tok, convs, **kw)
    ran = dict(steps)
    plain = generate(m, tok, convs, decoder=m, **kw)
    assert steps == ran  # the plain run made no engine step
    assert [a.ids for a in fast] == [a.ids for a in plain]
    assert ran["llm"] >= 2  # the engine did run the decode steps (a text-only answer here: 3 tokens)
    drew = any(a.images for a in fast)
    assert drew == (kind != "t2t") and (ran["adapter"] > 0) == drew  # a text-only answer never runs the adapter


def test_engine_tokens_equal_plain_path_on_the_toy_model(steps):
    model, tok, _ = sample.load(sample.DEFAULT_TOY)
    kw = dict(n=2, max_new_tokens=80, text=GREEDY, image=GREEDY, cfg=sample.DEFAULT_CFG)
    convs = [ask("draw an aurora"), ask("what is the capital of France? then draw a red circle")]
    fast = generate(model, tok, convs, **kw)
    assert [a.ids for a in fast] == [a.ids for a in generate(model, tok, convs, decoder=model, **kw)]
    assert steps["llm"] > 40 and steps["adapter"] > 40 and any(a.images for a in fast)


# --- decode steps: logits within tolerance ---------------------------------------------------------------------------


@torch.no_grad()
def decode_steps(model, m, ids, steps, B):
    """Prefill + greedy steps through extend / text_logits / adapter_catch_up / image_logits of m (the model or its
    engine) -> all logits."""
    state = model.new_state(B, ids.shape[1] + steps, pad=torch.tensor([0, 2][:B]))
    h = m.extend(state, ids[:B])[:, -1]
    outs = []
    for _ in range(steps):
        lg = m.text_logits(h)
        img = m.image_logits(m.adapter_catch_up(state)[:, -1])
        outs += [lg, img]
        h = m.extend(state, lg.argmax(-1, keepdim=True))[:, 0]
    return outs


@pytest.mark.parametrize("dtype, B", [(torch.float32, 1), (torch.float32, 2), (torch.bfloat16, 1),
                                      (torch.bfloat16, 2)])
def test_engine_decode_steps_equal_plain_path(tok, steps, dtype, B):
    # a 1-layer model wide enough (512 x 4352 MLP) that gate and up go as two matmuls (a big group needs no stacked
    # copy); bf16 weights prepacked for oneDNN (where the CPU has its bf16 kernels), fp32 ones through F.linear.
    cfg = tiny_config(tok)
    cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, hidden_size=512, num_layers=1, num_heads=8,
                                                           num_kv_heads=2, intermediate_size=4352))
    torch.manual_seed(0)
    m = Armor(cfg).eval()
    armor.init_weights(m, std=0.05)
    armor.init_armor(m, seed=0)
    m = m.to(dtype)
    ids = torch.randint(0, 250, (2, 9))
    dec = engine.decoder(m)
    fast = decode_steps(m, dec, ids, 4, B)
    assert steps == {"llm": 4, "adapter": 3}  # the first catch-up covers the prompt: the model's own
    packed = [p for e in dec.packs.values() for p in e[1]]
    want = {"bf16"} if dtype == torch.bfloat16 and engine._ONEDNN_BF16 else {"linear"}
    assert {k for k, *_ in packed} == want
    if want == {"linear"}:
        assert any(len(e[1]) == 2 for e in dec.packs.values())
    plain = decode_steps(m, m, ids, 4, B)
    tol = 1e-5 if dtype == torch.float32 else 3e-2  # bf16: another kernel's rounding, outputs of size ~1
    for a, b in zip(fast, plain):
        assert (a.float() - b.float()).abs().max() <= tol * max(1.0, b.float().abs().max())


# --- kernels -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_linear_equals_f_linear_row_major(dtype):
    # A stacked group with biases, an odd total width; row-major outputs, as the elementwise ops that follow expect.
    torch.manual_seed(0)
    lins = tuple(torch.nn.Linear(64, n, bias=b).to(dtype).requires_grad_(False) for n, b in ((48, True), (37, True)))
    packs = {}
    engine.refresh(packs, [lins])
    for M in (1, 2, 3):
        x = torch.randn(M, 64, dtype=dtype)
        y = engine.fast_linear(packs, lins, x)
        ref = torch.cat([torch.nn.functional.linear(x, m.weight, m.bias) for m in lins], -1)
        assert y.shape == (M, 85) and y.is_contiguous()
        assert torch.allclose(y.float(), ref.float(), atol=1e-5 if dtype == torch.float32 else 3e-2)


@pytest.mark.skipif(not engine._ONEDNN_BF16, reason="no oneDNN bf16 kernels on this CPU (bf16 then goes as fp32's)")
def test_bf16_goes_through_the_onednn_prepacked_weight():
    # A stacked bf16 group, prepacked once: one row and two rows within one bf16 rounding of fp32 sums.
    torch.manual_seed(0)
    lins = tuple(torch.nn.Linear(96, n, bias=b).bfloat16().requires_grad_(False) for n, b in ((64, True), (33, True)))
    packs = {}
    engine.refresh(packs, [lins])
    (kind, n, w, b), = packs[lins][1]
    assert kind == "bf16" and n == 97
    x = torch.randn(1, 96, dtype=torch.bfloat16)
    wf = torch.cat([m.weight for m in lins]).float()
    ref = torch.nn.functional.linear(x.float(), wf, b.float())
    y = engine.fast_linear(packs, lins, x)
    assert (y.float() - ref).abs().max() <= 2 ** -7 * ref.abs().max()  # one bf16 rounding of fp32 sums
    y2 = engine.fast_linear(packs, lins, torch.cat([x, x]))
    assert torch.equal(y2[0], y2[1]) and y2.is_contiguous()
    assert (y2[0].float() - ref[0]).abs().max() <= 2 ** -7 * ref.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_step_equals_rms_norm(dtype):
    # The decode path's norm (vector_norm + addcmul) against the released form (F.rms_norm): rows of every scale,
    # down to where eps dominates and an all-zero row, and a width whose 1/d is inexact in binary.
    torch.manual_seed(0)
    d, eps = 896, 1e-6
    x = torch.randn(6, d) * torch.tensor([1e3, 10.0, 1.0, 1e-2, 1e-4, 0.0])[:, None]
    x, w = x.to(dtype), (1 + torch.randn(d)).to(dtype)
    ref, got = armor.rms_norm(x, w, eps), engine.rms_norm_step(x, w, eps)
    assert got.dtype == ref.dtype == dtype and got.shape == ref.shape
    ulp = 2.0 ** -23 if dtype == torch.float32 else 2.0 ** -8  # one unit in the last place, relative
    assert ((got.float() - ref.float()).abs() <= 4 * ulp * ref.float().abs()).all()
    assert got[-1].eq(0).all() and ref[4].float().abs().max() < 0.2 * ref[2].float().abs().max()  # eps counted


def test_decode_step_embedding_checks_ids_in_python(tok):
    # A decode step's ids are checked as a Python list: the same rows as model.embed for text ids, new-row ids and a
    # mix, and <IMG_CONTEXT> without pixels is refused as the model refuses it.
    cfg = tiny_config(tok)
    torch.manual_seed(0)
    m = Armor(cfg).eval()
    armor.init_weights(m, std=0.05)
    armor.init_armor(m, seed=0)
    dec = engine.decoder(m)
    with torch.no_grad():
        for ids in ([[5], [7]], [[cfg.imgbos_id], [cfg.code_offset + 3]], [[cfg.imgend_id], [7]]):
            ids = torch.tensor(ids)
            assert torch.equal(dec._embed(ids), m.embed(ids))
        with pytest.raises(ValueError, match="1 <IMG_CONTEXT> tokens but no pixel_values"):
            dec._embed(torch.tensor([[5], [cfg.img_context_id]]))


def test_packed_weights_follow_weight_changes(tok, steps):
    m = planted(tok, route(tok, tiny_config(tok), "free"), seed=9)
    conv = [ask("draw a red circle")]
    kw = dict(max_new_tokens=30, text=GREEDY, image=GREEDY)
    before = generate(m, tok, conv, **kw)[0].ids
    with torch.no_grad():  # an in-place update, as an optimizer step makes: the packed copies must be rebuilt
        for b in m.language_model.model.layers:
            b.mlp.up_proj.weight.mul_(-3.0)
        m.armor.visual_head.weight.mul_(-1.0)
    after = generate(m, tok, conv, **kw)[0].ids
    assert after == generate(m, tok, conv, decoder=m, **kw)[0].ids != before
    assert steps["llm"] > 0
    twin = copy.deepcopy(m)  # the packed weights live in engine.py, not on the model: never copied along
    assert twin not in engine._PACKS and len(engine._PACKS[m]) > 0
