"""
The two commands on a GPU. Marked `cuda` and skipped where torch sees no CUDA device (CI has none): run them on a
machine with one, `python -m pytest -m cuda`.

- ARMOR's new tensors initialised on the GPU equal those initialised on the CPU (the seed decides, not the device).
- A training forward and backward on the GPU: frozen base matmuls stored in bf16, the trainable tensors fp32, the
  loss finite and equal to the CPU's within bf16 rounding.
- The decode steps as CUDA graphs (engine.py) answer as the plain path: greedy on the toy model and on
  tests/test_engine_graphs.py's planted cases, sampled from the same seed; bf16 close to it.
- `python sample.py "draw an aurora" --device cuda` and `python train.py --stage 2 --steps 2` on the GPU, as a user
  types them, draw a PNG and write a checkpoint that samples.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import armor

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tok():
    """tests/test_sample.py's tokenizer (imported here, not at the top: only these tests need its imports)."""
    from test_sample import SENTENCES
    from tokenizer import Tokenizer

    return Tokenizer.train_bpe(SENTENCES * 3, vocab_size=300)


def test_init_on_the_gpu_equals_the_cpu():
    """The same base (as loaded from a checkpoint) on both devices: ARMOR's new tensors come out the same."""
    torch.manual_seed(0)
    base = armor.Armor(armor.PRESETS["tiny"]())
    armor.init_weights(base)
    models = {}
    for dev in ("cpu", "cuda"):
        with torch.device(dev):
            m = armor.Armor(armor.PRESETS["tiny"]())
        m.load_state_dict(base.state_dict())
        armor.init_armor(m, seed=5)
        models[dev] = m
    for (n, a), b in zip(models["cpu"].armor.state_dict().items(), models["cuda"].armor.state_dict().values()):
        torch.testing.assert_close(a, b.cpu(), rtol=0, atol=1e-6, msg=n)


def test_training_step_on_the_gpu_with_frozen_bf16_weights():
    torch.manual_seed(0)
    model = armor.Armor(armor.PRESETS["tiny"]())
    armor.init_weights(model)
    armor.init_armor(model, seed=0)
    armor.set_trainable(model, 2)
    cfg, V = model.config, model.config.llm.vocab_size
    span = [cfg.imgbos_id] + [cfg.code_offset + i % cfg.num_image_codes for i in range(cfg.image_grid ** 2)]
    ids = torch.tensor([[5, 6, 7] + span + [cfg.imgend_id]] * 2)
    targets = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], 1)
    targets[targets <= V] = -100
    losses = {}
    for dev in ("cpu", "cuda"):
        m = armor.Armor(cfg).to(dev)
        m.load_state_dict(model.state_dict())
        armor.set_trainable(m, 2)
        if dev == "cuda":
            for p in armor.frozen_matmuls(m):
                p.data = p.data.to(torch.bfloat16)
        with torch.autocast(dev, dtype=torch.bfloat16):
            out = m(ids.to(dev), targets=targets.to(dev), alpha=0.0, beta=1.0)
        out.loss.backward()
        assert all(p.grad is not None and p.dtype == torch.float32 for p in m.parameters() if p.requires_grad)
        losses[dev] = out.loss.item()
    assert torch.isfinite(torch.tensor(losses["cuda"]))
    assert abs(losses["cuda"] - losses["cpu"]) < 0.05 * abs(losses["cpu"])  # bf16 kernels differ by device


def run(*args, timeout=600):
    p = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def test_the_two_commands_on_the_gpu(tmp_path):
    run("sample.py", "--device", "cuda", "--out", tmp_path / "a", "draw an aurora")
    assert list((tmp_path / "a").glob("*.png"))
    run("train.py", "--stage", "2", "--steps", "2", "--device", "cuda", "--out", tmp_path / "stage2")
    run("sample.py", "--device", "cuda", "--model", tmp_path / "stage2", "--out", tmp_path / "b", "draw an aurora")
    assert list((tmp_path / "b").glob("*.png"))


