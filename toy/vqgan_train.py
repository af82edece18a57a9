"""
The toy world's VQGAN trainer: Chameleon's VQGAN (vqgan.py) trained from scratch on the world's pictures, so the
toy world's image tokenizer is made by this code. The pipeline (pipeline.py, step "vqgan") calls train_vqgan on
fresh renders; the command below trains on a folder of images. context_entropy measures how far a code depends on
more than its own cell (eval.py's VQGAN row).

  python -m toy.vqgan_train --images DIR --out DIR [--steps 2000] [--size 64] [--batch 8]
      trains the toy VQGAN (VQGANConfig.toy()) on a folder of images; rerun to resume.
"""

import argparse
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from vqgan import VQGAN, VQGANConfig, _atomic_write, iter_images, preprocess, save_vqgan


def train_vqgan(cfg: VQGANConfig, batches, steps, lr=1e-3, out_dir="out/vqgan", log_every=100, resume=True,
                restart_every=100, locality=0.0, device="cpu") -> VQGAN:
    """Train a VQGAN from scratch: loss = MSE(recon, x) + VQ loss (taming's legacy order: commitment term with
    weight 1 + 0.25 * codebook term). MSE rather than L1: on toy drawings it gave 0.025 held-out MSE after 2000
    steps where L1 gave 0.034 (and a plain autoencoder with L1 0.026).

    batches: a function step -> (B, 3, H, W) in [-1, 1] (exact resume), or an iterator of such tensors.
    Every `restart_every` steps, codes unused since the last check are re-seeded from the latest encoder outputs
    (dead-code restart; without it the toy codebook collapsed to 94 of 1024 codes in 600 steps). Checkpoints go to
    out_dir/train_state.pt (written atomically); the result is saved with save_vqgan(out_dir).

    locality > 0 adds a term that makes a code depend on its own cell only: the batch is encoded a second time with
    every image shifted by whole cells and a block of cells pasted in from another image, and the encoder outputs
    of the unchanged cells are pulled together (_context_pairs, _locality_loss). Chameleon's encoder sees the whole
    image (GroupNorm statistics, mid-block attention), and without the term the shipped toy VQGAN gives equal 8x8
    cells about 15 different codes depending on their surroundings (context_entropy 2.74 nats, eval.py's VQGAN
    row): codes that an autoregressive generator must guess before it has drawn what they depend on. Ramped in over
    the first half of training: trials at full weight from the first step collapsed the codebook or lost colours."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = VQGAN(cfg).to(device)  # initialised on the CPU first: the same weights from the seed on every device
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    usage = torch.zeros(cfg.n_embed, dtype=torch.long, device=device)  # code counts since the last restart check
    step, state_path = 0, out / "train_state.pt"
    if resume and state_path.exists():
        st = torch.load(state_path, map_location=device, weights_only=True)
        if st["config"] != asdict(cfg):
            raise ValueError(f"{state_path}: was trained with config {st['config']}, not {asdict(cfg)}")
        if st.get("locality", 0.0) != locality:
            raise ValueError(f"{state_path}: was trained with locality {st.get('locality', 0.0)}, not {locality}")
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        usage, step = st["usage"], st["step"]
        torch.set_rng_state(st["rng"].cpu())
        print(f"vqgan train: resumed from {state_path} at step {step}")

    def save_state():
        st = {"config": asdict(cfg), "model": model.state_dict(), "optimizer": opt.state_dict(), "usage": usage,
              "step": step, "rng": torch.get_rng_state(), "locality": locality}
        _atomic_write(state_path, lambda p: torch.save(st, p))

    model.train()
    bar = tqdm(total=steps, initial=step, unit="step", desc="vqgan train")
    window_codes = torch.zeros(cfg.n_embed, dtype=torch.bool, device=device)  # codes used since the last log line
    t0, step0 = time.time(), step
    while step < steps:
        x = (batches(step) if callable(batches) else next(batches)).to(device)
        # lr: constant, then cosine to 10% over the last half (sharper final reconstructions)
        frac = max(0.0, step / steps - 0.5) * 2
        for g in opt.param_groups:
            g["lr"] = lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        if locality:  # the batch again in new contexts: encoded only, for the locality term
            moved, shift, keep = _context_pairs(x, cfg.factor, step)
            z_all = model.encode_z(torch.cat([x, moved]))
            z, loc_loss = z_all[:len(x)], _locality_loss(z_all, shift, keep)
        else:
            z = model.encode_z(x)
        z_q, vq_loss, codes = model.quantize(z)
        recon = model.decoder(model.post_quant_conv(z_q))
        rec_loss = F.mse_loss(recon, x)
        loss = rec_loss + vq_loss
        if locality:  # ramped in over the first half (see the docstring)
            loss = loss + locality * min(1.0, 2 * step / steps) * loc_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        usage += torch.bincount(codes.flatten(), minlength=cfg.n_embed)
        window_codes[codes.flatten()] = True
        if step % restart_every == 0 and step <= 0.9 * steps:
            _restart_dead_codes(model, opt, usage, z.detach())
            usage.zero_()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", codes=int(window_codes.sum()))
        if step % log_every == 0 or step == steps:
            ms = (time.time() - t0) * 1000 / (step - step0)
            tqdm.write(f"step {step}/{steps} | loss {loss.item():.4f} (mse {rec_loss.item():.4f}, "
                       f"vq {vq_loss.item():.4f}{f', locality {loc_loss.item():.4f}' if locality else ''}) | "
                       f"codes used {int(window_codes.sum())}/{cfg.n_embed} | {ms:.0f} ms/step")
            window_codes.zero_()
            t0, step0 = time.time(), step
            save_state()
    bar.close()
    save_state()
    model.eval()
    save_vqgan(model, out)
    return model


def _context_pairs(x, f, step):
    """The batch again with a new context around unchanged cells: each image shifted by whole cells (wrapping) and
    a block of cells pasted from another image. -> moved images, the shift in cells, mask (B, h, w) of kept cells."""
    g = torch.Generator().manual_seed(step)
    B, _, H, W = x.shape
    h, w = H // f, W // f
    dy, dx = (int(v) for v in torch.randint(-(h // 2), h // 2 + 1, (2,), generator=g))
    moved = torch.roll(x, (dy * f, dx * f), dims=(2, 3)).clone()
    keep = torch.ones(B, h, w, dtype=torch.bool, device=x.device)
    donor = torch.roll(x, 1, dims=0)
    for i in range(B):
        bh, bw = (int(v) for v in torch.randint(1, h // 2 + 1, (2,), generator=g))
        r, c = int(torch.randint(h - bh + 1, (1,), generator=g)), int(torch.randint(w - bw + 1, (1,), generator=g))
        moved[i, :, r * f:(r + bh) * f, c * f:(c + bw) * f] = donor[i, :, r * f:(r + bh) * f, c * f:(c + bw) * f]
        keep[i, r:r + bh, c:c + bw] = False
    return moved, (dy, dx), keep


def _locality_loss(z, shift, keep):
    """z (2B, C, h, w): encoder outputs of a batch and of its moved copy (see _context_pairs). Mean squared difference
    of the same cells in the two contexts, relative to the outputs' variance over cells, so that shrinking z does not
    lower it (a constant z would; the reconstruction term and the ramp in train_vqgan keep the encoder away from it)."""
    B = len(keep)
    ref = torch.roll(z[:B], shift, dims=(2, 3))
    d = (z[B:] - ref).pow(2).mean(1)  # (B, h, w)
    spread = z[:B].transpose(0, 1).flatten(1).var(1).mean()  # per channel over all cells of the batch
    return d[keep].mean() / spread.clamp(min=1e-8)


@torch.no_grad()
def _restart_dead_codes(model, opt, usage, z):
    dead = (usage == 0).nonzero().flatten()
    if len(dead) == 0:
        return
    zf = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # (B*h*w, embed_dim) recent encoder outputs
    emb = model.quantize.embedding.weight
    # Re-seed only where the codebook serves the batch badly: the worst-quantised outputs (top 5% and above twice the
    # mean error). Seeding from random outputs spent dead codes on the most frequent patches (flat background),
    # splitting them into near-duplicate codes picked by context: H(code | 8x8 pixel patch) was 4.0 nats on toy
    # drawings, which a generator then has to model.
    err = torch.cdist(zf, emb).min(1).values
    cand = (err > max(2 * err.mean().item(), err.quantile(0.95).item())).nonzero().flatten()
    k = min(len(dead), len(cand))
    if k == 0:
        return
    # drawn from the CPU generator whatever the device, as the rest of the run's randomness
    pick, dead = cand[torch.randperm(len(cand)).to(cand.device)[:k]], dead[:k]
    emb[dead] = zf[pick] + 0.01 * zf.std() * torch.randn(k, zf.shape[1]).to(zf.device)
    st = opt.state.get(emb)
    if st:  # forget the Adam moments of the re-seeded rows
        st["exp_avg"][dead] = 0
        st["exp_avg_sq"][dead] = 0


def _folder_batches(folder, size, batch, seed=0):  # -> (function step -> batch, all images as a tensor)
    imgs = []
    for key, opener in tqdm(list(iter_images(folder)), desc="load images", unit="img"):
        try:
            imgs.append(preprocess(opener(), size))
        except Exception as e:
            print(f"skipping {key}: {type(e).__name__}: {e}")
    if not imgs:
        raise ValueError(f"{folder}: no readable images")
    data = torch.stack(imgs)

    def at(step):  # batch of a given step, independent of history, so a resumed run sees the same data
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        return data[torch.randint(len(data), (batch,), generator=g)]

    return at, data


@torch.no_grad()
def evaluate(model, data, batch=64):
    """Reconstruction MSE (in [-1, 1] units) and codebook usage of a VQGAN on a (N, 3, H, W) tensor."""
    mse, used = 0.0, torch.zeros(model.config.n_embed, dtype=torch.bool)
    for i in range(0, len(data), batch):
        x = data[i: i + batch]
        codes = model.encode(x)
        mse += F.mse_loss(model.decode(codes), x, reduction="sum").item()
        used[codes.flatten()] = True
    return mse / data.numel(), int(used.sum())


@torch.no_grad()
def context_entropy(model, data, batch=64):
    """H(code | the cell's own pixels) in nats, over the f x f cells of a (N, 3, H, W) tensor: 0 when equal patches
    always get equal codes. Higher means a code also depends on what lies around its cell (the encoder's receptive
    field, GroupNorm's image-wide statistics, the mid-block attention), which an autoregressive generator has to
    predict before it has drawn that context."""
    f, seen = model.config.factor, {}
    for i in range(0, len(data), batch):
        x = data[i: i + batch]
        codes = model.encode(x)
        B, _, H, W = x.shape
        cells = x.reshape(B, 3, H // f, f, W // f, f).permute(0, 2, 4, 1, 3, 5).reshape(-1, 3 * f * f)
        for patch, code in zip(cells.half().numpy(), codes.flatten().tolist()):
            counts = seen.setdefault(patch.tobytes(), {})
            counts[code] = counts.get(code, 0) + 1
    total, h = sum(sum(c.values()) for c in seen.values()), 0.0
    for c in seen.values():
        n = np.array(list(c.values()), dtype=np.float64)
        h -= (n * np.log(n / n.sum())).sum()
    return h / total



def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m toy.vqgan_train",
                                 description="train the toy VQGAN on a folder of images")
    ap.add_argument("--images", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--log-every", type=int, default=250)
    args = ap.parse_args(argv)
    try:
        batches, data = _folder_batches(args.images, args.size, args.batch)
        cfg = VQGANConfig.toy()
        model = train_vqgan(cfg, batches, args.steps, args.lr, args.out, args.log_every)
        mse, used = evaluate(model, data[:512])
        print(f"toy vqgan: recon mse {mse:.5f} on {min(len(data), 512)} training images, "
              f"{used}/{cfg.n_embed} codes used -> {args.out}")
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
