"""
Chameleon's image tokenizer: the taming-transformers VQGAN (f=16, 8192 codes of dim 256) in plain PyTorch.

ARMOR writes images as these codes (a 256 px image -> 16x16 = 256 tokens; Chameleon used 512 px -> 32x32).
This file holds the network (module names = the keys of Meta's tokenizer/vqgan.ckpt), a strict loader for
vqgan.ckpt / safetensors, Chameleon's pre- and post-processing, and a resumable VQ code cache for datasets (the
toy world trains its own VQGAN with toy/vqgan_train.py). Spec: shared/specs/chameleon_vqgan.md.

Commands
  python vqgan.py cache --vqgan PATH --data SRC [--data SRC ...] --out DIR [--size 256] [--batch 16]
      SRC: a folder of images, a JSONL of conversations (fields `image`, `out_images`), a webdataset .tar
      shard, or a quoted glob of them. Resumable: rerun the same command after a kill.
  python vqgan.py recon --vqgan PATH --images IMG [IMG ...] --out DIR [--size 256]
      encode + decode images, writes <name>_recon.png side by side with the input.
  python vqgan.py bench [--runs 3]
      CPU fp32 timings of encode / decode at 256 px, released config, random weights.
  python vqgan.py random --out DIR [--ch 32] [--ch-mult 1,1,1,1] [--codes 64] [--embed-dim 16] [--seed 0]
      a VQGAN with random weights written exactly as Chameleon releases its tokenizer: DIR/vqgan.ckpt (a pickled
      {"state_dict": ...} of fp32 tensors under taming's key names) and DIR/vqgan.yaml (taming's layout). For tests
      and smoke runs of the released-weights commands (README, tests/test_road.py). The defaults give f = 8
      (32 px -> 4x4 codes of 64), 0.2M parameters; widths are multiples of 32 because taming hard-codes
      GroupNorm(32). `--ch 128 --ch-mult 1,1,2,2,4 --codes 8192 --embed-dim 256` is the released shape.

Python
  model = load_vqgan("tokenizer/")           # vqgan.ckpt (+ vqgan.yaml) or model.safetensors (+ config.json)
  codes = encode_pil(model, [img], 256)      # (1, 16, 16) long
  imgs = decode_pil(model, codes)            # [PIL.Image 256x256]
"""

import argparse
import glob
import hashlib
import io
import json
import os
import sys
import tarfile
import time
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm


# ----------------------------------------------------------------------------------------------------------
# Config


@dataclass
class VQGANConfig:
    # field names follow vqgan.yaml (model.params.{embed_dim,n_embed} and model.params.ddconfig.*);
    # defaults are the released Chameleon tokenizer (its tokenizer/vqgan.yaml)
    embed_dim: int = 256  # codebook vector size
    n_embed: int = 8192  # number of codes
    z_channels: int = 256  # encoder output / decoder input channels
    ch: int = 128
    ch_mult: tuple = (1, 1, 2, 2, 4)  # one level per entry; len-1 downsamples, so f = 16
    num_res_blocks: int = 2  # per encoder level; the decoder has one more
    in_channels: int = 3
    out_ch: int = 3
    resolution: int = 512  # training resolution; no effect on the maths while attn_resolutions is empty
    attn_resolutions: tuple = ()
    dropout: float = 0.0
    num_groups: int = 32  # GroupNorm groups; not in the yaml (taming hard-codes 32), small models need fewer
    # toy world only, not in the yaml: the encoder reads each f x f cell alone, so a code is a function of its own
    # cell's pixels (VQGAN.encode_z); the released model encodes the whole image (False)
    cell_local: bool = False

    def __post_init__(self):
        self.ch_mult = tuple(self.ch_mult)
        self.attn_resolutions = tuple(self.attn_resolutions)
        # the released model only has attention in the two mid blocks (no up./down.*.attn keys)
        assert not self.attn_resolutions, "attention inside down/up levels is not implemented (the release has none)"
        for m in self.ch_mult:
            assert (self.ch * m) % self.num_groups == 0, \
                f"num_groups {self.num_groups} must divide ch*mult {self.ch * m}"

    @property
    def factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def toy(cls):
        # toy world: 64 px flat-coloured drawings -> 8x8 = 64 tokens (f=8). Widths 8-16-32-64 keep a training
        # step of batch 8 near 100 ms on 2 CPU cores; 16-wide first levels trained no better in 2000 steps.
        # 2000 steps: held-out MSE 0.026, codes used: see (tests/test_vqgan.py::test_toy_config_trains)
        return cls(embed_dim=32, n_embed=512, z_channels=32, ch=8, ch_mult=(1, 2, 4, 8), num_res_blocks=1,
                   resolution=64, num_groups=4)

    @classmethod
    def from_yaml(cls, path):
        """Read the taming fields of Meta's vqgan.yaml (model.params.{embed_dim, n_embed, ddconfig})."""
        path = Path(path)
        doc = _read_yaml(path.read_text(), path)
        try:
            params = doc["model"]["params"]
            dd = params["ddconfig"]
            top = {"embed_dim": params["embed_dim"], "n_embed": params["n_embed"]}
        except (KeyError, TypeError) as e:
            raise ValueError(f"{path}: expected model.params.{{embed_dim, n_embed, ddconfig}} (missing {e})") from None
        # options of taming's Encoder/Decoder/VQModel that the released model leaves at these values
        for k, want in (("double_z", False), ("tanh_out", False), ("give_pre_end", False),
                        ("resamp_with_conv", True), ("use_linear_attn", False), ("attn_type", "vanilla")):
            if k in dd and dd[k] != want:
                raise ValueError(f"{path}: ddconfig.{k} = {dd[k]!r} is not supported (the released model has {want!r})")
        if params.get("remap") is not None:
            raise ValueError(f"{path}: model.params.remap is not supported")
        names = {f.name for f in fields(cls)}
        return cls(**top, **{k: v for k, v in dd.items() if k in names})