def test_cuda_graphs_answer_as_the_plain_path():
    """The decode steps replayed as CUDA graphs give the plain path's greedy answers (fp32, the toy model; text,
    text then image, image alone; left padding; with guidance)."""
    import sample
    from engine import GraphDecoder

    model, tok, _ = sample.load(REPO / "toy" / "armor", device="cuda")
    greedy = sample.Sampling(0.0)
    convs = [[{"role": "user", "content": p}] for p in
             ("draw an aurora", "How many corners does a square have? Draw two green squares for me.",
              "what colour is the sky?")]
    for cfg in (1.0, 1.5):
        plain = sample.generate(model, tok, convs, text=greedy, image=greedy, cfg=cfg, decoder=model)
        engine = GraphDecoder(model)
        graphed = sample.generate(model, tok, convs, text=greedy, image=greedy, cfg=cfg, decoder=engine)
        assert [a.ids for a in graphed] == [a.ids for a in plain]
        assert any(a.images for a in graphed)
        # a text step, an image step (text and image rows together, in this batch) were captured and replayed
        assert any(t and not i for t, i, _ in engine.captured) and any(i for _, i, _ in engine.captured)


@pytest.mark.parametrize("case", ["text only", "text-image-text", "cfg", "padded batch", "budget cuts the image"])
def test_cuda_graph_steps_equal_plain_path_on_planted_models(tok, case):
    """tests/test_engine_graphs.py's cases with the steps captured and replayed on the GPU (fp32, greedy)."""
    import sample
    from engine import GraphDecoder
    from test_engine_graphs import CASES
    from test_sample import ask, planted, route, tiny_config

    kind, prompts, n, cfg, extra = CASES[case]
    c = tiny_config(tok)
    hw = c.image_grid ** 2
    m = planted(tok, route(tok, c, kind), seed=1, imgbos_noise=0.0 if kind == "t2t" else 3.0).to("cuda")
    convs = [ask(p) for p in prompts]
    kw = dict(n=n, max_new_tokens=2 + hw + 2 + extra if extra is not None else hw, text=sample.Sampling(0.0),
              image=sample.Sampling(0.0), cfg=cfg)
    dec = GraphDecoder(m)
    graphed = sample.generate(m, tok, convs, decoder=dec, **kw)
    assert [a.ids for a in graphed] == [a.ids for a in sample.generate(m, tok, convs, decoder=m, **kw)]
    assert dec.captured and (any(a.images for a in graphed) == any(image for _, image, _ in dec.captured))


def test_cuda_graph_sampling_is_reproducible_and_equals_the_plain_path(tok):
    """Sampling inside the captured step (noise drawn from the CUDA generator before each replay): the same seed
    gives the same answers, and the plain path's with the same noise."""
    import sample
    from engine import GraphDecoder
    from test_sample import ask, planted, route, tiny_config

    m = planted(tok, route(tok, tiny_config(tok), "free"), seed=3, imgbos_noise=3.0).to("cuda")
    convs = [ask("draw a red circle"), ask("what colour is the sky? it is blue")]
    kw = dict(n=2, max_new_tokens=50, text=sample.Sampling(1.0, 50, 0.95), image=sample.Sampling(1.2, 20, 0.9),
              cfg=2.0)
    a = [x.ids for x in sample.generate(m, tok, convs, seed=7, decoder=GraphDecoder(m), **kw)]
    assert [x.ids for x in sample.generate(m, tok, convs, seed=7, decoder=GraphDecoder(m), **kw)] == a
    assert [x.ids for x in sample.generate(m, tok, convs, seed=7, decoder=m, **kw)] == a
    assert [x.ids for x in sample.generate(m, tok, convs, seed=8, decoder=GraphDecoder(m), **kw)] != a


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_step_outputs_close_to_plain_extend(dtype):
    """tests/test_engine_graphs.py's decoder outputs, the steps captured and replayed: fp32 within a few ulps, bf16
    within bf16 rounding (other kernels round differently: greedy answers in bf16 may part after a near tie)."""
    from conftest import randomize
    from test_engine_graphs import static_and_plain_outputs

    model = randomize(armor.Armor(armor.PRESETS["tiny"]()).eval()).to("cuda", dtype)
    outs = static_and_plain_outputs(model, graphs=True)
    for a, b in zip(outs["plain"], outs["static"]):
        tol = 5e-5 if dtype == torch.float32 else 3e-2 * max(1.0, a.float().abs().max().item())
        torch.testing.assert_close(b.float(), a.float(), rtol=0, atol=tol)
