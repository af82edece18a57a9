"""
train.py against an independent reference, and the paper's stage table written out as literals.

  python -m pytest tests/test_train_reference.py -q            # -m "not e2e" leaves out the torchrun cases

- One optimizer step of train.py equals plain PyTorch written here apart from it: the global batch in one forward,
  the loss of Eq. 1-3 computed by hand from the two heads' logits (a token mean per modality, weighted by alpha and
  beta), torch's clip_grad_norm_ and AdamW on the paper's trainable set. Same loss, same gradients (single process)
  and same updated tensors, for stages 1, 2 and 3; one process with one micro-step, with 2 micro-steps, and 2 gloo
  ranks. The batch is lopsided: its first half holds text targets only and its second half mostly image targets, so
  the two ranks (or micro-steps) hold very different token counts of each kind and any mix-up of the global counts
  shows.
- Figure 5 / Section 3.4 as literals: alpha and beta of every stage, and the exact names of the trainable tensors.
- Training draws nothing from the global random generators (the data position in the checkpoint is the whole random
  state), and a bf16-autocast run resumed after a crash is bitwise equal to an uninterrupted bf16 run.
"""

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import armor
import data
import train
from test_data import make_world
from tokenizer import Tokenizer
from vqgan import CodeCache

pytestmark = pytest.mark.usefixtures("one_thread")

# Figure 5 and Section 3.4 of the paper: (alpha, beta, trainable groups) of each WoHG stage
FIGURE5 = {1: (1.0, 0.0, ("embed_new", "text_head")),  # "what to generate"
           2: (0.0, 1.0, ("embed_new", "adapter", "visual_head")),  # "how to generate"
           3: (1.0, 1.0, ("embed_new", "adapter", "text_head", "visual_head"))}  # "how to answer better"


def figure5_names(model, stage):
    """The tensor names of a stage's trainable groups, written out here (Section 3.2): the new embedding rows; the
    text head = the original LM head + the <imgbos> row; the adapter = blocks shaped like the LLM's decoder layers,
    then a norm; the visual head. Everything else (vision encoder, projector, decoder layers, original embedding
    rows) stays frozen."""
    layer = [n.removeprefix("language_model.model.layers.0.") for n, _ in model.named_parameters()
             if n.startswith("language_model.model.layers.0.")]
    adapter = {f"armor.adapter.{i}.{n}" for i in range(model.config.num_adapter_layers) for n in layer}
    table = {"embed_new": {"armor.embed_new.weight"},
             "text_head": {"language_model.lm_head.weight", "armor.imgbos_head.weight"},
             "adapter": adapter | {"armor.adapter_norm.weight"},
             "visual_head": {"armor.visual_head.weight"}}
    return set().union(*(table[g] for g in FIGURE5[stage][2]))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("refworld")
    make_world(root)
    return root


KINDS = ("t2t", "ti2t", "t2i", "t2ti")
MIX = {k: 1.0 for k in KINDS}
G = 4  # global batch: 1 process x 4, 1 process x 2 x 2 micro-steps, 2 ranks x 1 x 2 micro-steps
LR, WD, CLIP, BETAS = 3e-3, 0.1, 1.0, (0.9, 0.95)


def data_specs(root):
    # the order of train.py's --data arguments, which is the order of each type's records
    specs = [(k, str(root / f"{k}.jsonl")) for k in KINDS]
    return specs + [("t2i", str(root / "shards" / "*.tar"))]


def lopsided_seed(root):
    """The first seed whose first global batch is [text-only, text-only with an input image | t2i and t2ti] in some
    order: the first half (rank 0, or micro-step 1) has no image target, the second more image than text targets."""
    sizes = {k: len(data.Pool(k, [s for kind, p in data_specs(root) if kind == k for s in data.open_sources(p)]))
             for k in KINDS}
    for seed in range(2000):
        kinds = [p.kind for p in data.Mixture(sizes, MIX, seed).take(G)]
        if sorted(kinds[:2]) in (["t2t", "ti2t"], ["ti2t", "ti2t"]) and sorted(kinds[2:]) == ["t2i", "t2ti"]:
            return seed
    raise AssertionError("no lopsided seed below 2000")