def _read_yaml(text, path="yaml"):
    """Tiny reader for block-style YAML (nested mappings, `- item` lists, [a, b] lists, scalars).

    Why not PyYAML: it is not a runtime dependency (requirements.txt), and this reads taming configs such as the
    released vqgan.yaml in full (with line numbers in its errors), so from_yaml can refuse the options it does not
    implement instead of guessing a config from the checkpoint's shapes."""
    lines = []  # (line number, indent, content)
    for n, raw in enumerate(text.splitlines(), 1):
        s = raw.split(" #")[0].rstrip()
        if s.strip() and not s.strip().startswith(("#", "---")):
            lines.append((n, len(s) - len(s.lstrip()), s.strip()))

    def block(i, indent):  # parse the block starting at lines[i] (indented by `indent`) -> (value, next i)
        if lines[i][2].startswith("-"):
            out = []
            while i < len(lines) and lines[i][1] == indent and lines[i][2].startswith("-"):
                out.append(_yaml_scalar(lines[i][2][1:].strip()))
                i += 1
            return out, i
        out = {}
        while i < len(lines) and lines[i][1] == indent:
            n, _, s = lines[i]
            key, colon, rest = s.partition(":")
            if not colon or s.startswith("-"):
                raise ValueError(f"{path}:{n}: cannot read {s!r}")
            i += 1
            rest = rest.strip()
            if rest:
                out[key.strip()] = _yaml_scalar(rest)
            elif i < len(lines) and (lines[i][1] > indent or (lines[i][1] == indent and lines[i][2].startswith("-"))):
                out[key.strip()], i = block(i, lines[i][1])
            else:
                out[key.strip()] = None
        if i < len(lines) and lines[i][1] > indent:
            raise ValueError(f"{path}:{lines[i][0]}: unexpected indentation")
        return out, i

    if not lines:
        return {}
    doc, i = block(0, lines[0][1])
    if i != len(lines):
        raise ValueError(f"{path}:{lines[i][0]}: unexpected indentation")
    return doc


def _yaml_scalar(s):
    if s.startswith("[") and s.endswith("]"):
        return [_yaml_scalar(x.strip()) for x in s[1:-1].split(",") if x.strip()]
    if s == "{}":
        return {}
    if len(s) >= 2 and s[0] == s[-1] and s[0] in "'\"":
        return s[1:-1]
    low = s.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("null", "none", "~"):
        return None
    for cast in (int, float):
        try:
            return cast(s)
        except ValueError:
            pass
    return s


# ----------------------------------------------------------------------------------------------------------
# Network. Mirrors chameleon/inference/vqgan.py (a trimmed copy of taming-transformers' VQModel), with the
# numerics that make it bit-equal to the reference on CPU fp32.


def swish(x):
    # the reference's nonlinearity; F.silu rounds differently (1e-6 on a quarter of the elements)
    return x * torch.sigmoid(x)


