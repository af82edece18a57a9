"""Tests for vqgan.py. Run: python -m pytest tests/test_vqgan.py  (add -m slow for the released-size
parity runs and the toy training measurement).

Oracles (test-only, transformers 5.23): ChameleonVQVAE.encode for encoder + quantizer, and JanusVQVAEDecoder with
the remap recipe of shared/specs/chameleon_vqgan.md section 5 for the decoder. Both were checked bit-equal to
facebookresearch/chameleon's vqgan.py by the spec's author."""

import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import vqgan
from toy import vqgan_train
from toy.vqgan_train import evaluate, train_vqgan
from vqgan import (CodeCache, VQGAN, VQGANConfig, decode_pil, encode_pil, iter_images, load_vqgan, preprocess,
                   save_vqgan, to_pil)

REPO = Path(__file__).resolve().parents[1]
# same depth, channel multipliers, res blocks and attention as the release, 4x fewer channels: every code path
# of the released network at a fraction of the cost (GroupNorm(32) still divides all widths, as the oracles need)
REDUCED = VQGANConfig(ch=32, z_channels=64, embed_dim=64, n_embed=512)
TINY = VQGANConfig.toy()


# ----------------------------------------------------------------------------------------------------------
# helpers


@torch.no_grad()
def perturbed(cfg, seed=0):
    """A VQGAN whose biases and GroupNorm affines are not at their 0 / 1 init, so none of them drops out."""
    torch.manual_seed(seed)
    model = VQGAN(cfg).eval()
    for name, p in model.named_parameters():
        if name.endswith("bias") or ".norm" in name:
            p.add_(0.1 * torch.randn(p.shape))
    return model


def random_vqgan(cfg, size, B, seed=0):
    """perturbed() with a codebook spread over its own encoder outputs, so that a bit-level difference anywhere
    would change many indices. Returns (model, pixels, encoder output)."""
    model = perturbed(cfg, seed)
    with torch.no_grad():
        x = torch.rand(B, 3, size, size) * 2 - 1
        enc = model.encoder(x)
        spread_codebook(model, model.quant_conv(enc), noise=0.5)
    return model, x, enc


@torch.no_grad()
def spread_codebook(model, z, noise):
    """Codebook vectors drawn from the quantizer inputs z (B, D, h, w) plus noise (x their std), so that most cells
    get distinct codes. Draws from torch's global generator (seed it first, as perturbed() does)."""
    z = z.permute(0, 2, 3, 1).reshape(-1, model.config.embed_dim)
    pick = torch.randint(len(z), (model.config.n_embed,))
    model.quantize.embedding.weight.copy_(z[pick] + noise * z.std() * torch.randn(model.config.n_embed, z.shape[1]))
    return model


def hf_encoder(model):
    from transformers.models.chameleon.configuration_chameleon import ChameleonVQVAEConfig
    from transformers.models.chameleon.modeling_chameleon import ChameleonVQVAE

    c = model.config
    hf = ChameleonVQVAE(ChameleonVQVAEConfig(
        embed_dim=c.embed_dim, num_embeddings=c.n_embed, latent_channels=c.z_channels, base_channels=c.ch,
        channel_multiplier=list(c.ch_mult), num_res_blocks=c.num_res_blocks, attn_resolutions=[],
        resolution=c.resolution, in_channels=c.in_channels, double_latent=False, dropout=0.0)).eval()
    # HF holds exactly the 129 non-decoder keys of the release, under the same names
    hf.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("decoder.")}, strict=True)
    return hf


def janus_decoder(model):
    """Spec section 5: Janus's decoder with up.i <- up.(L-1-i) and its extra deepest-level attention blocks made
    identities (proj_out = 0)."""
    from transformers.models.janus.configuration_janus import JanusVQVAEConfig
    from transformers.models.janus.modeling_janus import JanusVQVAEDecoder

    c = model.config
    L = len(c.ch_mult)
    dec = JanusVQVAEDecoder(JanusVQVAEConfig(
        embed_dim=c.embed_dim, num_embeddings=c.n_embed, latent_channels=c.z_channels, base_channels=c.ch,
        channel_multiplier=list(c.ch_mult), num_res_blocks=c.num_res_blocks, out_channels=c.out_ch,
        in_channels=c.in_channels, dropout=0.0)).eval()
    sd = {}
    for k, v in model.decoder.state_dict().items():
        if k.startswith("up."):
            i, rest = k[3:].split(".", 1)
            k = f"up.{L - 1 - int(i)}.{rest}"
        sd[k] = v
    missing, unexpected = dec.load_state_dict(sd, strict=False)
    assert not unexpected and all(k.startswith("up.0.attn.") for k in missing), (missing, unexpected)
    with torch.no_grad():
        for attn in dec.up[0].attn:
            attn.proj_out.weight.zero_()
            attn.proj_out.bias.zero_()
    return dec


