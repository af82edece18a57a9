"""
What train.py does around the training step, where users run it: checkpoints that carry their VQGAN and base, steps
with nothing to learn from, frozen weights kept in bf16, and the toy data prepared once for several processes.

  python -m pytest tests/test_commands.py -q

- A checkpoint written by train.py names its VQGAN (from the code cache) and its base as absolute paths, so a moved
  output folder still loads, and sampling needs no --vqgan.
- A step whose examples were all dropped (--max-len) makes no update; a run where every step is like that stops with
  an error naming the skipped records instead of ending "done ... saved".
- Under bf16 autocast the frozen base matmul weights are stored in bf16: the trained tensors are bit-identical to
  keeping them in fp32 (autocast rounds them the same way), at half the memory.
- The toy data: two processes preparing the same folder at once both end with the whole dataset; a preparation killed
  half-way leaves nothing that a later run reads as complete.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import armor
import train
from test_data import make_world

REPO = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmdworld")
    make_world(root)
    return root


def stage_args(root, out, stage=2, steps=2, **kw):
    a = ["--stage", str(stage), "--base", str(root / "base"), "--codes", str(root / "codes"),
         "--data", f"t2i={root / 't2i.jsonl'}", "--data", f"t2ti={root / 't2ti.jsonl'}", "--steps", str(steps),
         "--batch-size", "2", "--lr", "3e-3", "--num-adapter-layers", "1", "--out", str(out), "--device", "cpu",
         "--prefetch", "0"]
    kw.setdefault("warmup", 1)
    for k, v in kw.items():
        a += [f"--{k.replace('_', '-')}", str(v)]
    return a


def test_checkpoint_names_its_vqgan_and_base_and_survives_a_move(world, tmp_path, capsys):
    # the code cache of the miniature world names no VQGAN: give it one, as `vqgan.py cache` records
    codes = tmp_path / "codes"
    shutil.copytree(world / "codes", codes)
    meta = json.loads((codes / "meta.json").read_text())
    meta["vqgan"] = str(tmp_path / "some_vqgan")
    (codes / "meta.json").write_text(json.dumps(meta))
    out = tmp_path / "run" / "stage2"
    train.main(stage_args(world, out) + ["--codes", str(codes)])  # the later --codes wins
    saved = json.loads((out / "config.json").read_text())
    assert saved["vqgan"] == str(tmp_path / "some_vqgan")
    assert saved["base"] == str(world / "base") and os.path.isabs(saved["base"])
    moved = tmp_path / "elsewhere" / "stage2"
    shutil.move(str(tmp_path / "run"), str(tmp_path / "elsewhere"))
    model = armor.from_pretrained(str(moved), verbose=False)  # a relative base path would point nowhere now
    assert isinstance(model, armor.Armor)


def test_a_later_stage_keeps_the_vqgan_of_its_init(world, tmp_path):
    """Without --vqgan, and with a code cache that names none (made before caches recorded it), the checkpoint of the
    previous stage says where the decoder is."""
    codes = tmp_path / "codes"
    shutil.copytree(world / "codes", codes)
    meta = json.loads((codes / "meta.json").read_text())
    meta["vqgan"] = ""
    (codes / "meta.json").write_text(json.dumps(meta))
    first = tmp_path / "s2"
    train.main(stage_args(world, first) + ["--codes", str(codes)])
    cfg = json.loads((first / "config.json").read_text())
    cfg["vqgan"] = "../my_vqgan"  # relative to the checkpoint, as the shipped toy checkpoint writes it
    (first / "config.json").write_text(json.dumps(cfg))
    second = tmp_path / "s3"
    args = stage_args(world, second, stage=3) + ["--codes", str(codes)]
    i = args.index("--base")
    args[i:i + 2] = ["--init", str(first)]
    del args[args.index("--num-adapter-layers"):args.index("--num-adapter-layers") + 2]
    train.main(args)
    assert json.loads((second / "config.json").read_text())["vqgan"] == str(tmp_path / "my_vqgan")


def test_steps_with_nothing_to_learn_make_no_update(world, tmp_path, capsys, monkeypatch):
    steps = []
    real_step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: steps.append(1) or real_step(self, *a, **k))
    out = tmp_path / "short"
    with pytest.raises(SystemExit) as e:
        train.main(stage_args(world, out, steps=3, max_len=8))  # every example is longer than 8 tokens
    msg = str(e.value)
    assert msg.startswith("error: ") and f"{train.MAX_EMPTY_STEPS} steps in a row had nothing to train on" in msg
    assert "too long" in msg
    assert steps == []  # the optimizer never stepped
    assert not (out / "model.safetensors").exists()
    log = capsys.readouterr().out
    assert "step 1: no image targets in this step's 2 examples (2 skipped as bad data): no update" in log
    assert "done:" not in log


def test_frozen_matmuls_in_bf16_train_the_same_bits(world, tmp_path, monkeypatch):
    """bf16 autocast, CPU: the frozen base weights stored in bf16, or in fp32 and cast by autocast, same result."""
    models = {}
    for name in ("bf16", "fp32"):
        if name == "fp32":
            monkeypatch.setattr(armor, "frozen_matmuls", lambda model: [])
        models[name] = train.main(stage_args(world, tmp_path / name, stage=3, dtype="bfloat16"))
    dtypes = {n: p.dtype for n, p in models["bf16"].named_parameters()}
    q = "language_model.model.layers.0.self_attn.q_proj.weight"
    assert dtypes[q] == torch.bfloat16 and dtypes["vision_model.embeddings.patch_embedding.weight"] == torch.bfloat16
    assert dtypes["language_model.lm_head.weight"] == torch.float32  # trained in stage 3, saved in checkpoints
    assert dtypes["language_model.model.embed_tokens.weight"] == torch.float32  # a lookup, not a matmul
    assert all(d == torch.float32 for n, d in dtypes.items() if n.startswith("armor.") or "norm" in n)
    fp32 = dict(models["fp32"].named_parameters())
    assert all(fp32[n].dtype == torch.float32 for n in fp32)
    for n, p in models["bf16"].named_parameters():
        if p.requires_grad:
            assert torch.equal(p, fp32[n]), n


# ---------------------------------------------------------------------------------------------------------------------
# The toy data, prepared once

PREPARE = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {repo!r})
    from toy import pipeline, world
    p = pipeline.paths(data={data!r})
    if {kill_after!r}:  # die in the middle of writing the images of the first dataset
        real_save, n = world.Image.Image.save, []
        def save(self, *a, **k):
            n.append(1)
            if len(n) == {kill_after!r}:
                os.kill(os.getpid(), signal.SIGKILL)
            return real_save(self, *a, **k)
        world.Image.Image.save = save
    with pipeline.prepared_once(p["data"]):
        pipeline.make_data(p, {{"t2i": 40, "t2ti": 20}}, base_text=False)
    print("prepared", flush=True)
""")


