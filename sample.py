"""
Sample from ARMOR: one model answers with text, an image, or text then image, choosing by itself (forward switching,
paper Section 3.2, Table 1). Text streams to the terminal; each image is decoded by the VQGAN and saved as a PNG as
soon as its span ends; the whole answer is written as an HTML page (text and images in order).

  python sample.py "draw an aurora"                              # the built-in toy checkpoint (toy/armor)
  python sample.py --model CKPT "what is the capital of France?"  # an ARMOR checkpoint directory
  python sample.py --model CKPT --base InternVL2_5-1B --vqgan chameleon/tokenizer "draw a red apple"
  python sample.py --image cat.png "what is this? then draw it in winter"   # ti2t / ti2ti (--image repeatable)
  python sample.py --n 4 --seed 1 --cfg 3 "draw a sunset over the sea"      # 4 answers in one batch
  python sample.py --greedy "a circle to the left of a square"              # greedy text and codes
  python sample.py --chat                                                   # multi-turn session on stdin
  python sample.py --model moved/ckpt --base InternVL2_5-1B --vqgan chameleon/tokenizer "..."  # a moved checkpoint
  python -m pytest tests/test_sample.py                                     # the checks listed in that file
  python -m toy.eval --cfg-sweep 1,1.5,2,3,4,6 --seed 99   # the toy evaluation sweep DEFAULT_CFG below comes from

Generation (`generate`, also what toy/eval.py calls): a batch of left-padded prompts x n answers, KV caches for the LLM
and the adapter, the adapter's cache filled lazily in one batched catch-up when an image starts (a text-only answer
never runs it). Inside an image span the visual head may only emit codes, exactly h*w of them, then <imgend> is
forced; <imgbos> is masked when the remaining budget cannot hold a whole image. Classifier-free guidance on image
tokens: the unconditional rows (data.make_unconditional, the form training's condition dropout uses) sit in the same
batch, are fed the same sampled tokens, and are themselves caught up lazily when their row's batch starts an image.
A decode step is one function of device tensors (_Batch.decode_step: the LLM on one column, the heads the rows' modes
call for, sampling, and the sampled ids written into the next column of the id buffer). On a GPU engine.py replays
it as a CUDA graph, and the host reads ids back only where the grammar needs them (each text step; an image's codes
once, at its end); on CPU it runs through engine.py's kernels (prepacked / stacked weights, fewer kernel calls).
decoder=model takes the model's plain path, to the same tokens; bench.py measures both against transformers'
generate. At the end the CLI prints time to first token, text and image tokens/s, seconds per image and peak memory
(model loading is reported apart).

Checkpoints load through load_armor (train.py --init too): the tokenizer comes from the checkpoint directory when it
holds tokenizer files (tokenizer.json, vocab.json + merges.txt, or tokenizer.model), else from the base directory its
config.json names; a path config.json names that is not there is an error naming it (pass --base / --vqgan). Answers
with room for an image need a VQGAN (the checkpoint's or --vqgan). Every input is checked before the model loads, and
a bad one ends in one line on stderr, `error: ...`, naming the file or value: exit code 2 for the command line (a
flag, a path given on it, the prompt: too long for the context, <image> tags without --image files; no VQGAN), 1 for
a file that holds something else than expected (config.json, tokenizer, VQGAN, weights, an input image). Each PNG
and HTML page is written to a temporary name and renamed, and a run first removes the earlier page and PNGs of the
names it writes (answer.html, answer_image0.png, ...), so a page never sits beside another run's images. In --chat
every turn answers the whole conversation so far, generated images carried as their codes: the same answer as
generate() on that conversation.
"""

import argparse
import html
import json
import os
import re
import resource
import sys
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch

import engine
from armor import ArmorConfig, CheckpointError, State
from data import GEN_IMAGE, encode_conversation, make_unconditional

DEFAULT_TOY = Path(__file__).resolve().parent / "toy" / "armor"
# The guidance scale with the best GenEval-style overall in the toy evaluation's sweep (README table; the sweep uses
# seed 99, the reported evaluation seed 1234): `python -m toy.eval --cfg-sweep 1,1.5,2,3,4,6 --seed 99`.
DEFAULT_CFG = 1.5


@dataclass
class Sampling:
    """Sampling settings of one modality. temperature <= 0 is greedy; top_k 0 and top_p 1 switch those filters off."""
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0


TEXT_DEFAULT = Sampling(0.7, 0, 0.9)
IMAGE_DEFAULT = Sampling(1.0, 0, 1.0)


@dataclass
class Answer:
    segments: list  # in order: str (text) or LongTensor (h, w) (a code grid)
    ids: list  # the generated tokens (extended vocabulary), <|im_end|> included when reached
    finished: bool  # True: ended with <|im_end|>; False: ran out of budget
    conversation: int  # index of the conversation it answers

    @property
    def text(self):
        return "".join(s if isinstance(s, str) else GEN_IMAGE for s in self.segments)

    @property
    def images(self):
        return [s for s in self.segments if not isinstance(s, str)]

    def message(self):
        """The answer as an assistant turn for the next round of a chat (data.encode_conversation reads `codes`)."""
        return {"role": "assistant", "content": self.text, "codes": self.images}


