"""
The decode engine: ARMOR's generation steps made fast, beside the readable model in armor.py. On a CPU the steps go
through packed weights and fewer kernel calls (CpuDecoder); on a GPU sample.generate's whole decode step (LLM, heads,
sampling, the next ids written on the device) is one replayed CUDA graph (GraphDecoder, in the second half of this
file).

  decoder = engine.decoder(model)    # what sample.generate uses (generate(..., decoder=model) goes without)
  state = model.new_state(B, max_len, pad)
  h = decoder.extend(state, ids)     # and decoder.text_logits(h), .adapter_catch_up(state), .image_logits(a)
  python -m pytest tests/test_engine.py tests/test_engine_graphs.py   # token for token against the plain path
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

from armor import Armor, State, make_ctx

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
    one per module (a big group, which then needs no stacked copy). bf16 weights on the CPU (where oneDNN has bf16
    kernels) are stacked and prepacked for oneDNN (a copy in its own layout); the others (fp32, or on a GPU) go
    through F.linear."""
    ws = [m.weight.detach() for m in linears]
    bs = [None if m.bias is None else m.bias.detach() for m in linears]
    cat = lambda ts: None if ts[0] is None else ts[0] if len(ts) == 1 else torch.cat(ts)
    if ws[0].dtype == torch.bfloat16 and _ONEDNN_BF16 and ws[0].device.type == "cpu":
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

# ---------------------------------------------------------------------------------------------------------------------
# On a GPU: decode steps as CUDA graphs
#
# sample.generate's decode step is one function of device tensors: the LLM on one column of every row, the head (or
# heads) the rows' modes call for, the sampling, and the sampled ids written into the next column of the batch's id
# buffer (sample._Batch.decode_step). GraphDecoder.run captures it once per kind of step (text, image, both, neither)
# and replays it as a single launch: at one token per row the GPU otherwise waits on Python to launch each of the
# step's few hundred small kernels. The ids never pass through the host on the way in; the host reads them back only
# where the grammar needs them (sample.py).
#
# What differs from armor.py's plain path inside a step (which stays the reference, and which these steps are tested
# against):
# - the column a step writes is a device tensor, not a Python int: the new keys and values go in with index_copy_;
# - attention reads the whole pre-allocated cache with a mask (columns written so far, minus each row's left
#   padding) instead of a slice that grows every step (the layout gpt-fast uses for its compiled decode step), and
#   GQA goes without repeated keys (as block_step above);
# - fewer kernel calls per layer (at one token per row a replayed step's time is mostly its kernels' launch latency):
#   q|k|v through one stacked weight (a copy, where small), RoPE on q and k together, one copy for the new keys and
#   values, the attention mask made once per step;
# - the embedding of a step's ids is the plain lookup of Armor.embed without its host-side checks (a decode step never
#   holds <IMG_CONTEXT> placeholders).
#
#   dec = GraphDecoder(model)                # per generate() call: graphs hold the addresses of one batch's tensors
#   dec.run(key, step, col, state)           # step() replayed; inside it dec.extend / dec.adapter_catch_up of one
#                                            # column are static steps at column col (a (1,) device tensor)
#
# Outside run (the prefill, catch-ups over several columns) and where static steps do not apply (InternLM2's dynamic
# RoPE past its trained length) the calls go to the model's own methods. graphs=False runs the same static steps
# eagerly: that is how they are tested on the CPU.