def prepare(data, kill_after=0):
    code = PREPARE.format(repo=str(REPO), data=str(data), kill_after=kill_after)
    return subprocess.Popen([sys.executable, "-c", code], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def lines(path):
    return Path(path).read_text().splitlines()


def t2i_records(n=40):  # make_data's t2i records: n and the recipe's extra object requests
    from toy import pipeline
    return n + sum(round(n * share) for share in pipeline.MORE.values())


@pytest.mark.e2e
def test_two_processes_preparing_the_toy_data_at_once(tmp_path):
    procs = [prepare(tmp_path / "data") for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0 and "prepared" in out, err
    assert sum("waiting for another process" in out for out, _ in outs) <= 1
    assert len(lines(tmp_path / "data" / "t2i_train.jsonl")) == t2i_records()
    assert len(lines(tmp_path / "data" / "t2ti_train.jsonl")) == 20
    assert not list((tmp_path / "data").glob("*.tmp"))


@pytest.mark.e2e
def test_a_killed_preparation_is_redone_not_read(tmp_path):
    p = prepare(tmp_path / "data", kill_after=10)
    p.communicate(timeout=120)
    assert p.returncode == -signal.SIGKILL
    assert not (tmp_path / "data" / "t2i_train.jsonl").exists()  # only a .tmp: nothing reads it as a dataset
    p = prepare(tmp_path / "data")
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    assert len(lines(tmp_path / "data" / "t2i_train.jsonl")) == t2i_records()


def test_a_warmup_longer_than_the_run_is_called_out(world, tmp_path, capsys):
    train.main(stage_args(world, tmp_path / "w", steps=2, warmup=100))
    assert "warning: --warmup 100 is not shorter than --steps 2: the learning rate stays at or below 6e-05" \
        in capsys.readouterr().out
    train.main(stage_args(world, tmp_path / "w2", steps=2))
    assert "warning: --warmup" not in capsys.readouterr().out
