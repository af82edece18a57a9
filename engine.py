"""
The decode engine: ARMOR's generation steps on CPU, fast, beside the readable model in armor.py.

  decoder = engine.decoder(model)    # what sample.generate uses on CPU (generate(..., decoder=model) goes without)
  state = model.new_state(B, max_len, pad)
  h = decoder.extend(state, ids)     # and decoder.text_logits(h), .adapter_catch_up(state), .image_logits(a)
  python -m pytest tests/test_engine.py   # token for token against the model's plain path
  python bench.py --kernels               # the kernels below against F.linear (GB/s of weight read)

armor.py has one decode path: Block.forward with the pre-allocated KV cache and SDPA. On CPU a decode step (one new
token per row, a few rows) multiplies a few rows by every weight once, so its time is the time to read the weights,
plus the per-call overhead of the many small kernels a step makes. nn.Linear reads bf16 weights slowly at these
shapes (oneDNN's product), and at a toy model's size the calls cost more than their work. This file runs the same step
with:
- every matmul through `fast_linear`, small groups stacked into one call (q|k|v, gate|up; every group of a toy-sized
  model): bf16 weights prepacked for oneDNN's linear kernel (the one torch.compile's CPU backend uses), fp32 weights
  through F.linear;
- the norms through `rms_norm_step` (5 kernel calls where F.rms_norm's decomposition makes 7), RoPE written in place
  by a roll, one SDPA call per layer with GQA folded into the query axis (`block_step`);
- a step's few token ids checked as a Python list.
The stacked / packed weights (a second copy of small groups; big fp32 groups are used in place) are made when a state
is created and kept until a weight changes (`refresh`). Everything else (a prefill, input images, grad enabled, another
device) goes to the model's own methods. In fp32 the engine's logits equal the plain path's up to summation order (the
same greedy tokens), in bf16 within bf16 rounding (tests/test_engine.py). python bench.py measures it
(figures/bench.txt).

The engine uses private torch entry points (torch.ops.mkldnn): that is one reason it lives here and not in the model.
"""

import weakref

import torch
import torch.nn.functional as F

from armor import make_ctx

_ONEDNN_BF16 = hasattr(torch.ops.mkldnn, "_linear_pointwise") and torch.backends.mkldnn.is_available() \
    and torch.ops.mkldnn._is_mkldnn_bf16_supported()


# -----------------------------------------------------------------------------------------------------------------
# Kernels


_EPS = {}


def rms_norm_step(x, weight, eps):
    """armor.rms_norm for a decode step, equal up to rounding, in 5 kernel calls where rms_norm makes 7 (F.rms_norm's
    pow, sum, div, add, rsqrt, mul, then the weight): at a decode step's few rows each call costs more than its work.
    The sum of squares comes from one vector_norm, mean + eps from one addcmul; bf16 adds the same casts."""
    key = (eps, x.device)
    if key not in _EPS:
        _EPS[key] = torch.tensor(eps, device=x.device)
    n = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32)
    y = x * torch.addcmul(_EPS[key], n, n, value=1 / x.shape[-1]).rsqrt_()  # fp32 (x's dtype promotes)
    return weight * (y if y.dtype == x.dtype else y.to(x.dtype))


def pack(linears):
    """A group's matmuls as (kind, out_features, weight, bias): one over the stacked weights (bf16, or a small group) or
    one per module (a big group, which then needs no stacked copy). bf16 weights (where oneDNN has bf16 kernels) are
    stacked and prepacked for oneDNN (a copy in its own layout); the others go through F.linear."""
    ws = [m.weight.detach() for m in linears]
    bs = [None if m.bias is None else m.bias.detach() for m in linears]
    cat = lambda ts: None if ts[0] is None else ts[0] if len(ts) == 1 else torch.cat(ts)
    if ws[0].dtype == torch.bfloat16 and _ONEDNN_BF16:
        w = cat(ws)
        return [("bf16", w.shape[0], torch.ops.mkldnn._reorder_linear_weight(w, 1), cat(bs))]
    parts = [(cat(ws), cat(bs))] if sum(w.numel() for w in ws) <= 1 << 22 else list(zip(ws, bs))
    return [("linear", w.shape[0], w, b) for w, b in parts]


