"""
ARMOR's model code in armor.py: parameter counts, cached decoding, WoHG stages, the alpha/beta loss, bf16.

  python -m pytest tests/test_armor.py -q

- The presets reproduce the published InternVL2.5 parameter counts (their model cards) on the meta device; ARMOR
  adds ~0.7B to 8B.
- Cached decoding (new_state / extend / adapter_catch_up) equals one full forward: text mode, visual mode, and a
  text -> <imgbos> -> codes -> <imgend> -> text -> <imgbos> switch with the lazy adapter catch-up; and a left-padded
  batch of rows with different prompt lengths (one with an image) equals each row run alone.
- After optimizer steps in each WoHG stage exactly the stage's tensors changed; the text head never runs in stage 2
  and the adapter never runs in stage 1.
- The loss equals alpha * CE_text + beta * CE_img computed by hand from the heads' logits, with the routing
  targets <= V -> text head, > V -> visual head, -100 -> ignored.
- A bfloat16 forward gives finite logits close to fp32.
"""

import copy

import pytest
import torch

import armor
from armor import Armor, InternVL
from conftest import randomize, tiny_armor

pytestmark = pytest.mark.usefixtures("one_thread")


class Tokens:
    """Ids of the tiny extended vocabulary (module docstring of armor.py)."""

    def __init__(self, cfg, seed=0):
        self.cfg, self.g = cfg, torch.Generator().manual_seed(seed)
        V = cfg.llm.vocab_size
        self.V, self.imgbos, self.imgend = V, cfg.imgbos_id, cfg.imgend_id
        self.img, self.img_end, self.ctx = V - 9, V - 8, cfg.img_context_id

    def text(self, n):
        return torch.randint(0, self.V - 9, (n,), generator=self.g).tolist()  # below the 9 InternVL tokens

    def codes(self, n):
        return (self.cfg.code_offset + torch.randint(0, self.cfg.num_image_codes, (n,), generator=self.g)).tolist()

    def image_in(self, tiles):
        return [self.img] + [self.ctx] * (tiles * self.cfg.tokens_per_tile) + [self.img_end]

    def pixels(self, tiles):
        s = self.cfg.vision.image_size
        return torch.randn(tiles, 3, s, s, generator=self.g)


def visual_after(tok, cfg):
    """Table 1: the token just fed decides the head for the next one: <imgbos>, <imgpad> and codes -> visual."""
    return tok >= cfg.imgbos_id and tok != cfg.imgend_id


@torch.no_grad()
def cached_run(model, ids, prefill, pixels=None, pad=None):
    """Teacher-forced generation loop: prefill, then one token per step. Text steps read the text head on the LLM
    output; visual steps first call adapter_catch_up (lazily: only when a visual step comes) and read the visual
    head. Returns {position: text logits (B, V+1)}, {position: image logits (B, K+2)} and the columns per catch-up.
    The mode of each step is taken from row 0 (the rows share their continuation)."""
    B, T = ids.shape
    state = model.new_state(B, T, pad=pad)
    text, img, calls = {}, {}, []
    h = model.extend(state, ids[:, :prefill], pixels)
    for p in range(prefill):  # every prefill position, to check the prompt pass too
        text[p] = model.text_logits(h[:, p])
    for pos in range(prefill - 1, T):
        if pos >= prefill:
            h = model.extend(state, ids[:, pos:pos + 1])
        if visual_after(int(ids[0, pos]), model.config):
            a0 = state.adapter_length
            a = model.adapter_catch_up(state)  # (B, columns not yet seen by the adapter, d)
            calls.append(a.shape[1])
            for i in range(a.shape[1]):
                img[a0 + i] = model.image_logits(a[:, i])
        else:
            text[pos] = model.text_logits(h[:, -1])
    assert state.length == T
    return text, img, calls


# cached vs full forward in fp32: the same math through different SDPA paths (is_causal, an explicit mask, one query
# row), on logits of magnitude ~6: measured up to 1.2e-5, i.e. a few float32 ulps of the logit scale
ATOL = 5e-5