def check_encode(cfg, size, B):
    model, x, enc = random_vqgan(cfg, size, B)
    codes = model.encode(x)
    with torch.no_grad():
        ref = hf_encoder(model).encode(x)
        z_q, loss, codes_fwd = model.quantize(model.quant_conv(enc))
    g = size // 16
    assert codes.shape == (B, g, g) and codes.dtype == torch.long
    # flat HF indices are row-major over (b, h, w)
    assert torch.equal(codes.flatten(), ref.image_tokens)
    assert torch.equal(enc, ref.last_hidden_state)
    assert torch.equal(z_q, ref.quantized_last_hidden_state) and torch.equal(loss, ref.embedding_loss)
    assert torch.equal(codes_fwd, codes)
    assert codes.unique().numel() > min(cfg.n_embed, B * g * g) // 4  # the comparison covers many codes


def check_decode(cfg, grid, B):
    model = perturbed(cfg)
    with torch.no_grad():
        model.quantize.embedding.weight.normal_()  # codes of unit scale, not taming's +-1/n_embed init
    codes = torch.randint(cfg.n_embed, (B, grid, grid))
    with torch.no_grad():
        z_q = model.quantize.embedding(codes.flatten()).view(B, grid, grid, -1).permute(0, 3, 1, 2).contiguous()
        ref = janus_decoder(model)(model.post_quant_conv(z_q))
    out = model.decode(codes)
    assert out.shape == (B, 3, 16 * grid, 16 * grid) and out.std() > 0.1
    assert torch.equal(out, ref), (out - ref).abs().max()


# ----------------------------------------------------------------------------------------------------------
# network: shapes, keys, parity


def test_released_layout():
    with torch.device("meta"):
        model = VQGAN(VQGANConfig())
    sd = model.state_dict()
    assert len(sd) == 293
    assert sum(v.numel() for v in sd.values()) == 68_718_467
    parts = {p: sum(k.startswith(p + ".") for k in sd) for p in ("encoder", "decoder", "quantize", "quant_conv",
                                                                  "post_quant_conv")}
    assert parts == {"encoder": 124, "decoder": 164, "quantize": 1, "quant_conv": 2, "post_quant_conv": 2}
    shapes = {"encoder.down.2.block.0.nin_shortcut.weight": (256, 128, 1, 1),
              "encoder.mid.attn_1.q.weight": (512, 512, 1, 1), "quantize.embedding.weight": (8192, 256),
              "decoder.up.1.block.0.nin_shortcut.weight": (128, 256, 1, 1), "decoder.conv_out.weight": (3, 128, 3, 3),
              "decoder.up.4.upsample.conv.weight": (512, 512, 3, 3), "encoder.down.3.downsample.conv.bias": (256,)}
    for k, s in shapes.items():
        assert tuple(sd[k].shape) == s, k
    assert not any(".attn." in k for k in sd)  # attention only in mid
    assert "decoder.up.0.upsample.conv.weight" not in sd and "encoder.down.4.downsample.conv.weight" not in sd
    assert model.grid(256) == (16, 16) and model.grid(512) == (32, 32)


@pytest.mark.parametrize("size,B", [(256, 2), (512, 1)])
def test_encode_matches_chameleon_reduced(size, B):
    check_encode(REDUCED, size, B)


def test_decode_matches_janus_recipe_reduced():
    check_decode(REDUCED, 16, 2)


@pytest.mark.slow
@pytest.mark.parametrize("size", [256, 512])
def test_encode_matches_chameleon_released(size):
    check_encode(VQGANConfig(), size, 2)


@pytest.mark.slow
@pytest.mark.parametrize("grid", [16, 32])
def test_decode_matches_janus_recipe_released(grid):
    check_decode(VQGANConfig(), grid, 1)


def test_forward_trains_and_bf16_runs():
    model, x, _ = random_vqgan(TINY, 64, 2)
    recon, vq_loss, codes = model(x)
    assert recon.shape == x.shape and codes.shape == (2, 8, 8) and vq_loss.ndim == 0
    (recon.abs().mean() + vq_loss).backward()
    assert model.encoder.conv_in.weight.grad is not None  # straight-through reaches the encoder
    assert model.quantize.embedding.weight.grad is not None
    bf = VQGAN(TINY)
    bf.load_state_dict(model.state_dict())
    bf = bf.to(torch.bfloat16)
    codes_bf = bf.encode(x)
    out = bf.decode(codes_bf)
    assert codes_bf.dtype == torch.long and out.dtype == torch.float32 and out.shape == x.shape
    assert (codes_bf == model.encode(x)).float().mean() > 0.5  # bf16 encoder, fp32 distances


# ----------------------------------------------------------------------------------------------------------
# loading: the released pickle layout, safetensors, and clear errors

YAML = """\
model:
  base_learning_rate: 4.5e-06   # comment
  target: taming.models.vqgan.VQModel
  params:
    embed_dim: {embed_dim}
    n_embed: {n_embed}
    ddconfig:
      double_z: false
      z_channels: {z_channels}
      resolution: {resolution}
      in_channels: 3
      out_ch: 3
      ch: {ch}
      ch_mult:
      - {m0}
      - {m1}
      - {m2}
      - {m3}
      num_res_blocks: {num_res_blocks}
      attn_resolutions: []
      dropout: 0.0
    lossconfig:
      target: taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator
      params:
        disc_conditional: false
        disc_in_channels: 3
        disc_start: 100001
        disc_weight: 0.8
        codebook_weight: 1.0
"""