def refresh(packs, groups):
    """(Re)build the entries of packs {group of nn.Linear: (stamp, pack(group))} whose weights changed since they were
    made (training, .to(), loading)."""
    for g in groups:
        # nn.Linear has no submodules, so its own _parameters are all of them (parameters() costs microseconds)
        stamp = tuple((p.data_ptr(), p._version, p.dtype) for m in g for p in m._parameters.values() if p is not None)
        if packs.get(g, (None,))[0] != stamp:
            packs[g] = (stamp, pack(g))


def fast_linear(packs, linears, x):
    """x (..., d) through the packed weights of `linears`, stacked -> (..., sum of their out_features)."""
    parts = packs[linears][1]
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    y = _mm(x2, *parts[0]) if len(parts) == 1 else torch.cat([_mm(x2, *p) for p in parts], -1)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[-1])


def _mm(x, kind, n, w, b):
    """x (M, K) @ the packed weight -> (M, n)."""
    if kind == "bf16":
        return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
    return F.linear(x, w, b)


def linear_groups(blocks):
    """The fast_linear groups of a stack of armor.Blocks."""
    return [g for b in blocks for g in ((b.self_attn.q_proj, b.self_attn.k_proj, b.self_attn.v_proj),
                                        (b.self_attn.o_proj,), (b.mlp.gate_proj, b.mlp.up_proj), (b.mlp.down_proj,))]


# -----------------------------------------------------------------------------------------------------------------
# One decode step through a stack of blocks