def step_args(root, out, stage, seed, batch_size, grad_accum):
    a = ["--stage", str(stage), "--base", str(root / "base"), "--codes", str(root / "codes"),
         "--num-adapter-layers", "1", "--mix", ",".join(f"{k}=1" for k in KINDS), "--seed", str(seed),
         "--cfg-drop", "0.5", "--steps", "1", "--warmup", "1", "--lr", str(LR), "--weight-decay", str(WD),
         "--grad-clip", str(CLIP), "--adam-betas", ",".join(map(str, BETAS)), "--batch-size", str(batch_size),
         "--grad-accum", str(grad_accum), "--out", str(out), "--device", "cpu", "--dtype", "float32"]
    for kind, path in data_specs(root):
        a += ["--data", f"{kind}={path}"]
    return a


def adamw_step(before, grads):
    """torch's AdamW from the weights before the step and their (clipped) gradients -> the weights after it."""
    params = {n: t.clone().requires_grad_(True) for n, t in before.items()}
    for n, p in params.items():
        p.grad = grads[n].clone()
    decay = [p for p in params.values() if p.dim() >= 2]  # weight decay on matrices only
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WD},
                             {"params": [p for p in params.values() if p.dim() < 2], "weight_decay": 0.0}],
                            lr=LR, betas=BETAS)  # --warmup 1: step 1 runs at the full lr
    opt.step()
    return {n: p.detach() for n, p in params.items()}