def Normalize(channels, groups):
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    # taming ResnetBlock with temb_channels=0 (no temb_proj); 1x1 nin_shortcut only when channels change
    def __init__(self, cin, cout, groups, dropout):
        super().__init__()
        self.norm1 = Normalize(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = Normalize(cout, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):  # (B, cin, H, W) -> (B, cout, H, W)
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    # taming AttnBlock: one head over all h*w positions. q/k/v/proj_out stay 1x1 convs and the scale is applied
    # after the bmm, as in the reference; F.scaled_dot_product_attention differs by ~5e-7.
    def __init__(self, channels, groups):
        super().__init__()
        self.norm = Normalize(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q = self.q(h).reshape(B, C, H * W).permute(0, 2, 1)  # (B, HW, C)
        k = self.k(h).reshape(B, C, H * W)  # (B, C, HW)
        v = self.v(h).reshape(B, C, H * W)  # (B, C, HW)
        w = torch.bmm(q, k) * (int(C) ** -0.5)  # (B, HW queries, HW keys)
        w = F.softmax(w, dim=2)
        h = torch.bmm(v, w.permute(0, 2, 1)).reshape(B, C, H, W)  # (B, C, HW) -> (B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):  # (B, C, H, W) -> (B, C, H/2, W/2)
        # taming pads right and bottom only (torch convs cannot pad asymmetrically)
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):  # (B, C, H, W) -> (B, C, 2H, 2W)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    # taming Encoder: conv_in, levels of ResnetBlocks with a downsample after all but the last, mid, conv_out
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        G = cfg.num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        c = cfg.ch
        for i, mult in enumerate(cfg.ch_mult):
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                level.block.append(ResnetBlock(c, cfg.ch * mult, G, cfg.dropout))
                c = cfg.ch * mult
            if i != len(cfg.ch_mult) - 1:
                level.downsample = Downsample(c)
            self.down.append(level)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(c, c, G, cfg.dropout)
        self.mid.attn_1 = AttnBlock(c, G)
        self.mid.block_2 = ResnetBlock(c, c, G, cfg.dropout)
        self.norm_out = Normalize(c, G)
        self.conv_out = nn.Conv2d(c, cfg.z_channels, 3, padding=1)

    def forward(self, x):  # (B, 3, H, W) -> (B, z_channels, H/f, W/f)
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    # taming Decoder. `up` is indexed like the encoder levels (up.0 = full resolution) but runs deepest first;
    # each level has num_res_blocks + 1 blocks. No tanh on the output (tanh_out=False in the release).
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        G = cfg.num_groups
        c = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, c, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(c, c, G, cfg.dropout)
        self.mid.attn_1 = AttnBlock(c, G)
        self.mid.block_2 = ResnetBlock(c, c, G, cfg.dropout)
        up = [None] * len(cfg.ch_mult)
        for i in reversed(range(len(cfg.ch_mult))):
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                level.block.append(ResnetBlock(c, cfg.ch * cfg.ch_mult[i], G, cfg.dropout))
                c = cfg.ch * cfg.ch_mult[i]
            if i != 0:
                level.upsample = Upsample(c)
            up[i] = level
        self.up = nn.ModuleList(up)
        self.norm_out = Normalize(c, G)
        self.conv_out = nn.Conv2d(c, cfg.out_ch, 3, padding=1)

    def forward(self, z):  # (B, z_channels, h, w) -> (B, 3, h*f, w*f)
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    # taming VectorQuantizer2 with remap=None, legacy=True, beta=0.25: plain squared-L2 nearest code
    # (no l2-normalisation, unlike LlamaGen/Janus)
    def __init__(self, n_embed, embed_dim, beta=0.25):
        super().__init__()
        self.beta = beta
        self.embedding = nn.Embedding(n_embed, embed_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_embed, 1.0 / n_embed)

    def nearest(self, z_bhwc):  # (B, h, w, C) -> (B*h*w,) long, row-major over (b, h, w)
        zf = z_bhwc.reshape(-1, z_bhwc.shape[-1]).float()
        e = self.embedding.weight.float()
        # the reference's expansion of |z - e|^2, in its order (argmin ties go to the first index).
        # Distances are taken in fp32 even for a bf16 model: bf16 cannot separate 8192 nearby codes.
        d = torch.sum(zf**2, dim=1, keepdim=True) + torch.sum(e**2, dim=1) - 2 * torch.einsum("bd,dn->bn", zf, e.t())
        return torch.argmin(d, dim=1)

    def forward(self, z):  # (B, C, h, w) -> z_q (B, C, h, w) straight-through, loss, codes (B, h, w)
        B, C, h, w = z.shape
        z = z.permute(0, 2, 3, 1).contiguous()  # (B, h, w, C)
        idx = self.nearest(z)
        z_q = self.embedding(idx).view(z.shape)
        # legacy ordering: beta sits on the codebook term (taming's "buggy" version, kept for compatibility)
        loss = torch.mean((z_q.detach() - z) ** 2) + self.beta * torch.mean((z_q - z.detach()) ** 2)
        z_q = z + (z_q - z).detach()
        return z_q.permute(0, 3, 1, 2).contiguous(), loss, idx.view(B, h, w)

    def lookup(self, codes):  # (B, h, w) long -> (B, C, h, w)
        # .contiguous(): a channels-last view would send the next conv down another kernel (other bits)
        return self.embedding(codes).permute(0, 3, 1, 2).contiguous()


class VQGAN(nn.Module):
    """taming's VQModel: state_dict() keys equal the 293 model keys of Meta's vqgan.ckpt."""

    def __init__(self, config: VQGANConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.embed_dim, 1)
        self.quantize = VectorQuantizer(config.n_embed, config.embed_dim)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)
        self.decoder = Decoder(config)

    def grid(self, size_px):  # image side(s) in pixels -> token grid (h, w)
        f = self.config.factor
        h, w = (size_px, size_px) if isinstance(size_px, int) else size_px
        assert h % f == 0 and w % f == 0, f"image size {h}x{w} must be a multiple of {f}"
        return h // f, w // f

    def encode_z(self, pixels):  # (B, 3, H, W) -> the quantizer's input (B, embed_dim, H/f, W/f)
        if not self.config.cell_local:
            return self.quant_conv(self.encoder(pixels))
        f = self.config.factor  # every cell through the encoder alone, as a batch of f x f images
        B, C, H, W = pixels.shape
        h, w = H // f, W // f
        cells = pixels.reshape(B, C, h, f, w, f).permute(0, 2, 4, 1, 3, 5).reshape(B * h * w, C, f, f)
        z = self.quant_conv(self.encoder(cells))  # (B*h*w, embed_dim, 1, 1)
        return z.reshape(B, h, w, -1).permute(0, 3, 1, 2)

    @torch.no_grad()
    def encode(self, pixels):  # (B, 3, H, W) in [-1, 1] -> codes (B, H/f, W/f) long
        w = self.quant_conv.weight
        z = self.encode_z(pixels.to(device=w.device, dtype=w.dtype))  # (B, embed_dim, h, w)
        B, _, h, w_ = z.shape
        return self.quantize.nearest(z.permute(0, 2, 3, 1)).view(B, h, w_)

    @torch.no_grad()
    def decode(self, codes):  # (B, h, w) long -> (B, 3, h*f, w*f) float32, unclamped
        assert codes.dim() == 3, f"codes must be (B, h, w), got {tuple(codes.shape)}"
        # plain codebook lookup: the straight-through z + (z_q - z) of training is not bit-equal to it
        z_q = self.quantize.lookup(codes.to(self.quant_conv.weight.device))
        return self.decoder(self.post_quant_conv(z_q)).float()

    def forward(self, pixels):  # training: (B, 3, H, W) -> recon (B, 3, H, W), vq loss, codes (B, h, w)
        z_q, vq_loss, codes = self.quantize(self.encode_z(pixels))
        return self.decoder(self.post_quant_conv(z_q)), vq_loss, codes