def sample_token(logits, s: Sampling, gen=None, noise=None):
    """logits (N, C) float -> (N,) long: greedy, or temperature + top-k + top-p (nucleus) sampling.
    The draw is torch.multinomial's for one sample, written out: argmax(p / q) with q ~ Exp(1) picks index i with
    probability p_i (the Gumbel-max trick, exponentiated), with q drawn from gen here or passed in as noise. Written
    out because multinomial checks its input on the host, a sync that a CUDA graph cannot hold; so the decode step
    (captured on CUDA) takes noise drawn before it runs, and the same generator gives multinomial's very tokens."""
    if s.temperature <= 0:
        return logits.argmax(-1)
    logits = logits / s.temperature
    if 0 < s.top_k < logits.shape[-1]:
        kth = torch.topk(logits, s.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        srt, idx = logits.sort(-1, descending=True)
        p = srt.softmax(-1)
        drop = p.cumsum(-1) - p > s.top_p  # keep the shortest prefix whose mass reaches top_p (the top token always)
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, srt.masked_fill(drop, float("-inf")))
    p = logits.softmax(-1)
    q = noise if noise is not None else torch.empty_like(p).exponential_(generator=gen)
    return (p / q).argmax(-1)


def _rows(state: State, rows: slice) -> State:
    """A State over some rows of another, sharing its tensors (writes go through): the conditional or the
    unconditional half of a guided batch, which advance separately while the answer is text."""
    pad = None if state.pad is None else state.pad[rows]
    return State(state.llm.rows(rows), pad, state.hidden[rows], state.adapter.rows(rows), state.length,
                 state.adapter_length)


# what a row's next token is: from the text head, a code, the forced <imgend>, or none (the answer is done)
TEXT, IMAGE, IMGEND, DONE = 0, 1, 2, 3


@dataclass
class _Row:
    """One answer being generated: its tokens, its segments so far, and where it stands in the grammar
    (text ... <imgbos> h*w codes <imgend> text ... <|im_end|>)."""
    mode: int = TEXT
    done: bool = False
    ids: list = field(default_factory=list)  # every generated id (an image's codes read in when the image ends)
    segments: list = field(default_factory=list)  # finished segments: str, or a code grid (h, w)
    text_ids: list = field(default_factory=list)  # the current text segment's ids
    shown: int = 0  # how many of its characters were streamed (on_text)
    window: int = 0  # text_ids[window:] is what the next piece is decoded from (see _stream)
    sent: int = 0  # text_ids[:sent] are streamed
    codes: int = 0  # codes of the current image so far


def _prompts(model, tok, conversations, images, n, T, guided):
    """The prompts by cache column, left-padded to the longest (L columns), n rows per conversation; with guidance
    the unconditional rows B..2B-1 mirror the conditional ones (their generated columns are the conditional rows'
    ids, written into both halves by each step). -> (seq (G, L + T) ids, pad (B,) left padding, pixels or None, L)."""
    c, dev = model.config, next(model.parameters()).device
    images = images or [[] for _ in conversations]
    if len(images) != len(conversations):
        raise ValueError(f"{len(conversations)} conversations but {len(images)} image lists")
    encs = []
    for msgs, ims in zip(conversations, images):
        codes = [g for m in msgs if m["role"] == "assistant" for g in m.get("codes", [])]
        encs.append(encode_conversation(tok, c, msgs, ims, codes, add_generation_prompt=True))
    rows = [e for e in encs for _ in range(n)]  # answer r answers conversation r // n
    B, L = len(rows), max(len(e.ids) for e in rows)
    seq = torch.full((2 * B if guided else B, L + T), tok.pad, dtype=torch.long, device=dev)
    for r, e in enumerate(rows):
        ids = torch.tensor(e.ids, device=dev)
        seq[r, L - len(ids):L] = ids
        if guided:
            seq[B + r, L - len(ids):L] = make_unconditional(ids, torch.tensor(e.user, device=dev), c)
    pad = torch.tensor([L - len(e.ids) for e in rows], device=dev)
    pixels = [e.pixels for e in rows if e.pixels is not None]
    return seq, pad, torch.cat(pixels).to(dev) if pixels else None, L


def _text_biases(model, tok):
    """Text head masks (added to the logits over [0, V], V = <imgbos>): <IMG_CONTEXT> only ever stands for
    input-image features, and ids past the tokenizer's vocabulary (padded embedding rows) have no text. The second
    also masks <imgbos>, for when the budget left cannot hold a whole image."""
    c, dev = model.config, next(model.parameters()).device
    V = c.llm.vocab_size
    text_bias = torch.zeros(V + 1, device=dev)
    text_bias[c.img_context_id] = float("-inf")
    text_bias[len(tok):V] = float("-inf")
    no_room = text_bias.clone()
    no_room[V] = float("-inf")
    return text_bias, no_room