def static_block_step(block, x, cos, sin, kv, col, mask, packs):
    """armor.Block.forward for one new column per row, with few kernel calls (at one token per row a GPU spends a
    step's time launching small kernels, a CPU calling them): x (B, d); cos, sin (B, 1, hd) in x's dtype, sin's first
    half negated (see _Stack); kv (2, B, n_kv, T_max, hd) the layer's whole cache of keys and values, written at
    column col (a (1,) tensor); mask (B, 1, 1, T_max) additive, 0 at the columns each row may read and -inf elsewhere
    (what SDPA makes of a boolean mask, made once per step instead of once per layer). As block_step above: q|k|v in
    one matmul (fast_linear), RoPE on q and k together, the new keys and values in one copy, GQA folded into the
    query axis."""
    a, m = block.self_attn, block.mlp
    B, nh, nkv, hd = x.shape[0], a.nh, a.nkv, a.hd
    qkv = fast_linear(packs, (a.q_proj, a.k_proj, a.v_proj), block.input_layernorm(x)).view(B, nh + 2 * nkv, hd)
    qk = qkv[:, :nh + nkv]
    # RoPE on q and k, written back in place: roll(x) * [-sin, sin] == rotate_half(x) * sin, exactly
    torch.add(qk * cos, qk.roll(hd // 2, -1) * sin, out=qk)
    kv.index_copy_(3, col, qkv[:, nh:].view(B, 2, nkv, 1, hd).transpose(0, 1))  # (2, B, nkv, 1, hd): keys, values
    # GQA without repeating the cache: the g query heads that read one kv head (head i reads kv head i // g) go in as
    # g queries of one sequence; the mask, not causality, says what each sees
    q = qkv[:, :nh].view(B, nkv, nh // nkv, hd)  # (B, nkv, g, hd)
    y = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=mask).view(B, nh * hd)
    x = _plus_linear(x, a.o_proj, y)
    h = block.post_attention_layernorm(x)
    return _plus_linear(x, m.down_proj, F.silu(m.gate_proj(h)) * m.up_proj(h))


def _plus_linear(x, linear, y):
    """x + linear(y), the residual added in the matmul's own epilogue (addmm: one kernel where there were two)."""
    if linear.bias is not None:
        return x + linear(y)
    return torch.addmm(x, y, linear.weight.t())


class _Stack:
    """A static decode step of a stack of blocks (the LLM's layers or ARMOR's adapter) over one KV cache, for a
    fixed set of rows: x (B, 1, d) at the column held in a device tensor -> (B, 1, d), as model.run_stack computes it
    (packs: the stacked q|k|v weights, engine.refresh).
    The RoPE tables of every column are made once here (in the cache's dtype, as the model's plain path uses them),
    so a captured step holds tensors that outlive it."""

    def __init__(self, model, blocks, cache, pad, rows, packs):
        dev, T_max = cache.kv.device, cache.kv.shape[4]
        self.blocks, self.cache, self.packs = blocks, cache, packs
        self.pad = pad if pad is not None else torch.zeros(rows, dtype=torch.long, device=dev)
        # the mask's rows padded to a multiple of 16 columns: SDPA's CUDA kernels read an attention bias whose rows
        # are aligned in place, and copy one that is not into a padded buffer (a kernel per layer)
        self.cols = torch.arange(-(-T_max // 16) * 16, device=dev)
        self.T_max = T_max
        cos, sin = model.rotary(self.cols[None, :T_max], T_max, cache.kv.dtype)  # (1, 1, T_max, hd)
        self.cos, self.sin = cos[0, 0], sin[0, 0] * _rope_sign(sin)  # [-sin, sin] on the two halves
        self.no = torch.tensor(float("-inf"), dtype=cache.kv.dtype, device=dev)
        self.yes = torch.zeros((), dtype=cache.kv.dtype, device=dev)

    def __call__(self, x, col):
        pos = (col - self.pad).clamp(min=0)[:, None]  # (B, 1), as InternVL.positions
        cos, sin = self.cos[pos], self.sin[pos]  # (B, 1, hd)
        keep = (self.cols <= col) & (self.cols >= self.pad[:, None])  # (B, T_max rounded up)
        mask = torch.where(keep, self.yes, self.no)[:, None, None, :self.T_max]  # (B, 1, 1, T_max)
        x = x[:, 0]
        for i, block in enumerate(self.blocks):
            x = static_block_step(block, x, cos, sin, self.cache.kv[i], col, mask, self.packs)
        return x[:, None]


class GraphDecoder:
    """The model's decode interface (extend, adapter_catch_up, text_logits, image_logits) plus `run`, which replays a
    whole decode step as a CUDA graph. One per generate() call: a graph holds the addresses of one batch's tensors."""

    def __init__(self, model: Armor, graphs=True):
        self.model, self.graphs = model, graphs
        self.col = None  # inside run: the (1,) device tensor holding the column the step works on
        self.stacks, self.captured = {}, {}
        # q|k|v stacked into one weight per layer (a copy, kept with the model's other packs between answers; big
        # groups stay apart and their outputs are joined)
        ar = getattr(model, "armor", None)
        blocks = list(model.language_model.model.layers) + ([] if ar is None else list(ar.adapter))
        self.packs = _PACKS.setdefault(model, {})
        refresh(self.packs, [(b.self_attn.q_proj, b.self_attn.k_proj, b.self_attn.v_proj) for b in blocks])

    def _usable(self, state: State):
        c = self.model.config.llm
        T_max = state.llm.kv.shape[4]
        return not torch.is_grad_enabled() and not (c.rope_dynamic_factor and T_max > c.max_position_embeddings)

    def run(self, key, step, col, state: State):
        """step(): one decode step, every tensor it reads and writes allocated outside it and kept at one address
        (its ids come from a buffer, its results go to one), the column it works on in col (a (1,) tensor the caller
        fills). The first call per key captures it as a CUDA graph; every call replays that graph."""
        if not self._usable(state):
            return step()  # the model's own methods, eagerly
        self.col = col
        try:
            if not self.graphs:
                return step()
            if key not in self.captured:
                # A warm-up on a side stream first (as torch.cuda.graphs' docs ask: lazy inits, cuBLAS workspaces),
                # then the capture, which runs nothing; the replay below runs the step. The warm-up writes what the
                # replay writes (the same cache column and next ids, from the same inputs), so it leaves no trace.
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    step()
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    step()
                self.captured[key] = graph
            self.captured[key].replay()
        finally:
            self.col = None

    def _stack(self, kind, state: State):
        key = (kind, id(state))
        if key not in self.stacks:
            m, rows = self.model, state.llm.kv.shape[2]
            blocks, cache = ((m.language_model.model.layers, state.llm) if kind == "llm" else
                             (m.armor.adapter, state.adapter))
            self.stacks[key] = _Stack(m, blocks, cache, state.pad, rows, self.packs)
        return self.stacks[key]

    def embed(self, ids):
        """Armor.embed for decode ids (no image placeholders): original rows below V, the new rows from V on."""
        m, V = self.model, self.model.config.llm.vocab_size
        x = m.language_model.model.embed_tokens(ids.clamp(max=V - 1))
        if not isinstance(m, Armor):
            return x
        return torch.where((ids >= V)[..., None], m.armor.embed_new((ids - V).clamp(min=0)), x)

    def extend(self, state: State, ids, pixels=None):
        """model.extend; inside run, one column (ids (B, 1)) as a static step at column self.col."""
        if self.col is None or ids.shape[1] != 1 or pixels is not None:
            return self.model.extend(state, ids, pixels)
        h = self._stack("llm", state)(self.embed(ids), self.col)
        if state.hidden is not None:
            state.hidden.index_copy_(1, self.col, h)
        state.length += 1  # for the eager run; after a replay the caller sets the lengths
        return h

    def adapter_catch_up(self, state: State):
        """model.adapter_catch_up; inside run, the adapter on column self.col alone (the caller caught it up to
        there) as a static step."""
        if self.col is None:
            return self.model.adapter_catch_up(state)
        out = self._stack("adapter", state)(state.hidden.index_select(1, self.col), self.col)
        state.adapter_length += 1
        return out

    # the heads as the model runs them (inside a captured step they are captured with it)
    def text_logits(self, h):
        return self.model.text_logits(h)

    def image_logits(self, a):
        return self.model.image_logits(a)


def decoder(model):
    """The decode engine for a model: its steps as CUDA graphs on a GPU, the CPU path elsewhere."""
    on_gpu = next(model.parameters()).device.type == "cuda"
    return GraphDecoder(model) if on_gpu else CpuDecoder(model)