# ----------------------------------------------------------------------------------------------------------
# Loading and saving


def _resolve(path):  # -> (weights file, config, where the config came from)
    p = Path(path)
    if p.is_dir():
        found = [p / "vqgan.ckpt", p / "model.safetensors"] + sorted(p.glob("*.safetensors")) + sorted(p.glob("*.ckpt"))
        found = [f for f in found if f.is_file()]
        if not found:
            raise FileNotFoundError(f"{p}: no vqgan.ckpt or *.safetensors in this folder")
        weights = found[0]
    elif p.is_file():
        weights = p
    else:
        raise FileNotFoundError(f"VQGAN weights not found: {p}")
    cfg_json, cfg_yaml = weights.parent / "config.json", weights.parent / "vqgan.yaml"
    if cfg_json.is_file():
        d = json.loads(cfg_json.read_text())
        unknown = set(d) - {f.name for f in fields(VQGANConfig)}
        if unknown:
            raise ValueError(f"{cfg_json}: unknown VQGANConfig fields {sorted(unknown)}")
        return weights, VQGANConfig(**d), cfg_json.name
    if cfg_yaml.is_file():
        return weights, VQGANConfig.from_yaml(cfg_yaml), cfg_yaml.name
    return weights, VQGANConfig(), "released defaults (no config.json or vqgan.yaml beside it)"


def _read_state_dict(path):
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error types for truncated / garbled headers
            raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    try:
        # the release pickles only an OrderedDict of fp32 tensors, so the safe unpickler reads it
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"{path}: not a torch checkpoint readable with weights_only=True "
                         f"({type(e).__name__}: {first})") from None
    if not isinstance(obj, dict) or "state_dict" not in obj:
        top = list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{path}: no 'state_dict' entry (found {top}); expected taming's {{'state_dict': ...}}")
    return obj["state_dict"]


def load_vqgan(path, device="cpu", dtype=torch.float32) -> VQGAN:
    """Load vqgan.ckpt / *.safetensors (or a folder holding one) strictly: exactly the model's keys and shapes.

    Extra keys (loss.*, discriminator.*) are listed and dropped; anything missing or misshapen is an error."""
    weights, cfg, cfg_src = _resolve(path)
    with torch.device("meta"):
        model = VQGAN(cfg)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    sd = _read_state_dict(weights)
    missing = [k for k in want if k not in sd]
    if missing:
        raise ValueError(f"{weights}: missing {len(missing)} of {len(want)} VQGAN keys: {', '.join(missing[:6])}"
                         + (" ..." if len(missing) > 6 else "") + f" (config from {cfg_src})")
    for k, shape in want.items():
        t = sd[k]
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError(f"{weights}: {k} is {type(t).__name__} {getattr(t, 'dtype', '')}, expected a float tensor")
        if tuple(t.shape) != shape:
            raise ValueError(f"{weights}: {k} has shape {tuple(t.shape)}, the config ({cfg_src}) expects {shape}")
    extra = [k for k in sd if k not in want]
    model.load_state_dict({k: sd[k].to(dtype) for k in want}, strict=True, assign=True)
    model = model.to(device).eval().requires_grad_(False)
    n = sum(p.numel() for p in model.parameters())
    msg = f"vqgan: loaded {len(want)} tensors, {n:,} params, {dtype} from {weights} (config: {cfg_src})"
    if extra:
        msg += f"; dropped {len(extra)} extra keys: " + ", ".join(extra[:10]) + (" ..." if len(extra) > 10 else "")
    print(msg)
    return model