class _Batch:
    """The KV caches of the B answer rows (and, with guidance, of their B unconditional twins), the ids of every row
    by column (seq, on the model's device), and the decode step.

    A step reads column col of seq and writes its sampled ids into column col + 1 (decode_step), on the device: on
    CUDA the decoder replays it as a CUDA graph, and the host copies no ids in. The unconditional rows only matter to
    the visual head, so while every row writes text they stand still (their missed columns are already in seq, the
    conditional rows' ids) and catch up in one call when an image starts; the adapter's cache is filled the same way,
    so a text-only answer never runs the adapter."""

    def __init__(self, model, tok, seq, pad, guided, decoder, cfg, text: Sampling, image: Sampling, gen):
        # decoder: the model itself, engine.CpuDecoder, or engine.GraphDecoder (which captures decode_step)
        c, dev = model.config, seq.device
        self.model, self.seq, self.guided, self.decoder, self.dev = model, seq, guided, decoder, dev
        self.cfg, self.text, self.image, self.gen, self.hw = cfg, text, image, gen, c.image_grid ** 2
        self.B, G = len(pad), seq.shape[0]
        self.state = model.new_state(G, seq.shape[1], pad=pad.repeat(2) if guided else pad)
        self.cond = _rows(self.state, slice(0, self.B)) if guided else self.state
        self.uncond = _rows(self.state, slice(self.B, G)) if guided else None
        # what a step reads besides seq and the caches: device tensors at fixed addresses, changed between steps
        self.col = torch.zeros(1, dtype=torch.long, device=dev)  # the column the step reads
        self.modes = None
        self.rowinfo = torch.zeros(2, self.B, dtype=torch.long, device=dev)  # each row's mode, and its forced id
        self.mode, self.forced_ids = self.rowinfo  # views, made once (as are the next two)
        self.rows_of = {R: seq[:R] for R in (self.B, G)}  # the ids of the first R rows
        self.halves = seq.view(G // self.B, self.B, -1)  # (1 or 2, B, L + T): a guided batch's halves
        self.biases = _text_biases(model, tok)
        self.bias = self.biases[0].clone()  # text head bias: biases[1] once the budget cannot hold an image
        self.short = False
        V, K, B = c.llm.vocab_size, c.num_image_codes, self.B
        self.noise = {h: torch.empty(B, n, device=dev) if s.temperature > 0 else None
                      for h, s, n in (("text", text, V + 1), ("image", image, K))}  # sample_token's Exp(1) draws
        self.index = {}  # device index tensors of row subsets, by rows
        self.forced = [tok.pad, tok.pad, c.imgend_id, tok.pad]  # the id a row of each mode gets without a head
        # ids read back through pinned memory on CUDA: one copy, then a wait for it alone
        self.pinned = (torch.empty(B * max(self.hw, 1), dtype=torch.long, pin_memory=True)
                       if dev.type == "cuda" else None)

    def step(self, col, modes, short):
        """One decode step: column col through the LLM, and the next ids of the rows, by their modes (TEXT, IMAGE,
        IMGEND, DONE), into column col + 1. short: the budget left cannot hold a whole image (<imgbos> masked)."""
        B, state, cond, uncond = self.B, self.state, self.cond, self.uncond
        text, image = TEXT in modes, IMAGE in modes
        same = len(set(modes)) == 1  # every row takes the one head's id (or every row a forced one)
        if modes != self.modes:  # rows change mode a few times per image: then the device learns
            info = torch.tensor([modes, [self.forced[m] for m in modes]])
            self.rowinfo.copy_(info.pin_memory() if self.pinned is not None else info, non_blocking=True)
            self.modes = modes
        if short and not self.short:
            self.bias.copy_(self.biases[1])
            self.short = True
        if image:  # the visual head reads the adapter, over every row's twin with guidance: both catch up first
            if self.guided and uncond.length < col:
                self.model.extend(uncond, self.seq[B:, uncond.length:col])  # the columns it stood still for
            state.length = col
            if state.adapter_length < col:
                self.model.adapter_catch_up(state)
        if text:
            self._draw("text", [r for r, m in enumerate(modes) if m == TEXT])
        if image:
            self._draw("image", [r for r, m in enumerate(modes) if m == IMAGE])
        self.col.fill_(col)
        run = getattr(self.decoder, "run", None)  # engine.GraphDecoder replays the step as a CUDA graph
        if run is None:
            self.decode_step(text, image, same)
        else:
            run((text, image, same), lambda: self.decode_step(text, image, same), self.col, state)
        # the lengths the step's extend calls advance (a replayed graph runs no Python)
        cond.length = col + 1
        if image:
            state.length = state.adapter_length = col + 1
            if self.guided:
                uncond.length = col + 1

    def _draw(self, head, rows):
        """The Exp(1) noise of a sampling head, drawn for its rows as sample_token would draw it for them alone."""
        noise = self.noise[head]
        if noise is None:  # greedy
            return
        if len(rows) == self.B:
            noise.exponential_(generator=self.gen)
            return
        key = tuple(rows)
        if key not in self.index:
            self.index[key] = torch.tensor(rows, device=self.dev)
        q = torch.empty(len(rows), noise.shape[1], device=self.dev).exponential_(generator=self.gen)
        noise.index_copy_(0, self.index[key], q)

    def decode_step(self, text, image, same):
        """The step itself, device tensors only (what engine.GraphDecoder captures): the LLM on column self.col of
        the rows that need it, the text head if some row writes text, the adapter and the visual head if some row
        draws, each row's next id chosen by its mode (same: all rows in one mode), written into column
        self.col + 1."""
        B, d, c = self.B, self.decoder, self.model.config
        st = self.state if image and self.guided else self.cond  # the unconditional rows step only to draw
        h = d.extend(st, self.rows_of[st.llm.kv.shape[2]].index_select(1, self.col))[:B, 0]  # (B, d)
        nxt = self.forced_ids  # <imgend> in IMGEND rows, padding in finished ones
        if text:  # text head over [0, V] (V = <imgbos>)
            logits = d.text_logits(h) + self.bias  # float32, as bias is
            t = sample_token(logits, self.text, noise=self.noise["text"])
            nxt = t if same else torch.where(self.mode == TEXT, t, nxt)
        if image:  # the visual head: <imgpad> never and <imgend> only when forced, so only the codes compete
            logits = d.image_logits(d.adapter_catch_up(self.state)[:, -1])[:, 2:].float()  # (G, K)
            if self.guided:  # classifier-free guidance: u + cfg * (c - u)
                logits = logits[B:] + self.cfg * (logits[:B] - logits[B:])
            code = sample_token(logits, self.image, noise=self.noise["image"]) + c.code_offset
            nxt = code if same else torch.where(self.mode == IMAGE, code, nxt)
        # both halves of a guided batch: the unconditional rows read the same ids when they catch up
        self.halves.index_copy_(2, self.col + 1, nxt.view(1, B, 1).expand(len(self.halves), B, 1))

    def read(self, a, b):
        """The conditional rows' ids of columns [a, b) -> lists (B of b - a): the host waits for the steps that
        write them, and only for those."""
        ids = self.seq[:self.B, a:b]
        if self.pinned is None:
            return ids.tolist()
        out = self.pinned[:ids.numel()].view(ids.shape)
        out.copy_(ids, non_blocking=True)
        torch.cuda.current_stream(self.dev).synchronize()
        return out.tolist()


def _advance(r, row: _Row, t, model, tok, budget, ignore_eos, on_text, on_image):
    """Append token t to row r and move it along the grammar: a text piece streamed, an image started or finished,
    the answer done at <|im_end|> or at the end of its budget. Inside an image t is None (a code the host has not
    read); its codes are in row.ids by the time its <imgend> comes."""
    c = model.config
    row.ids.append(t)
    if row.mode == TEXT:
        if t == tok.im_end and not ignore_eos:
            row.done = True
        elif t == c.imgbos_id:
            _end_text(r, row, tok, on_text)
            row.mode, row.codes = IMAGE, 0
        else:
            row.text_ids.append(t)
            if on_text is not None:
                _stream(r, row, tok, on_text)
    elif row.mode == IMAGE:
        row.codes += 1
        if row.codes == c.image_grid ** 2:
            row.mode = IMGEND
    else:  # the forced <imgend>: the image is complete
        hw = c.image_grid ** 2
        grid = torch.tensor(row.ids[-hw - 1:-1]).view(c.image_grid, c.image_grid) - c.code_offset
        row.segments.append(grid)
        if on_image is not None:
            on_image(r, grid)
        row.mode = TEXT
    if len(row.ids) >= budget:
        row.done = True
    if row.done:
        _end_text(r, row, tok, on_text)


def _stream(r, row: _Row, tok, on_text):
    """Stream what the text's newest ids add, decoding a short window instead of the whole text each time: the ids
    not yet streamed, behind the last streamed piece's ids (context that a tokenizer's decoding of spaces may need).
    A piece that ends in U+FFFD waits: its last ids are part of a multi-byte character whose rest is still to come."""
    ids = row.text_ids
    head, s = tok.decode(ids[row.window:row.sent]), tok.decode(ids[row.window:])
    if s.endswith("\ufffd") or not s.startswith(head):
        return
    if len(s) > len(head):
        on_text(r, s[len(head):])
        row.shown += len(s) - len(head)
    row.window, row.sent = row.sent, len(ids)


def _end_text(r, row: _Row, tok, on_text):
    """Close the current text segment (decoded whole, once): stream what is left of it, keep it if not empty."""
    s = tok.decode(row.text_ids)
    if on_text is not None and len(s) > row.shown:
        on_text(r, s[row.shown:])
    if s:
        row.segments.append(s)
    row.text_ids, row.shown, row.window, row.sent = [], 0, 0, 0


@torch.no_grad()
def generate(model, tok, conversations, images=None, n=1, max_new_tokens=512, text=TEXT_DEFAULT,
             image=IMAGE_DEFAULT, cfg=1.0, seed=0, on_text=None, on_image=None, ignore_eos=False, stats=None,
             decoder=None):
    """Answer a batch of conversations, n answers each, in one batch -> list of Answer (conversation-major).

    conversations: lists of {"role": "user" | "assistant", "content": str}; user contents may hold `<image>`
      placeholders (one per input image, else the images go in front of the first turn); assistant contents hold
      earlier generated images as `<gen_image>` with their code grids in the message's "codes" list.
    images: per conversation, a list of input images (PIL or paths), or None.
    text, image: Sampling settings of the two heads (temperature 0 = greedy).
    cfg: classifier-free guidance scale on image tokens (1 = none): logits = u + cfg * (c - u).
    on_text(row, piece): streamed text; on_image(row, codes (h, w)): called as soon as an image span ends.
    ignore_eos: do not stop at <|im_end|> (benchmarks: a fixed number of tokens).
    stats: a dict filled with timings and token counts (see print_stats).
    decoder: what runs the decode steps (extend, adapter_catch_up, text_logits, image_logits; and run, where it
      replays them as CUDA graphs): None picks engine.GraphDecoder on CUDA and engine.CpuDecoder elsewhere; tests
      pass the model (the reference), engine.decoder(model) or engine.GraphDecoder(model, graphs=False).
    """
    c, dev = model.config, next(model.parameters()).device
    hw = c.image_grid ** 2
    t0 = time.perf_counter()
    guided = cfg != 1.0
    seq, pad, pixels, L = _prompts(model, tok, conversations, images, n, max_new_tokens, guided)
    if decoder is None:  # CUDA graphs or CPU kernels where a step's kernel calls cost more than its work
        decoder = engine.decoder(model)
    gen = torch.Generator(device=dev).manual_seed(seed)
    batch = _Batch(model, tok, seq, pad, guided, decoder, cfg, text, image, gen)
    B = batch.B

    model.extend(batch.cond, seq[:B, :L - 1], pixels)  # prefill: every prompt column but the last (the first step's)
    t_prefill = time.perf_counter()
    rows = [_Row() for _ in range(B)]
    t_first, n_text, n_img = None, 0, 0
    t_text = t_img = 0.0  # decode time of text steps / of steps that make image tokens, and their tokens
    k_text = k_img = 0
    for step in range(max_new_tokens):
        ts = time.perf_counter()
        col = L - 1 + step  # the step reads column col and samples column col + 1
        modes = [DONE if row.done else row.mode for row in rows]
        # <imgbos> only where h*w codes and <imgend> still fit (every live row has made `step` tokens)
        batch.step(col, modes, short=max_new_tokens - step < hw + 2)
        # The host reads ids only where the grammar needs them: each step some row writes text (did it open an
        # image? end?), and an image's codes when it ends, in one copy. Inside an image it knows what comes (h*w
        # codes, then <imgend>) and does not wait for the GPU.
        ids = batch.read(col + 1, col + 2) if TEXT in modes else None
        codes = batch.read(col + 1 - hw, col + 1) if IMGEND in modes else None
        # a step that makes image tokens counts as image time, with every token it makes
        drew = IMAGE in modes or IMGEND in modes
        made = sum(m != DONE for m in modes)
        for r, row in enumerate(rows):
            if row.done:
                continue
            if row.mode == IMGEND:
                row.ids[-hw:] = codes[r]
            t = ids[r][0] if row.mode == TEXT else c.imgend_id if row.mode == IMGEND else None
            n_text, n_img = n_text + (row.mode == TEXT), n_img + (row.mode != TEXT)
            _advance(r, row, t, model, tok, max_new_tokens, ignore_eos, on_text, on_image)
        if t_first is None:
            t_first = time.perf_counter()
        if drew:
            t_img, k_img = t_img + time.perf_counter() - ts, k_img + made
        else:
            t_text, k_text = t_text + time.perf_counter() - ts, k_text + made
        if all(row.done for row in rows):
            break

    if stats is not None:
        if dev.type == "cuda":
            peak = torch.cuda.max_memory_allocated(dev)
        else:  # the process's peak resident set (Linux reports KiB)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        n_images = sum(not isinstance(s, str) for row in rows for s in row.segments)
        stats.update(prefill_s=t_prefill - t0, ttft_s=(t_first or time.perf_counter()) - t0, text_tokens=n_text,
                     image_tokens=n_img, images=n_images, text_step_s=t_text, text_step_tokens=k_text,
                     image_step_s=t_img, image_step_tokens=k_img, peak_bytes=peak, total_s=time.perf_counter() - t0,
                     rows=B, guided_rows=seq.shape[0] - B)
    return [Answer(row.segments, row.ids, bool(row.ids) and row.ids[-1] == tok.im_end and not ignore_eos, r // n)
            for r, row in enumerate(rows)]


def print_stats(s, decode_s=None):
    """One line of honest speed numbers. Step rates: every token made in the steps of that kind, so a
    batch that draws while another row writes counts those text tokens in the image steps."""
    rate = lambda k, t: f"{k / t:,.1f} tok/s" if t > 0 else "-"
    parts = [f"time to first token {s['ttft_s']:.2f} s (prefill {s['prefill_s']:.2f} s)",
             f"text {rate(s['text_step_tokens'], s['text_step_s'])} ({s['text_tokens']} tokens)",
             f"image {rate(s['image_step_tokens'], s['image_step_s'])} ({s['image_tokens']} tokens)"]
    if s["images"]:
        per = s["image_step_s"] / s["images"]
        parts.append(f"{per:.2f} s per image" + (f" + {decode_s / s['images']:.2f} s VQGAN decode" if decode_s else ""))
    parts.append(f"peak memory {s['peak_bytes'] / 2 ** 30:.2f} GiB")
    print(" | ".join(parts), file=sys.stderr)


# -----------------------------------------------------------------------------------------------------------------
# Loading: an ARMOR checkpoint directory = config.json {"format": "armor", "base": ..., "vqgan": ..., "armor": {...}}
# + model.safetensors (+ the tokenizer's files when whole, or as train.py copies them). Recorded paths are absolute or
# relative to the checkpoint directory; --base / --vqgan override them (relative to the working directory).
# read_checkpoint is cheap (config.json and file checks), so the CLI runs it, and every other input check, before the
# slow model load. load_armor is the one loader of sample.py and train.py --init.


class UsageError(ValueError):
    """The command line cannot work as given (a flag, a path on it, the prompt): exit code 2."""


class DataError(ValueError):
    """A file holds something else than expected: exit code 1 (as armor.CheckpointError)."""


def _one_line(e) -> str:
    return " ".join(str(e).split())


@dataclass
class Checkpoint:
    """An ARMOR checkpoint directory with the paths its config.json names resolved (the base checked to exist)."""
    dir: Path
    config_path: Path
    config: ArmorConfig
    base: Path | None  # the InternVL2.5 directory a partial checkpoint loads on top of
    vqgan: Path | None  # None: the checkpoint names no VQGAN and none was passed; checked when loaded
    tokenizer_dir: Path  # the checkpoint itself when it holds tokenizer files, else the base


def _recorded(ck_dir, meta, key, override):
    """A path of config.json, resolved against the checkpoint, or its override (--base / --vqgan, which must exist)."""
    if override is not None:
        if not os.path.exists(override):
            raise UsageError(f"--{key} {override}: no such file or directory")
        return Path(override)
    return Path(os.path.abspath(ck_dir / meta[key])) if meta.get(key) else None  # absolute: a no-op join


def _must_exist(p, ck: Checkpoint, flag, what):
    if not p.exists():  # typically a moved or copied output folder: name the file that named it, and the way out
        raise CheckpointError(f"the {what} {p} named by {ck.config_path} does not exist; pass {flag}")


def read_checkpoint(path, base=None, vqgan=None) -> Checkpoint:
    """config.json of an ARMOR checkpoint -> Checkpoint; every error names the file and what was expected."""
    from tokenizer import Tokenizer

    path = Path(path)
    if not path.is_dir():
        raise UsageError(f"{path}: no such checkpoint directory")
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"no config.json in {path}")
    try:
        meta = json.loads(cfg_path.read_bytes().decode("utf-8"))
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError alike: neither names the file
        raise CheckpointError(f"{cfg_path}: not a JSON file ({_one_line(e)})") from None
    if not isinstance(meta, dict) or meta.get("format") != "armor":
        raise CheckpointError(f"{cfg_path} is not an ARMOR checkpoint (\"format\": \"armor\")")
    try:
        config = ArmorConfig(**meta["armor"])
    except (KeyError, TypeError, AssertionError) as e:
        raise CheckpointError(f"{cfg_path}: \"armor\" does not hold an ArmorConfig ({type(e).__name__}: "
                              f"{_one_line(e)})") from None
    base = _recorded(path, meta, "base", base)
    vq = _recorded(path, meta, "vqgan", vqgan)
    tok_dir = path if Tokenizer.kind_in(path) else base
    if tok_dir is None:
        raise CheckpointError(f"{path} holds no tokenizer (tokenizer.json, vocab.json + merges.txt or "
                              f"tokenizer.model) and {cfg_path} names no base directory to take one from")
    ck = Checkpoint(path, cfg_path, config, base, vq, tok_dir)
    if base is not None:  # the VQGAN is checked where it is loaded: train.py --init does not need it
        _must_exist(base, ck, "--base DIR (the InternVL2.5 directory the checkpoint was trained on)", "base directory")
    return ck


def load_tokenizer(ck: Checkpoint):
    """The checkpoint's tokenizer, checked against its config (the ids the model reserves)."""
    from tokenizer import Tokenizer

    try:
        tok = Tokenizer.from_dir(ck.tokenizer_dir)
    except Exception as e:  # the tokenizers library raises its own types on a garbled file
        raise CheckpointError(f"{ck.tokenizer_dir}: cannot read the tokenizer ({_one_line(e)})") from None
    c = ck.config
    if tok.img_context != c.img_context_id or len(tok) > c.llm.vocab_size:
        raise CheckpointError(f"the tokenizer in {ck.tokenizer_dir} ({len(tok)} tokens, <IMG_CONTEXT> = "
                              f"{tok.img_context}) does not fit {ck.config_path} (vocab_size {c.llm.vocab_size}, "
                              f"img_context_id {c.img_context_id})")
    return tok


def load_vqgan_for(ck: Checkpoint, device="cpu"):
    """The checkpoint's VQGAN (None when it names none), checked to draw the model's grids."""
    from vqgan import load_vqgan

    if ck.vqgan is None:
        return None
    _must_exist(ck.vqgan, ck, "--vqgan PATH", "VQGAN")
    try:
        vq = load_vqgan(str(ck.vqgan), device=device)
    except Exception as e:  # missing weights, a garbled file or config: load_vqgan's message, on one line
        raise CheckpointError(f"VQGAN {ck.vqgan}: cannot load ({type(e).__name__}: {_one_line(e)})") from None
    c = ck.config
    if vq.config.n_embed != c.num_image_codes or vq.grid(c.image_px) != (c.image_grid, c.image_grid):
        raise CheckpointError(f"the VQGAN at {ck.vqgan} ({vq.config.n_embed} codes, {vq.config.factor}x down) "
                              f"does not draw the model's {c.image_grid}x{c.image_grid} grids of "
                              f"{c.num_image_codes} codes at {c.image_px} px")
    return vq


def load_armor(path, base=None, vqgan=None, device="cpu", dtype=torch.float32, verbose=True):
    """The one loader of ARMOR checkpoints, whole or partial (sample.py, toy/eval.py, train.py --init) ->
    (model, tokenizer, Checkpoint): ck.vqgan is the resolved VQGAN path (or None), ck.base the base directory of a
    partial checkpoint, ck.tokenizer_dir where the tokenizer came from. base / vqgan override config.json's paths.
    Raises UsageError (a missing override) or armor.CheckpointError (both ValueErrors), one line each."""
    ck = read_checkpoint(path, base, vqgan)
    tok = load_tokenizer(ck)
    return load_model(ck, device, dtype, verbose), tok, ck


def load_model(ck: Checkpoint, device="cpu", dtype=torch.float32, verbose=True):
    """The model of a checkpoint read_checkpoint has checked (the slow part: every tensor is read)."""
    from armor import from_pretrained

    return from_pretrained(str(ck.dir), dtype=dtype, device=device, verbose=verbose,
                           base=None if ck.base is None else str(ck.base))


def load(path, base=None, vqgan=None, device="cpu", dtype=torch.float32):
    """-> (model in eval mode, tokenizer, VQGAN or None): load_armor plus the VQGAN, ready to sample."""
    model, tok, ck = load_armor(path, base, vqgan, device, dtype)
    vq = load_vqgan_for(ck, device)
    return _ready(model, device), tok, vq


def _ready(model, device):
    model.eval()
    if torch.device(device).type == "cpu":  # pack the decode weights now, not in the first answer
        engine.decoder(model).refresh()
    return model


# -----------------------------------------------------------------------------------------------------------------
# Input checks: each ends in one line naming the file or value (the CLI runs them before the slow model load)


def check_images(paths):
    """Every --image: a file (else a usage error) that decodes whole (else a data error: not an image, truncated).
    -> the decoded pictures, held in memory: the answer may be written where an input was (samples/answer_image0.png
    read back into the next question), and the run removes its earlier PNGs before it reads the prompt's images."""
    from PIL import Image

    out = []
    for p in paths:
        if not os.path.isfile(p):
            raise UsageError(f"--image {p}: no such file")
        try:
            with Image.open(p) as im:
                im.load()  # decodes every pixel: a truncated file fails here, not in the middle of an answer
                out.append(im.copy())
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, zlib errors ... by format
            raise DataError(f"--image {p}: not a readable image ({type(e).__name__}: {_one_line(e)})") from None
    return out


def check_prompt(tok, ck: Checkpoint, conversation, images, max_new_tokens):
    """The conversation encodes (image tags against --image files) and it plus the budget fits the model's context."""
    tags = sum(m["content"].count("<image>") for m in conversation if m["role"] == "user")
    if tags > len(images) or 0 < tags < len(images):
        raise UsageError(f"the prompt holds {tags} <image> tag(s) but {len(images)} --image file(s) were given; give "
                         f"one --image per tag (or no tags: the images then go in front of the prompt)")
    codes = [g for m in conversation if m["role"] == "assistant" for g in m.get("codes", [])]
    try:
        n = len(encode_conversation(tok, ck.config, conversation, images, codes, add_generation_prompt=True).ids)
    except ValueError as e:  # e.g. a <gen_image> typed into the prompt
        raise UsageError(f"prompt: {_one_line(e)}") from None
    context = ck.config.llm.max_position_embeddings
    if n + max_new_tokens > context:
        raise UsageError(f"the prompt is {n:,} tokens and --max-new-tokens {max_new_tokens:,}: more than the "
                         f"model's context of {context:,} tokens (max_position_embeddings in {ck.config_path}); "
                         f"shorten the prompt or lower --max-new-tokens")
    return n


def check_can_draw(ck: Checkpoint, max_new_tokens):
    """An answer with room for an image needs a VQGAN to show it: without one the image would be lost."""
    c = ck.config
    if ck.vqgan is None and max_new_tokens >= c.image_grid ** 2 + 2:
        raise UsageError(f"{ck.config_path} names no VQGAN and answers can hold images: pass --vqgan PATH")


# -----------------------------------------------------------------------------------------------------------------
# Output: PNGs as images complete, an HTML page per answer; each file written whole or not at all


def _atomic(path: Path, write):
    """write(tmp) to a temporary name in the same folder, then rename: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def visible(tok):
    """-> str -> str that drops the text of special tokens (<|endoftext|>, <img>, ...) that an answer may hold: what
    the terminal and the page show. The answer itself (and so a chat's history) keeps them."""
    specials = [t.content for t in tok.tk.get_added_tokens_decoder().values() if t.special]
    pattern = re.compile("|".join(map(re.escape, specials))) if specials else None
    return (lambda s: pattern.sub("", s)) if pattern else (lambda s: s)


class Writer:
    """Decodes each finished code grid right away and saves it as `{stem}_image{k}.png`; then writes the HTML.
    An earlier run's page and PNGs of the same stems are removed first, so a page never sits beside images that
    are not its own."""

    def __init__(self, out_dir, vq, stems, clean=lambda s: s):
        self.out, self.vq, self.stems, self.clean = Path(out_dir), vq, stems, clean
        self.out.mkdir(parents=True, exist_ok=True)
        for stem in stems:
            for p in self.out.glob(f"{stem}*"):
                if p.name == f"{stem}.html" or re.fullmatch(rf"{re.escape(stem)}_image\d+\.png", p.name):
                    p.unlink()
        self.paths = {r: [] for r in range(len(stems))}
        self.decode_s = 0.0

    def image(self, row, codes):
        from vqgan import to_pil

        assert self.vq is not None, "an image was drawn but no VQGAN was loaded (check_can_draw lets none through)"
        t = time.perf_counter()
        img = to_pil(self.vq.decode(codes[None])[0])
        self.decode_s += time.perf_counter() - t
        p = self.out / f"{self.stems[row]}_image{len(self.paths[row])}.png"
        _atomic(p, lambda tmp: img.save(tmp, format="PNG"))
        self.paths[row].append(p)
        print(f"\n[image saved: {p}]", file=sys.stderr, flush=True)

    def html(self, row, turns):
        """turns: [(role, segments)] with the answer's images taking this row's PNGs in order."""
        pngs = iter(self.paths[row])
        body = []
        for role, segments in turns:
            body.append(f"<h3>{role}</h3>")
            for s in segments:
                if isinstance(s, str):
                    body.append(f"<p>{html.escape(self.clean(s)).replace(chr(10), '<br>')}</p>")
                else:
                    body.append(f'<p><img src="{next(pngs).name}" width="256" style="image-rendering: pixelated">'
                                f'</p>')
        p = self.out / f"{self.stems[row]}.html"
        page = ("<!doctype html>\n<meta charset=\"utf-8\">\n<title>ARMOR</title>\n<body style=\"max-width: 720px; "
                "margin: 2em auto; font-family: sans-serif\">\n" + "\n".join(body) + "\n</body>\n")
        _atomic(p, lambda tmp: tmp.write_text(page, encoding="utf-8"))
        return p

    def shown(self, row, segments):
        """An answer for the terminal: its text, each image as the path of its PNG (never a placeholder token)."""
        pngs = iter(self.paths[row])
        return "".join(self.clean(s) if isinstance(s, str) else f"[image: {next(pngs, '?')}]" for s in segments)


def _settings(args, prefix):
    s = Sampling(**{f.name: getattr(args, f"{prefix}_{f.name}") for f in fields(Sampling)})
    return replace(s, temperature=0.0) if args.greedy else s


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2, like every other usage error (argparse prints usage first)
        raise UsageError(f"{message} (python sample.py --help lists the flags)")


def main(argv=None):
    try:
        _main(argv)
    except UsageError as e:
        _fail(e, 2)
    except (CheckpointError, DataError, FileNotFoundError) as e:
        _fail(e, 1)


def _fail(e, code):
    print(f"error: {_one_line(e)}", file=sys.stderr)
    sys.exit(code)


def _main(argv):
    ap = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prompt", nargs="?", help="the question or instruction (omit with --chat)")
    ap.add_argument("--model", help=f"ARMOR checkpoint directory (default: the toy checkpoint {DEFAULT_TOY})")
    ap.add_argument("--base", help="InternVL2.5 directory, overriding the one the checkpoint's config.json names")
    ap.add_argument("--vqgan", help="VQGAN weights (file or folder), overriding the checkpoint's")
    ap.add_argument("--image", action="append", default=[], help="input image (repeatable)")
    ap.add_argument("--chat", action="store_true", help="multi-turn session: one user turn per line of stdin")
    ap.add_argument("--n", type=int, default=1, help="answers per prompt, in one batch")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--cfg", type=float, default=DEFAULT_CFG, help="classifier-free guidance on image tokens (1 = off)")
    ap.add_argument("--greedy", action="store_true", help="greedy text and image tokens")
    # sampling flags derived from the Sampling dataclass: --text-temperature, --image-top-k, ...
    for prefix, d in (("text", TEXT_DEFAULT), ("image", IMAGE_DEFAULT)):
        for f in fields(Sampling):
            v = getattr(d, f.name)
            ap.add_argument(f"--{prefix}-{f.name.replace('_', '-')}", type=type(v), default=v,
                            help=f"{prefix} {f.name}")
    ap.add_argument("--out", default="samples", help="folder for the PNGs and HTML pages")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = ap.parse_args(argv)
    if not args.chat and not args.prompt:
        raise UsageError("give a PROMPT, or --chat")
    for flag, v in (("--n", args.n), ("--max-new-tokens", args.max_new_tokens)):
        if v < 1:
            raise UsageError(f"{flag} {v}: must be at least 1")

    # Every input is checked before the model loads (seconds on the toy, minutes on a big one).
    images = check_images(args.image)
    path = args.model
    if path is None:
        if not DEFAULT_TOY.is_dir():
            raise UsageError(f"the built-in toy checkpoint is missing ({DEFAULT_TOY}); the toy pipeline writes it, "
                             f"or pass --model DIR")
        path = DEFAULT_TOY
    ck = read_checkpoint(path, args.base, args.vqgan)
    tok = load_tokenizer(ck)
    check_can_draw(ck, args.max_new_tokens)
    if not args.chat:
        check_prompt(tok, ck, [{"role": "user", "content": args.prompt}], images, args.max_new_tokens)
    vq = load_vqgan_for(ck, args.device)

    torch.manual_seed(args.seed)
    t = time.perf_counter()
    model = _ready(load_model(ck, args.device, getattr(torch, args.dtype)), args.device)
    print(f"loaded in {time.perf_counter() - t:.1f} s (not counted below)", file=sys.stderr)
    kw = dict(max_new_tokens=args.max_new_tokens, text=_settings(args, "text"), image=_settings(args, "image"),
              cfg=args.cfg, seed=args.seed)

    if args.chat:
        chat(model, tok, Writer(args.out, vq, ["chat"], visible(tok)), images, kw, ck)
        return
    stems = ["answer"] if args.n == 1 else [f"answer{j}" for j in range(args.n)]
    w = Writer(args.out, vq, stems, visible(tok))
    stream = (lambda r, s: print(w.clean(s), end="", flush=True)) if args.n == 1 else None
    stats = {}
    answers = generate(model, tok, [[{"role": "user", "content": args.prompt}]], [images], n=args.n,
                       on_text=stream, on_image=w.image, stats=stats, **kw)
    print()
    for j, a in enumerate(answers):
        if args.n > 1:
            print(f"--- answer {j} ---\n{w.shown(j, a.segments)}")
        page = w.html(j, [("user", [args.prompt]), ("assistant", a.segments)])
        print(f"[{'finished' if a.finished else 'stopped at the token budget'}] {page}" +
              "".join(f"\n  {p}" for p in w.paths[j]))
    print_stats(stats, w.decode_s)


def chat(model, tok, w, images, kw, ck, read=input):
    """Multi-turn: every turn answers the whole conversation so far (generated images as their codes), exactly as
    generate() on that conversation would. read(prompt) gives the next line. -> the conversation."""
    history, turns = [], []
    print("chat: one message per line; an empty line or Ctrl-D ends", file=sys.stderr)
    while True:
        try:
            line = read("\nyou> ").strip()
        except EOFError:
            break
        if not line or line in ("exit", "quit"):
            break
        history.append({"role": "user", "content": line})
        try:  # the input images belong to the first turn; a turn that cannot fit is refused and the session goes on
            check_prompt(tok, ck, history, images, kw["max_new_tokens"])
        except UsageError as e:
            print(f"error: {_one_line(e)}", file=sys.stderr)
            history.pop()
            continue
        print("armor> ", end="", flush=True)
        stats, w.decode_s = {}, 0.0
        (a,) = generate(model, tok, [history], [images], on_text=lambda r, s: print(w.clean(s), end="", flush=True),
                        on_image=w.image, stats=stats, **kw)
        print()
        history.append(a.message())
        turns += [("user", [line]), ("assistant", a.segments)]
        print(f"[{w.html(0, turns)}]", file=sys.stderr)
        print_stats(stats, w.decode_s)
    return history


if __name__ == "__main__":
    main()