def assert_matches_full(model, ids, text, img, pixels=None, atol=ATOL):
    """Compare the cached logits of every position with one full forward over the same ids."""
    with torch.no_grad():
        full = model(ids, pixels)
    for pos, lg in text.items():
        assert (lg - full.text_logits[:, pos]).abs().max() <= atol, ("text", pos)
    for pos, lg in img.items():
        assert (lg - full.image_logits[:, pos]).abs().max() <= atol, ("image", pos)
    return full


class CallCounter:
    """Counts forward calls of a set of modules. Hooks stay on: each test builds its own model."""

    def __init__(self, modules):
        self.n = 0
        for m in modules:
            m.register_forward_hook(self.hook)

    def hook(self, *args):
        self.n += 1


# --- parameter counts ------------------------------------------------------------------------------------------------


def count(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name, vision, mlp1, llm, total", [
    ("internvl2_5-1b", 304_012_288, 4_482_816, 629_697_920, 938_193_024),
    ("internvl2_5-2b", 304_012_288, 12_595_200, 1_889_146_880, 2_205_754_368),
    ("internvl2_5-4b", 304_012_288, 12_595_200, 3_396_030_464, 3_712_637_952),
    ("internvl2_5-8b", 304_012_288, 33_570_816, 7_737_782_272, 8_075_365_376),
])
def test_preset_parameter_counts(name, vision, mlp1, llm, total):
    cfg = armor.PRESETS[name]()
    with torch.device("meta"):
        m = InternVL(cfg)
    assert (count(m.vision_model), count(m.mlp1), count(m.language_model), count(m)) == (vision, mlp1, llm, total)
    assert cfg.tokens_per_tile == 256 and cfg.img_context_id == {151674: 151667, 92553: 92546}[cfg.llm.vocab_size]


def test_armor_8b_adds_about_0p7b():
    cfg = armor.PRESETS["internvl2_5-8b"]()
    with torch.device("meta"):
        m = Armor(cfg)
    added = count(m.armor)
    assert count(m) - added == 8_075_365_376  # the base is untouched
    # digest: new rows + visual head ~ 2 x 8195 x 4096, plus three InternLM2-7B-shaped blocks of ~218M
    block = 2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * 4096 * 14336 + 2 * 4096
    assert added == 8195 * 4096 + 4096 + 3 * block + 4096 + 8194 * 4096
    assert 0.65e9 < added < 0.75e9
    groups = {g: sum(p.numel() for p in ps) for g, ps in armor.param_groups(m).items()}
    assert groups["adapter"] == 3 * block + 4096 and groups["embed_new"] == 8195 * 4096


# --- cached decoding equals a full forward ---------------------------------------------------------------------------


def test_cached_text_mode_equals_full_forward():
    m = tiny_armor()
    tk = Tokens(m.config)
    ids = torch.tensor([tk.text(6) + tk.image_in(2) + tk.text(9)])
    pixels = tk.pixels(2)
    adapter = CallCounter(m.armor.adapter)
    text, img, calls = cached_run(m, ids, prefill=10, pixels=pixels)  # the image is inside the prompt
    assert calls == [] and img == {} and adapter.n == 0  # a text-only answer never runs the adapter
    assert sorted(text) == list(range(ids.shape[1]))
    assert_matches_full(m, ids, text, img, pixels)


def test_cached_visual_mode_equals_full_forward():
    m = tiny_armor(seed=1)
    tk = Tokens(m.config)
    g2 = m.config.image_grid ** 2
    ids = torch.tensor([tk.text(5) + [tk.imgbos] + tk.codes(g2) + [tk.imgend]])
    text, img, calls = cached_run(m, ids, prefill=6)  # the prompt ends with <imgbos>: visual from the first step
    assert calls == [6] + [1] * g2  # one catch-up over the whole prompt, then one column per step
    assert sorted(img) == list(range(6 + g2))
    full = assert_matches_full(m, ids, text, img)
    # the visual head ranks <imgend>, <imgpad> and the codes: K + 2 outputs
    assert full.image_logits.shape == (1, ids.shape[1], m.config.num_image_codes + 2)