def _atomic_write(path, write):  # write(tmp_path) then rename, so a kill never leaves a half-written file
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_vqgan(model: VQGAN, out_dir):
    """Write config.json + model.safetensors (the form our own VQGANs ship in; load_vqgan(out_dir) reads it)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    _atomic_write(out / "model.safetensors", lambda p: save_file(sd, str(p)))
    _atomic_write(out / "config.json", lambda p: p.write_text(json.dumps(asdict(model.config), indent=2) + "\n"))


def to_yaml(cfg: VQGANConfig) -> str:
    """vqgan.yaml for a config, in the layout of Chameleon's tokenizer/vqgan.yaml (taming's VQModel config; the
    released values are VQGANConfig's defaults). The lossconfig block is taming's usual one: the released text is not
    public, and every loader (ours, chameleon/inference/image_tokenizer.py) ignores it."""
    if cfg.num_groups != 32 or cfg.cell_local:
        raise ValueError("vqgan.yaml cannot carry num_groups != 32 or cell_local (taming hard-codes GroupNorm(32) "
                         "and encodes whole images); write config.json with save_vqgan instead")
    dd = [("double_z", "false"), ("z_channels", cfg.z_channels), ("resolution", cfg.resolution),
          ("in_channels", cfg.in_channels), ("out_ch", cfg.out_ch), ("ch", cfg.ch)]
    lines = ["model:", "  base_learning_rate: 4.5e-06", "  target: taming.models.vqgan.VQModel", "  params:",
             f"    embed_dim: {cfg.embed_dim}", f"    n_embed: {cfg.n_embed}", "    ddconfig:"]
    lines += [f"      {k}: {v}" for k, v in dd]
    lines += ["      ch_mult:"] + [f"      - {m}" for m in cfg.ch_mult]
    lines += [f"      num_res_blocks: {cfg.num_res_blocks}", "      attn_resolutions: []",
              f"      dropout: {float(cfg.dropout)}",
              "    lossconfig:", "      target: taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
              "      params:", "        disc_conditional: false", "        disc_in_channels: 3",
              "        disc_start: 0", "        disc_weight: 0.8", "        codebook_weight: 1.0"]
    return "\n".join(lines) + "\n"


def save_released(model: VQGAN, out_dir):
    """Write vqgan.ckpt + vqgan.yaml as Meta ships its tokenizer (tokenizer/vqgan.ckpt): a torch pickle of
    {"state_dict": OrderedDict of fp32 tensors} under taming's key names, which load_vqgan(out_dir) and
    chameleon/inference/vqgan.py both read."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = to_yaml(model.config)  # first: refuse a config the yaml cannot describe before writing anything
    sd = type(model.state_dict())((k, v.detach().cpu().float().contiguous().clone())
                                  for k, v in model.state_dict().items())
    _atomic_write(out / "vqgan.ckpt", lambda p: torch.save({"state_dict": sd}, p))
    _atomic_write(out / "vqgan.yaml", lambda p: p.write_text(text))


@torch.no_grad()
def random_vqgan(cfg: VQGANConfig, seed=0) -> VQGAN:
    """A VQGAN with random weights in which every tensor counts: biases and GroupNorm affines moved off their 0 / 1
    init, and the codebook drawn (plus noise) from the quantizer inputs of random blocky pictures, so that different
    pictures get different codes (at the uniform init nearly every cell falls on a handful of codes)."""
    with torch.random.fork_rng():  # leave the caller's global generator as it was
        torch.manual_seed(seed)
        model = VQGAN(cfg).eval()
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".norm" in name:
                p.add_(0.1 * torch.randn(p.shape))
        side = 4 * cfg.factor  # 4x4 cells; colours constant over 1, 2 or 4 cells
        x = torch.cat([F.interpolate(torch.rand(8, 3, k, k) * 2 - 1, size=(side, side), mode="nearest")
                       for k in (1, 2, 4)])
        z = model.encode_z(x).permute(0, 2, 3, 1).reshape(-1, cfg.embed_dim)
        pick = torch.randint(len(z), (cfg.n_embed,))
        model.quantize.embedding.weight.copy_(z[pick] + 0.5 * z.std() * torch.randn(cfg.n_embed, cfg.embed_dim))
    return model.requires_grad_(False)


# ----------------------------------------------------------------------------------------------------------
# Pre- and post-processing, exactly as chameleon/inference/image_tokenizer.py


def _whiten_transparency(img):
    if img.mode == "RGB":
        return img
    rgba = np.array(img.convert("RGBA"))
    if not (rgba[:, :, 3] < 255).any():
        return img.convert("RGB")
    # blend onto white in float64, then truncate (astype), as Chameleon does (not PIL's rounding alpha_composite)
    alpha = rgba[:, :, 3] / 255.0
    rgb = (1 - alpha[:, :, None]) * 255 + alpha[:, :, None] * rgba[:, :, :3]
    return Image.fromarray(rgb.astype("uint8"), "RGB")


