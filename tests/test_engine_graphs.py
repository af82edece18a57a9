"""
engine.py's GPU decode step (sample._Batch.decode_step through GraphDecoder.run: the LLM on one column, the heads,
the sampling and the next ids written on the device; a CUDA graph on a GPU) run eagerly on the CPU (graphs=False)
against armor.py's plain path (decoder=model): the same greedy answers from tiny planted models and the shipped toy
model, and the same decoder outputs on tiny random models of both LLM layouts, with left padding and grouped-query
attention. tests/test_cuda.py runs the same checks with the graphs captured and replayed.

  python -m pytest tests/test_engine_graphs.py -q

- Greedy tokens equal the plain path's, fp32: text only, text -> image -> text, CFG, several prompts x answers with
  left padding, a budget that cuts an image (its <imgbos> masked); both stacks really went through static steps.
- Sampled answers (temperature, top-k, top-p on both heads) are reproducible from the seed, and equal the plain path's:
  the step draws its noise from the generator as sample_token would for the rows that sample.
- The host reads ids back only where the grammar needs them: once per text step, once per image (its codes at the
  end), never inside an image.
"""

from pathlib import Path

import pytest
import torch

import armor
import sample
from conftest import randomize
from engine import GraphDecoder
from sample import Sampling, generate
from test_sample import ask, planted, route, tiny_config, tok  # noqa: F401 (tok: the fixture)

pytestmark = pytest.mark.usefixtures("one_thread")
TOY = Path(__file__).resolve().parent.parent / "toy" / "armor"
GREEDY = Sampling(0.0)


@pytest.fixture(scope="module")
def toy():
    model, tok, _ = sample.load(TOY)
    return model, tok


@pytest.mark.parametrize("cfg", [1.0, 1.5])
def test_static_steps_answer_as_the_plain_path(toy, cfg):
    """Text only, text then an image, an image alone; prompts of different lengths (left padding); with and without
    guidance (its unconditional rows catch up through the plain path, then step with the others)."""
    model, tok = toy
    convs = [[{"role": "user", "content": p}] for p in
             ("draw an aurora", "How many corners does a square have? Draw two green squares for me.",
              "what colour is the sky?")]
    plain = sample.generate(model, tok, convs, text=GREEDY, image=GREEDY, cfg=cfg, decoder=model)
    engine = GraphDecoder(model, graphs=False)
    static = sample.generate(model, tok, convs, text=GREEDY, image=GREEDY, cfg=cfg, decoder=engine)
    assert [a.ids for a in static] == [a.ids for a in plain]
    assert any(not isinstance(s, str) for a in plain for s in a.segments)  # an image was drawn
    assert {kind for kind, _ in engine.stacks} == {"llm", "adapter"}  # both stacks went through static steps


CASES = {  # route, conversations, n, cfg, budget past the image's h*w + 2 (None: 2 short of one, so none fits)
    "text only": ("t2t", ["what colour is the sky?"], 1, 1.0, 10),
    "text-image-text": ("free", ["draw a red circle"], 1, 1.0, 10),
    "cfg": ("free", ["draw a red circle", "what colour is the sky? it is blue. draw it"], 1, 3.0, 10),
    "padded batch": ("free", ["draw a red circle", "here is a blue square, what colour is the sky?"], 2, 2.0, 10),
    "budget cuts the image": ("free", ["draw a red circle"], 1, 3.0, None),
}


@pytest.mark.parametrize("case", CASES)
def test_device_step_tokens_equal_plain_path(tok, case):
    kind, prompts, n, cfg, extra = CASES[case]
    c = tiny_config(tok)
    hw = c.image_grid ** 2
    m = planted(tok, route(tok, c, kind), seed=1, imgbos_noise=0.0 if kind == "t2t" else 3.0)
    convs = [ask(p) for p in prompts]
    budget = 2 + hw + 2 + extra if extra is not None else hw
    kw = dict(n=n, max_new_tokens=budget, text=GREEDY, image=GREEDY, cfg=cfg)
    dec = GraphDecoder(m, graphs=False)
    static = generate(m, tok, convs, decoder=dec, **kw)
    plain = generate(m, tok, convs, decoder=m, **kw)
    assert [a.ids for a in static] == [a.ids for a in plain]
    drew = any(a.images for a in static)
    assert drew == (extra is not None and kind != "t2t")  # "Sure" then <imgbos>, unless masked for want of room
    assert {k for k, _ in dec.stacks} == ({"llm", "adapter"} if drew else {"llm"})  # no image: no adapter
    if extra is None:  # the route asks for <imgbos> right after "Sure": masked, the answer goes on in text
        assert all(a.ids[0] == 275 and c.imgbos_id not in a.ids and len(a.ids) == budget for a in static)