def test_cached_switch_with_lazy_adapter_catch_up():
    m = tiny_armor(seed=2)
    tk = Tokens(m.config)
    g2 = m.config.image_grid ** 2
    seq = tk.text(5) + [tk.imgbos] + tk.codes(g2) + [tk.imgend] + tk.text(4) + [tk.imgbos] + tk.codes(3)
    ids = torch.tensor([seq])
    blocks = CallCounter(m.armor.adapter)
    text, img, calls = cached_run(m, ids, prefill=3)
    # first <imgbos> at column 5: the adapter catches up over columns 0..5, then 1 per code; after <imgend> it is
    # idle through the text, and the second <imgbos> (column 27) catches up over the 6 columns it missed
    assert calls == [6] + [1] * g2 + [6] + [1] * 3
    assert blocks.n == len(calls) * len(m.armor.adapter)
    assert sorted(img) == list(range(len(seq)))  # every column went through the adapter exactly once
    text_steps = [p for p in range(2, len(seq)) if not visual_after(seq[p], m.config)]
    assert set(text_steps) <= set(text)
    assert_matches_full(m, ids, text, img)


@pytest.mark.parametrize("preset", ["tiny", "tiny-internlm2"])
def test_left_padded_batch_equals_rows_alone(preset):
    m = tiny_armor(seed=3, preset=preset)
    tk = Tokens(m.config)
    cont = tk.text(2) + [tk.imgbos] + tk.codes(4) + [tk.imgend] + tk.text(2)
    p0 = tk.text(3) + tk.image_in(2) + tk.text(2)  # 9 tokens with 2 image tiles
    p1 = tk.text(4)  # shorter: 5 padding columns on the left
    pixels = tk.pixels(2)
    pad_id = 0
    ids = torch.tensor([p0 + cont, [pad_id] * (len(p0) - len(p1)) + p1 + cont])
    pad = torch.tensor([0, len(p0) - len(p1)])
    text, img, calls = cached_run(m, ids, prefill=len(p0), pixels=pixels, pad=pad)
    assert calls == [len(p0) + 3] + [1] * 4
    for r, (row, px) in enumerate(((p0 + cont, pixels), (p1 + cont, None))):
        with torch.no_grad():
            full = m(torch.tensor([row]), px)
        off = int(pad[r])
        n = 0
        for pos, lg in text.items():
            if pos >= off:
                assert (lg[r] - full.text_logits[0, pos - off]).abs().max() <= ATOL, (r, "text", pos)
                n += 1
        for pos, lg in img.items():
            if pos >= off:
                assert (lg[r] - full.image_logits[0, pos - off]).abs().max() <= ATOL, (r, "image", pos)
                n += 1
        assert n >= len(row)  # every real column was compared at least once
    # meaningful: without the pad argument the short row would attend to its padding and drift
    t2, _, _ = cached_run(m, ids, prefill=len(p0), pixels=pixels)
    last = ids.shape[1] - 1
    assert (t2[last][1] - text[last][1]).abs().max() > 1e-3


def test_dynamic_rope_decoding_keeps_no_table_per_length():
    """Past max_position_embeddings the NTK base changes every step; the rope must not keep a table per length."""
    cfg = armor.PRESETS["tiny-internlm2"]()
    cfg.llm.max_position_embeddings = 16
    m = randomize(InternVL(cfg).eval())
    tk = Tokens(cfg)
    state = m.new_state(1, 60)
    with torch.no_grad():
        m.extend(state, torch.tensor([tk.text(10)]))
        size = sum(c.numel() for c, _ in m.rotary.tables.values())
        for t in tk.text(40):  # from 10 to 50 columns, past max_pos 16
            h = m.extend(state, torch.tensor([[t]]))
    assert torch.isfinite(h).all()
    assert sum(c.numel() for c, _ in m.rotary.tables.values()) == size


# --- WoHG stages -----------------------------------------------------------------------------------------------------


