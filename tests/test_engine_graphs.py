"""
engine.py's static decode steps (what CUDA graphs capture) against armor.py's plain cached decoding, run eagerly on
the CPU: the same greedy answers from the shipped toy model, and the same decoder outputs on tiny random models of
both LLM layouts, with left padding and grouped-query attention.

  python -m pytest tests/test_engine.py -q
"""

from pathlib import Path

import pytest
import torch

import armor
import sample
from conftest import randomize
from engine import GraphDecoder

pytestmark = pytest.mark.usefixtures("one_thread")
TOY = Path(__file__).resolve().parent.parent / "toy" / "armor"
GREEDY = sample.Sampling(0.0)


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
    assert {kind for kind, _ in engine.steps} == {"llm", "adapter"}  # both stacks went through static steps


@pytest.mark.parametrize("preset", ["tiny", "tiny-internlm2"])
def test_static_step_outputs_equal_plain_extend(preset):
    model = randomize(armor.Armor(armor.PRESETS[preset]()).eval())
    c = model.config
    V = c.llm.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V - 9, (2, 7), generator=g)
    pad = torch.tensor([0, 3])  # row 1 left-padded by 3 columns
    steps = [torch.randint(0, V - 9, (2, 1), generator=g), torch.full((2, 1), c.imgbos_id),
             c.code_offset + torch.randint(0, c.num_image_codes, (2, 1), generator=g)]
    outs = {}
    with torch.no_grad():
        for name in ("plain", "static"):
            state = model.new_state(2, 16, pad=pad)
            model.extend(state, ids)
            dec = model if name == "plain" else GraphDecoder(model, graphs=False)
            out = [dec.extend(state, steps[0]), dec.extend(state, steps[1])]
            out.append(model.adapter_catch_up(state))  # the plain catch-up of every column so far
            out += [dec.extend(state, steps[2]), dec.adapter_catch_up(state)]  # then one column: a static step
            assert state.length == state.adapter_length == 10
            outs[name] = out
    assert outs["static"][-1].shape == (2, 1, c.llm.hidden_size)
    for a, b in zip(outs["plain"], outs["static"]):
        # fp32, the same math through other SDPA calls (a masked whole cache against a slice); as tests/test_armor.py's
        # cached-vs-full ATOL, a few float32 ulps of outputs of magnitude ~5
        torch.testing.assert_close(b, a, rtol=0, atol=5e-5)
