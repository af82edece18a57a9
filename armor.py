"""
ARMOR (arXiv 2503.06542) on top of InternVL2.5, in plain PyTorch.

InternVL2.5 reads images: InternViT -> pixel shuffle -> MLP projector (`mlp1`) -> LLM (Qwen2 or InternLM2).
ARMOR teaches it to also write them, leaving every original weight where it was (paper Section 3.2, Figure 3):
  - new input embedding rows for <imgbos>, <imgend>, <imgpad> and the 8192 VQGAN codes (the original rows stay frozen),
  - the text head = the original LM head plus one row for <imgbos>,
  - an adapter (a few transformer blocks of the LLM's own type) on the decoder's output, then a visual head over
    <imgend>, <imgpad> and the codes: the "forward switching" of Table 1 picks the head by the current mode,
  - the loss L = alpha * L_text + beta * L_img (Eq. 1-3), and per-stage trainable sets for WoHG (Figure 5).

Token layout of the extended vocabulary (V = the base vocabulary size):
  [0, V)            original text tokens      -> text head index = token id
  V                 <imgbos>                  -> text head index V (the extra row)
  V + 1, V + 2      <imgend>, <imgpad>        -> visual head index = token id - (V + 1)
  V + 3 + k         image code k, k < K        -> visual head index 2 + k
So a target t belongs to the text head iff t <= V, which is how the label masks are derived.

Commands:
  python armor.py                            # parameter counts of every preset (meta device, no memory)
  python armor.py --preset internvl2_5-8b    # one preset, with ARMOR's new parameters per WoHG stage
  python armor.py --load /path/InternVL2_5-1B [--dtype bfloat16]   # load a released checkpoint, print a summary
"""

import json
import math
import os
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# -----------------------------------------------------------------------------------------------------------------
# Configs. Presets are the released models (their config.json: vision_config, llm_config); derived fields live in
# __post_init__.


@dataclass
class VisionConfig:
    image_size: int = 448  # tile side in pixels
    patch_size: int = 14
    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    intermediate_size: int = 4096
    layer_norm_eps: float = 1e-6

    def __post_init__(self):
        assert self.image_size % self.patch_size == 0, "image_size must be a multiple of patch_size"
        assert self.hidden_size % self.num_heads == 0


@dataclass
class LLMConfig:
    arch: str = "qwen2"  # 'qwen2' (InternVL2.5-1B/4B) or 'internlm2' (2B/8B): only the key names and biases differ
    vocab_size: int = 151674
    hidden_size: int = 896
    num_layers: int = 24
    num_heads: int = 14
    num_kv_heads: int = 2
    intermediate_size: int = 4864
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    rope_dynamic_factor: float = 0.0  # InternLM2's dynamic NTK (2.0); 0 = plain RoPE
    head_dim: int = 0  # derived

    def __post_init__(self):
        assert self.arch in ("qwen2", "internlm2"), f"unknown LLM arch {self.arch!r}"
        assert self.num_heads % self.num_kv_heads == 0, "num_heads must be a multiple of num_kv_heads (GQA)"
        self.head_dim = self.hidden_size // self.num_heads
        assert self.head_dim * self.num_heads == self.hidden_size

    @property
    def attention_bias(self):
        return self.arch == "qwen2"  # Qwen2 has q/k/v biases (not o_proj); InternLM2 has none


@dataclass
class ArmorConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    downsample_ratio: float = 0.5  # pixel shuffle: 2x2 patches -> one token of 4x the width
    img_context_id: int = -1  # <IMG_CONTEXT>; -1 = vocab_size - 7 (the 9 InternVL tokens are appended last)
    max_tiles: int = 12  # dynamic tiling limit used by chat() (the config's max_dynamic_patch)
    system_message: str | None = None  # None = the InternVL2.5 default (tokenizer.SYSTEM_MESSAGE)
    # ARMOR additions
    num_image_codes: int = 8192  # VQGAN codebook size (Chameleon: 8192)
    image_grid: int = 16  # codes per side of a generated image (256 px / 16 = 16 for Chameleon's VQGAN)
    image_px: int = 256  # side of a generated image in pixels
    num_adapter_layers: int = 3
    # False only for the ablation of Figure 7: image targets are scored by one softmax over the whole vocabulary
    # (text head + visual head) instead of the visual head alone
    forward_switching: bool = True
    tokens_per_tile: int = 0  # derived

    def __post_init__(self):
        if isinstance(self.vision, dict):
            self.vision = VisionConfig(**self.vision)
        if isinstance(self.llm, dict):
            self.llm = LLMConfig(**self.llm)
        if self.img_context_id < 0:
            self.img_context_id = self.llm.vocab_size - 7
        assert 0 <= self.img_context_id < self.llm.vocab_size
        g = self.vision.image_size // self.vision.patch_size
        s = round(1 / self.downsample_ratio)
        assert g % s == 0, "the patch grid must divide by the pixel-shuffle factor"
        self.tokens_per_tile = (g // s) ** 2

    # ids of the extended vocabulary (see the module docstring)
    @property
    def imgbos_id(self):
        return self.llm.vocab_size

    @property
    def imgend_id(self):
        return self.llm.vocab_size + 1

    @property
    def imgpad_id(self):
        return self.llm.vocab_size + 2

    @property
    def code_offset(self):
        return self.llm.vocab_size + 3

    @property
    def total_vocab(self):
        return self.llm.vocab_size + 3 + self.num_image_codes

    def to_dict(self):
        d = asdict(self)
        for k in ("tokens_per_tile",):
            d.pop(k)
        d["llm"].pop("head_dim")
        return d


# The released models' shapes, from each InternVL2.5 checkpoint's config.json (vision_config, llm_config).
VIT_300M = dict(image_size=448, patch_size=14, hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096)
TINY_VIT = dict(image_size=28, patch_size=14, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)


def _config(vision, llm, **armor):
    return ArmorConfig(VisionConfig(**vision), LLMConfig(**llm), **armor)


PRESETS = {
    # InternVL2.5-1B: InternViT-300M + Qwen2.5-0.5B-Instruct
    "internvl2_5-1b": lambda: _config(VIT_300M, dict(
        arch="qwen2", vocab_size=151674, hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2,
        intermediate_size=4864, rope_theta=1e6, rms_norm_eps=1e-6)),
    # InternVL2.5-2B: InternViT-300M + internlm2_5-1_8b-chat
    "internvl2_5-2b": lambda: _config(VIT_300M, dict(
        arch="internlm2", vocab_size=92553, hidden_size=2048, num_layers=24, num_heads=16, num_kv_heads=8,
        intermediate_size=8192, rope_theta=1e6, rms_norm_eps=1e-5, rope_dynamic_factor=2.0)),
    # InternVL2.5-4B: InternViT-300M + Qwen2.5-3B-Instruct
    "internvl2_5-4b": lambda: _config(VIT_300M, dict(
        arch="qwen2", vocab_size=151674, hidden_size=2048, num_layers=36, num_heads=16, num_kv_heads=2,
        intermediate_size=11008, rope_theta=1e6, rms_norm_eps=1e-6)),
    # InternVL2.5-8B: InternViT-300M + internlm2_5-7b-chat
    "internvl2_5-8b": lambda: _config(VIT_300M, dict(
        arch="internlm2", vocab_size=92553, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
        intermediate_size=14336, rope_theta=1e6, rms_norm_eps=1e-5, rope_dynamic_factor=2.0)),
    # the toy world (toy/): 64 px single tiles of 8 px patches -> 16 tokens per image, a 4-layer Qwen2-layout
    # LLM (vocab_size is replaced by the toy tokenizer's), drawing 8x8 codes of the toy VQGAN (512 codes)
    "toy": lambda: _config(
        dict(image_size=64, patch_size=8, hidden_size=128, num_layers=4, num_heads=4, intermediate_size=512),
        dict(arch="qwen2", vocab_size=1024, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2,
             intermediate_size=768),
        max_tiles=1, system_message="You can see and draw pictures.", num_image_codes=512, image_grid=8, image_px=64,
        num_adapter_layers=3),
    # tiny shapes for tests: every code path, milliseconds per forward
    "tiny": lambda: _config(
        TINY_VIT, dict(arch="qwen2", vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                       intermediate_size=128),
        num_image_codes=64, image_grid=4, image_px=64, num_adapter_layers=2, max_tiles=4),
    "tiny-internlm2": lambda: _config(
        TINY_VIT, dict(arch="internlm2", vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                       intermediate_size=128, rms_norm_eps=1e-5, rope_dynamic_factor=2.0),
        num_image_codes=64, image_grid=4, image_px=64, num_adapter_layers=2),
}

# -----------------------------------------------------------------------------------------------------------------
# InternViT-300M (upstream: InternVL internvl_chat/internvl/model/internvl_chat/modeling_intern_vit.py).
# Pre-LN blocks with LayerScale, fused qkv with bias, no final norm: InternVisionEncoderLayer there.


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        C, g = cfg.hidden_size, cfg.image_size // cfg.patch_size
        self.grid = g
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, C))
        self.patch_embedding = nn.Conv2d(3, C, cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Parameter(torch.zeros(1, 1 + g * g, C))  # CLS first, then the grid row-major

    def forward(self, pixels):
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))  # (N, C, h, w)
        N, C, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)  # (N, h*w, C), row-major
        x = torch.cat([self.class_embedding.expand(N, 1, C).to(x.dtype), x], dim=1)
        pos = self.position_embedding
        if (h, w) != (self.grid, self.grid):
            # other input sizes: bicubic resample of the 2-D grid in fp32, as upstream does
            grid = pos[:, 1:].float().reshape(1, self.grid, self.grid, C).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
            pos = torch.cat([pos[:, :1], grid.flatten(2).transpose(1, 2).to(pos.dtype)], dim=1)
        return x + pos