def tiny_yaml(cfg):
    m0, m1, m2, m3 = cfg.ch_mult
    return YAML.format(m0=m0, m1=m1, m2=m2, m3=m3, **asdict(cfg))


def test_yaml_reader(tmp_path):
    def write(text):
        (tmp_path / "vqgan.yaml").write_text(text)
        return tmp_path / "vqgan.yaml"

    cfg = VQGANConfig(ch=32, ch_mult=(1, 2, 2, 4), num_res_blocks=1, z_channels=32, embed_dim=16, n_embed=64,
                      resolution=64)
    assert VQGANConfig.from_yaml(write(tiny_yaml(cfg))) == cfg
    inline = tiny_yaml(cfg).replace("ch_mult:\n      - 1\n      - 2\n      - 2\n      - 4", "ch_mult: [1, 2, 2, 4]")
    assert "ch_mult: [1, 2, 2, 4]" in inline
    assert VQGANConfig.from_yaml(write(inline)) == cfg
    # the released values (Chameleon's tokenizer/vqgan.yaml) with every list written in block style
    released = VQGANConfig()
    text = YAML.format(m0=1, m1=1, m2=2, m3=2, **asdict(released))
    text = text.replace("      - 2\n      num", "      - 2\n      - 4\n      num")
    assert VQGANConfig.from_yaml(write(text)) == released
    with pytest.raises(ValueError, match="double_z"):
        VQGANConfig.from_yaml(write(tiny_yaml(cfg).replace("double_z: false", "double_z: true")))


def test_released_pickle_roundtrip(tmp_path, capsys):
    model, x, _ = random_vqgan(TINY, 64, 2)
    sd = dict(model.state_dict())
    sd["loss.discriminator.main.0.weight"] = torch.randn(8, 3, 4, 4)
    sd["loss.logvar"] = torch.zeros(())
    torch.save({"state_dict": sd}, tmp_path / "vqgan.ckpt")
    # taming's yaml has no num_groups (it hard-codes 32) and the toy needs 8: our config.json, when present, wins
    (tmp_path / "vqgan.yaml").write_text(tiny_yaml(TINY))
    (tmp_path / "config.json").write_text(json.dumps(asdict(TINY)))
    loaded = load_vqgan(tmp_path / "vqgan.ckpt")
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and f"loaded {len(model.state_dict())} tensors" in line and "config: config.json" in line
    assert "dropped 2 extra keys: loss.discriminator.main.0.weight, loss.logvar" in line
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert torch.equal(loaded.encode(x), model.encode(x))
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    # our own format, and bf16 loading
    save_vqgan(model, tmp_path / "ours")
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == ["config.json", "model.safetensors"]
    again = load_vqgan(tmp_path / "ours", dtype=torch.bfloat16)
    assert again.config == TINY and again.quant_conv.weight.dtype == torch.bfloat16
    assert torch.equal(again.decoder.conv_out.weight, model.decoder.conv_out.weight.to(torch.bfloat16))


def test_released_pickle_with_yaml_only(tmp_path, capsys):
    cfg = VQGANConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, z_channels=32, embed_dim=16, n_embed=64,
                      resolution=64)
    model = VQGAN(cfg)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "vqgan.ckpt")
    (tmp_path / "vqgan.yaml").write_text(tiny_yaml(cfg))
    loaded = load_vqgan(tmp_path)
    assert loaded.config == cfg and "config: vqgan.yaml" in capsys.readouterr().out


def _bad(tmp_path, kind):
    model = VQGAN(TINY)
    sd = dict(model.state_dict())
    (tmp_path / "config.json").write_text(json.dumps(asdict(TINY)))
    p = tmp_path / "vqgan.ckpt"
    if kind == "not a pickle":
        p.write_bytes(b"this is not a checkpoint\n" * 10)
    elif kind == "no state_dict":
        torch.save({"model": sd}, p)
    elif kind == "missing key":
        del sd["decoder.mid.attn_1.q.weight"]
        torch.save({"state_dict": sd}, p)
    elif kind == "wrong shape":
        sd["quantize.embedding.weight"] = torch.zeros(100, TINY.embed_dim)
        torch.save({"state_dict": sd}, p)
    elif kind == "unsafe pickle":  # weights_only=True refuses arbitrary objects
        torch.save({"state_dict": sd, "opt": io.StringIO("x")}, p)
    elif kind == "truncated safetensors":
        save_vqgan(model, tmp_path)
        p = tmp_path / "model.safetensors"
        p.write_bytes(p.read_bytes()[:5000])
    return p


