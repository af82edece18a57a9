"""
The two commands on a GPU. Marked `cuda` and skipped where torch sees no CUDA device (CI has none): run them on a
machine with one, `python -m pytest -m cuda`.

- ARMOR's new tensors initialised on the GPU equal those initialised on the CPU (the seed decides, not the device).
- A training forward and backward on the GPU: frozen base matmuls stored in bf16, the trainable tensors fp32, the
  loss finite and equal to the CPU's within bf16 rounding.
- The decode steps as CUDA graphs (engine.py) answer as the plain path.
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
        assert all(step.graph is not None for step in engine.steps.values()) and len(engine.steps) >= 2