class VisionAttention(nn.Module):  # InternAttention: one fused qkv with bias, no qk norm in the 300M
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.nh = cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=True)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.nh, C // self.nh).permute(2, 0, 3, 1, 4)  # 3 x (B, nh, T, hd)
        y = attention(q, k, v)  # bidirectional, no mask
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU


class VisionLayer(nn.Module):  # InternVisionEncoderLayer
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = VisionAttention(cfg)
        self.ls1 = nn.Parameter(torch.ones(cfg.hidden_size))  # LayerScale (a plain vector in the checkpoint)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)
        self.ls2 = nn.Parameter(torch.ones(cfg.hidden_size))

    def forward(self, x):
        x = x + self.ls1 * self.attn(self.norm1(x).to(x.dtype))
        return x + self.ls2 * self.mlp(self.norm2(x).to(x.dtype))


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(cfg) for _ in range(cfg.num_layers))


class VisionModel(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.embeddings = VisionEmbeddings(cfg)
        self.encoder = VisionEncoder(cfg)
        self.grad_ckpt = False

    def forward(self, pixels):
        x = self.embeddings(pixels)  # (N, 1 + h*w, C)
        for layer in self.encoder.layers:
            x = checkpoint(layer, x, use_reentrant=False) if self.grad_ckpt and self.training else layer(x)
        return x  # no final LayerNorm: select_layer = -1 takes the last block's raw output


def pixel_shuffle(x, scale):
    """InternVL's pixel_shuffle v2 with downsample 1/scale: (N, H, W, C) -> (N, H/s * W/s, s*s*C).
    Output token (i, j) concatenates patches (si, sj), (si, sj+1), (si+1, sj), (si+1, sj+1), in that order."""
    N, H, W, C = x.shape
    x = x.reshape(N, H // scale, scale, W // scale, scale, C).permute(0, 1, 3, 2, 4, 5)  # (N, H/s, W/s, s, s, C)
    return x.reshape(N, (H // scale) * (W // scale), scale * scale * C)


# -----------------------------------------------------------------------------------------------------------------
# The LLM: Qwen2 / InternLM2 decoder blocks (upstream: transformers' Qwen2, InternVL's modeling_internlm2.py).
# Modules carry Qwen2's names; InternLM2 checkpoints go through INTERNLM2_KEYS + the wqkv split at load time.


def rms_norm(x, weight, eps):
    # released cast order: normalise in fp32 (x * rsqrt(mean(x^2) + eps), which F.rms_norm computes in one call,
    # bit for bit), cast back to the input dtype, then scale
    if x.dtype == torch.float32:
        return weight * F.rms_norm(x, x.shape[-1:], eps=eps)
    return weight * F.rms_norm(x.float(), x.shape[-1:], eps=eps).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


class Rotary:
    """Rotate-half RoPE tables. InternLM2's dynamic NTK changes the base only past max_position_embeddings,
    from the total length of the current sequence (stateless; upstream keeps the enlarged base afterwards)."""

    def __init__(self, cfg: LLMConfig):
        self.hd, self.theta, self.cfg = cfg.head_dim, cfg.rope_theta, cfg
        self.tables = {}

    def inv_freq(self, seq_len):
        base, c = self.theta, self.cfg
        if c.rope_dynamic_factor and seq_len > c.max_position_embeddings:
            f = c.rope_dynamic_factor
            base = base * (f * seq_len / c.max_position_embeddings - (f - 1)) ** (self.hd / (self.hd - 2))
        return 1.0 / base ** (torch.arange(0, self.hd, 2, dtype=torch.int64).float() / self.hd)

    def __call__(self, pos, seq_len, dtype):
        """pos (B, T) int -> cos, sin (B, 1, T, hd) in the activation dtype (built in fp32, cast before use)."""
        if self.cfg.rope_dynamic_factor and seq_len > self.cfg.max_position_embeddings:
            # the base changes with every length: compute for these positions only (a table per length would pile
            # up one entry per decoding step)
            freqs = pos.float()[..., None] * self.inv_freq(seq_len).to(pos.device)  # (B, T, hd/2)
            emb = torch.cat([freqs, freqs], dim=-1)
            return emb.cos().to(dtype).unsqueeze(1), emb.sin().to(dtype).unsqueeze(1)
        key = (pos.device, dtype)
        if key not in self.tables or self.tables[key][0].shape[0] < seq_len:  # positions stay below seq_len
            n = max(seq_len, 256)
            freqs = torch.outer(torch.arange(n, dtype=torch.float32), self.inv_freq(0))
            emb = torch.cat([freqs, freqs], dim=-1).to(pos.device)
            self.tables[key] = (emb.cos().to(dtype), emb.sin().to(dtype))
        cos, sin = self.tables[key]
        return cos[pos].unsqueeze(1), sin[pos].unsqueeze(1)


def attention(q, k, v, mask=None, causal=False):
    """Softmax attention over (B, nh, T, hd) tensors: F.scaled_dot_product_attention, except for short sequences in
    bf16 with grad on CPU, where its kernels ran slower than two plain matmuls (forward + backward at the toy
    training's shapes; about even near 512 tokens, slower past it). That is every attention of the toy training
    (ViT, LLM and adapter; Attention.forward keeps q and k in bf16 under autocast, see there)."""
    T = q.shape[-2]
    if not (q.device.type == "cpu" and q.dtype == torch.bfloat16 and torch.is_grad_enabled() and T <= 256):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    att = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # (B, nh, T, S)
    if causal:
        mask = torch.ones(T, k.shape[-2], dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        att = att.masked_fill(~mask, float("-inf"))
    return att.float().softmax(-1).to(v.dtype) @ v  # softmax in fp32, as the SDPA kernels do


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class KVCache:
    """Pre-allocated keys and values for every layer, indexed by sequence column. One tensor, keys then values on
    the second axis, (layers, 2, B, n_kv, T_max, hd): a decode step reads one view of it, writes its new column in one
    copy, and k, v (layers, B, n_kv, T_max, hd) each fold (B, n_kv) into one batch axis without a copy (a layout with
    k and v side by side per row made every decode step's attention matmuls copy the whole cache at B > 1)."""

    def __init__(self, n_layers, B, n_kv, max_len, hd, dtype, device):
        self._hold(torch.zeros(n_layers, 2, B, n_kv, max_len, hd, dtype=dtype, device=device))

    def _hold(self, kv):
        self.kv, self.k, self.v = kv, kv[:, 0], kv[:, 1]

    def rows(self, rows: slice):
        """A cache over some rows of this one, sharing its storage (writes go through)."""
        out = KVCache.__new__(KVCache)
        out._hold(self.kv[:, :, rows])
        return out

    def update(self, layer, start, k, v):
        T = k.shape[2]
        self.k[layer, :, :, start:start + T] = k
        self.v[layer, :, :, start:start + T] = v
        return self.k[layer, :, :, :start + T], self.v[layer, :, :, :start + T]


class Attention(nn.Module):  # Qwen2Attention (modeling_qwen2.py) / InternLM2Attention (modeling_internlm2.py)
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.nh, self.nkv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        d, b = cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(d, self.nh * self.hd, bias=b)
        self.k_proj = nn.Linear(d, self.nkv * self.hd, bias=b)
        self.v_proj = nn.Linear(d, self.nkv * self.hd, bias=b)
        self.o_proj = nn.Linear(self.nh * self.hd, d, bias=False)

    def forward(self, x, rope, ctx):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.hd).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)
        cos, sin = rope
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        # Under autocast the projections come out bf16 but RoPE's fp32 tables promote q and k to fp32, which would
        # send attention to SDPA's slower fp32 kernels. The rotation stays fp32; its result goes back to the
        # projections' dtype (a no-op without autocast).
        q, k = q.to(v.dtype), k.to(v.dtype)
        if ctx.cache is not None:  # append to the cache, attend over everything cached so far
            k, v = ctx.cache.update(ctx.layer, ctx.start, k, v)
        if self.nkv != self.nh:  # GQA: query head i reads kv head i // g
            k = k.repeat_interleave(self.nh // self.nkv, dim=1)
            v = v.repeat_interleave(self.nh // self.nkv, dim=1)
        y = attention(q, k, v, ctx.mask, ctx.causal)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.nh * self.hd))


class MLP(nn.Module):  # Qwen2MLP / InternLM2MLP
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)  # InternLM2: w1
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)  # w3
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)  # w2

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    """Pre-norm decoder block, shared by the LLM and ARMOR's adapter (same block type, paper Section 3.2)."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)  # InternLM2: attention_norm
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)  # InternLM2: ffn_norm
        self.mlp = MLP(cfg)

    def forward(self, x, rope, ctx):
        x = x + self.self_attn(self.input_layernorm(x), rope, ctx)
        return x + self.mlp(self.post_attention_layernorm(x))

@dataclass
class Ctx:
    """Per-call attention context shared by every block of a stack."""
    cache: KVCache | None = None
    start: int = 0  # first cache column written by this call
    mask: torch.Tensor | None = None  # (B, 1, T, S) bool, True = may attend
    causal: bool = False
    layer: int = 0


def make_ctx(B, T, start, pad, cache, device):
    """Causal attention over cache columns [0, start + T). `pad` (B,) counts left-padding columns to hide."""
    if pad is None or not bool(pad.any()):
        if start == 0 or cache is None:
            return Ctx(cache, start, None, T > 1)
        if T == 1:
            return Ctx(cache, start, None, False)  # one new query sees every cached column
    S = start + T
    i = torch.arange(start, S, device=device)[:, None]
    j = torch.arange(S, device=device)[None, :]
    mask = (j <= i)[None, None]  # (1, 1, T, S)
    if pad is not None:
        # padded keys are hidden; a padded query keeps itself so its softmax has a finite row
        mask = mask & ((j >= pad[:, None, None, None]) | (j == i))
    return Ctx(cache, start, mask.expand(B, 1, T, S), False)


def run_blocks(blocks, x, rope, ctx, grad_ckpt=False):
    for i, block in enumerate(blocks):
        ctx.layer = i
        if grad_ckpt and torch.is_grad_enabled():
            x = checkpoint(block, x, rope, ctx, use_reentrant=False)
        else:
            x = block(x, rope, ctx)
    return x


class TextModel(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)  # InternLM2: tok_embeddings
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.model = TextModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)  # untied; InternLM2: output


# -----------------------------------------------------------------------------------------------------------------
# InternVL2.5: the base MLLM (upstream: modeling_internvl_chat.py, InternVLChatModel).


@dataclass
class State:
    """Generation state: the LLM's KV cache, the adapter's (filled lazily), and the decoder outputs it needs."""
    llm: KVCache
    pad: torch.Tensor | None  # (B,) left-padding columns per row; None: none padded
    hidden: torch.Tensor | None = None  # (B, T_max, d) decoder outputs, kept only for the adapter's catch-up
    adapter: KVCache | None = None
    length: int = 0  # columns in the LLM cache
    adapter_length: int = 0  # columns in the adapter cache


class InternVL(nn.Module):
    """The understanding-only base: image tiles -> InternViT -> pixel shuffle -> mlp1 -> spliced into the LLM."""

    def __init__(self, config: ArmorConfig):
        super().__init__()
        self.config = config
        v, d = config.vision, config.llm.hidden_size
        self.vision_model = VisionModel(v)
        w = v.hidden_size * round(1 / config.downsample_ratio) ** 2
        self.mlp1 = nn.Sequential(nn.LayerNorm(w, eps=1e-5), nn.Linear(w, d), nn.GELU(), nn.Linear(d, d))
        self.language_model = CausalLM(config.llm)
        self.rotary = Rotary(config.llm)
        self.grad_ckpt = False

    def extract_feature(self, pixels):
        """(N tiles, 3, S, S) -> (N, tokens_per_tile, d)."""
        x = self.vision_model(pixels)[:, 1:]  # drop CLS: (N, h*w, C)
        N, L, C = x.shape
        g = math.isqrt(L)
        x = pixel_shuffle(x.reshape(N, g, g, C), round(1 / self.config.downsample_ratio))
        return self.mlp1(x)

    def embed(self, ids, pixels=None):
        x = self.language_model.model.embed_tokens(ids)  # (B, T, d)
        return self._splice(ids, x, pixels)

    def _splice(self, ids, x, pixels):
        """Overwrite the <IMG_CONTEXT> rows with the image features, in order (tile 0 token 0 ... last tile)."""
        ctx_id = self.config.img_context_id
        if pixels is None or len(pixels) == 0:
            if bool((ids == ctx_id).any()):
                raise ValueError(f"{int((ids == ctx_id).sum())} <IMG_CONTEXT> tokens but no pixel_values")
            return x
        where = ids == ctx_id
        n = int(where.sum())
        feats = self.extract_feature(pixels).reshape(-1, x.shape[-1])
        if feats.shape[0] != n:
            raise ValueError(f"{n} <IMG_CONTEXT> tokens for {len(pixels)} tiles x {self.config.tokens_per_tile}")
        x = x.clone()
        x[where] = feats.to(x.dtype)
        return x

    def positions(self, B, start, T, pad, device):
        pos = torch.arange(start, start + T, device=device).expand(B, T)
        return pos if pad is None else (pos - pad[:, None]).clamp(min=0)

    def run_stack(self, blocks, x, start=0, pad=None, cache=None):
        """Run a stack of blocks (the LLM's decoder layers, or ARMOR's adapter) on x (B, T, d) at cache columns
        [start, start + T), rows left-padded by pad (B,) -> the last block's output (B, T, d)."""
        B, T, _ = x.shape
        pos = self.positions(B, start, T, pad, x.device)
        rope = self.rotary(pos, start + T, x.dtype)
        ctx = make_ctx(B, T, start, pad, cache, x.device)
        return run_blocks(blocks, x, rope, ctx, self.grad_ckpt)

    def decode(self, x, start=0, pad=None, cache=None):
        """Run the LLM's decoder layers on embeddings x (B, T, d); returns the last layer's output (pre-norm)."""
        return self.run_stack(self.language_model.model.layers, x, start, pad, cache)

    def forward(self, ids, pixels=None, targets=None):
        """Base MLLM forward (next-token targets aligned with ids, -100 = ignore) -> (logits, loss)."""
        h = self.language_model.model.norm(self.decode(self.embed(ids, pixels)))
        if targets is None:
            return self.language_model.lm_head(h), None
        keep = targets >= 0  # the LM head only runs on the positions that have a target
        logits = self.language_model.lm_head(h[keep])
        return logits, F.cross_entropy(logits.float(), targets[keep])

    # --- incremental decoding -------------------------------------------------------------------------------------
    def new_state(self, B, max_len, pad=None, dtype=None, device=None):
        p = next(self.parameters())
        dtype, device, c = dtype or p.dtype, device or p.device, self.config.llm
        pad = None if pad is None or not bool(pad.any()) else pad.to(device)  # None: no row padded (fewer kernels)
        return State(KVCache(c.num_layers, B, c.num_kv_heads, max_len, c.head_dim, dtype, device), pad)

    def extend(self, state: State, ids, pixels=None):
        """Append tokens ids (B, T) to the state; returns the decoder output (B, T, d) of the new positions."""
        h = self.decode(self.embed(ids, pixels), state.length, state.pad, state.llm)
        if state.hidden is not None:
            state.hidden.narrow(1, state.length, ids.shape[1]).copy_(h)
        state.length += ids.shape[1]
        return h

    def text_logits(self, h):
        return self.language_model.lm_head(self.language_model.model.norm(h))


