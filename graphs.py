"""
Decode steps as CUDA graphs: the same math as armor.py's cached decoding, laid out so that every step has the same
shapes and needs nothing from the host, so one step of the whole LLM (or of ARMOR's adapter) is captured once and
replayed as a single launch. At a decode step's one token per row the GPU otherwise waits on Python to launch each
of the step's few hundred small kernels.

What differs from armor.py's plain path (which stays the reference, and which these steps are tested against):
- the column a step writes is a device tensor, not a Python int: the new keys and values go in with index_copy_;
- attention reads the whole pre-allocated cache with a mask (columns written so far, minus each row's left
  padding) instead of a slice that grows every step (the layout gpt-fast uses for its compiled decode step);
- the embedding of a step's ids is the plain lookup of Armor.embed without its host-side checks (a decode step never
  holds <IMG_CONTEXT> placeholders).

  engine = GraphDecoder(model)             # per generate() call: graphs belong to one State's caches
  h = engine.extend(state, ids)            # ids (B, 1) on the GPU -> (B, 1, d), like model.extend
  a = engine.adapter_catch_up(state)       # like model.adapter_catch_up

Anything else (a prefill, several columns at once, InternLM2's dynamic RoPE past its trained length) goes through
the model's own methods. graphs=False runs the same static steps eagerly: that is how they are tested on the CPU.
"""

import torch
import torch.nn.functional as F

from armor import Armor, State, rotate_half


def block_step(block, x, cos, sin, k_all, v_all, col, mask):
    """armor.Block.forward for one new column per row: x (B, 1, d); k_all, v_all (B, n_kv, T_max, hd) the layer's
    whole cache, written at column col (a (1,) tensor); mask (B, 1, 1, T_max) the columns each row may read."""
    a, B = block.self_attn, x.shape[0]
    h = block.input_layernorm(x)
    q = a.q_proj(h).view(B, 1, a.nh, a.hd).transpose(1, 2)  # (B, nh, 1, hd)
    k = a.k_proj(h).view(B, 1, a.nkv, a.hd).transpose(1, 2)  # (B, nkv, 1, hd)
    v = a.v_proj(h).view(B, 1, a.nkv, a.hd).transpose(1, 2)
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    q, k = q.to(v.dtype), k.to(v.dtype)  # as Attention.forward: RoPE's tables may promote to fp32
    k_all.index_copy_(2, col, k)
    v_all.index_copy_(2, col, v)
    if a.nkv != a.nh:  # GQA: query head i reads kv head i // g (as Attention.forward)
        k_all = k_all.repeat_interleave(a.nh // a.nkv, dim=1)
        v_all = v_all.repeat_interleave(a.nh // a.nkv, dim=1)
    y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask)
    x = x + a.o_proj(y.transpose(1, 2).reshape(B, 1, a.nh * a.hd))
    return x + block.mlp(block.post_attention_layernorm(x))


class _Step:
    """One static decode step of a stack of blocks over one KV cache, for a fixed set of rows: its inputs live in
    buffers that the caller fills before each run, so the step can be captured once and replayed."""

    def __init__(self, model, blocks, cache, pad, rows, max_len, make_input, use_graph):
        self.model, self.blocks, self.cache = model, blocks, cache
        dev = cache.kv.device
        self.col = torch.zeros(1, dtype=torch.long, device=dev)
        self.pad = pad if pad is not None else torch.zeros(rows, dtype=torch.long, device=dev)
        self.cols = torch.arange(max_len, device=dev)
        self.max_len, self.make_input = max_len, make_input
        self.use_graph, self.graph, self.out = use_graph, None, None

    def _run(self):
        x = self.make_input(self.col)  # (B, 1, d)
        pos = (self.col - self.pad).clamp(min=0)[:, None]  # (B, 1), as InternVL.positions
        cos, sin = self.model.rotary(pos, self.max_len, x.dtype)
        mask = ((self.cols <= self.col) & (self.cols >= self.pad[:, None]))[:, None, None, :]  # (B, 1, 1, T_max)
        for i, block in enumerate(self.blocks):
            x = block_step(block, x, cos, sin, self.cache.k[i], self.cache.v[i], self.col, mask)
        return x

    def __call__(self, col):
        self.col.fill_(col)
        if not self.use_graph:
            return self._run()
        if self.graph is None:
            # Warm-up and capture run the step for real on this column and these ids; they write the same keys
            # and values as the replay below, so the cache ends as one plain step would leave it.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._run()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = self._run()
        self.graph.replay()
        return self.out


class GraphDecoder:
    """model.extend / model.adapter_catch_up for decode steps, through static steps (CUDA graphs on the GPU). One
    per generate() call: a step's graph holds the addresses of one State's caches."""

    def __init__(self, model: Armor, graphs=True):
        self.model, self.graphs = model, graphs
        self.steps = {}

    def _usable(self, state: State):
        c = self.model.config.llm
        T_max = state.llm.kv.shape[4]
        return not torch.is_grad_enabled() and not (c.rope_dynamic_factor and T_max > c.max_position_embeddings)

    def _step(self, kind, state: State):
        key = (kind, id(state))
        if key not in self.steps:
            m, T_max, R = self.model, state.llm.kv.shape[4], state.llm.kv.shape[2]
            if kind == "llm":
                ids = torch.zeros(R, 1, dtype=torch.long, device=state.llm.kv.device)

                def make_input(col):
                    return self.embed(ids)

                step = _Step(m, m.language_model.model.layers, state.llm, state.pad, R, T_max, make_input,
                             self.graphs)
                step.ids = ids
            else:
                def make_input(col):
                    return state.hidden.index_select(1, col)  # the decoder output of the column

                step = _Step(m, m.armor.adapter, state.adapter, state.pad, R, T_max, make_input, self.graphs)
            self.steps[key] = step
        return self.steps[key]

    def embed(self, ids):
        """Armor.embed for decode ids (no image placeholders): original rows below V, the new rows from V on."""
        m, V = self.model, self.model.config.llm.vocab_size
        x = m.language_model.model.embed_tokens(ids.clamp(max=V - 1))
        if not isinstance(m, Armor):
            return x
        return torch.where((ids >= V)[..., None], m.armor.embed_new((ids - V).clamp(min=0)), x)

    def extend(self, state: State, ids, pixels=None):
        if ids.shape[1] != 1 or pixels is not None or state.length == 0 or not self._usable(state):
            return self.model.extend(state, ids, pixels)
        step = self._step("llm", state)
        step.ids.copy_(ids)
        h = step(state.length)
        if state.hidden is not None:
            state.hidden.narrow(1, state.length, 1).copy_(h)
        state.length += 1
        return h

    def adapter_catch_up(self, state: State):
        if state.length - state.adapter_length != 1 or state.adapter_length == 0 or not self._usable(state):
            return self.model.adapter_catch_up(state)
        out = self._step("adapter", state)(state.adapter_length)
        state.adapter_length += 1
        return out

    # the heads as the model runs them (sample.generate asks its decoder for them too: engine.py's has its own)
    def text_logits(self, h):
        return self.model.text_logits(h)

    def image_logits(self, a):
        return self.model.image_logits(a)