def reference_step(root, stage, seed):
    """One optimizer step in plain PyTorch -> dict of the losses, the (text, image) target counts of each half of the
    batch, the gradient norm before clipping, the clipped gradients, the weights before and after the step."""
    alpha, beta, _ = FIGURE5[stage]
    tok = Tokenizer.from_dir(root / "base")
    model = armor.from_internvl(str(root / "base"), seed=seed, verbose=False, num_image_codes=64, image_grid=4,
                                image_px=64, num_adapter_layers=1)  # the code cache's 64 codes on a 4 x 4 grid
    names = figure5_names(model, stage)
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
    params = {n: p for n, p in model.named_parameters() if n in names}
    # the whole global batch as one micro-batch of one process
    pools = {}
    for kind, path in data_specs(root):
        pools.setdefault(kind, []).extend(data.open_sources(path))
    pools = {k: data.Pool(k, v) for k, v in pools.items()}
    builder = data.ExampleBuilder(tok, model.config, 4096, CodeCache(str(root / "codes")))
    stream = data.TrainStream(pools, MIX, builder, G, 1, 0, 1, seed, 0.5, False, tok.pad if tok.pad is not None else 0)
    batch = stream.next_step().batches[0]
    out = model(batch.ids, batch.pixels)  # both heads on every position: text (B, T, V + 1), visual (B, T, K + 2)
    # Eq. 1-3: a target <= V (a text token or <imgbos>) is scored by the text head; a target > V (<imgend>, <imgpad>,
    # a code) by the visual head, whose index 0 is <imgend> = id V + 1. Each term is a mean over its own positions.
    V, t = model.config.llm.vocab_size, batch.targets
    text, img = (t >= 0) & (t <= V), t > V
    nll_text = -torch.log_softmax(out.text_logits[text].float(), -1).gather(1, t[text][:, None]).sum()
    nll_img = -torch.log_softmax(out.image_logits[img].float(), -1).gather(1, (t[img] - (V + 1))[:, None]).sum()
    loss_text, loss_img = nll_text / text.sum(), nll_img / img.sum()
    loss = alpha * loss_text + beta * loss_img
    loss.backward()
    grad_norm = float(torch.nn.utils.clip_grad_norm_(list(params.values()), CLIP))
    grads = {n: p.grad.clone() for n, p in params.items()}
    before = {n: p.detach().clone() for n, p in params.items()}
    halves = [(int(text[h].sum()), int(img[h].sum())) for h in (slice(0, G // 2), slice(G // 2, G))]
    return dict(loss=float(loss.detach()), loss_text=float(loss_text.detach()), loss_img=float(loss_img.detach()),
                halves=halves, grad_norm=grad_norm, grads=grads, before=before, after=adamw_step(before, grads))


@pytest.fixture(scope="module")
def references(world):
    seed = lopsided_seed(world)
    cache = {}

    def get(stage):
        if stage not in cache:
            cache[stage] = reference_step(world, stage, seed)
        return cache[stage]
    return seed, get


def assert_matches_reference(ref, stage, metrics, after, grads=None):
    (text0, img0), (text1, img1) = ref["halves"]
    assert text0 > 0 and img0 == 0 and img1 > text1 > 0  # the lopsided batch of lopsided_seed
    alpha, beta, _ = FIGURE5[stage]
    # losses and the gradient norm before clipping (AdamW's first step hardly depends on the gradient's scale, so
    # the norm is what shows a wrong count or rank factor when the gradients themselves are not at hand): sums of
    # a few fp32 shares, rounding only
    assert metrics["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    assert metrics["loss_text"] == (pytest.approx(ref["loss_text"], rel=1e-5) if alpha else 0.0)
    assert metrics["loss_img"] == (pytest.approx(ref["loss_img"], rel=1e-5) if beta else 0.0)
    assert metrics["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)
    assert sorted(after) == sorted(ref["after"])
    for n, g in ref["grads"].items():
        # The same sums over other micro-batch shapes: rounding relative to the tensor's largest terms. AdamW's first
        # step moves a weight by lr * g / (|g| + eps), so a rounding difference d of a gradient near eps (1e-8) moves
        # it by up to lr * eps * d / (|g| + eps)^2: the tolerance of the weights follows the gradient's.
        d = 1e-4 * g.abs() + 1e-4 * g.abs().max()
        if grads is not None:
            assert ((grads[n] - g).abs() <= d).all(), n
        tol = LR * 1e-8 * d / (g.abs() + 1e-8) ** 2 + 2.5e-7  # + two fp32 steps at 1.0
        assert ((after[n] - ref["after"][n]).abs() <= tol).all(), n


def spy_on_adamw(monkeypatch):
    """The gradients AdamW steps with (after clipping), by parameter identity."""
    seen, step = {}, torch.optim.AdamW.step

    def spied(self, *a, **k):
        for g in self.param_groups:
            for p in g["params"]:
                seen[id(p)] = p.grad.detach().clone()
        return step(self, *a, **k)
    monkeypatch.setattr(torch.optim.AdamW, "step", spied)
    return seen


@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("batch_size, grad_accum", [(4, 1), (2, 2)])
def test_one_step_equals_the_reference(world, references, monkeypatch, tmp_path, stage, batch_size, grad_accum):
    seed, ref = references
    seen = spy_on_adamw(monkeypatch)
    model = train.main(step_args(world, tmp_path / "run", stage, seed, batch_size, grad_accum))
    monkeypatch.undo()
    trained = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    assert set(trained) == figure5_names(model, stage)
    grads = {n: seen[id(p)] for n, p in model.named_parameters() if p.requires_grad}
    metrics = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert_matches_reference(ref(stage), stage, metrics, trained, grads)
    # and the update is exactly torch's AdamW (lr, betas, decay on matrices only) on train.py's own gradients
    expected = adamw_step(ref(stage)["before"], grads)
    assert all(torch.equal(trained[n], expected[n]) for n in trained)


@pytest.mark.e2e
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_one_step_on_two_ranks_equals_the_reference(world, references, tmp_path, stage):
    from test_train import torchrun

    seed, ref = references
    out = tmp_path / "ddp"
    p = torchrun(step_args(world, out, stage, seed, 1, 2))
    assert p.returncode == 0, p.stdout + p.stderr
    ck = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=False)
    metrics = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert ck["step"] == 1 and set(ck["trainable"]) == set(ref(stage)["after"])
    assert_matches_reference(ref(stage), stage, metrics, ck["trainable"])


# ---------------------------------------------------------------------------------------------------------------------
# Figure 5 as literals


def test_stage_weights_and_trainable_sets_are_figure_5(world):
    for stage, (alpha, beta, _) in FIGURE5.items():
        args = train.parse_args(["--stage", str(stage), "--base", "b", "--data", "t2t=x.jsonl"])
        assert (args.alpha, args.beta) == (alpha, beta), stage
        model = armor.Armor(armor.PRESETS["tiny"]())
        armor.set_trainable(model, stage)
        assert {n for n, p in model.named_parameters() if p.requires_grad} == figure5_names(model, stage), stage
    # the literal names themselves: nothing of the base but the LM head, every ARMOR tensor in stage 3
    model = armor.Armor(armor.PRESETS["tiny"]())
    names = figure5_names(model, 3)
    assert names == {n for n, _ in model.named_parameters() if n.startswith("armor.")} | {
        "language_model.lm_head.weight"}
    # new rows, text head (2), 2 adapter blocks of a Qwen2 layer's 12 (q/k/v weight + bias, o, gate/up/down, 2 norms),
    # adapter norm, visual head
    assert len(names) == 1 + 2 + 2 * 12 + 1 + 1
    # stage 0 (the toy world's base MLLM) trains text only
    args = train.parse_args(["--stage", "0", "--preset", "tiny", "--tokenizer", "t", "--data", "t2t=x.jsonl"])
    assert (args.alpha, args.beta) == (1.0, 0.0)


# ---------------------------------------------------------------------------------------------------------------------
# Random state and bf16 resume


def resume_args(root, out, *extra):
    a = ["--stage", "3", "--base", str(root / "base"), "--codes", str(root / "codes"), "--num-adapter-layers", "1",
         "--cfg-drop", "0.5", "--steps", "4", "--save-every", "2", "--batch-size", "2", "--grad-accum", "2",
         "--lr", "3e-3", "--warmup", "2", "--out", str(out), "--device", "cpu", *extra]
    for kind, path in data_specs(root):
        a += ["--data", f"{kind}={path}"]
    return a


def test_training_draws_nothing_from_the_global_generators(world):
    # so a resume needs no RNG state: if this fails, the checkpoint must save and restore the generators it uses
    random.seed(1)
    np.random.seed(1)
    py, npy = random.getstate(), np.random.get_state()
    train.main(resume_args(world, world / "rng", "--seed", "5"))
    assert torch.equal(torch.get_rng_state(), torch.Generator().manual_seed(5).get_state())  # train.py seeds 5 + 0
    assert random.getstate() == py
    after = np.random.get_state()
    assert after[0] == npy[0] and np.array_equal(after[1], npy[1]) and after[2:] == npy[2:]


class Crash(Exception):
    pass


def test_bf16_run_resumed_after_a_crash_equals_the_uninterrupted_run(world, monkeypatch, capsys):
    full = train.main(resume_args(world, world / "bf16", "--dtype", "bfloat16"))
    assert "cpu, bfloat16" in capsys.readouterr().out

    def crash(step, stop):  # dies after step 3, between the checkpoints of steps 2 and 4
        if step == 3:
            raise Crash
    monkeypatch.setattr(train, "after_step", crash)
    out = world / "bf16_crashed"
    with pytest.raises(Crash):
        train.main(resume_args(world, out, "--dtype", "bfloat16"))
    assert torch.load(out / "ckpt.pt", weights_only=False)["step"] == 2 and not (out / "model.safetensors").exists()
    monkeypatch.undo()
    resumed = train.main(resume_args(world, out, "--dtype", "bfloat16", "--resume"))
    assert f"resumed from {out / 'ckpt.pt'} at step 2" in capsys.readouterr().out
    sa, sb = full.state_dict(), resumed.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    la, lb = ([json.loads(ln) for ln in (d / "metrics.jsonl").read_text().splitlines()] for d in (world / "bf16", out))
    assert [r["step"] for r in lb] == [1, 2, 3, 4] and [r["loss"] for r in la] == [r["loss"] for r in lb]
    # bf16 autocast really ran: the same run in fp32 ends close to it, but not equal (trained weights stay fp32)
    fp32 = train.main(resume_args(world, world / "fp32", "--dtype", "float32"))
    assert all(p.dtype == torch.float32 for p in resumed.parameters() if p.requires_grad)
    lc = [json.loads(ln)["loss"] for ln in (world / "fp32" / "metrics.jsonl").read_text().splitlines()]
    assert lc != [r["loss"] for r in la] and lc == pytest.approx([r["loss"] for r in la], rel=0.05)
    assert not torch.equal(fp32.armor.visual_head.weight, full.armor.visual_head.weight)