# -----------------------------------------------------------------------------------------------------------------
# ARMOR's additions (paper Section 3.2, Table 1, Figure 3).


class ArmorModules(nn.Module):
    """Everything ARMOR adds, under one prefix (`armor.`) so that a checkpoint of the new tensors is one filter."""

    def __init__(self, config: ArmorConfig):
        super().__init__()
        c = config.llm
        self.embed_new = nn.Embedding(3 + config.num_image_codes, c.hidden_size)  # <imgbos>, <imgend>, <imgpad>, codes
        self.imgbos_head = nn.Linear(c.hidden_size, 1, bias=False)  # the text head's extra row
        self.adapter = nn.ModuleList(Block(c) for _ in range(config.num_adapter_layers))
        self.adapter_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.visual_head = nn.Linear(c.hidden_size, 2 + config.num_image_codes, bias=False)  # <imgend>, <imgpad>, codes


@dataclass
class ArmorOutput:
    text_logits: torch.Tensor | None  # (N_text, V + 1) on the text positions, or (B, T, V + 1) without targets
    image_logits: torch.Tensor | None  # (N_img, K + 2) on the image positions, or (B, T, K + 2) without targets
    loss: torch.Tensor | None = None
    loss_text: torch.Tensor | None = None
    loss_img: torch.Tensor | None = None