def training_batch(cfg, seed=0):
    """Two rows that mix text and image targets: text, <imgbos>, codes, <imgend>, text; -100 on the prompts."""
    tk = Tokens(cfg, seed)
    rows = []
    for _ in range(2):
        seq = tk.text(4) + [tk.imgbos] + tk.codes(6) + [tk.imgend] + tk.text(3)
        rows.append(seq)
    ids = torch.tensor(rows)
    targets = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], 1)
    targets[:, :2] = -100  # prompt positions
    return ids, targets


STAGE_LOSS = {1: (1.0, 0.0), 2: (0.0, 1.0), 3: (1.0, 1.0)}  # (alpha, beta), Figure 5


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_stage_trains_exactly_its_groups(stage):
    m = tiny_armor(seed=4).train()
    alpha, beta = STAGE_LOSS[stage]
    n = armor.set_trainable(m, stage)
    groups = armor.param_groups(m)
    ids = {id(p) for g in armor.STAGE_GROUPS[stage] for p in groups[g]}
    names = {k for k, p in m.named_parameters() if id(p) in ids}
    assert {k for k, p in m.named_parameters() if p.requires_grad} == names
    assert n == sum(p.numel() for k, p in m.named_parameters() if k in names)
    text_head = CallCounter([m.language_model.lm_head, m.armor.imgbos_head])
    adapter = CallCounter([*m.armor.adapter, m.armor.adapter_norm, m.armor.visual_head])
    before = {k: v.clone() for k, v in m.state_dict().items()}
    # every parameter goes to the optimizer: frozen ones must get no gradient, so not even weight decay moves them
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)
    x, y = training_batch(m.config)
    for _ in range(3):
        out = m(x, targets=y, alpha=alpha, beta=beta)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    changed = {k for k, v in m.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == names, (sorted(changed ^ names))
    # what must stay bit-identical in every stage: original embedding rows, vision, mlp1, decoder, final norm
    for k, v in m.state_dict().items():
        if k.startswith(("vision_model.", "mlp1.", "language_model.model.")):
            assert torch.equal(v, before[k]), k
    if stage == 1:
        assert adapter.n == 0 and text_head.n > 0 and out.image_logits is None
    if stage == 2:
        assert text_head.n == 0 and adapter.n > 0 and out.text_logits is None
    if stage == 3:
        assert text_head.n > 0 and adapter.n > 0


def test_set_trainable_groups_are_disjoint_and_frozen_base():
    m = tiny_armor()
    groups = armor.param_groups(m)
    seen = [id(p) for ps in groups.values() for p in ps]
    assert len(seen) == len(set(seen))
    base = {id(p) for k, p in m.named_parameters() if not k.startswith("armor.")}
    assert {id(p) for p in groups["text_head"]} & base == {id(m.language_model.lm_head.weight)}
    assert set(seen) & base == {id(m.language_model.lm_head.weight)}  # the only base tensor ever trained
    assert set(seen) | base == {id(p) for p in m.parameters()}  # every ARMOR tensor is in some group
    with pytest.raises(ValueError, match="unknown parameter groups"):
        armor.set_trainable(m, groups=["embed_new", "decoder"])
    assert armor.set_trainable(m, groups=["all"]) == sum(p.numel() for p in m.parameters())  # the ablation's set
    assert armor.set_trainable(m, 1) < sum(p.numel() for p in m.parameters())


# --- the loss --------------------------------------------------------------------------------------------------------


def test_loss_equals_hand_computed_cross_entropies():
    m = tiny_armor(seed=5)
    cfg = m.config
    V, K = cfg.llm.vocab_size, cfg.num_image_codes
    c0 = cfg.code_offset
    # hand-built: row 0 writes an image, row 1 is text only with a padded tail
    ids = torch.tensor([[11, 12, 13, V, c0 + 5, c0 + 60, V + 2, V + 1, 14, 15],
                        [21, 22, 23, 24, 25, 26, 27, 0, 0, 0]])
    targets = torch.tensor([[-100, -100, V, c0 + 5, c0 + 60, V + 2, V + 1, 14, 15, -100],
                            [-100, 23, 24, 25, 26, V, 7, -100, -100, -100]])
    text_pos = [(0, 2), (0, 7), (0, 8), (1, 1), (1, 2), (1, 3), (1, 4), (1, 5), (1, 6)]  # targets <= V
    img_pos = [(0, 3), (0, 4), (0, 5), (0, 6)]  # targets > V: codes 5, 60, <imgpad>, <imgend>
    img_idx = [2 + 5, 2 + 60, 1, 0]  # visual head index: <imgend> 0, <imgpad> 1, code k -> 2 + k
    with torch.no_grad():
        full = m(ids)

    def ce(logits, t):  # -log softmax(logits)[t], written out
        return float(torch.logsumexp(logits.double(), -1) - logits.double()[t])

    l_text = sum(ce(full.text_logits[b, t], int(targets[b, t])) for b, t in text_pos) / len(text_pos)
    l_img = sum(ce(full.image_logits[b, t], i) for (b, t), i in zip(img_pos, img_idx)) / len(img_pos)
    assert full.text_logits.shape[-1] == V + 1 and full.image_logits.shape[-1] == K + 2
    for alpha, beta in [(1.0, 1.0), (0.3, 2.0), (1.0, 0.0), (0.0, 1.0)]:
        with torch.no_grad():
            out = m(ids, targets=targets, alpha=alpha, beta=beta)
        assert abs(float(out.loss) - (alpha * l_text + beta * l_img)) < 1e-5, (alpha, beta)
        if alpha:  # routing: the text head ran on exactly the text positions, in order
            assert abs(float(out.loss_text) - l_text) < 1e-5
            assert torch.allclose(out.text_logits, torch.stack([full.text_logits[b, t] for b, t in text_pos]),
                                  atol=1e-5)
        else:
            assert out.text_logits is None
        if beta:
            assert abs(float(out.loss_img) - l_img) < 1e-5
            assert torch.allclose(out.image_logits, torch.stack([full.image_logits[b, t] for b, t in img_pos]),
                                  atol=1e-5)
        else:
            assert out.image_logits is None
    # global denominators (gradient accumulation / DDP): sums divided by the given counts
    with torch.no_grad():
        out = m(ids, targets=targets, alpha=0.5, beta=2.0, n_text=20, n_img=8)
    want = 0.5 * l_text * len(text_pos) / 20 + 2.0 * l_img * len(img_pos) / 8
    assert abs(float(out.loss) - want) < 1e-5
    # the base model's loss: plain LM cross-entropy over every target >= 0 (row 1 without its <imgbos> target)
    base = InternVL(cfg)
    base.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("armor.")})
    t1 = targets[1:].clone()
    t1[0, 5] = -100
    with torch.no_grad():
        _, loss = base(ids[1:], targets=t1)
        ref = base(ids[1:])[0]
    want = sum(ce(ref[0, t], int(t1[0, t])) for t in (1, 2, 3, 4, 6)) / 5
    assert abs(float(loss) - want) < 1e-5


