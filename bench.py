"""
Speed of ARMOR's generation and training, each row measured side by side in one run (warm-up excluded, medians).

  python bench.py             # the full table (about 5 minutes on 2 CPU cores)
  python bench.py --quick     # fewer tokens and repeats (about 2 minutes)
  python bench.py --kernels   # only the decode-kernel table: GB/s of weight read, F.linear vs engine.py's
  python bench.py --device cuda          # the GPU table (about 4 minutes on an H200): figures/bench_cuda.txt
  python bench.py --device cpu --smoke   # the GPU table's rows at tiny shapes (seconds)

Rows:
  decode      tokens/s of sample.generate vs transformers' Qwen2ForCausalLM.generate on the same weights (an
              InternVL2.5-1B-shaped LLM = Qwen2.5-0.5B + untied head, random weights, fp32 and bf16; and the toy
              checkpoint, at most h*w + 1 tokens so that it cannot open a picture), batch 1 and batch 2 (the shape
              of a CFG step), greedy, no stop token. Decode rate =
              (N - 1) / (time(N tokens) - time(1 token)), the same for both, so the prefill drops out. The bound:
              steps/s <= read bandwidth / weight bytes read per step (every decoder weight + the text head), the
              bandwidth read in the row's own interleaved runs (ReadProbe).
  prefill     tokens/s of one 512-token prompt (ours: extend + text head on the last position; HF: forward with
              logits_to_keep=1).
  text-only   a text answer from sample.generate (adapter present, --cfg on) vs the bare LLM in a plain greedy
              KV-cache loop: the lazily filled adapter cache should cost nothing.
  train       one WoHG stage-2 step (forward + backward + AdamW) of the 1B shape on t2i sequences, tokens/s and
              MFU against the fp32 matmul peak measured in this run. FLOPs per token (matmuls only): frozen decoder
              4 N_dec (forward + input-gradient backward; no weight gradients), trainable adapter 6 N_adapter, visual
              head 6 N_head on image positions, attention 2 T d per layer forward (causal) x 3 for fwd + bwd.
  vqgan       decode seconds per 256 px image (released Chameleon config, random weights), and the toy VQGAN.
On CUDA (bf16, random weights made on the GPU; the bound is the weight bytes per step over the copy bandwidth
measured in the run):
  decode      the 1B shape at batch 1, 2 and 8 against transformers' generate, the 8B preset (InternLM2, which
              transformers does not ship) at batch 1 against the bound alone.
  text-only   as on the CPU, at the 1B shape; both loops replay CUDA graphs and look at each token.
  image       seconds per image (h*w = 256 codes at 256 px) with guidance's two rows, 1B shape and 8B preset, the
              text head pinned to <imgbos> (a random model never opens an image by itself).
  vqgan       decode of one 16x16 grid on the GPU, fp32 and bf16 autocast.
  train       stage-2 steps at the 1B shape (batch 16 and 64, the latter also with activation checkpointing) and the
              8B preset, MFU against the bf16 matmul rate measured in the run.
The vision tower is left out of the 1B-shaped model (a 1-layer stand-in): no row here feeds it an image.
Threads: every row runs at one thread count, by default the one (1 or all cores) at which decode-shaped bf16 GEMVs
run fastest at startup; on a loaded machine a second thread stalls every parallel kernel. The load average is printed.
"""

import argparse
import os
import statistics
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

import armor
import engine
from armor import Armor, InternVL, VisionConfig
from sample import DEFAULT_CFG, DEFAULT_TOY, Sampling, generate

GREEDY = Sampling(0.0)
# the bench tokenizer spells every byte as a token, so a short system message keeps prompts near real lengths (~50)
SYSTEM = "You are ARMOR."
PROMPT = "Describe a quiet morning by the sea."


def timeit(fn, reps):
    """Median wall time of reps calls after one warm-up call (reps = 0: one timed call, no warm-up)."""
    if reps == 0:
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def side_by_side(fns, reps):
    """Median times of several functions, interleaved run by run so that machine load hits them alike."""
    for fn in fns:
        fn()  # warm-up
    ts = [[] for _ in fns]
    for _ in range(reps):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            ts[i].append(time.perf_counter() - t)
    return [statistics.median(t) for t in ts]