# WoHG (Figure 5): the trainable groups per stage. Vision encoder, projector, decoder layers and the original
# embedding rows are frozen in every stage.
STAGE_GROUPS = {
    1: ("embed_new", "text_head"),  # what to generate
    2: ("embed_new", "adapter", "visual_head"),  # how to generate
    3: ("embed_new", "adapter", "text_head", "visual_head"),  # how to answer better
}


class Armor(InternVL):
    def __init__(self, config: ArmorConfig):
        super().__init__(config)
        self.armor = ArmorModules(config)

    # --- embeddings: frozen original rows + trainable new rows ("unified embedding") ---------------------------
    def embed(self, ids, pixels=None):
        V = self.config.llm.vocab_size
        if not bool((ids >= V).any()):
            return self._splice(ids, self.language_model.model.embed_tokens(ids), pixels)
        new = ids >= V  # image codes and the three specials come from the new rows
        x = self.language_model.model.embed_tokens(ids.clamp(max=V - 1))
        x = torch.where(new[..., None], self.armor.embed_new((ids - V).clamp(min=0)), x)
        return self._splice(ids, x, pixels)

    # --- the two heads ---------------------------------------------------------------------------------------------
    def text_logits(self, h):
        """Text head on decoder outputs (..., d) -> (..., V + 1): the original LM head + the <imgbos> row."""
        h = self.language_model.model.norm(h)
        return torch.cat([self.language_model.lm_head(h), self.armor.imgbos_head(h)], dim=-1)

    def adapt(self, h, start=0, pad=None, cache=None):
        """The adapter on decoder outputs h (B, T, d) -> (B, T, d), the visual head's input (before its norm). It
        reads the decoder's output at the same positions (same RoPE), with a causal KV cache of its own (Figure 3)."""
        return self.run_stack(self.armor.adapter, h, start, pad, cache)

    def image_logits(self, a):
        """Visual head on adapter outputs (..., d) -> (..., K + 2): <imgend>, <imgpad>, codes."""
        return self.armor.visual_head(self.armor.adapter_norm(a))

    def forward(self, ids, pixels=None, targets=None, alpha=1.0, beta=1.0, n_text=None, n_img=None):
        """Training / scoring forward. targets (B, T) are next-token ids aligned with ids (-100 = no target).

        Each head runs only on the positions it predicts; with beta = 0 the adapter is not run at all.
        Loss (Eq. 1-3): L = alpha * L_text + beta * L_img, each term a token-mean over its own positions, so alpha
        and beta weigh the two modalities independently of how many tokens each has. n_text / n_img override the
        denominators (train.py passes global counts so gradient accumulation and DDP give the same gradient).
        """
        h = self.decode(self.embed(ids, pixels))  # (B, T, d)
        V = self.config.llm.vocab_size
        if targets is None:  # every position through both heads (tests, scoring)
            return ArmorOutput(self.text_logits(h), self.image_logits(self.adapt(h)))
        is_text = (targets >= 0) & (targets <= V)
        is_img = targets > V
        zero = h.sum() * 0  # an absent term still has a grad_fn, so backward() works on any batch
        text_logits = image_logits = None
        loss_text = loss_img = zero
        if alpha and bool(is_text.any()):
            text_logits = self.text_logits(h[is_text])
            loss_text = F.cross_entropy(text_logits.float(), targets[is_text], reduction="sum")
            loss_text = loss_text / (n_text if n_text is not None else is_text.sum())
        if beta and bool(is_img.any()):
            last = int(is_img.any(0).nonzero().max()) + 1  # the adapter is causal: stop after the last image target
            a = self.adapt(h[:, :last])
            z = a[is_img[:, :last]]
            image_logits, tgt = self.image_logits(z), targets[is_img] - (V + 1)
            if not self.config.forward_switching:  # ablation: the whole vocabulary competes (index = token id)
                image_logits, tgt = torch.cat([self.text_logits(z), image_logits], dim=-1), targets[is_img]
            loss_img = F.cross_entropy(image_logits.float(), tgt, reduction="sum")
            loss_img = loss_img / (n_img if n_img is not None else is_img.sum())
        loss = alpha * loss_text + beta * loss_img
        return ArmorOutput(text_logits, image_logits, loss, loss_text.detach(), loss_img.detach())

    # --- incremental decoding with a lazily filled adapter cache ---------------------------------------------------
    def new_state(self, B, max_len, pad=None, dtype=None, device=None):
        s = super().new_state(B, max_len, pad, dtype, device)
        c = self.config.llm
        s.hidden = torch.zeros(B, max_len, c.hidden_size, dtype=s.llm.k.dtype, device=s.llm.k.device)
        s.adapter = KVCache(len(self.armor.adapter), B, c.num_kv_heads, max_len, c.head_dim, s.llm.k.dtype,
                            s.llm.k.device)
        return s

    def adapter_catch_up(self, state: State):
        """Run the adapter over every column it has not seen (one batched call) -> outputs (B, n_new, d).
        Called only when an image is being drawn, so a text-only answer never pays for the adapter."""
        a, b = state.adapter_length, state.length
        out = self.adapt(state.hidden[:, a:b], a, state.pad, state.adapter)
        state.adapter_length = b
        return out