def preprocess(img, size) -> torch.Tensor:
    """PIL image -> (3, size, size) float32 in [-1, 1]: whiten alpha, shortest side to `size`, centre crop."""
    img = _whiten_transparency(img)
    scale = size / min(img.size)
    # Python round (ties to even), LANCZOS; resize is called even when the size is unchanged (returns a copy)
    img = img.resize((round(scale * img.size[0]), round(scale * img.size[1])), Image.LANCZOS)
    x0, y0 = (img.width - size) // 2, (img.height - size) // 2
    img = img.crop((x0, y0, x0 + size, y0 + size))
    # float64 like the reference: in float32 half of the 256 levels land 1 ulp away
    x = np.array(img) / 255.0 * 2 - 1  # (size, size, 3)
    return torch.from_numpy(x).permute(2, 0, 1).float().contiguous()


def to_pil(x) -> Image.Image:
    """(3, H, W) decoder output -> PIL RGB: clamp to [-1, 1], then a truncating uint8 conversion (0.0 -> 127)."""
    x = (torch.clamp(x.detach().cpu().float(), -1.0, 1.0) + 1.0) / 2.0
    return Image.fromarray((x.permute(1, 2, 0).numpy() * 255).astype(np.uint8), "RGB")


def encode_pil(model: VQGAN, images, size) -> torch.Tensor:  # list of PIL -> (B, h, w) long
    return model.encode(torch.stack([preprocess(im, size) for im in images]))


def decode_pil(model: VQGAN, codes):  # (B, h, w) long -> list of PIL
    return [to_pil(x) for x in model.decode(codes)]


# ----------------------------------------------------------------------------------------------------------
# Image sources and the code cache

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def _image_from_bytes(data):
    img = Image.open(io.BytesIO(data))
    img.load()  # decode now, so a broken file fails inside the opener
    return img


def _read_file(path):
    return _image_from_bytes(Path(path).read_bytes())


def _read_tar_member(tar_path, offset, size):
    with open(tar_path, "rb") as f:
        f.seek(offset)
        return _image_from_bytes(f.read(size))


def iter_images(src):
    """Yield (key, opener) for every image of a source; opener() returns a PIL image or raises.

    src: a folder (key = path relative to it, '/'-separated, sorted), a .jsonl of conversation records (key = each
    string of the fields `image` (str or list) and `out_images` (list) as written, read relative to the JSONL's
    folder, first occurrence only), a webdataset .tar (key = '<tar file name>/<member name>', in tar order), or a
    glob of these (sorted)."""
    src = str(src)
    paths = [Path(p) for p in sorted(glob.glob(src))] if glob.has_magic(src) else [Path(src)]
    if not paths:
        raise FileNotFoundError(f"{src}: matches nothing")
    for p in paths:
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                if f.is_file() and f.suffix.lower() in IMAGE_EXTS:
                    yield f.relative_to(p).as_posix(), partial(_read_file, f)
        elif p.suffix == ".jsonl" and p.is_file():
            seen = set()
            with open(p) as fh:
                for n, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{p}:{n}: not a JSON record ({e})") from None
                    names = rec.get("image") or []
                    names = [names] if isinstance(names, str) else list(names)
                    for name in names + list(rec.get("out_images") or []):
                        if name not in seen:
                            seen.add(name)
                            yield name, partial(_read_file, p.parent / name)
        elif p.suffix == ".tar" and p.is_file():
            with tarfile.open(p, "r:") as tf:
                for m in tf:
                    if m.isfile() and Path(m.name).suffix.lower() in IMAGE_EXTS:
                        yield f"{p.name}/{m.name}", partial(_read_tar_member, p, m.offset_data, m.size)
        elif not p.exists():
            raise FileNotFoundError(f"{p}: no such file or folder")
        else:
            raise ValueError(f"{p}: expected a folder of images, a .jsonl or a .tar shard")


def _read_index(path):  # -> entries of the complete lines; a torn last line (killed mid-write) is cut off
    if not path.exists():
        return []
    data = path.read_bytes()
    keep = data[: data.rfind(b"\n") + 1]
    if len(keep) != len(data):
        with open(path, "r+b") as f:
            f.truncate(len(keep))
    return [json.loads(line) for line in keep.decode().splitlines()]