class ReadProbe:
    """Two reads of 1 GiB of random fp32 (far past the caches): a sum, and a one-row fp32 product (the weight as two
    row halves in one torch.bmm, 896 columns); the bound takes the faster. Each decode row times them
    interleaved with its own runs (side_by_side), because this machine's read bandwidth drifts: within one run the
    rows read 35 to 60 GB/s (figures/bench.txt), and a bound read once at start-up was beaten (114%)."""

    def __init__(self):
        self.x = torch.rand(2 ** 28)
        self.w = self.x[:2 * 149796 * 896].view(2, 149796, 896)  # the first 1.07 GB of it, as two row halves
        xT = torch.rand(1, 896).T.expand(2, -1, -1)
        self.fns = [lambda: self.x.sum(), lambda: torch.bmm(self.w, xT)]

    def rates(self, times):
        """Bytes/s of (sum, product) from their times."""
        return self.x.numel() * 4 / times[0], self.w.numel() * 4 / times[1]

    def measure(self, threads, reps=7):
        n = torch.get_num_threads()
        torch.set_num_threads(threads)
        out = self.rates([timeit(fn, reps) for fn in self.fns])
        torch.set_num_threads(n)
        return out


def decode_probe(threads):
    """Weight GB/s of one-row products through 16 bf16 4864 x 896 weights (140 MB, past the caches), on engine.py's
    decode path, at a thread count."""
    n = torch.get_num_threads()
    torch.set_num_threads(threads)
    lins = [torch.nn.Linear(896, 4864, bias=False, device="meta").to_empty(device="cpu") for _ in range(16)]
    for m in lins:
        m.weight.requires_grad_(False).normal_(0, 0.02)  # not left uninitialised: denormals crawl
    lins = [m.to(torch.bfloat16) for m in lins]
    fast = {}
    engine.refresh(fast, [(m,) for m in lins])
    x = torch.randn(1, 896, dtype=torch.bfloat16)
    t = timeit(lambda: [engine.fast_linear(fast, (m,), x) for m in lins], 5)
    torch.set_num_threads(n)
    return 16 * 4864 * 896 * 2 / t


# The decoder's weight shapes per layer (q|k|v, o, gate|up, down) and the text head, as engine.py's decode path groups
# them: the 1B shape (Qwen2.5-0.5B, 3 layers' worth: 150 MB in fp32, past the caches) and the toy (every layer).
KERNEL_SHAPES = {"1B-shape": [(1152, 896), (896, 896), (9728, 896), (896, 4864)] * 3 + [(151675, 896)],
                 "toy": [(512, 256), (256, 256), (1536, 256), (256, 768)] * 4 + [(1025, 256)]}


def kernel_rows(reps, rows):
    """GB/s of weight read by decode-shaped products: F.linear against engine.py's (fast_linear: bf16 prepacked
    for oneDNN; fp32 through F.linear itself) and, for reference, the weight as two
    row halves in one torch.bmm on the same bf16 weights."""
    for name, shapes in KERNEL_SHAPES.items():
        for dtype in (torch.float32, torch.bfloat16):
            lins = [torch.nn.Linear(k, n, bias=False, dtype=dtype).requires_grad_(False) for n, k in shapes]
            nbytes = sum(m.weight.numel() * m.weight.element_size() for m in lins)
            fast = {}
            engine.refresh(fast, [(m,) for m in lins])
            # two bmm row halves on bf16 weights, for reference (even row counts only: no padded copy)
            halves = [m.weight.view(2, -1, m.in_features) for m in lins if m.out_features % 2 == 0]
            for M in (1, 2):
                xs = {k: torch.randn(M, k, dtype=dtype) for _, k in shapes}
                fns = [lambda: [F.linear(xs[m.in_features], m.weight) for m in lins],
                       lambda: [engine.fast_linear(fast, (m,), xs[m.in_features]) for m in lins]]
                if dtype == torch.bfloat16:
                    fns.append(lambda: [torch.bmm(w, xs[w.shape[2]].T.expand(2, -1, -1)) for w in halves])
                ts = side_by_side(fns, reps)
                gbs = [nbytes / ts[0] / 1e9, nbytes / ts[1] / 1e9]
                if len(ts) > 2:
                    gbs.append(sum(w.numel() * w.element_size() for w in halves) / ts[2] / 1e9)
                kind = "F.linear" if dtype == torch.float32 else "oneDNN prepacked"
                note = f"F.linear {gbs[0]:.1f} GB/s" + (f"; two bmm row halves on bf16 {gbs[2]:.1f} GB/s"
                                                        if len(gbs) > 2 else "")
                rows.append((f"kernel {name} {str(dtype)[6:]} {M} row(s)", f"{gbs[1]:.1f} GB/s ({kind})",
                             f"{gbs[0]:.1f} GB/s", f"{gbs[1] / gbs[0]:.2f}x", note))
                print(" | ".join(rows[-1]), flush=True)