# -----------------------------------------------------------------------------------------------------------------
# WoHG trainable sets


def param_groups(model: Armor):
    """Name -> parameters of each ARMOR group. The text head includes the original LM head (Figure 5 trains it)."""
    a = model.armor
    return {
        "embed_new": [a.embed_new.weight],
        "text_head": [model.language_model.lm_head.weight, a.imgbos_head.weight],
        "adapter": list(a.adapter.parameters()) + list(a.adapter_norm.parameters()),
        "visual_head": [a.visual_head.weight],
    }


def set_trainable(model: Armor, stage=None, groups=None):
    """Freeze everything, then unfreeze the groups of a WoHG stage (or an explicit list, for ablations; "all"
    unfreezes the whole model, vision encoder and decoder layers included: the paper's single-stage baseline).
    Returns the trainable parameter count."""
    groups = STAGE_GROUPS[stage] if groups is None else tuple(groups)
    table = param_groups(model)
    unknown = set(groups) - set(table) - {"all"}
    if unknown:
        raise ValueError(f"unknown parameter groups {sorted(unknown)}; choose from {sorted(table) + ['all']}")
    model.requires_grad_("all" in groups)  # "all": every tensor, base included (the single-stage ablation only)
    for g in set(groups) - {"all"}:
        for p in table[g]:
            p.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def frozen_matmuls(model: InternVL):
    """The frozen weights that training may store in bf16: under bf16 autocast every matmul reads its weight cast to
    bf16, so storing a frozen one that way changes no number and halves its memory (what lets an 8B stage 2 fit one
    80 GB GPU per rank). Linear / Conv2d tensors of the base only, outside what checkpoints save (ARMOR's modules,
    the LM head); norms, embedding tables and every trainable tensor stay fp32, AdamW's master weights."""
    saved = {k.rsplit(".", 1)[0] for k in PARTIAL_BASE_KEYS}
    return [p for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))
            and not name.startswith("armor.") and name not in saved
            for p in m.parameters(recurse=False) if not p.requires_grad]


# -----------------------------------------------------------------------------------------------------------------
# Initialisation of ARMOR's new tensors (random, as in the paper), and of whole models for the toy world / tests.


@torch.no_grad()
def init_weights(module, std=0.02):
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, std=std)
            nn.init.zeros_(m.bias)
        elif isinstance(m, (RMSNorm, nn.LayerNorm)):
            nn.init.ones_(m.weight)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, VisionLayer):
            m.ls1.fill_(1.0)
            m.ls2.fill_(1.0)
        elif isinstance(m, VisionEmbeddings):  # unit scale, as InternVisionEmbeddings draws them (torch.randn):
            # at std 0.02 the patch content drowns the position, and a toy base never learns left from right
            nn.init.normal_(m.class_embedding, std=1.0)
            nn.init.normal_(m.position_embedding, std=1.0)


@torch.no_grad()
def init_armor(model: Armor, seed=None):
    """Random init of the new tensors. The new embedding rows take the scale of the original rows, so image
    tokens enter the frozen decoder at the magnitude it was trained on."""
    # Drawn on the CPU from one seeded generator, then moved: the same seed gives the same initial weights on every
    # device (a CUDA generator would draw other numbers), and the statistics below stay on the model's device.
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    a = model.armor

    def randn(shape, std, mean=0.0):  # on the model's device (copy_ casts to the weight's dtype)
        return (torch.randn(shape, generator=g).to(a.embed_new.weight.device) * std + mean)

    ref = model.language_model.model.embed_tokens.weight.float()
    a.embed_new.weight.copy_(randn(a.embed_new.weight.shape, ref.std(), ref.mean()))
    for m in [a.imgbos_head, a.visual_head, *a.adapter.modules()]:
        if isinstance(m, nn.Linear):
            m.weight.copy_(randn(m.weight.shape, 0.02))
            if m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, RMSNorm):
            m.weight.fill_(1.0)
    a.adapter_norm.weight.fill_(1.0)


# -----------------------------------------------------------------------------------------------------------------
# Loading the released InternVL2.5 checkpoints (config.json + model*.safetensors, the keys of
# modeling_internvl_chat.py, modeling_intern_vit.py and the LLM's own modeling file) and saving our own.

# InternLM2 key -> our (Qwen2-named) key. The packed wqkv is handled by split_wqkv / pack_wqkv.
INTERNLM2_KEYS = {
    "language_model.model.tok_embeddings.": "language_model.model.embed_tokens.",
    ".attention.wo.": ".self_attn.o_proj.",
    ".attention_norm.": ".input_layernorm.",
    ".ffn_norm.": ".post_attention_layernorm.",
    ".feed_forward.w1.": ".mlp.gate_proj.",
    ".feed_forward.w3.": ".mlp.up_proj.",
    ".feed_forward.w2.": ".mlp.down_proj.",
    "language_model.output.": "language_model.lm_head.",
}


def split_wqkv(w, cfg: LLMConfig):
    """InternLM2's wqkv rows are grouped per kv head as [g query heads, 1 key, 1 value] x head_dim (the rearrange in
    modeling_internlm2.py's InternLM2Attention.forward)."""
    g, hd = cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
    w = w.reshape(cfg.num_kv_heads, g + 2, hd, w.shape[-1])
    q = w[:, :g].reshape(cfg.num_heads * hd, -1)
    return q, w[:, g].reshape(cfg.num_kv_heads * hd, -1), w[:, g + 1].reshape(cfg.num_kv_heads * hd, -1)


def pack_wqkv(q, k, v, cfg: LLMConfig):
    g, hd = cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
    q = q.reshape(cfg.num_kv_heads, g, hd, -1)
    return torch.cat([q, k.reshape(cfg.num_kv_heads, 1, hd, -1), v.reshape(cfg.num_kv_heads, 1, hd, -1)],
                     dim=1).reshape(-1, q.shape[-1])


def to_released_key(key, cfg: LLMConfig):
    """Our key -> the released key (InternLM2's q/k/v all map to the wqkv they are packed into)."""
    if cfg.arch != "internlm2" or not key.startswith("language_model."):
        return key
    for n in "qkv":
        if key.endswith(f".self_attn.{n}_proj.weight"):
            return key[: -len(f"self_attn.{n}_proj.weight")] + "attention.wqkv.weight"
    for theirs, ours in INTERNLM2_KEYS.items():
        if ours in key:
            return key.replace(ours, theirs)
    return key