@pytest.mark.parametrize("kind,message", [
    ("not a pickle", r"vqgan\.ckpt: not a torch checkpoint readable with weights_only=True"),
    ("no state_dict", r"vqgan\.ckpt: no 'state_dict' entry \(found \['model'\]\)"),
    ("missing key", r"vqgan\.ckpt: missing 1 of \d+ VQGAN keys: decoder\.mid\.attn_1\.q\.weight"),
    ("wrong shape", rf"quantize\.embedding\.weight has shape \(100, {TINY.embed_dim}\), the config \(config\.json\) "
                    rf"expects \({TINY.n_embed}, {TINY.embed_dim}\)"),
    ("unsafe pickle", r"vqgan\.ckpt: not a torch checkpoint readable with weights_only=True \(UnpicklingError"),
    ("truncated safetensors", r"model\.safetensors: not a readable safetensors file"),
])
def test_malformed_files(tmp_path, kind, message):
    p = _bad(tmp_path, kind)
    with pytest.raises(ValueError, match=message):
        load_vqgan(p)


def test_missing_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no vqgan.ckpt or"):
        load_vqgan(tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_vqgan(tmp_path / "nope.ckpt")


def test_cli_errors_are_one_line(tmp_path):
    with pytest.raises(SystemExit, match="^error: VQGAN weights not found: .*nope.ckpt$"):
        vqgan.main(["cache", "--vqgan", str(tmp_path / "nope.ckpt"), "--data", str(tmp_path), "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="^error: .*: no readable images$"):
        vqgan_train.main(["--images", str(tmp_path), "--out", str(tmp_path / "run")])
    save_vqgan(VQGAN(TINY), tmp_path / "vq")
    with pytest.raises(SystemExit, match="^error: .*data.csv: expected a folder of images, a .jsonl or a .tar shard$"):
        (tmp_path / "data.csv").write_text("x")
        vqgan.main(["cache", "--vqgan", str(tmp_path / "vq"), "--data", str(tmp_path / "data.csv"),
                    "--out", str(tmp_path / "c"), "--size", "32"])


# ----------------------------------------------------------------------------------------------------------
# pre- and post-processing (chameleon/inference/image_tokenizer.py)


def test_normalisation_is_float64():
    levels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    x = preprocess(Image.fromarray(levels, "L"), 16)
    want = torch.from_numpy(levels / 255.0 * 2 - 1).float()
    for c in range(3):
        assert torch.equal(x[c], want)
    f32 = torch.from_numpy(levels.astype(np.float32) / np.float32(255.0) * 2 - 1)
    assert (f32 != want).sum() > 100  # float32 arithmetic would have moved many levels by 1 ulp
    assert x.dtype == torch.float32 and x.min() == -1 and x.max() == 1


def test_alpha_blended_on_white_with_truncation():
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (8, 8, 4), dtype=np.uint8)
    rgba[0, 0] = (10, 200, 30, 128)
    img = Image.fromarray(rgba, "RGBA")
    x = preprocess(img, 8)  # already 8x8: resize and crop keep the pixels
    a = rgba[..., 3:] / 255.0
    blend = ((1 - a) * 255 + a * rgba[..., :3]).astype(np.uint8)  # truncation
    got = np.round((x.permute(1, 2, 0).numpy().astype(np.float64) + 1) / 2 * 255).astype(np.uint8)
    assert np.array_equal(got, blend)
    rounded = np.round((1 - a) * 255 + a * rgba[..., :3]).astype(np.uint8)
    assert (rounded != blend).any()  # the test tells truncation from rounding
    # fully opaque RGBA is a plain RGB conversion
    rgba[..., 3] = 255
    assert torch.equal(preprocess(Image.fromarray(rgba, "RGBA"), 8), preprocess(Image.fromarray(rgba[..., :3]), 8))


def test_palette_grayscale_and_la():
    pal = Image.new("P", (4, 4))
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.putpixel((0, 0), 1)
    pal.info["transparency"] = 0  # index 0 (red) transparent -> white
    x = preprocess(pal, 4)
    assert torch.equal(x[:, 0, 0], torch.tensor([-1.0, -1.0, 1.0]))  # opaque blue
    assert torch.equal(x[:, 1, 1], torch.ones(3))  # transparent red became white
    opaque = Image.new("P", (4, 4))
    opaque.putpalette([0, 255, 0] + [0] * 765)
    assert torch.equal(preprocess(opaque, 4)[:, 2, 2], torch.tensor([-1.0, 1.0, -1.0]))
    gray = Image.fromarray(np.full((4, 4), 51, np.uint8), "L")
    g = preprocess(gray, 4)
    assert torch.equal(g[0], g[1]) and torch.equal(g[1], g[2])
    assert g[0, 0, 0] == torch.tensor(51 / 255.0 * 2 - 1).float()
    la = Image.fromarray(np.stack([np.full((4, 4), 0, np.uint8), np.full((4, 4), 64, np.uint8)], -1), "LA")
    v = int((1 - 64 / 255.0) * 255 + 64 / 255.0 * 0)  # 191, truncated
    assert torch.equal(preprocess(la, 4), torch.full((3, 4, 4), v / 255.0 * 2 - 1).float())


def test_resize_round_lanczos_floor_crop():
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (157, 301, 3), dtype=np.uint8))
    # 64/157 * 301 = 122.7 -> 123; x0 = (123 - 64) // 2 = 29
    want = img.resize((123, 64), Image.LANCZOS).crop((29, 0, 93, 64))
    assert torch.equal(preprocess(img, 64), torch.from_numpy(np.array(want) / 255.0 * 2 - 1).permute(2, 0, 1).float())
    # Python round ties to even: 25 x 10 at 5 px -> 12.5 -> 12 (not 13); x0 = (12 - 5) // 2 = 3
    tie = Image.fromarray(rng.integers(0, 256, (10, 25, 3), dtype=np.uint8))
    want = tie.resize((12, 5), Image.LANCZOS).crop((3, 0, 8, 5))
    assert torch.equal(preprocess(tie, 5), torch.from_numpy(np.array(want) / 255.0 * 2 - 1).permute(2, 0, 1).float())
    other = tie.resize((13, 5), Image.LANCZOS).crop((4, 0, 9, 5))
    assert not torch.equal(preprocess(tie, 5),
                           torch.from_numpy(np.array(other) / 255.0 * 2 - 1).permute(2, 0, 1).float())
    # portrait, odd sizes, both targets
    tall = Image.fromarray(rng.integers(0, 256, (333, 97, 3), dtype=np.uint8))
    for size in (256, 512):
        assert preprocess(tall, size).shape == (3, size, size)