def block_step(block, x, kv, cos, sin, keep, packs):
    """armor.Block.forward for one new token per row, with the fewest kernel calls: x (B, d); kv (2, B, n_kv, S, hd)
    this layer's keys and values up to and including the new column; cos, sin (B, 1, hd) with sin's first half negated
    (see step_blocks); keep (B, 1, 1, S) False at padded columns, or None. One matmul for q|k|v and one for gate|up
    (fast_linear), and one SDPA call for the attention, GQA without repeated keys: the g query heads that read one kv
    head go in as g queries of one sequence (no causal mask: each sees every column)."""
    a, m, n1, n2 = block.self_attn, block.mlp, block.input_layernorm, block.post_attention_layernorm
    B, nh, nkv, hd = x.shape[0], a.nh, a.nkv, a.hd
    qkv = fast_linear(packs, (a.q_proj, a.k_proj, a.v_proj), rms_norm_step(x, n1.weight, n1.eps))
    qkv = qkv.view(B, nh + 2 * nkv, hd)
    qk = qkv[:, :nh + nkv]
    # RoPE on q and k, written back in place: roll(x) * [-sin, sin] == rotate_half(x) * sin, exactly
    torch.add(qk * cos, qk.roll(hd // 2, -1) * sin, out=qk)
    kv[:, :, :, -1] = qkv[:, nh:].view(B, 2, nkv, hd).transpose(0, 1)  # the new column: keys, values in one copy
    q = qkv[:, :nh].view(B, nkv, nh // nkv, hd)  # query head i reads kv head i // g
    y = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=keep).view(B, nh * hd)
    x = x + fast_linear(packs, (a.o_proj,), y)
    g, u = fast_linear(packs, (m.gate_proj, m.up_proj), rms_norm_step(x, n2.weight, n2.eps)).chunk(2, dim=-1)
    return x + fast_linear(packs, (m.down_proj,), F.silu(g) * u)


_SIGNS = {}


def _rope_sign(t):
    """(-1, ..., -1, 1, ..., 1) over t's last dimension, in t's dtype and device (made once)."""
    key = (t.shape[-1], t.dtype, t.device)
    if key not in _SIGNS:
        _SIGNS[key] = torch.ones(t.shape[-1], dtype=t.dtype, device=t.device)
        _SIGNS[key][:t.shape[-1] // 2] = -1
    return _SIGNS[key]


def step_blocks(model, blocks, x, start, pad, cache, packs):
    """x (B, 1, d), one new token per row at cache column `start`, through a stack of blocks (the model's decoder
    layers or ARMOR's adapter) -> (B, 1, d), as model.run_stack computes it. What every layer shares is made once
    here: the RoPE tables, the padding mask and this step's view of the cache."""
    B = x.shape[0]
    pos = model.positions(B, start, 1, pad, x.device)
    cos, sin = (r.view(B, 1, -1) for r in model.rotary(pos, start + 1, x.dtype))  # (B, 1, hd)
    sin = sin * _rope_sign(sin)  # [-sin, sin] on the two halves, for block_step's roll
    keep = make_ctx(B, 1, start, pad, cache, x.device).mask  # (B, 1, 1, S) or None
    kv = cache.kv[..., :start + 1, :]  # (layers, 2, B, n_kv, S, hd)
    x = x[:, 0]
    for i, block in enumerate(blocks):
        x = block_step(block, x, kv[i], cos, sin, keep, packs)
    return x[:, None]


# -----------------------------------------------------------------------------------------------------------------
# The decoder sample.generate drives


_PACKS = weakref.WeakKeyDictionary()  # model -> its packed weights, kept between answers, dropped with the model


class CpuDecoder:
    """The model's decode interface (extend, text_logits, adapter_catch_up, image_logits: same signatures and results
    as armor.InternVL / armor.Armor's) with decode steps on CPU through the kernels above.
    Whatever else it is asked (a prefill, input images, an adapter catch-up over several columns, many rows, grad
    enabled, a state off the CPU) goes to the model's own method. One per answer (sample.generate makes one per call):
    it repacks the weights that changed when made, and they must not change while it is used."""

    def __init__(self, model):
        self.model, self.config = model, model.config
        self.packs = _PACKS.setdefault(model, {})
        lm, ar = model.language_model, getattr(model, "armor", None)
        self.text_head = (lm.lm_head,) if ar is None else (lm.lm_head, ar.imgbos_head)
        self.blocks = list(lm.model.layers) + ([] if ar is None else list(ar.adapter))
        self.heads = [self.text_head] + ([] if ar is None else [(ar.visual_head,)])
        if next(model.parameters()).device.type == "cpu":
            self.refresh()

    def refresh(self):
        """Pack the weights that changed since the last call (all of them the first time)."""
        refresh(self.packs, linear_groups(self.blocks) + self.heads)

    def _fast(self, t):
        """Whether a decode step on t (the state's cache or a head's input) takes the fast path."""
        return t.device.type == "cpu" and not torch.is_grad_enabled() and bool(self.packs)

    def _embed(self, ids):
        """model.embed(ids) of a decode step's few ids (no pixels), checked as a Python list: no kernel calls."""
        m, c = self.model, self.config
        if ids.numel() > 64 or not hasattr(m, "armor"):
            return m.embed(ids)
        few, V = ids.reshape(-1).tolist(), c.llm.vocab_size
        if c.img_context_id in few:
            return m.embed(ids)  # which refuses <IMG_CONTEXT> without pixels
        if max(few) < V:
            return m.language_model.model.embed_tokens(ids)
        if min(few) >= V:  # image codes and the three specials: the new rows only
            return m.armor.embed_new(ids - V)
        return m.embed(ids)

    def extend(self, state, ids, pixels=None):
        m = self.model
        if ids.shape[1] != 1 or pixels is not None or not self._fast(state.llm.kv):
            return m.extend(state, ids, pixels)
        h = step_blocks(m, m.language_model.model.layers, self._embed(ids), state.length, state.pad, state.llm,
                        self.packs)
        if state.hidden is not None:
            state.hidden.narrow(1, state.length, 1).copy_(h)
        state.length += 1
        return h

    def adapter_catch_up(self, state):
        m, a, b = self.model, state.adapter_length, state.length
        if b - a != 1 or not self._fast(state.adapter.kv):
            return m.adapter_catch_up(state)
        out = step_blocks(m, m.armor.adapter, state.hidden[:, a:b], a, state.pad, state.adapter, self.packs)
        state.adapter_length = b
        return out

    def _head(self, norm, group, h, plain):
        if h.numel() > 64 * h.shape[-1] or not self._fast(h) or group not in self.packs:
            return plain(h)
        return fast_linear(self.packs, group, rms_norm_step(h, norm.weight, norm.eps))

    def text_logits(self, h):
        return self._head(self.model.language_model.model.norm, self.text_head, h, self.model.text_logits)

    def image_logits(self, a):
        ar = self.model.armor
        return self._head(ar.adapter_norm, (ar.visual_head,), a, self.model.image_logits)


def decoder(model):
    """The decode engine for a model (the CPU one; it hands other devices' steps to the model)."""
    return CpuDecoder(model)