def config_from_internvl(cfg_json: dict, **overrides) -> ArmorConfig:
    """Build our config from an InternVL2.5 `config.json` (InternVLChatConfig)."""
    try:
        llm, vis = cfg_json["llm_config"], cfg_json["vision_config"]
        arch_name = llm.get("architectures", ["?"])[0]
        arch = {"Qwen2ForCausalLM": "qwen2", "InternLM2ForCausalLM": "internlm2"}.get(arch_name)
        if arch is None:
            raise ValueError(f"unsupported llm_config.architectures {arch_name!r} (Qwen2 or InternLM2 only)")
        if cfg_json.get("ps_version", "v2") != "v2":
            raise ValueError("only ps_version v2 (InternVL2.5) is supported")
        rs = llm.get("rope_scaling") or {}
        dyn = float(rs.get("factor", 0.0)) if rs.get("type", rs.get("rope_type")) == "dynamic" else 0.0
        v = VisionConfig(vis.get("image_size", cfg_json.get("force_image_size", 448)), vis["patch_size"],
                         vis["hidden_size"], vis["num_hidden_layers"], vis["num_attention_heads"],
                         vis["intermediate_size"], vis.get("layer_norm_eps", 1e-6))
        l = LLMConfig(arch, llm["vocab_size"], llm["hidden_size"], llm["num_hidden_layers"],
                      llm["num_attention_heads"], llm.get("num_key_value_heads", llm["num_attention_heads"]),
                      llm["intermediate_size"], llm.get("rope_theta", 1e6), llm.get("rms_norm_eps", 1e-6),
                      llm.get("max_position_embeddings", 32768), dyn)
    except KeyError as e:
        raise ValueError(f"config.json is missing the InternVL field {e}") from None
    if vis.get("qk_normalization") or vis.get("norm_type", "layer_norm") != "layer_norm":
        raise ValueError("InternViT with qk_normalization / rms_norm (the 6B tower) is not supported")
    kw = dict(downsample_ratio=cfg_json.get("downsample_ratio", 0.5),
              max_tiles=cfg_json.get("max_dynamic_patch", 12), system_message=cfg_json.get("system_message"))
    kw.update(overrides)
    return ArmorConfig(v, l, **kw)


def config_to_internvl(c: ArmorConfig) -> dict:
    """Our config -> an InternVL2.5-style `config.json` (what the toy base ships, and what tests write)."""
    l, v = c.llm, c.vision
    arch = {"qwen2": "Qwen2ForCausalLM", "internlm2": "InternLM2ForCausalLM"}[l.arch]
    llm = dict(architectures=[arch], hidden_size=l.hidden_size, num_hidden_layers=l.num_layers,
               num_attention_heads=l.num_heads, num_key_value_heads=l.num_kv_heads,
               intermediate_size=l.intermediate_size, vocab_size=l.vocab_size, rope_theta=l.rope_theta,
               rms_norm_eps=l.rms_norm_eps, max_position_embeddings=l.max_position_embeddings,
               tie_word_embeddings=False, hidden_act="silu")
    if l.rope_dynamic_factor:
        llm["rope_scaling"] = {"type": "dynamic", "factor": l.rope_dynamic_factor}
    vis = dict(architectures=["InternVisionModel"], hidden_size=v.hidden_size, num_hidden_layers=v.num_layers,
               num_attention_heads=v.num_heads, intermediate_size=v.intermediate_size, image_size=v.image_size,
               patch_size=v.patch_size, qkv_bias=True, qk_normalization=False, norm_type="layer_norm",
               layer_norm_eps=v.layer_norm_eps, num_channels=3)
    out = dict(architectures=["InternVLChatModel"], model_type="internvl_chat", template="internvl2_5",
               downsample_ratio=c.downsample_ratio, force_image_size=v.image_size, ps_version="v2",
               select_layer=-1, dynamic_image_size=True, use_thumbnail=True, min_dynamic_patch=1,
               max_dynamic_patch=c.max_tiles, llm_config=llm, vision_config=vis)
    if c.system_message is not None:
        out["system_message"] = c.system_message
    return out


class CheckpointError(ValueError):
    pass


def _open_safetensors(path):
    """Index of a checkpoint directory (or file): key -> file, with clear errors for missing / broken files."""
    from safetensors import safe_open

    if os.path.isfile(path):
        files = {None: path}
        weight_map = None
    else:
        index = os.path.join(path, "model.safetensors.index.json")
        single = os.path.join(path, "model.safetensors")
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = {fn: os.path.join(path, fn) for fn in sorted(set(weight_map.values()))}
            missing = [fn for fn, p in files.items() if not os.path.exists(p)]
            if missing:
                raise CheckpointError(f"{index} names shard(s) that are not in the directory: {missing}")
        elif os.path.exists(single):
            files, weight_map = {None: single}, None
        else:
            raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {path}")
    handles, keys = {}, {}
    for name, p in files.items():
        try:
            handles[name] = safe_open(p, framework="pt")
        except Exception as e:  # truncated or not a safetensors file
            raise CheckpointError(f"cannot read {p}: {e}") from None
        for k in handles[name].keys():
            if weight_map is not None and weight_map.get(k) != name:
                raise CheckpointError(f"{p} holds {k!r}, which the index places in {weight_map.get(k)!r}")
            keys[k] = handles[name]
    if weight_map is not None:
        lost = sorted(set(weight_map) - set(keys))
        if lost:
            raise CheckpointError(f"{path}: the index lists {len(lost)} tensor(s) missing from their shards, "
                                  f"e.g. {lost[0]!r}")
    return keys


def _read_tensor(handle, key):
    try:
        return handle.get_tensor(key)
    except Exception as e:
        raise CheckpointError(f"cannot read tensor {key!r}: {e}") from None


def load_state(model: nn.Module, tensors: dict, dtype, device, what="checkpoint", name=lambda k: k):
    """Strict load: the key sets must match exactly and every shape must agree; nothing is copied before that.
    `tensors` maps our key -> a zero-argument loader (so only one tensor is in flight at a time); `name` maps our
    key to the one in the file, for the error messages."""
    expected = {k: v for k, v in model.state_dict().items()}
    missing = sorted({name(k) for k in set(expected) - set(tensors)})
    unexpected = sorted({name(k) for k in set(tensors) - set(expected)})
    if missing or unexpected:
        msg = []
        if missing:
            msg.append(f"{len(missing)} missing key(s), e.g. {missing[:3]}")
        if unexpected:
            msg.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:3]}")
        raise CheckpointError(f"{what}: " + "; ".join(msg))
    state = {}
    for k, load in tensors.items():
        t = load()
        if tuple(t.shape) != tuple(expected[k].shape):
            raise CheckpointError(f"{what}: {name(k)!r} has shape {tuple(t.shape)}, the model expects "
                                  f"{tuple(expected[k].shape)}")
        state[k] = t.to(device=device, dtype=dtype)
    model.load_state_dict(state, strict=True, assign=True)
    return len(state)