def matmul_peak(dtype, shapes=((2048, 2048, 2048), (320, 896, 4864), (320, 4864, 896))):
    """The best matmul throughput of a square and of the training step's own GEMM shapes (fastest of 5 runs each)."""
    best = 0.0
    for m, k, n in shapes:
        a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
        a @ b
        t = min(timeit(lambda: a @ b, 0) for _ in range(5))
        best = max(best, 2 * m * k * n / t)
    return best


# -----------------------------------------------------------------------------------------------------------------
# Models


def bench_tokenizer(vocab_size):
    """A byte-level tokenizer with exactly vocab_size ids (the InternVL specials last), so prompts encode like the
    real one's bytes and every id of a Qwen-sized vocabulary exists: the random model may emit any of them."""
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, pre_tokenizers
    from tokenizers.models import BPE

    from tokenizer import INTERNVL_TOKENS, QWEN_SPECIALS, Tokenizer

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    n = vocab_size - len(QWEN_SPECIALS) - len(INTERNVL_TOKENS)
    vocab = {s: i for i, s in enumerate(sorted(alphabet) + [f"<t{i}>" for i in range(n - len(alphabet))])}
    tk = HFTokenizer(BPE(vocab, []))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIALS + INTERNVL_TOKENS])
    tok = Tokenizer(tk)
    assert len(tok) == vocab_size
    return tok


# (preset, batch, activation checkpointing) of the GPU training rows: the 1B shape at the batch of 16 earlier tables
# used and at one that fills an H200, with and without checkpointing (which trades a second forward for memory)
TRAIN_SHAPES = (("internvl2_5-1b", 16, False), ("internvl2_5-1b", 64, False), ("internvl2_5-1b", 64, True),
                ("internvl2_5-8b", 8, False))


def gpu_train_rows(rows, dev="cuda", shapes=TRAIN_SHAPES, reps=5, peak_n=8192):
    """As train.py runs on a GPU: bf16 autocast, the frozen base matmuls stored in bf16 (armor.frozen_matmuls),
    trainable tensors fp32, fused AdamW. Stage-2 t2i steps, each LLM with ARMOR's additions (no vision tower: t2i
    data never runs it), optionally with activation checkpointing (train.py --grad-ckpt). Peak memory is what the
    step held at its highest; MFU is against the bf16 matmul rate measured in the same run."""
    dev = torch.device(dev)
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    a, b = (torch.randn(peak_n, peak_n, device=dev, dtype=torch.bfloat16) for _ in range(2))
    peak = 2 * peak_n ** 3 / timeit(lambda: (a @ b, sync()), 10)
    print(f"{torch.cuda.get_device_name() if cuda else 'cpu'} | bf16 matmul {peak_n}^3: {peak / 1e12:,.3g} TFLOP/s",
          flush=True)
    del a, b
    for preset, B, ckpt in shapes:
        cfg = replace(armor.PRESETS[preset](), vision=VisionConfig(28, 14, 32, 1, 2, 64), tokens_per_tile=0)
        T = min(320, cfg.image_grid ** 2 + 64)
        with torch.device("meta"):
            model = Armor(cfg)
        model.to_empty(device=dev)
        armor.init_weights(model)
        armor.init_armor(model, seed=0)
        n = armor.set_trainable(model, stage=2)
        model.train()
        model.grad_ckpt = ckpt
        for p in armor.frozen_matmuls(model):
            p.data = p.data.to(torch.bfloat16)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=cuda or None)
        ids, targets, n_img = t2i_batch(cfg, B, T)
        ids, targets = ids.to(dev), targets.to(dev)
        if cuda:
            torch.cuda.reset_peak_memory_stats()

        def step():
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                out = model(ids, targets=targets, alpha=0.0, beta=1.0)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()

        t = timeit(step, reps)
        flops = stage2_flops_per_step(model, B, T, n_img)
        mem = f"peak memory {torch.cuda.max_memory_allocated() / 2 ** 30:.1f} GiB; " if cuda else ""
        rows.append((f"train stage 2, {preset}, bf16, {B}x{T} tokens" + (", activation checkpointing" if ckpt else ""),
                     f"{B * T / t:,.0f} tok/s", f"{t * 1000:.0f} ms/step", f"MFU {flops / t / peak:.0%}",
                     f"{mem}{n:,} trainable parameters"))
        print(" | ".join(rows[-1]), flush=True)
        del model, opt, ids, targets
        if cuda:
            torch.cuda.empty_cache()