def test_loss_backward_works_with_only_one_kind_of_target():
    m = tiny_armor(seed=6)
    armor.set_trainable(m, 3)
    V = m.config.llm.vocab_size
    ids = torch.tensor([[1, 2, 3, 4]])
    only_text = torch.tensor([[2, 3, 4, -100]])
    out = m(ids, targets=only_text)
    out.loss.backward()  # no image target: the image term is an exact zero with a graph
    assert float(out.loss_img) == 0 and out.image_logits is None
    assert m.armor.visual_head.weight.grad is None or not m.armor.visual_head.weight.grad.any()
    only_img = torch.tensor([[V + 1, V + 3, V + 4, -100]])
    out = m(ids, targets=only_img)
    out.loss.backward()
    assert float(out.loss_text) == 0 and out.text_logits is None


# --- bfloat16 --------------------------------------------------------------------------------------------------------


def test_bfloat16_forward_close_to_fp32():
    m = tiny_armor(seed=7)
    tk = Tokens(m.config)
    ids = torch.tensor([tk.text(4) + tk.image_in(3) + tk.text(3) + [tk.imgbos] + tk.codes(5)])
    pixels = tk.pixels(3)
    with torch.no_grad():
        ref = m(ids, pixels)
        m16 = copy.deepcopy(m).to(torch.bfloat16)
        out = m16(ids, pixels)
        # and the cached path in bf16
        state = m16.new_state(1, ids.shape[1])
        h = m16.extend(state, ids, pixels)
        a = m16.adapter_catch_up(state)
    assert out.text_logits.dtype == out.image_logits.dtype == torch.bfloat16 and state.llm.k.dtype == torch.bfloat16
    for a16, a32 in ((out.text_logits, ref.text_logits), (out.image_logits, ref.image_logits),
                     (m16.text_logits(h), ref.text_logits), (m16.image_logits(a), ref.image_logits)):
        assert torch.isfinite(a16).all()
        # bf16 keeps 8 mantissa bits (relative step 2^-8 = 0.4%), and these O(1)-scaled random weights amplify the
        # rounding through the ViT, 2 LLM blocks and 2 adapter blocks: measured 3.4% (text) / 7.2% (image) of the
        # largest |logit|, while HF's own bf16 InternVL forward on such weights is 2.7-4.7% off its fp32 one
        # (test_parity.py::test_bfloat16_error_like_hf). 12% leaves room for that and still catches a lost cast.
        err = (a16.float() - a32).abs().max() / a32.abs().max()
        assert err < 0.12, float(err)