def read_internvl_tensors(path, cfg: ArmorConfig):
    """Released key names -> our key names, with InternLM2's wqkv split into q/k/v. Values are loaders."""
    keys = _open_safetensors(path)
    out = {}
    for key, h in keys.items():
        if cfg.llm.arch == "internlm2" and key.endswith(".attention.wqkv.weight"):
            base = key[: -len("attention.wqkv.weight")]
            cache = {}

            def part(i, key=key, h=h, cache=cache):
                if "qkv" not in cache:
                    w, c = _read_tensor(h, key), cfg.llm
                    shape = ((c.num_heads + 2 * c.num_kv_heads) * c.head_dim, c.hidden_size)
                    if tuple(w.shape) != shape:
                        raise CheckpointError(f"{path}: {key!r} has shape {tuple(w.shape)}, the model expects {shape}")
                    cache["qkv"] = split_wqkv(w, c)
                t = cache["qkv"][i]
                if i == 2:
                    cache.clear()
                return t
            for i, n in enumerate("qkv"):
                out[f"{base}self_attn.{n}_proj.weight"] = (lambda i=i, part=part: part(i))
            continue
        ours = key
        if cfg.llm.arch == "internlm2":
            for theirs, mine in INTERNLM2_KEYS.items():
                if theirs in ours:
                    ours = ours.replace(theirs, mine)
                    break
        out[ours] = (lambda key=key, h=h: _read_tensor(h, key))
    return out


def _count(m):
    return sum(p.numel() for p in m.parameters())


# what a released InternVL2.5 directory's config.json says it is (its model_type); the remote code's
# InternVLChatConfig (configuration_internvl_chat.py) sets it, a bare Qwen2 / InternLM2 LLM directory says otherwise
INTERNVL_MODEL_TYPE = "internvl_chat"
# the files of each kind of tokenizer that tokenizer.Tokenizer.from_dir reads, for the messages
TOKENIZER_FILES = {"tokenizer.json": "tokenizer.json", "qwen2": "vocab.json + merges.txt",
                   "internlm2": "tokenizer.model"}


def check_tokenizer(path, cfg: ArmorConfig):
    """The tokenizer beside the weights must exist and fit them: as many ids as the embedding has rows, and
    <IMG_CONTEXT> where the config puts it (released: the 9 InternVL tokens close the vocabulary).
    -> a description for the summary line, e.g. "tokenizer vocab.json + merges.txt, 151,674 ids"."""
    from tokenizer import Tokenizer

    kind = Tokenizer.kind_in(path)
    if kind is None:
        half = [f for f in ("vocab.json", "merges.txt") if os.path.isfile(os.path.join(path, f))]
        raise CheckpointError(f"{path}: no tokenizer" + (f" ({half[0]} without its partner)" if half else "") +
                              "; expected tokenizer.json, vocab.json + merges.txt (Qwen2) or tokenizer.model "
                              "(InternLM2) beside config.json")
    try:
        tok = Tokenizer.from_dir(path)
    except Exception as e:  # malformed files: ValueError, KeyError, or the tokenizers library's own exception
        first = (str(e).strip().splitlines() or [""])[0]
        raise CheckpointError(f"{path}: cannot read the tokenizer ({type(e).__name__}: {first})") from None
    if len(tok) != cfg.llm.vocab_size or tok.img_context != cfg.img_context_id:
        raise CheckpointError(f"{path}: the tokenizer ({len(tok)} tokens, <IMG_CONTEXT> = {tok.img_context}) does "
                              f"not fit config.json (vocab_size {cfg.llm.vocab_size}, <IMG_CONTEXT> expected at "
                              f"{cfg.img_context_id})")
    return f"tokenizer {TOKENIZER_FILES[kind]}, {len(tok):,} ids"


def from_internvl(path, dtype=torch.float32, device="cpu", armor=True, seed=0, verbose=True, tokenizer=False,
                  **overrides):
    """Load a released InternVL2.5 directory (config.json + model.safetensors or shards + index).
    The model is built on the meta device and every tensor is assigned once (no second copy). With armor=True the
    ARMOR additions are added with a random init; with armor=False this is the plain base MLLM.
    tokenizer=True also requires the directory's tokenizer and checks that it fits (check_tokenizer), before any
    weight is read: what `python armor.py --load` does, since a base without one can be neither trained nor sampled."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise CheckpointError(f"no config.json in {path}")
    try:
        with open(cfg_path) as f:
            cfg_json = json.load(f)
        if not isinstance(cfg_json, dict):
            raise ValueError(f"expected a JSON object, got {type(cfg_json).__name__}")
        if cfg_json.get("model_type") != INTERNVL_MODEL_TYPE:
            raise ValueError(f"model_type {cfg_json.get('model_type')!r}, expected {INTERNVL_MODEL_TYPE!r} "
                             f"(a released InternVL2.5 directory)")
        cfg = config_from_internvl(cfg_json, **overrides)
    except ValueError as e:  # another model, unsupported architecture, missing field, not JSON
        raise CheckpointError(f"{cfg_path}: {e}") from None
    tok_note = check_tokenizer(path, cfg) if tokenizer else None
    with torch.device("meta"):
        model = (Armor if armor else InternVL)(cfg)
    base = model.armor if armor else None
    if armor:
        model.armor = None  # load the base strictly on its own, then attach the new modules
    n = load_state(model, read_internvl_tensors(path, cfg), dtype, device, what=path,
                   name=lambda k: to_released_key(k, cfg.llm))
    if armor:
        with torch.device(device):
            base = ArmorModules(cfg).to(dtype)
        model.armor = base
        init_armor(model, seed)
    if verbose:
        extra = f", ARMOR adds {_count(model.armor):,} new parameters" if armor else ""
        extra += f"; {tok_note}" if tok_note else ""
        print(f"loaded {n} tensors from {path}: {_count(model):,} parameters, {dtype}{extra}")
    return model


def save_internvl(model: InternVL, path, max_shard_bytes=None):
    """Write the base model in the released layout (config.json + model.safetensors, or shards + index)."""
    from safetensors.torch import save_file

    cfg = model.config
    os.makedirs(path, exist_ok=True)
    sd = {}
    for k, v in model.state_dict().items():
        if k.startswith("armor."):
            continue
        if cfg.llm.arch == "internlm2" and k.endswith("self_attn.q_proj.weight"):
            base = k[: -len("self_attn.q_proj.weight")]
            sd[base + "attention.wqkv.weight"] = pack_wqkv(
                v, model.state_dict()[base + "self_attn.k_proj.weight"],
                model.state_dict()[base + "self_attn.v_proj.weight"], cfg.llm)
            continue
        if cfg.llm.arch == "internlm2" and k.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight")):
            continue
        sd[to_released_key(k, cfg.llm)] = v.contiguous()
    shards = [{}]
    size = 0
    for k, v in sd.items():
        nb = v.numel() * v.element_size()
        if max_shard_bytes and shards[-1] and size + nb > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nb
    if len(shards) == 1:
        _atomic_save(shards[0], os.path.join(path, "model.safetensors"), save_file)
    else:
        n = len(shards)
        weight_map = {}
        for i, shard in enumerate(shards):
            fn = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            _atomic_save(shard, os.path.join(path, fn), save_file)
            weight_map.update({k: fn for k in shard})
        total = sum(v.numel() * v.element_size() for v in sd.values())
        _atomic_write_json({"metadata": {"total_size": total}, "weight_map": weight_map},
                           os.path.join(path, "model.safetensors.index.json"))
    _atomic_write_json(config_to_internvl(cfg), os.path.join(path, "config.json"))


def _atomic_save(tensors, path, save_file):
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, path)


def _atomic_write_json(obj, path):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
    os.replace(tmp, path)


# ARMOR checkpoints: config.json {"armor": <our config>, "base": <InternVL dir or null>} + model.safetensors.
# Whole: every tensor under our names. Partial (base given): only the tensors ARMOR adds or trains: `armor.*` and
# the LM head (the text head is trained in stages 1 and 3); everything else comes from the base directory.
# int8 rows (save_pretrained(int8=True); what the toy world ships, to fit the repository's size budget): every matrix
# W as q = round(W / s) in int8 with one fp32 scale per row, s = max|W[row]| / 127, stored as "<key>.int8_scale";
# from_pretrained multiplies them back (each entry within s / 2 of W's).
PARTIAL_BASE_KEYS = ("language_model.lm_head.weight",)
INT8_SCALE = ".int8_scale"


def quantize_rows(w):
    """A matrix -> (int8 q, fp32 per-row scale s) with q * s within s / 2 of w everywhere."""
    w = w.float()
    s = (w.abs().amax(1, keepdim=True) / 127).clamp_min(torch.finfo(torch.float32).tiny)
    return (w / s).round_().clamp_(-127, 127).to(torch.int8), s


def _dequantize_rows(keys, k):
    q, s = _read_tensor(keys[k], k), _read_tensor(keys[k + INT8_SCALE], k + INT8_SCALE)
    if q.dtype != torch.int8 or q.dim() != 2 or tuple(s.shape) != (q.shape[0], 1):
        raise CheckpointError(f"{k!r}: int8 rows need an int8 matrix and one scale per row, got {q.dtype} "
                              f"{tuple(q.shape)} with scales {tuple(s.shape)}")
    return q.float() * s.float()


def save_pretrained(model: Armor, path, base=None, vqgan=None, int8=False):
    """Write an ARMOR checkpoint: whole, or partial on top of `base`. `vqgan` records where the image decoder is.
    Relative paths are stored relative to the checkpoint directory (from_pretrained / sample.py resolve them so).
    int8: matrices as int8 rows (the note above); a quarter of fp32's bytes, a rounding the caller must measure."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    sd = model.state_dict()
    rel = (lambda p: p if p is None or os.path.isabs(p) else os.path.relpath(p, path))
    if base is not None:
        sd = {k: v for k, v in sd.items() if k.startswith("armor.") or k in PARTIAL_BASE_KEYS}
    if int8:
        sd = dict(sd)
        for k in [k for k, v in sd.items() if v.dim() == 2 and v.is_floating_point()]:
            sd[k], sd[k + INT8_SCALE] = quantize_rows(sd[k])
    _atomic_save({k: v.contiguous() for k, v in sd.items()}, os.path.join(path, "model.safetensors"), save_file)
    meta = {"format": "armor", "base": rel(base), "armor": model.config.to_dict()}
    if vqgan is not None:
        meta["vqgan"] = rel(vqgan)
    _atomic_write_json(meta, os.path.join(path, "config.json"))