def gpu_decode_rows(rows, dev, presets=("internvl2_5-1b", "internvl2_5-8b"), n_tokens=200, reps=2,
                    copy_bytes=2 ** 30):
    """On a GPU, bf16, random weights made on the device. Per preset: greedy decoding, sample.generate (its decode
    steps as CUDA graphs) against transformers' generate on the same tensors at batch 1, 2 (guidance's two rows) and 8
    where transformers has the architecture (Qwen2: the 1B shape), ours alone at batch 1 otherwise (InternLM2: the 8B
    preset); a text-only answer against the bare LLM (1B shape); seconds per image with guidance. The bound is the
    weight bytes one step reads over the copy bandwidth measured in this run. Per-token rates take the difference of
    a long and a short run, so the prompt's prefill and the graphs' capture drop out."""
    from data import encode_conversation

    dev = torch.device(dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    a = torch.empty(copy_bytes, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    bw = 2 * a.numel() / timeit(lambda: (b.copy_(a), sync()), 10)  # read + write
    del a, b
    print(f"{dev.type} copy {bw / 1e12:.2f} TB/s", flush=True)
    for preset in presets:
        model, tok = random_on(preset, torch.bfloat16, dev)
        hf = hf_twin(model) if model.config.llm.arch == "qwen2" else None
        nbytes = weight_bytes_per_step(model)
        name = f"{preset} shape bf16"
        print(f"{name}: weights read per decode step {nbytes / 1e9:.2f} GB", flush=True)
        conv = [{"role": "user", "content": PROMPT}]
        ids = torch.tensor([encode_conversation(tok, model.config, conv, add_generation_prompt=True).ids], device=dev)
        for B in (1, 2, 8) if hf is not None else (1,):
            x = ids.repeat(B, 1)

            def ours(n):
                return lambda: (generate(model, tok, [conv] * B, max_new_tokens=n, text=GREEDY, ignore_eos=True),
                                sync())

            def theirs(n):
                return lambda: (hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False),
                                sync())

            to_n, to_2 = timeit(ours(n_tokens), reps), timeit(ours(2), reps)
            ro, bound = B * (n_tokens - 2) / (to_n - to_2), B * bw / nbytes
            if hf is None:
                rows.append((f"decode {name} batch {B}", f"{ro:,.0f} tok/s", "", "",
                             f"bound {bound:,.0f} tok/s ({bw / 1e12:.2f} TB/s): ours {ro / bound:.0%}"))
            else:
                th_n, th_1 = timeit(theirs(n_tokens // 4), reps), timeit(theirs(1), reps)
                rh = B * (n_tokens // 4 - 1) / (th_n - th_1)
                rows.append((f"decode {name} batch {B}", f"{ro:,.0f} tok/s", f"{rh:,.0f} tok/s", f"{ro / rh:.1f}x",
                             f"bound {bound:,.0f} tok/s ({bw / 1e12:.2f} TB/s): ours {ro / bound:.0%}, "
                             f"HF {rh / bound:.0%}"))
            print(" | ".join(rows[-1]), flush=True)
        if hf is not None:
            text_only_row(name, model, tok, n_tokens, reps, rows, sync)
        image_row(name, model, tok, reps, rows, sync)
        del model, hf
        if dev.type == "cuda":
            torch.cuda.empty_cache()


def image_row(name, model, tok, reps, rows, sync):
    """Seconds per image: h*w codes (a 256 px image at the released shapes) with guidance's two rows, timed from the
    prompt to the last code (prefill, the adapter's and the unconditional rows' catch-up included; the VQGAN decode
    is its own row). A random model never opens an image by itself, so its text head is pinned to <imgbos>."""
    c, dev = model.config, next(model.parameters()).device
    hw, V = c.image_grid ** 2, c.llm.vocab_size
    head = model.text_logits

    def to_imgbos(h):
        logits = head(h)
        logits[..., V] = 1e4  # above every text logit; masked like the rest once no image fits
        return logits

    conv = [{"role": "user", "content": "Draw a quiet morning by the sea."}]
    model.text_logits = to_imgbos  # GraphDecoder reads the model's heads (CpuDecoder has its own)
    try:
        def draw():
            dec = engine.GraphDecoder(model, graphs=dev.type == "cuda")
            (a,) = generate(model, tok, [conv], max_new_tokens=hw + 2, cfg=DEFAULT_CFG, decoder=dec)
            sync()
            assert len(a.images) == 1, "the pinned head should draw exactly one image"

        t = timeit(draw, reps)
    finally:
        del model.text_logits
    rows.append((f"image {name}, {hw} codes, cfg {DEFAULT_CFG}", f"{t:.2f} s/image", "", "",
                 f"{hw / t:,.0f} codes/s (2 rows each step); from the prompt, VQGAN decode apart"))
    print(" | ".join(rows[-1]), flush=True)


def gpu_vqgan_row(rows, dev, reps=5, config=None, grid=16):
    """VQGAN decode of one image on the device (the released Chameleon config, random weights): fp32, and bf16
    autocast."""
    from vqgan import VQGAN, VQGANConfig

    dev = torch.device(dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    config = config or VQGANConfig()
    with torch.device(dev):
        vq = VQGAN(config).eval()
    codes = torch.randint(0, config.n_embed, (1, grid, grid), device=dev)
    ts = []
    for dtype in (None, torch.bfloat16):
        @torch.inference_mode()
        def decode():
            with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
                vq.decode(codes)
            sync()

        ts.append(timeit(decode, reps))
    rows.append((f"vqgan decode {grid}x{grid} codes ({dev.type})", f"{ts[0] * 1e3:.1f} ms/image", "", "",
                 f"fp32; bf16 autocast {ts[1] * 1e3:.1f} ms; random weights"))
    print(" | ".join(rows[-1]), flush=True)


def t2i_batch(c, B, T, g=None):
    """A stage-2 t2i batch: prompt, <imgbos>, h*w codes, <imgend>, <|im_end|>; only the visual head's targets."""
    hw = c.image_grid ** 2
    g = g or torch.Generator().manual_seed(0)
    P = T - hw - 3
    ids = torch.cat([torch.randint(0, c.llm.vocab_size - 20, (B, P), generator=g),
                     torch.full((B, 1), c.imgbos_id),
                     c.code_offset + torch.randint(0, c.num_image_codes, (B, hw), generator=g),
                     torch.full((B, 1), c.imgend_id), torch.full((B, 1), c.llm.vocab_size - 10)], 1)
    targets = torch.full_like(ids, -100)
    targets[:, P - 1:P + hw + 1] = ids[:, P:P + hw + 2]  # <imgbos> -> codes -> <imgend>: the visual head's targets
    targets[targets <= c.llm.vocab_size] = -100  # stage 2: alpha = 0, only image targets
    return ids, targets, int((targets > c.llm.vocab_size).sum())


def random_1b(dtype):
    """InternVL2.5-1B's LLM (Qwen2.5-0.5B shape, untied head) + ARMOR's additions, random, no vision tower."""
    cfg = armor.PRESETS["internvl2_5-1b"]()
    cfg = replace(cfg, vision=VisionConfig(28, 14, 32, 1, 2, 64), tokens_per_tile=0, system_message=SYSTEM)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Armor(cfg)
    model.to_empty(device="cpu")
    armor.init_weights(model)
    armor.init_armor(model, seed=0)
    return model.to(dtype).eval().requires_grad_(False), bench_tokenizer(cfg.llm.vocab_size)


def random_on(preset, dtype, dev):
    """A preset's LLM + ARMOR's additions with random weights, made on the device in dtype (the 8B preset is ~16 GB
    in bf16: never built in fp32 on the host); no vision tower."""
    cfg = replace(armor.PRESETS[preset](), vision=VisionConfig(28, 14, 32, 1, 2, 64), tokens_per_tile=0,
                  system_message=SYSTEM)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Armor(cfg)
    model = model.to(dtype).to_empty(device=dev)
    armor.init_weights(model)
    return model.eval().requires_grad_(False), bench_tokenizer(cfg.llm.vocab_size)


def load_toy():
    from sample import load

    model, tok, _ = load(DEFAULT_TOY)
    return model.requires_grad_(False), tok


def hf_twin(model):
    """transformers' Qwen2ForCausalLM holding the very same tensors (no copy)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    l = model.config.llm
    assert l.arch == "qwen2", "the transformers twin is a Qwen2"
    hc = Qwen2Config(vocab_size=l.vocab_size, hidden_size=l.hidden_size, num_hidden_layers=l.num_layers,
                     num_attention_heads=l.num_heads, num_key_value_heads=l.num_kv_heads,
                     intermediate_size=l.intermediate_size, rope_theta=l.rope_theta, rms_norm_eps=l.rms_norm_eps,
                     max_position_embeddings=l.max_position_embeddings, tie_word_embeddings=False)
    hc._attn_implementation = "sdpa"
    with torch.device("meta"):
        hf = Qwen2ForCausalLM(hc)
    sd = {"model." + k[len("language_model.model."):]: v for k, v in model.state_dict().items()
          if k.startswith("language_model.model.")}
    sd["lm_head.weight"] = model.language_model.lm_head.weight
    hf.load_state_dict(sd, strict=True, assign=True)
    hf.model.rotary_emb = type(hf.model.rotary_emb)(config=hc)  # its inv_freq buffer is not in the state dict
    hf.generation_config.pad_token_id = 0
    return hf.to(next(model.parameters()).dtype).eval()


def bare_llm(model):
    """The base InternVL (no ARMOR modules) on the same tensors: what decoding costs without the image branch."""
    with torch.device("meta"):
        bare = InternVL(model.config)
    bare.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("armor.")}, assign=True)
    return bare.eval()


def weight_bytes_per_step(model):
    """Bytes of weights one decode step reads: every decoder layer, the final norm and the text head."""
    lm = model.language_model
    ps = list(lm.model.layers.parameters()) + list(lm.model.norm.parameters()) + [lm.lm_head.weight]
    if isinstance(model, Armor):
        ps.append(model.armor.imgbos_head.weight)
    return sum(p.numel() * p.element_size() for p in ps)


# -----------------------------------------------------------------------------------------------------------------
# Rows


def decode_rows(name, model, tok, hf, n_tokens, reps, probe, rows):
    from data import encode_conversation

    conv = [{"role": "user", "content": PROMPT}]
    ids = torch.tensor([encode_conversation(tok, model.config, conv, add_generation_prompt=True).ids])
    nbytes = weight_bytes_per_step(model)
    for B in (1, 2):
        x = ids.repeat(B, 1)

        def ours(n):
            return lambda: generate(model, tok, [conv] * B, max_new_tokens=n, text=GREEDY, ignore_eos=True)

        def theirs(n):
            return lambda: hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False)

        to_n, th_n, to_1, th_1, *tr = side_by_side([ours(n_tokens), theirs(n_tokens), ours(1), theirs(1)]
                                                   + probe.fns, reps)
        bw = max(probe.rates(tr))  # read in the same interleaved runs
        ro, rh = B * (n_tokens - 1) / (to_n - to_1), B * (n_tokens - 1) / (th_n - th_1)
        hf_ids = theirs(n_tokens)()[:, x.shape[1]:].tolist()
        same = [a.ids for a in ours(n_tokens)()] == hf_ids
        bound = B * bw / nbytes
        rows.append((f"decode {name} batch {B}", f"{ro:,.1f} tok/s", f"{rh:,.1f} tok/s", f"{ro / rh:.2f}x",
                     f"bound {bound:,.1f} tok/s ({bw / 1e9:.1f} GB/s): ours {ro / bound:.0%}, HF {rh / bound:.0%}; "
                     f"same tokens: {'yes' if same else 'no'}"))
        print(" | ".join(rows[-1]), flush=True)


def prefill_row(name, model, hf, n, reps, rows):
    ids = torch.randint(0, model.config.llm.vocab_size - 20, (1, n))

    @torch.no_grad()
    def ours():
        state = model.new_state(1, n)
        return model.text_logits(model.extend(state, ids)[:, -1])

    @torch.no_grad()
    def theirs():
        return hf(ids, logits_to_keep=1, use_cache=True).logits

    to, th = side_by_side([ours, theirs], reps)
    rows.append((f"prefill {name} {n} tokens", f"{n / to:,.1f} tok/s", f"{n / th:,.1f} tok/s", f"{th / to:.2f}x", ""))
    print(" | ".join(rows[-1]), flush=True)


def text_only_row(name, model, tok, n_tokens, reps, rows, sync=lambda: None):
    from data import encode_conversation

    dev = next(model.parameters()).device
    conv = [{"role": "user", "content": PROMPT}]
    ids = torch.tensor([encode_conversation(tok, model.config, conv, add_generation_prompt=True).ids], device=dev)
    bare = bare_llm(model)

    def plain(n):
        @torch.no_grad()
        def run():
            # the bare LLM's greedy loop, laid out as sample.generate's decode step (through the same decode engine:
            # a replayed CUDA graph on a GPU, the CPU kernels on a CPU); like any answer loop it looks at each token
            # (to stop at <|im_end|>), the one host wait per token that sample.generate makes in text too
            dec, L = engine.decoder(bare), ids.shape[1]
            seq = torch.zeros(1, L + n, dtype=torch.long, device=dev)
            seq[:, :L] = ids
            state = bare.new_state(1, L + n)
            dec.extend(state, seq[:, :L - 1])
            col = torch.zeros(1, dtype=torch.long, device=dev)

            def step():
                h = dec.extend(state, seq.index_select(1, col))[:, 0]
                seq.index_copy_(1, col + 1, dec.text_logits(h).argmax(-1)[:, None])

            run_step = getattr(dec, "run", None)
            for c in range(L - 1, L - 1 + n):
                col.fill_(c)
                step() if run_step is None else run_step("greedy", step, col, state)
                state.length = c + 1
                seq[0, c + 1].item()
            sync()
        return run

    def ours(n):
        return lambda: (generate(model, tok, [conv], max_new_tokens=n, text=GREEDY, cfg=DEFAULT_CFG, ignore_eos=True),
                        sync())

    to_n, tb_n, to_1, tb_1 = side_by_side([ours(n_tokens), plain(n_tokens), ours(1), plain(1)], reps)
    ratio = (to_n - to_1) / (tb_n - tb_1)
    rows.append((f"text-only answer {name}", f"{(to_n - to_1) / (n_tokens - 1) * 1e3:.2f} ms/tok",
                 f"bare LLM {(tb_n - tb_1) / (n_tokens - 1) * 1e3:.2f} ms/tok", f"{ratio:.3f}x",
                 f"sample.generate with the adapter and --cfg {DEFAULT_CFG} vs the bare LLM's greedy loop "
                 f"(target <= 1.05x)"))
    print(" | ".join(rows[-1]), flush=True)


def stage2_flops_per_step(model, B, T, n_img):
    c, l = model.config, model.config.llm
    n_dec = sum(p.numel() for p in model.language_model.model.layers.parameters())
    n_ad = sum(p.numel() for p in model.armor.adapter.parameters())
    attn = 2 * T * l.hidden_size  # per token per layer, forward, causal (QK^T and AV over T/2 keys on average)
    per_token = 4 * n_dec + 6 * n_ad + 3 * attn * (l.num_layers + c.num_adapter_layers)
    return B * T * per_token + 6 * model.armor.visual_head.weight.numel() * n_img


def train_row(reps, peak, rows, B=1, T=320):
    model, _ = random_1b(torch.float32)
    model.train()
    n = armor.set_trainable(model, stage=2)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, foreach=True)
    ids, targets, n_img = t2i_batch(model.config, B, T)

    def step():
        out = model(ids, targets=targets, alpha=0.0, beta=1.0)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t = timeit(step, reps)
    flops = stage2_flops_per_step(model, B, T, n_img)
    rows.append((f"train stage 2, 1B shape, fp32, {B}x{T} tokens", f"{B * T / t:,.1f} tok/s", f"{t:.2f} s/step",
                 f"MFU {flops / t / peak:.0%}", f"{flops / t / 1e9:,.1f} GFLOP/s of a measured {peak / 1e9:,.1f} "
                                                f"GFLOP/s fp32 matmul peak; {n:,} trainable parameters"))
    print(" | ".join(rows[-1]), flush=True)


def vqgan_rows(reps, rows):
    from vqgan import VQGAN, VQGANConfig, load_vqgan

    torch.manual_seed(0)
    vq = VQGAN(VQGANConfig()).eval()
    codes = torch.randint(0, 8192, (1, 16, 16))
    t = timeit(lambda: vq.decode(codes), reps)
    rows.append(("vqgan decode 256 px (Chameleon config)", f"{t:.2f} s/image", "", "", "fp32, random weights"))
    print(" | ".join(rows[-1]), flush=True)
    toy = DEFAULT_TOY.parent / "vqgan"
    if toy.exists():
        vq = load_vqgan(str(toy))
        f = vq.config.factor
        codes = torch.randint(0, vq.config.n_embed, (1, 64 // f, 64 // f))
        t = timeit(lambda: vq.decode(codes), reps)
        rows.append(("vqgan decode 64 px (toy)", f"{t * 1e3:.1f} ms/image", "", "", ""))
        print(" | ".join(rows[-1]), flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer tokens and repeats")
    ap.add_argument("--kernels", action="store_true", help="only the decode-kernel table (GB/s of weight read)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads for every row (default: the count, 1 or "
                                                            "all cores, with the higher measured read bandwidth)")
    ap.add_argument("--device", default="cpu", help="cpu: every row; cuda: decoding and training on the GPU")
    ap.add_argument("--smoke", action="store_true", help="the GPU table's decode, image and VQGAN rows at tiny shapes "
                                                         "and a few tokens, on --device (a check that they run)")
    args = ap.parse_args(argv)
    if args.smoke:
        from vqgan import VQGANConfig

        rows = []
        tiny_vq = VQGANConfig(embed_dim=16, n_embed=64, z_channels=16, ch=16, ch_mult=(1, 2), num_res_blocks=1,
                              num_groups=4)
        gpu_decode_rows(rows, args.device, presets=("tiny", "tiny-internlm2"), n_tokens=12, reps=1,
                        copy_bytes=2 ** 20)
        gpu_vqgan_row(rows, args.device, reps=1, config=tiny_vq, grid=4)
        gpu_train_rows(rows, args.device, shapes=(("tiny", 2, False), ("tiny", 2, True)), reps=1, peak_n=256)
        print_table(rows)
        return rows
    if args.device == "cuda":
        print(f"torch {torch.__version__} | {torch.cuda.get_device_name()}", flush=True)
        rows = []
        gpu_decode_rows(rows, "cuda")
        gpu_vqgan_row(rows, "cuda")
        gpu_train_rows(rows)
        print_table(rows)
        return rows
    n_tok, reps = (12, 2) if args.quick else (32, 3)
    rows = []
    cores = torch.get_num_threads()
    if args.threads:
        threads, note = args.threads, "as asked"
    else:
        # On a shared machine a second OpenMP thread that is not scheduled stalls every parallel kernel (measured
        # here under load: 0.7 GB/s instead of 10 for a 4864x896 GEMV), while on a quiet one it speeds up the
        # compute-bound bf16 GEMV (70 vs 100 ms per 1B-shape decode step): so the thread count is measured.
        probe = {t: decode_probe(t) for t in sorted({1, cores})}
        threads = max(probe, key=probe.get)
        note = "decode-shaped bf16 GEMV: " + ", ".join(f"{t} thread(s) {b / 1e9:.1f} GB/s" for t, b in probe.items())
    torch.set_num_threads(threads)
    reads = ReadProbe()
    bw_sum, bw_gemv = reads.measure(threads)
    peak32, peak16 = matmul_peak(torch.float32), matmul_peak(torch.bfloat16)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"torch {torch.__version__} | {threads} of {cores} threads ({note}) | load average {load}\n"
          f"read bandwidth over 1 GiB fp32 now: sum {bw_sum / 1e9:.1f} GB/s, GEMV {bw_gemv / 1e9:.1f} GB/s (each "
          f"decode row re-reads it side by side) | matmul peak fp32 {peak32 / 1e9:,.1f} GFLOP/s, "
          f"bf16 {peak16 / 1e9:,.1f} GFLOP/s (best of 2048^3 and the training GEMM shapes)", flush=True)
    if args.kernels:
        kernel_rows(3 if args.quick else 7, rows)
        print_table(rows)
        return
    for dtype in (torch.float32, torch.bfloat16):
        model, tok = random_1b(dtype)
        hf = hf_twin(model)
        name = f"1B-shape {str(dtype)[6:]}"
        decode_rows(name, model, tok, hf, n_tok, reps, reads, rows)
        prefill_row(name, model, hf, 128 if args.quick else 512, 1 if args.quick else 2, rows)
        if dtype == torch.bfloat16:
            text_only_row(name, model, tok, n_tok, reps, rows)
        del model, hf
    if DEFAULT_TOY.is_dir():
        model, tok = load_toy()
        hf = hf_twin(model)
        # at most h*w + 1 new tokens: too few for a whole image, so sample.generate never opens one (<imgbos> needs
        # room for h*w codes and <imgend>) and both sides decode text; with more, the toy model, which can draw, may
        # start a picture after the (ignored) end of its answer
        n_toy = min(4 * n_tok, model.config.image_grid ** 2 + 1)
        # a toy run takes tens of milliseconds, so its rows take the median of 5x the repeats (the 1B rows' count
        # left their figures moving by several percent between runs)
        toy_reps = 5 * reps
        decode_rows("toy fp32", model, tok, hf, n_toy, toy_reps, reads, rows)
        prefill_row("toy fp32", model, hf, 512, toy_reps, rows)
        text_only_row("toy fp32", model, tok, n_toy, toy_reps, rows)
    else:
        print(f"(toy rows skipped: no toy checkpoint at {DEFAULT_TOY})")
    train_row(1 if args.quick else 2, peak32, rows)
    vqgan_rows(reps, rows)

    print_table(rows)


def print_table(rows):
    print("\n| row | ours | reference | ratio | notes |\n|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