def _cache_meta(model: VQGAN, size, vqgan_path):
    """meta.json's fields that pin a cache to one tokenizer: its weights (a SHA-1 over every tensor, so a rerun cannot
    mix codes of two tokenizers), dtype, config, and the image size. The VQGAN's path is stored absolute: train.py
    records it in the checkpoints it writes, so sampling finds the decoder."""
    sha = hashlib.sha1()
    for k, v in model.state_dict().items():
        sha.update(k.encode() + v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return {"vqgan": os.path.abspath(vqgan_path) if vqgan_path else "", "weights_sha1": sha.hexdigest(),
            "dtype": str(model.quant_conv.weight.dtype), "config": asdict(model.config), "size": size,
            "grid": list(model.grid(size))}


def _check_same_cache(out, meta):
    if (out / "meta.json").exists():
        old = json.loads((out / "meta.json").read_text())
        differ = [k for k in meta if k != "vqgan" and old.get(k) != json.loads(json.dumps(meta[k]))]
        if differ:
            raise ValueError(f"{out}: holds a cache made with another {', '.join(differ)} "
                             f"(vqgan {old.get('vqgan')}, size {old.get('size')}); use another --out")


def _resume_cache(out):
    """The index entries of an earlier (maybe killed) run, and the number of codes they cover; codes.u16 is cut back to
    those (a batch whose index lines never got written is dropped)."""
    entries = _read_index(out / "index.jsonl")
    end = sum(e["h"] * e["w"] for e in entries if "skip" not in e)
    codes_path = out / "codes.u16"
    have = codes_path.stat().st_size // 2 if codes_path.exists() else 0
    if have < end:
        raise ValueError(f"{codes_path}: {have} codes but index.jsonl refers to {end}; the cache is damaged")
    with open(codes_path, "ab") as f:
        f.truncate(2 * end)
    return entries, end


def _write_cache_meta(out, meta, entries, complete):
    ok = [e for e in entries if "skip" not in e]
    bad = [e for e in entries if "skip" in e]
    m = dict(meta, complete=complete, n_images=len(ok), n_skipped=len(bad),
             first_skipped=[f"{e['key']}: {e['skip']}" for e in bad[:10]])
    _atomic_write(out / "meta.json", lambda p: p.write_text(json.dumps(m, indent=2) + "\n"))


def _images_to_do(sources, done):
    """-> (the (key, opener) pairs not in done, in stream order; how many distinct keys; how many duplicates)."""
    items, seen, dup = [], set(), 0
    for src in sources:
        for key, opener in iter_images(src):
            if key in seen:
                dup += 1
                continue
            seen.add(key)
            if key not in done:
                items.append((key, opener))
    return items, len(seen), dup


def _append_index(findex, lines):
    """Append index lines, after their batch's codes are on disk (a kill between the two loses only that batch)."""
    findex.write("".join(json.dumps(e) + "\n" for e in lines))
    findex.flush()


def build_cache(model: VQGAN, sources, out_dir, size=256, batch=16, vqgan_path=""):
    """Encode every image of `sources` once into out_dir/{codes.u16, index.jsonl, meta.json}; resumable.

    index.jsonl has one line per image in stream order: {"key", "offset", "h", "w"} (offset counts uint16
    codes into codes.u16), or {"key", "skip": reason} for an unreadable image. A batch's codes are written and
    flushed before its index lines, so a kill loses at most that batch; a rerun cuts codes.u16 back to what the
    index covers and continues with the next image."""
    assert model.config.n_embed <= 65536, "codes are stored as uint16"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    h, w = model.grid(size)
    meta = _cache_meta(model, size, vqgan_path)
    _check_same_cache(out, meta)
    entries, end = _resume_cache(out)
    _write_cache_meta(out, meta, entries, complete=False)
    items, n_keys, dup = _images_to_do(sources, {e["key"] for e in entries})
    pending, skipped = [], []  # this batch: (key, pixels) to encode, (key, reason) unreadable
    bar = tqdm(total=n_keys, initial=n_keys - len(items), unit="img", desc="vq cache")
    with open(out / "codes.u16", "ab") as fcodes, open(out / "index.jsonl", "a") as findex:

        def flush():
            nonlocal end
            lines = []
            if pending:
                codes = model.encode(torch.stack([x for _, x in pending])).cpu().numpy().astype(np.uint16)
                fcodes.write(codes.tobytes())  # (B, h, w) row-major
                fcodes.flush()
                for key, _ in pending:
                    lines.append({"key": key, "offset": end, "h": h, "w": w})
                    end += h * w
            lines += [{"key": k, "skip": why} for k, why in skipped]
            _append_index(findex, lines)
            entries.extend(lines)
            bar.update(len(lines))
            pending.clear()
            skipped.clear()

        for key, opener in items:
            try:
                pending.append((key, preprocess(opener(), size)))
            except Exception as e:  # any decoder error means an unreadable image: count it and go on
                skipped.append((key, f"{type(e).__name__}: {e}"))
            if len(pending) == batch:
                flush()
        if pending or skipped:
            flush()
    bar.close()
    _write_cache_meta(out, meta, entries, complete=True)
    n_bad = sum("skip" in e for e in entries)
    print(f"vq cache: {len(entries) - n_bad} images, {n_bad} skipped, {dup} duplicate keys ignored -> {out}")


class CodeCache:
    """Read a cache written by `python vqgan.py cache`: `key in cache`, cache.get(key) -> uint16 (h, w)."""

    def __init__(self, root):
        root = Path(root)
        if not (root / "meta.json").is_file():
            raise FileNotFoundError(f"{root}: no meta.json; not a VQ code cache")
        self.meta = json.loads((root / "meta.json").read_text())
        self.index = {}
        text = (root / "index.jsonl").read_text() if (root / "index.jsonl").exists() else ""
        for line in text.splitlines(keepends=True):
            if line.endswith("\n"):  # a torn last line of an interrupted run is not an entry
                e = json.loads(line)
                if "skip" not in e:
                    self.index[e["key"]] = (e["offset"], e["h"], e["w"])
        size = (root / "codes.u16").stat().st_size if (root / "codes.u16").exists() else 0
        self.codes = np.memmap(root / "codes.u16", dtype=np.uint16, mode="r") if size else np.zeros(0, np.uint16)

    def __contains__(self, key):
        return key in self.index

    def __len__(self):
        return len(self.index)

    def get(self, key) -> np.ndarray:
        off, h, w = self.index[key]
        return np.array(self.codes[off: off + h * w]).reshape(h, w)


# ----------------------------------------------------------------------------------------------------------
# Commands


def bench(runs=3, size=256):
    torch.manual_seed(0)
    model = VQGAN(VQGANConfig()).eval()
    print(f"released config, random weights, fp32, CPU, {torch.get_num_threads()} threads, {size} px, "
          f"median of {runs} runs after one warm-up")
    for B in (1, 4):
        x = torch.rand(B, 3, size, size) * 2 - 1
        codes = model.encode(x)
        for name, fn in (("encode", lambda: model.encode(x)), ("decode", lambda: model.decode(codes))):
            fn()  # warm-up
            times = []
            for _ in range(runs):
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
            med = float(np.median(times))
            print(f"{name} batch {B}: {med:.2f} s ({med / B:.2f} s/image)")


def main(argv=None):
    ap = argparse.ArgumentParser(description="Chameleon VQGAN: code cache, reconstruction, bench, random weights")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("cache", help="encode the images of datasets into a VQ code cache")
    c.add_argument("--vqgan", required=True, help="vqgan.ckpt, *.safetensors, or a folder holding one")
    c.add_argument("--data", required=True, action="append", help="folder / .jsonl / .tar / glob; repeatable")
    c.add_argument("--out", required=True)
    c.add_argument("--size", type=int, default=256)
    c.add_argument("--batch", type=int, default=16)
    c.add_argument("--device", default="cpu")
    c.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    r = sub.add_parser("recon", help="encode + decode images and save them next to the inputs")
    r.add_argument("--vqgan", required=True)
    r.add_argument("--images", required=True, nargs="+")
    r.add_argument("--out", required=True)
    r.add_argument("--size", type=int, default=256)
    b = sub.add_parser("bench", help="CPU timings, released config, random weights")
    b.add_argument("--runs", type=int, default=3)
    m = sub.add_parser("random", help="write a random VQGAN in Chameleon's released layout (vqgan.ckpt + .yaml)")
    m.add_argument("--out", required=True)
    m.add_argument("--ch", type=int, default=32, help="width of the first level (a multiple of 32)")
    m.add_argument("--ch-mult", default="1,1,1,1", help="width multipliers, one level each; f = 2^(levels-1)")
    m.add_argument("--codes", type=int, default=64, help="codebook size (n_embed)")
    m.add_argument("--embed-dim", type=int, default=16, help="code vector size (also z_channels)")
    m.add_argument("--num-res-blocks", type=int, default=1)
    m.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "cache":
            model = load_vqgan(args.vqgan, device=args.device, dtype=getattr(torch, args.dtype))
            build_cache(model, args.data, args.out, args.size, args.batch, vqgan_path=args.vqgan)
        elif args.cmd == "recon":
            model = load_vqgan(args.vqgan)
            Path(args.out).mkdir(parents=True, exist_ok=True)
            for f in args.images:
                img = Image.open(f)
                x = preprocess(img, args.size)
                y = to_pil(model.decode(model.encode(x[None]))[0])
                pair = Image.new("RGB", (2 * args.size, args.size))
                pair.paste(to_pil(x), (0, 0))
                pair.paste(y, (args.size, 0))
                pair.save(Path(args.out) / f"{Path(f).stem}_recon.png")
            print(f"wrote {len(args.images)} input|reconstruction pairs to {args.out}")
        elif args.cmd == "bench":
            bench(args.runs)
        elif args.cmd == "random":
            try:
                mult = tuple(int(v) for v in args.ch_mult.split(","))
            except ValueError:
                raise ValueError(f"--ch-mult {args.ch_mult!r}: expected comma-separated integers") from None
            bad = [args.ch * m for m in mult if (args.ch * m) % 32]
            if bad:
                raise ValueError(f"--ch {args.ch} --ch-mult {args.ch_mult}: widths {bad} are not multiples of 32 "
                                 f"(taming's GroupNorm(32))")
            cfg = VQGANConfig(embed_dim=args.embed_dim, n_embed=args.codes, z_channels=args.embed_dim, ch=args.ch,
                              ch_mult=mult, num_res_blocks=args.num_res_blocks, resolution=256)
            model = random_vqgan(cfg, args.seed)
            save_released(model, args.out)
            n = sum(p.numel() for p in model.parameters())
            print(f"random vqgan: {len(model.state_dict())} tensors, {n:,} params, f = {cfg.factor}, "
                  f"{cfg.n_embed} codes -> {Path(args.out) / 'vqgan.ckpt'} + vqgan.yaml")
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