def from_pretrained(path, dtype=torch.float32, device="cpu", base=None, verbose=True):
    """Load an ARMOR checkpoint. A partial one loads its base InternVL2.5 directory first: `base` (a path as given)
    overrides the one stored in config.json, which is resolved relative to the checkpoint when it is not absolute."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise CheckpointError(f"no config.json in {path}")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            meta = json.load(f)
    except ValueError as e:  # not UTF-8 or not JSON: the decoder's message alone does not name the file
        raise CheckpointError(f"{cfg_path}: not a JSON file ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != "armor":
        raise CheckpointError(f"{cfg_path} is not an ARMOR checkpoint (for a released InternVL2.5 directory use "
                              f"from_internvl)")
    try:
        cfg = ArmorConfig(**meta["armor"])
    except (KeyError, TypeError, AssertionError) as e:
        raise CheckpointError(f"{cfg_path}: \"armor\" does not hold an ArmorConfig ({type(e).__name__}: {e})") from None
    keys = _open_safetensors(os.path.join(path, "model.safetensors"))
    tensors = {k: (lambda k=k, h=h: _read_tensor(h, k)) for k, h in keys.items() if not k.endswith(INT8_SCALE)}
    for k in [k[:-len(INT8_SCALE)] for k in keys if k.endswith(INT8_SCALE)]:
        if k not in tensors:
            raise CheckpointError(f"{path}: {k + INT8_SCALE!r} scales no tensor")
        tensors[k] = lambda k=k: _dequantize_rows(keys, k)
    if base is None and meta.get("base") is not None:
        base = os.path.normpath(os.path.join(path, meta["base"]))  # a no-op join when it is absolute
        if not os.path.isdir(base):  # a moved or copied output folder: say which file named the path, and the way out
            raise CheckpointError(f"the base directory {base} named by {cfg_path} does not exist; pass --base DIR "
                                  f"(the InternVL2.5 directory the checkpoint was trained on)")
    if base is None:
        with torch.device("meta"):
            model = Armor(cfg)
        n = load_state(model, tensors, dtype, device, what=path)
    else:
        model = from_internvl(base, dtype, device, verbose=False, **{k: v for k, v in meta["armor"].items()
                                                                     if k not in ("vision", "llm")})
        if model.config.to_dict() != cfg.to_dict():
            raise CheckpointError(f"{path} was trained on a base with another config than {base}")
        expected = {k for k in model.state_dict() if k.startswith("armor.") or k in PARTIAL_BASE_KEYS}
        if set(tensors) != expected:
            diff = sorted(set(tensors) ^ expected)
            raise CheckpointError(f"{path}: partial checkpoint keys differ from the model's, e.g. {diff[:3]}")
        sd = model.state_dict()
        for k, load in tensors.items():
            t = load()
            if t.shape != sd[k].shape:
                raise CheckpointError(f"{path}: {k!r} has shape {tuple(t.shape)}, expected {tuple(sd[k].shape)}")
            sd[k].copy_(t)
        n = len(tensors)
    if verbose:
        print(f"loaded {n} tensors from {path}" + (f" on top of {base}" if base else "") +
              f": {_count(model):,} parameters, {dtype}")
    return model


# -----------------------------------------------------------------------------------------------------------------


def describe(name, cfg: ArmorConfig):
    with torch.device("meta"):
        m = Armor(cfg)
    base = _count(m) - _count(m.armor)
    groups = {g: sum(p.numel() for p in ps) for g, ps in param_groups(m).items()}
    print(f"{name}: base InternVL2.5 {base:,} parameters (vision {_count(m.vision_model):,}, mlp1 "
          f"{_count(m.mlp1):,}, LLM {_count(m.language_model):,})")
    print(f"  ARMOR adds {_count(m.armor):,} new parameters ({_count(m.armor) / base:.1%} of the base): "
          f"new embedding rows {groups['embed_new']:,}, <imgbos> row {m.armor.imgbos_head.weight.numel():,}, "
          f"adapter {groups['adapter']:,} ({cfg.num_adapter_layers} blocks), visual head {groups['visual_head']:,}")
    total = _count(m)
    for s, gs in STAGE_GROUPS.items():
        set_trainable(m, s)
        n = sum(groups[g] for g in gs)
        # train.py under bf16 autocast: frozen base matmuls in bf16, every other tensor fp32; a trainable one also
        # has an fp32 gradient and AdamW's two fp32 moments
        half = sum(p.numel() for p in frozen_matmuls(m))
        gb = (2 * half + 4 * (total - half) + (4 + 8) * n) / 2 ** 30
        print(f"  WoHG stage {s}: trainable {n:,} ({' + '.join(gs)}); weights + grads + AdamW {gb:.1f} GiB "
              f"before activations")
    print(f"  sampling in bf16: weights {2 * total / 2 ** 30:.1f} GiB")


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), help="print the parameter counts of one preset")
    ap.add_argument("--load", help="load a released InternVL2.5 directory (weights, config.json, tokenizer) "
                                   "strictly and print a summary")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = ap.parse_args()
    if args.load:
        if not os.path.isdir(args.load):
            raise SystemExit(f"error: --load {args.load}: no such directory")
        try:
            from_internvl(args.load, getattr(torch, args.dtype), tokenizer=True)
        except CheckpointError as e:
            raise SystemExit(f"error: {e}")
    else:
        for name in [args.preset] if args.preset else [p for p in PRESETS if p.startswith("internvl")]:
            describe(name, PRESETS[name]())