@pytest.mark.parametrize("T,kind", [(24, "causal"), (24, "mask"), (24, "none"), (300, "causal")])
def test_attention_matmul_path_equals_sdpa(T, kind):
    """armor.attention takes plain matmuls for short bf16 sequences with grad on CPU (the toy training's case) and
    SDPA otherwise; both paths give SDPA's outputs and gradients (fp32 reference, bf16 rounding as tolerance)."""
    g = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(2, 4, T, 16, generator=g) for _ in range(3))
    mask = (torch.rand(2, 1, T, T, generator=g) > 0.3) | torch.eye(T, dtype=torch.bool) if kind == "mask" else None
    w = torch.randn(2, 4, T, 16, generator=g)

    def run(dtype, fn):
        leaves = [t.to(dtype).clone().requires_grad_() for t in (q, k, v)]
        y = fn(*leaves, mask, kind == "causal")
        (y.float() * w).sum().backward()
        return [y.float()] + [t.grad.float() for t in leaves]

    ref = run(torch.float32, lambda a, b, c, m, causal: torch.nn.functional.scaled_dot_product_attention(
        a, b, c, attn_mask=m, is_causal=causal))
    for got, want in zip(run(torch.bfloat16, armor.attention), ref):
        assert (got - want).abs().max() <= 0.05 * want.abs().max()
    # fp32 always goes to SDPA: identical
    for got, want in zip(run(torch.float32, armor.attention), ref):
        assert torch.equal(got, want)


def test_autocast_training_attention_runs_in_bf16(monkeypatch):
    """Under CPU bf16 autocast (the toy training) every attention call, the LLM's and the adapter's included, gets
    bf16 queries and keys. RoPE's fp32 tables used to promote them back to fp32, which sent the toy training's
    attention to SDPA's slower fp32 kernels; the loss must stay close to the fp32 one."""
    m = tiny_armor(seed=5).train()
    ids, targets = training_batch(m.config)
    seen = []
    real = armor.attention

    def spy(q, k, v, mask=None, causal=False):
        seen.append((q.dtype, k.dtype, v.dtype))
        return real(q, k, v, mask, causal)

    monkeypatch.setattr(armor, "attention", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(ids, None, targets, 1.0, 1.0)
    out.loss.backward()
    n_llm = m.config.llm.num_layers + m.config.num_adapter_layers
    assert len(seen) == n_llm and set(seen) == {(torch.bfloat16,) * 3}
    with torch.no_grad():
        ref = float(m(ids, None, targets, 1.0, 1.0).loss)  # fp32
    gap = abs(float(out.loss.detach()) - ref) / ref
    print(f"autocast loss {float(out.loss.detach()):.5f} vs fp32 {ref:.5f}: relative gap {gap:.2e}")
    assert gap < 0.005  # about one bf16 rounding step (2^-8) of the loss; the gap printed above is far below it