def test_to_pil_clamps_and_truncates():
    x = torch.tensor([-5.0, -1.0, 0.0, 0.999, 1.0, 7.0]).view(1, 1, 6).expand(3, 1, 6)
    img = to_pil(x)
    assert img.mode == "RGB" and img.size == (6, 1)
    assert np.array(img)[0, :, 0].tolist() == [0, 0, 127, 254, 255, 255]


def test_pil_helpers_shapes():
    model, _, _ = random_vqgan(TINY, 64, 1)
    imgs = [Image.new("RGB", (100, 70), (200, 30, 30)), Image.new("RGBA", (64, 64), (0, 0, 0, 0))]
    codes = encode_pil(model, imgs, 64)
    assert codes.shape == (2, 8, 8)
    out = decode_pil(model, codes)
    assert [im.size for im in out] == [(64, 64), (64, 64)]


# ----------------------------------------------------------------------------------------------------------
# image sources and the code cache


def _png(path, color, size=(40, 30), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


def make_sources(root):
    """A folder (with a nested image and a broken .png), a JSONL (with a missing image and a repeat) and a tar."""
    _png(root / "folder" / "a.png", (255, 0, 0))
    _png(root / "folder" / "sub" / "b.png", (0, 255, 0, 128), mode="RGBA")
    _png(root / "folder" / "c.jpg", (0, 0, 255))
    (root / "folder" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (root / "folder" / "notes.txt").write_text("not an image")
    _png(root / "conv" / "imgs" / "q.png", (120, 120, 0), size=(50, 90))
    _png(root / "conv" / "imgs" / "r.png", (0, 120, 120))
    _png(root / "conv" / "imgs" / "s.png", (99, 9, 199))
    recs = [{"image": "imgs/q.png", "conversations": [{"from": "human", "value": "<image> what?"}]},
            {"image": ["imgs/r.png", "imgs/q.png"], "conversations": []},
            {"conversations": [], "out_images": ["imgs/s.png", "imgs/missing.png"]}]
    (root / "conv" / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    with tarfile.open(root / "shard-000.tar", "w") as tf:
        for i in range(4):
            buf = io.BytesIO()
            Image.new("RGB", (33, 33), (60 * i, 40, 200 - 40 * i)).save(buf, format="PNG")
            for name, data in ((f"{i:06d}.png", buf.getvalue()), (f"{i:06d}.txt", b"caption")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return [str(root / "folder"), str(root / "conv" / "data.jsonl"), str(root / "shard-*.tar")]


def test_iter_images_keys(tmp_path):
    srcs = make_sources(tmp_path)
    keys = [[k for k, _ in iter_images(s)] for s in srcs]
    assert keys[0] == ["a.png", "broken.png", "c.jpg", "sub/b.png"]
    assert keys[1] == ["imgs/q.png", "imgs/r.png", "imgs/s.png", "imgs/missing.png"]
    assert keys[2] == [f"shard-000.tar/{i:06d}.png" for i in range(4)]
    openers = dict(iter_images(srcs[2]))
    assert openers["shard-000.tar/000002.png"]().getpixel((0, 0)) == (120, 40, 120)
    with pytest.raises(Exception):
        dict(iter_images(srcs[0]))["broken.png"]()
    with pytest.raises(FileNotFoundError):
        list(iter_images(str(tmp_path / "nothing-*.tar")))


# `python vqgan.py cache ...` that SIGKILLs itself at its third index write: that batch's codes are on disk, its index
# lines are not
KILL_AT_THIRD_INDEX_WRITE = f"""
import os, signal, sys
sys.path.insert(0, {str(REPO)!r})
import vqgan
append, calls = vqgan._append_index, []
def append_index(findex, lines):
    calls.append(len(lines))
    if len(calls) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    append(findex, lines)
vqgan._append_index = append_index
vqgan.main(sys.argv[1:])
"""


def _cache_cmd(vq, srcs, out):
    cmd = [sys.executable, str(REPO / "vqgan.py"), "cache", "--vqgan", str(vq), "--out", str(out), "--size", "32",
           "--batch", "2"]
    for s in srcs:
        cmd += ["--data", s]
    return cmd


@pytest.mark.e2e
def test_cache_kill_and_resume(tmp_path):
    srcs = make_sources(tmp_path / "data")
    model, _, _ = random_vqgan(TINY, 32, 1)
    save_vqgan(model, tmp_path / "vq")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run(_cache_cmd(tmp_path / "vq", srcs, tmp_path / "one"), env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    assert "10 images, 2 skipped" in one.stdout

    # killed (SIGKILL) after the codes of its 3rd batch hit the disk but before that batch's index lines
    two = tmp_path / "two"
    cmd = [sys.executable, "-c", KILL_AT_THIRD_INDEX_WRITE, *_cache_cmd(tmp_path / "vq", srcs, two)[2:]]
    killed = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL
    lines = (two / "index.jsonl").read_text().splitlines()
    covered = sum(16 for e in map(json.loads, lines) if "skip" not in e)  # 4x4 codes per image
    assert 0 < len(lines) < 12 and (two / "codes.u16").stat().st_size > 2 * covered  # a partial run
    assert json.loads((two / "meta.json").read_text())["complete"] is False
    with open(two / "index.jsonl", "a") as f:
        f.write('{"key": "torn')  # as if the kill had hit the middle of a line
    again = subprocess.run(_cache_cmd(tmp_path / "vq", srcs, two), env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    for name in ("codes.u16", "index.jsonl", "meta.json"):
        assert (two / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name

    meta = json.loads((two / "meta.json").read_text())
    assert meta["complete"] and meta["n_images"] == 10 and meta["n_skipped"] == 2
    assert [s.split(":")[0] for s in meta["first_skipped"]] == ["broken.png", "imgs/missing.png"]
    cache = CodeCache(two)
    assert len(cache) == 10 and "sub/b.png" in cache and "broken.png" not in cache
    img = dict(iter_images(srcs[2]))["shard-000.tar/000003.png"]()
    assert np.array_equal(cache.get("shard-000.tar/000003.png"), encode_pil(model, [img], 32)[0].numpy())
    assert cache.get("imgs/q.png").dtype == np.uint16 and cache.get("imgs/q.png").shape == (4, 4)


def test_cache_refuses_other_settings(tmp_path):
    srcs = make_sources(tmp_path / "data")
    model = VQGAN(TINY)
    vqgan.build_cache(model, srcs[:1], tmp_path / "c", size=32, batch=4)
    with pytest.raises(ValueError, match="another size"):
        vqgan.build_cache(model, srcs[:1], tmp_path / "c", size=64, batch=4)
    with pytest.raises(ValueError, match="another weights_sha1"):
        vqgan.build_cache(VQGAN(TINY), srcs[:1], tmp_path / "c", size=32, batch=4)
    vqgan.build_cache(model, srcs[:1], tmp_path / "c", size=32, batch=4)  # same settings: a no-op rerun
    assert len(CodeCache(tmp_path / "c")) == 3


# ----------------------------------------------------------------------------------------------------------
# toy training


SHAPE_COLORS = [(220, 40, 40), (40, 160, 60), (40, 80, 220), (240, 200, 40), (150, 60, 200), (250, 140, 30),
                (240, 110, 170), (30, 30, 30), (250, 250, 250), (120, 70, 30)]
PASTELS = [(255, 214, 214), (214, 236, 255), (214, 255, 222), (255, 246, 204), (235, 220, 255), (255, 228, 204),
           (230, 230, 230)]


def toy_images(n, seed, size=64):
    """Flat-coloured procedural drawings like the toy world's: named-colour shapes on pastels, sunsets,
    snowy mountains, auroras. Returns (n, 3, size, size) in [-1, 1]."""
    r = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        kind = r.integers(5)
        im = Image.new("RGB", (size, size), PASTELS[r.integers(len(PASTELS))])
        d = ImageDraw.Draw(im)
        if kind <= 1:  # 1-3 circles / squares / triangles
            for _ in range(r.integers(1, 4)):
                s = int(r.integers(size // 6, size // 2))
                x, y = (int(v) for v in r.integers(0, size - s, 2))
                c, shape = SHAPE_COLORS[r.integers(len(SHAPE_COLORS))], r.integers(3)
                if shape == 2:
                    d.polygon([(x, y + s), (x + s, y + s), (x + s // 2, y)], fill=c)
                else:
                    (d.ellipse if shape == 0 else d.rectangle)([x, y, x + s, y + s], fill=c)
        elif kind == 2:  # sunset: sky gradient, sun, dark ground
            top = np.array([250, 120, 90] if r.integers(2) else [120, 60, 140])
            for i in range(size):
                c = (1 - i / size) * top + i / size * np.array([255, 220, 120])
                d.line([(0, i), (size, i)], fill=tuple(int(v) for v in c))
            s, x = int(r.integers(10, 24)), int(r.integers(0, size - 24))
            d.ellipse([x, size // 2 - s // 2, x + s, size // 2 + s // 2], fill=(255, 200, 60))
            d.rectangle([0, int(size * 0.65), size, size], fill=(40, 30, 50))
        elif kind == 3:  # snowy mountains
            im.paste((150, 200, 250), (0, 0, size, size))
            for _ in range(r.integers(1, 4)):
                cx, h, w = (int(v) for v in (r.integers(0, size), r.integers(size // 3, size * 4 // 5),
                                             r.integers(size // 3, size)))
                d.polygon([(cx - w // 2, size), (cx + w // 2, size), (cx, size - h)], fill=(90, 90, 110))
                d.polygon([(cx - w * 3 // 20, size - h * 7 // 10), (cx + w * 3 // 20, size - h * 7 // 10),
                           (cx, size - h)], fill=(250, 250, 255))
        else:  # aurora: wavy bands over a night sky
            im.paste((10, 20, 50), (0, 0, size, size))
            for _ in range(r.integers(1, 3)):
                y0, amp, ph = int(r.integers(5, size // 2)), int(r.integers(3, 8)), r.uniform(0, 6)
                pts = [(x, y0 + int(amp * np.sin(x / 8 + ph))) for x in range(0, size + 1, 4)]
                d.line(pts, fill=(80, 240, 150) if r.integers(2) else (120, 200, 255), width=int(r.integers(3, 7)))
            d.rectangle([0, int(size * 0.8), size, size], fill=(20, 30, 30))
        out.append(preprocess(im, size))
    return torch.stack(out)


def killed_once(data, at):
    """A batches function that serves `data` but raises KeyboardInterrupt the first time step `at` is asked for."""
    pending = [True]

    def batches(step):
        if step == at and pending[0]:
            pending[0] = False
            raise KeyboardInterrupt
        return data

    return batches


def test_train_overfits_and_resumes_exactly(tmp_path):
    torch.set_num_threads(1)
    data = toy_images(4, seed=0)
    batches = killed_once(data, 4)  # a kill right after the step-4 checkpoint

    with pytest.raises(KeyboardInterrupt):
        train_vqgan(TINY, batches, 8, 1e-3, tmp_path / "a", log_every=2, restart_every=2)
    a = train_vqgan(TINY, batches, 8, 1e-3, tmp_path / "a", log_every=2, restart_every=2)
    b = train_vqgan(TINY, lambda step: data, 8, 1e-3, tmp_path / "b", log_every=2, restart_every=2)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert load_vqgan(tmp_path / "a").config == TINY

    # a hundred steps on 4 images must at least halve the reconstruction error (60 steps at lr 2e-3 was unstable
    # with the 512-code toy codebook: it measured 0.83 -> 0.43 or a divergence, depending on the RNG)
    torch.manual_seed(0)
    before, _ = evaluate(VQGAN(TINY), data)
    model = train_vqgan(TINY, lambda step: data, 120, 1e-3, tmp_path / "c", log_every=60)
    after, used = evaluate(model, data)
    assert after < 0.5 * before, (before, after)


@pytest.mark.slow
def test_toy_config_trains(tmp_path):
    """2000 steps of batch 8 (about 4 minutes on 2 cores),
    then MSE and codebook usage on held-out drawings. It must beat an 8x8 grid of exact flat colours, i.e. each
    token holding the mean colour of its patch (which is what a blurry tokenizer would manage)."""
    import time

    import torch.nn.functional as F

    torch.set_num_threads(2)
    train, test = toy_images(2000, seed=1), toy_images(256, seed=2)
    flat = F.mse_loss(F.interpolate(F.avg_pool2d(test, 8), scale_factor=8), test).item()

    def batches(step):
        return train[torch.randint(len(train), (8,), generator=torch.Generator().manual_seed(step))]

    t = time.time()
    model = train_vqgan(TINY, batches, 2000, 1e-3, tmp_path, log_every=500)
    ms = (time.time() - t) * 1000 / 2000
    mse, used = evaluate(model, test)
    print(f"toy vqgan, 2000 steps of batch 8: held-out mse {mse:.4f} (flat 8x8 colours {flat:.4f}), "
          f"{used}/{TINY.n_embed} codes used on 256 images, {ms:.0f} ms/step")
    assert mse < 0.8 * flat and used > TINY.n_embed // 2


def test_context_pairs_keep_the_kept_cells():
    """The moved copy holds every kept cell unchanged (shifted by whole cells), and a pasted block elsewhere."""
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for step in range(5):
        moved, (dy, dx), keep = vqgan_train._context_pairs(x, 8, step)
        ref = torch.roll(x, (8 * dy, 8 * dx), dims=(2, 3))
        cells = lambda t: t.reshape(4, 3, 4, 8, 4, 8).permute(0, 2, 4, 1, 3, 5)  # (B, h, w, 3, 8, 8)
        same = (cells(moved) == cells(ref)).flatten(3).all(-1)
        assert torch.equal(same, keep)  # random pixels: a pasted cell never equals the one it replaced
        assert (~keep).flatten(1).any(1).all() and keep.flatten(1).any(1).all()


def test_locality_loss_separates_local_from_global_encoders():
    """0 for an encoder that looks only at its own cell (mean colour per cell), clearly above 0 for one that adds the
    image mean (what GroupNorm or attention can do); and scaling z does not change it."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 1, 1, generator=g) + 0.1 * torch.rand(6, 3, 32, 32, generator=g)  # a flat colour each
    moved, shift, keep = vqgan_train._context_pairs(x, 8, 0)
    both = torch.cat([x, moved])
    local = F.avg_pool2d(both, 8)
    glob = local + 3 * both.mean((2, 3), keepdim=True)
    assert vqgan_train._locality_loss(local, shift, keep).item() < 1e-10
    g = vqgan_train._locality_loss(glob, shift, keep).item()
    assert g > 1e-3  # 0.04 here: the block pasted from another image moves the image mean
    assert vqgan_train._locality_loss(0.01 * glob, shift, keep).item() == pytest.approx(g, rel=1e-4)


def test_context_entropy():
    """0 nats when equal cells always get equal codes; log 2 when each cell's code is a fair coin flip."""
    class Stub:
        def __init__(self, noisy):
            self.config, self.noisy, self.g = VQGANConfig(ch_mult=(1, 2, 2, 2)), noisy, torch.Generator().manual_seed(0)

        def encode(self, x):  # a code per cell from its mean colour, plus a random bit when noisy
            codes = (F.avg_pool2d(x, 8).mean(1) > 0).long() * 2
            return codes + torch.randint(2, codes.shape, generator=self.g) if self.noisy else codes

    x = torch.zeros(200, 3, 16, 16)
    x[::2, :, :8] = 1  # two kinds of cell
    assert vqgan_train.context_entropy(Stub(False), x) == 0
    assert vqgan_train.context_entropy(Stub(True), x) == pytest.approx(np.log(2), abs=0.03)


def test_train_with_locality_resumes_exactly(tmp_path):
    """The locality term changes training (other weights than without it) and a killed run resumes bit-exactly."""
    torch.set_num_threads(1)
    data = toy_images(4, seed=0)
    batches = killed_once(data, 3)

    with pytest.raises(KeyboardInterrupt):
        train_vqgan(TINY, batches, 6, 1e-3, tmp_path / "a", log_every=3, locality=5.0)
    a = train_vqgan(TINY, batches, 6, 1e-3, tmp_path / "a", log_every=3, locality=5.0)
    b = train_vqgan(TINY, lambda step: data, 6, 1e-3, tmp_path / "b", log_every=3, locality=5.0)
    c = train_vqgan(TINY, lambda step: data, 6, 1e-3, tmp_path / "c", log_every=3)
    w = "encoder.conv_in.weight"
    assert torch.equal(a.state_dict()[w], b.state_dict()[w])
    assert not torch.equal(a.state_dict()[w], c.state_dict()[w])
    with pytest.raises(ValueError, match="locality 5.0, not 0.0"):  # resuming under another weight is refused
        train_vqgan(TINY, lambda step: data, 6, 1e-3, tmp_path / "a", log_every=3)


def test_cell_local_codes_depend_on_their_own_cell_only(tmp_path):
    """cell_local (the toy world's VQGAN): a code is a function of its own 8 px cell. Changing one cell changes that
    cell's code and no other; a cell encoded as an image of its own gets the code it has in context; the setting
    survives save / load. The whole-image encoder (the released layout) changes codes around the changed cell."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(6, 3, 64, 64, generator=g) * 2 - 1
    y = x.clone()
    y[:, :, 8:16, 16:24] = torch.rand(6, 3, 8, 8, generator=g) * 2 - 1  # cell (1, 2) only
    local = perturbed(dataclasses.replace(TINY, cell_local=True))
    spread_codebook(local, local.encode_z(torch.cat([x, y])), noise=0.05)
    before, after = local.encode(x), local.encode(y)
    changed = before != after
    assert changed[:, 1, 2].sum() >= 4  # the changed cell (random codebook: a few may map to the same code)
    changed[:, 1, 2] = False
    assert not changed.any()
    assert torch.equal(local.encode(x[:, :, 8:16, 16:24])[:, 0, 0], before[:, 1, 2])
    save_vqgan(local, tmp_path / "vq")
    again = load_vqgan(tmp_path / "vq")
    assert again.config.cell_local and torch.equal(again.encode(x), before)

    whole = perturbed(TINY)
    spread_codebook(whole, whole.encode_z(torch.cat([x, y])), noise=0.05)
    spread = whole.encode(x) != whole.encode(y)
    spread[:, 1, 2] = False
    assert spread.sum() > 6  # GroupNorm statistics and the mid-block attention see the whole image