def test_sampled_answers_are_reproducible_and_equal_the_plain_path(tok):
    # Both heads sampled with every filter, guidance on, two conversations x two answers (rows in different modes in
    # the same step, so each head draws for a subset of the rows)
    m = planted(tok, route(tok, tiny_config(tok), "free"), seed=3, imgbos_noise=3.0)
    convs = [ask("draw a red circle"), ask("what colour is the sky? it is blue")]
    kw = dict(n=2, max_new_tokens=50, text=Sampling(1.0, 50, 0.95), image=Sampling(1.2, 20, 0.9), cfg=2.0)
    a = generate(m, tok, convs, seed=7, decoder=GraphDecoder(m, graphs=False), **kw)
    assert [x.ids for x in generate(m, tok, convs, seed=7, decoder=GraphDecoder(m, graphs=False), **kw)] == \
        [x.ids for x in a]
    assert [x.ids for x in generate(m, tok, convs, seed=7, decoder=m, **kw)] == [x.ids for x in a]
    assert [x.ids for x in generate(m, tok, convs, seed=8, decoder=GraphDecoder(m, graphs=False), **kw)] != \
        [x.ids for x in a]
    assert sum(len(x.images) for x in a) >= 2 and len({tuple(x.ids) for x in a}) == 4  # drew; rows differ


def test_host_reads_ids_once_per_text_step_and_once_per_image(tok, monkeypatch):
    c = tiny_config(tok)
    hw = c.image_grid ** 2
    m = planted(tok, route(tok, c, "t2ti"), seed=2)  # "Sure", image, " d", <|im_end|>
    reads, read = [], sample._Batch.read
    monkeypatch.setattr(sample._Batch, "read", lambda self, a, b: reads.append(b - a) or read(self, a, b))
    (ans,) = generate(m, tok, [ask("draw a red circle")], max_new_tokens=40, text=GREEDY, image=Sampling(1.0),
                      cfg=2.0, decoder=GraphDecoder(m, graphs=False))
    assert len(ans.ids) == 1 + 1 + hw + 1 + 2 and len(ans.images) == 1 and ans.finished
    # text steps ("Sure", <imgbos>; " d", <|im_end|>) read one column each; the image's h*w codes come in one read
    # at its <imgend>; the step that samples <imgend> itself reads nothing else
    assert sorted(reads) == [1, 1, 1, 1, hw]


def static_and_plain_outputs(model, graphs=False):
    """A left-padded batch of two rows (GQA) prefilled, then a text id, <imgbos> (the adapter catches up plainly) and
    a code through the LLM and the adapter, one column at a time, as sample._Batch.step drives a decoder: the
    model's own outputs and GraphDecoder's static steps' -> {"plain": [...], "static": [...]}."""
    c, dev = model.config, next(model.parameters()).device
    V = c.llm.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V - 9, (2, 7), generator=g).to(dev)
    pad = torch.tensor([0, 3], device=dev)  # row 1 left-padded by 3 columns
    steps = [torch.randint(0, V - 9, (2, 1), generator=g), torch.full((2, 1), c.imgbos_id),
             c.code_offset + torch.randint(0, c.num_image_codes, (2, 1), generator=g)]
    outs = {}
    with torch.no_grad():
        for name in ("plain", "static"):
            state = model.new_state(2, 16, pad=pad)
            model.extend(state, ids)
            dec = model if name == "plain" else GraphDecoder(model, graphs=graphs)
            col = torch.zeros(1, dtype=torch.long, device=dev)
            out = []

            def step(x, adapter):
                def fn():
                    out.append(dec.extend(state, x.to(dev)))
                    if adapter:
                        out.append(dec.adapter_catch_up(state))
                n = state.length
                col.fill_(n)
                fn() if dec is model else dec.run(adapter, fn, col, state)
                state.length = n + 1
                if adapter:
                    state.adapter_length = n + 1

            step(steps[0], False)
            step(steps[1], False)
            out.append(model.adapter_catch_up(state))  # the plain catch-up of every column so far
            step(steps[2], True)  # then one column of both stacks: static steps
            assert state.length == state.adapter_length == 10
            outs[name] = out
    assert len(outs["static"]) == 5 and outs["static"][-1].shape == (2, 1, c.llm.hidden_size)
    return outs


@pytest.mark.parametrize("preset", ["tiny", "tiny-internlm2"])
def test_static_step_outputs_equal_plain_extend(preset):
    outs = static_and_plain_outputs(randomize(armor.Armor(armor.PRESETS[preset]()).eval()))
    for a, b in zip(outs["plain"], outs["static"]):
        # fp32, the same math through other SDPA calls (a masked whole cache against a slice); as tests/test_armor.py's
        # cached-vs-full ATOL, a few float32 ulps of outputs of magnitude ~5
        torch.testing.assert_close(b, a, rtol=0, atol=5e-5)
