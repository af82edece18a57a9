"""
Train ARMOR with WoHG (paper Section 3.4, Figure 5), or the toy world's base MLLM (stage 0).

  stage 1 "what to generate":      alpha=1, beta=0; new embedding rows + text head;            t2t, ti2t, t2i, t2ti
  stage 2 "how to generate":       alpha=0, beta=1; new embedding rows + adapter + visual head; t2i, t2ti
  stage 3 "how to answer better":  alpha=1, beta=1; all of those;                               t2t, ti2t, t2i, t2ti
  stage 0 (toy world only): the plain InternVL from scratch (--preset, --tokenizer), text loss, t2t + ti2t

Commands
  python train.py --stage 1                      # no data/model arguments: the toy world's, toy/stage1.args
  python train.py @toy/stage3.args --init out/toy_stage2   # an arguments file, then arguments that override it
  python train.py --stage 1 --base /models/InternVL2_5-8B --codes cache/ --data t2t=t2t.jsonl \\
      --data ti2t=ti2t.jsonl --data t2i='laion/*.tar' --data t2ti=t2ti.jsonl --out out/stage1
  python train.py --stage 2 --init out/stage1 --codes cache/ --data t2i='laion/*.tar' --data t2ti=t2ti.jsonl
  torchrun --standalone --nproc_per_node=8 train.py --stage 2 ...   # DDP: nccl on GPUs, gloo on CPU
  python train.py ... --resume                   # continue from out/ckpt.pt: same command plus --resume
  python train.py --stage 1 --max-len 512 --steps 2 --device cpu ...                  # a CPU smoke run

Batches: --batch-size examples per rank per micro-step, --grad-accum micro-steps per optimizer step, so the global
batch is batch_size x grad_accum x world_size; the data sequence depends only on it and the seed (data.py). Losses
are normalised by the global token counts of the step, so 2 ranks x 1 micro-step equal 1 rank x 2 micro-steps.
Outputs in --out: model.safetensors + config.json (save_pretrained; a partial checkpoint on top of --base) or, in
stage 0, the released InternVL layout (save_internvl); the tokenizer files; ckpt.pt (resume); metrics.jsonl.
Data format, length limit and bad-data handling: the training-data section of data.py.
"""

import argparse
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import closing, contextmanager, nullcontext
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import armor
from data import (BAD_KINDS, DATA_TYPES, STAGE_MIX, T2I_TEMPLATES, ExampleBuilder, Pool, Prefetcher, TarSource,
                  TrainStream, open_sources, read_templates)
from tokenizer import Tokenizer

STAGE_LOSS = {0: (1.0, 0.0), 1: (1.0, 0.0), 2: (0.0, 1.0), 3: (1.0, 1.0)}  # (alpha, beta), Section 3.4
STAGE_NAMES = {0: "base MLLM", 1: "what to generate", 2: "how to generate", 3: "how to answer better"}
ARMOR_FIELDS = ("num_image_codes", "image_grid", "image_px", "num_adapter_layers")  # set for a new run (--base)
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json",
                   "tokenizer_config.json", "special_tokens_map.json")
# arguments that fix the run's data sequence and objective: a resume must not change them
# (AdamW's own hyperparameters too: Optimizer.load_state_dict would silently keep the saved ones)
MAX_EMPTY_STEPS = 20  # steps in a row with nothing to learn from before a run stops (the data cannot train it)
# train.py's arguments for the toy world, one file per stage (toy/stage<N>.args): read, never imported
TOY_ARGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "toy", "stage{}.args")
RESUME_FIXED = ("stage", "seed", "data", "mix", "max_len", "cfg_drop", "alpha", "beta", "train", "t2i_templates",
                "weight_decay", "adam_betas")


class UsageError(Exception):
    pass


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 fromfile_prefix_chars="@")
    # @FILE: one argument per line (--lr=1e-3); blank lines and lines starting with # are skipped
    ap.convert_arg_line_to_args = lambda line: [] if not line.strip() or line.startswith("#") else [line.strip()]
    a = ap.add_argument_group("model")
    a.add_argument("--stage", type=int, default=1, choices=[0, 1, 2, 3], help="WoHG stage (0: toy base MLLM)")
    a.add_argument("--base", help="released InternVL2.5 directory; ARMOR modules are added, randomly initialised")
    a.add_argument("--init", help="ARMOR checkpoint of the previous stage (save_pretrained directory)")
    a.add_argument("--preset", help="stage 0: armor.PRESETS name or a config JSON (ArmorConfig fields)")
    a.add_argument("--tokenizer", help="stage 0: tokenizer directory (its size sets the vocabulary)")
    a.add_argument("--alpha", type=float, help="text loss weight (default: the stage's)")
    a.add_argument("--beta", type=float, help="image loss weight (default: the stage's)")
    a.add_argument("--train", help="comma list of trainable groups instead of the stage's: embed_new, text_head, "
                                   "adapter, visual_head; or all (every tensor: the single-stage ablation)")
    a.add_argument("--vqgan", help="VQGAN (load_vqgan path): encodes output images missing from --codes")
    a.add_argument("--codes", help="VQ code cache directory (python vqgan.py cache ...)")
    for f in ARMOR_FIELDS:
        a.add_argument("--" + f.replace("_", "-"), type=int, help=f"new runs: ArmorConfig.{f} (default: from the "
                                                                  f"VQGAN / code cache, else the config default)")
    d = ap.add_argument_group("data")
    d.add_argument("--data", action="append", default=[], metavar="TYPE=PATH",
                   help=f"TYPE in {'|'.join(DATA_TYPES)}; PATH a .jsonl, or a glob of webdataset .tar shards (t2i)")
    d.add_argument("--mix", help="type weights, e.g. t2i=2,t2ti=1 (default: the stage's, Section 3.4)")
    d.add_argument("--t2i-templates", help="file of t2i prompt templates for tar shards, one per line with {caption}")
    d.add_argument("--max-len", type=int, default=4096, help="tokens per example (text after the last image is cut; "
                                                             "an image span never)")
    d.add_argument("--cfg-drop", type=float, help="condition dropout for guidance (default 0.1 in stages 2-3, else 0)")
    d.add_argument("--strict-data", action="store_true", help="stop at the first bad record instead of skipping it")
    d.add_argument("--prepare", metavar="CMD",
                   help="a command run before the data is opened, e.g. one that makes it; every rank runs it, so it "
                        "must be safe to run at once (toy: a file lock). A leading `python` is this interpreter")
    d.add_argument("--prefetch", type=int, default=2, help="optimizer steps of data prepared ahead in a thread (0: "
                                                           "inline)")
    o = ap.add_argument_group("optimisation")
    o.add_argument("--steps", type=int, default=1000, help="optimizer steps")
    o.add_argument("--batch-size", type=int, default=8, help="examples per rank per micro-step")
    o.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step")
    o.add_argument("--lr", type=float, default=1e-4)
    o.add_argument("--min-lr", type=float, help="end of the cosine (default lr / 10)")
    o.add_argument("--warmup", type=int, default=100, help="linear warmup steps")
    o.add_argument("--weight-decay", type=float, default=0.0, help="AdamW decay of matrices (norms/biases: none)")
    o.add_argument("--adam-betas", default="0.9,0.95")
    o.add_argument("--grad-clip", type=float, default=1.0, help="max global gradient norm (0: off)")
    o.add_argument("--skip-nonfinite", action="store_true", help="skip (and count) a step whose loss or gradient "
                                                                 "is not finite, instead of stopping")
    s = ap.add_argument_group("system")
    s.add_argument("--device", default="auto", help="auto | cpu | cuda")
    s.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="autocast dtype; weights stay fp32 (auto: bfloat16 on CUDA, float32 on CPU)")
    s.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing of the transformer blocks")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", help="output directory (default out/stage<N>)")
    s.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps (and at the end)")
    s.add_argument("--snapshot-every", type=int, default=0,
                   help="also save the model every N steps into <out>/step<N> (for a curve of scores against "
                        "training compute; 0: only at the end)")
    s.add_argument("--resume", action="store_true", help="continue from <out>/ckpt.pt (a fresh start if none)")
    return ap


def parse_args(argv=None):
    ap = build_parser()
    args = ap.parse_args(argv)
    if not (args.data or args.base or args.init or args.preset or args.tokenizer):
        # with no data or model arguments, the toy world's arguments file supplies them; the command line still wins
        path = TOY_ARGS.format(args.stage)
        if not os.path.exists(path):
            raise UsageError(f"no --data / --base / --init given, and the toy world's defaults that would supply them "
                             f"({path}) are not here; pass a model (--base or --init) and data (--data TYPE=PATH)")
        root = os.path.dirname(os.path.dirname(path))
        if os.path.realpath(os.getcwd()) != os.path.realpath(root):  # its paths and `python -m toy` are root-relative
            raise UsageError(f"the toy world's defaults ({path}) are read from the repository root: cd {root}")
        args = ap.parse_args(["@" + path] + list(sys.argv[1:] if argv is None else argv))
    args.alpha = STAGE_LOSS[args.stage][0] if args.alpha is None else args.alpha
    args.beta = STAGE_LOSS[args.stage][1] if args.beta is None else args.beta
    args.cfg_drop = (0.1 if args.stage in (2, 3) else 0.0) if args.cfg_drop is None else args.cfg_drop
    args.min_lr = args.lr / 10 if args.min_lr is None else args.min_lr
    args.out = args.out or f"out/stage{args.stage}"
    if args.stage == 0:
        if not (args.preset and args.tokenizer) or args.base or args.init or args.train:
            raise UsageError("stage 0 trains the base MLLM from scratch: give --preset and --tokenizer (and no "
                             "--base / --init / --train)")
    elif bool(args.base) == bool(args.init):
        raise UsageError(f"stage {args.stage} needs exactly one of --base (a released InternVL2.5 directory) and "
                         f"--init (an ARMOR checkpoint of the previous stage)")
    if args.init and any(getattr(args, f) is not None for f in ARMOR_FIELDS):
        raise UsageError("--init takes its config from the checkpoint; " +
                         ", ".join("--" + f.replace("_", "-") for f in ARMOR_FIELDS) + " are for new runs (--base)")
    if not args.data:
        raise UsageError("no training data: give --data TYPE=PATH (repeatable)")
    if args.snapshot_every < 0:
        raise UsageError("--snapshot-every must be 0 (off) or a number of steps")
    for name in ("steps", "batch_size", "grad_accum", "max_len", "save_every"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    return args


# ---------------------------------------------------------------------------------------------------------------------
# Model


def preset_config(preset, vocab_size):
    """Stage 0: a preset's shapes (or a config JSON) with the tokenizer's vocabulary."""
    if preset in armor.PRESETS:
        d = armor.PRESETS[preset]().to_dict()
    elif os.path.isfile(preset):
        with open(preset) as f:
            d = json.load(f)
    else:
        raise UsageError(f"--preset {preset!r} is neither one of {sorted(armor.PRESETS)} nor a config JSON file")
    d["llm"]["vocab_size"], d["img_context_id"] = vocab_size, -1  # InternVL's 9 tokens are the tokenizer's last
    return armor.ArmorConfig(**d)


def vq_settings(codes, vqgan, image_px):
    """ARMOR config fields implied by the code cache (meta.json) or the VQGAN."""
    if codes is not None:
        h, w = codes.meta["grid"]
        if h != w:
            raise UsageError(f"the code cache holds {h}x{w} grids; ARMOR draws square images")
        return {"num_image_codes": codes.meta["config"]["n_embed"], "image_grid": h, "image_px": codes.meta["size"]}
    if vqgan is not None:
        px = image_px or 256  # the paper draws 256 px images
        return {"num_image_codes": vqgan.config.n_embed, "image_grid": vqgan.grid(px)[0], "image_px": px}
    return {}


def check_vq(cfg, codes, vqgan):
    """The codes the data provides must be the ones the model draws."""
    for what, got in (("--codes", vq_settings(codes, None, None)), ("--vqgan", vq_settings(None, vqgan, cfg.image_px))):
        bad = {k: (v, getattr(cfg, k)) for k, v in got.items() if v != getattr(cfg, k)}
        if bad:
            raise UsageError(f"{what} does not match the model: " +
                             ", ".join(f"{k} {v} vs the model's {m}" for k, (v, m) in bad.items()))


def build_model(args, device, codes, vqgan, verbose):
    """-> (model, tokenizer, tokenizer source dir, base dir for save_pretrained or None)."""
    if args.stage == 0:
        tok = Tokenizer.from_dir(args.tokenizer)
        cfg = preset_config(args.preset, len(tok))
        torch.manual_seed(args.seed)
        with torch.device(device):
            model = armor.InternVL(cfg)
        armor.init_weights(model)
        return model, tok, args.tokenizer, None
    if args.base:
        over = vq_settings(codes, vqgan, args.image_px)
        over.update({f: getattr(args, f) for f in ARMOR_FIELDS if getattr(args, f) is not None})
        model = armor.from_internvl(args.base, device=device, seed=args.seed, verbose=verbose, **over)
        base = args.base
    else:  # sample.py's loader: the same tokenizer rule and path checks as sampling
        from sample import load_armor

        model, tok, ck = load_armor(args.init, device=device, verbose=verbose)
        return model, tok, str(ck.tokenizer_dir), None if ck.base is None else str(ck.base)
    src = base or args.init
    return model, Tokenizer.from_dir(src), src, base


def vqgan_of(args, codes):
    """Where the run's image decoder is, recorded in the checkpoint so that sample.py draws with no other flag:
    --vqgan, else the one the code cache was built with, else the one the --init checkpoint names. None: unknown."""
    if args.vqgan:
        return os.path.abspath(args.vqgan)
    if codes is not None and codes.meta.get("vqgan"):
        return os.path.abspath(codes.meta["vqgan"])
    if args.init:
        with open(os.path.join(args.init, "config.json")) as f:
            named = json.load(f).get("vqgan")
        if named:
            return os.path.abspath(os.path.join(args.init, named))  # the join keeps an absolute path as it is
    return None


def check_vocab(cfg, tok, src):
    if cfg.llm.vocab_size != len(tok) or cfg.img_context_id != tok.img_context:
        raise UsageError(f"the tokenizer in {src} ({len(tok)} tokens, <IMG_CONTEXT> = {tok.img_context}) does not fit "
                         f"the model (vocab_size {cfg.llm.vocab_size}, img_context_id {cfg.img_context_id})")


def trainable_set(model, args):
    """Figure 5's groups for the stage (or --train); stage 0 trains everything. -> description for the log."""
    if args.stage == 0:
        model.requires_grad_(True)
        return "everything"
    groups = [g.strip() for g in args.train.split(",")] if args.train else armor.STAGE_GROUPS[args.stage]
    try:
        armor.set_trainable(model, groups=groups)
    except ValueError as e:
        raise UsageError(f"--train: {e}") from None
    return " + ".join(groups)


# ---------------------------------------------------------------------------------------------------------------------
# Data


def open_data(args):
    """--data / --mix -> (pools by type, mixture weights, log lines); checked before the (slow) model load."""
    templates = read_templates(args.t2i_templates) if args.t2i_templates else T2I_TEMPLATES
    sources = {}
    for spec in args.data:
        kind, sep, path = spec.partition("=")
        if not sep or kind not in DATA_TYPES or not path:
            raise UsageError(f"--data {spec!r}: expected TYPE=PATH with TYPE in {'|'.join(DATA_TYPES)}")
        try:
            found = open_sources(path, templates)
        except (FileNotFoundError, ValueError) as e:
            raise UsageError(f"--data {spec}: {e}") from None
        if kind != "t2i" and any(isinstance(s, TarSource) for s in found):
            raise UsageError(f"--data {spec}: webdataset shards are image + caption pairs, read as t2i only")
        sources.setdefault(kind, []).extend(found)
    pools = {k: Pool(k, v) for k, v in sources.items()}
    notes = []
    if args.mix:
        weights = {}
        for item in args.mix.split(","):
            k, _, w = item.partition("=")
            try:
                weights[k.strip()] = float(w)
            except ValueError:
                raise UsageError(f"--mix {args.mix!r}: expected TYPE=WEIGHT,...") from None
        bad = sorted(set(weights) - set(DATA_TYPES))
        if bad:
            raise UsageError(f"--mix: unknown data types {bad}; choose from {list(DATA_TYPES)}")
        empty = sorted(k for k, w in weights.items() if w > 0 and not len(pools.get(k, ())))
        if empty:
            raise UsageError(f"--mix gives weight to {empty} but there is no data for them (--data TYPE=PATH)")
    else:
        weights = dict(STAGE_MIX[args.stage])
        for k in [k for k in weights if not len(pools.get(k, ()))]:
            notes.append(f"no {k} data: stage {args.stage} trains without it")
            del weights[k]
    weights = {k: w for k, w in weights.items() if w > 0}
    if not weights:
        raise UsageError(f"no data for stage {args.stage}: it mixes {sorted(STAGE_MIX[args.stage])}")
    notes += [f"{k} data given but its weight is 0 in this mix (see --mix)" for k in pools if k not in weights]
    if args.stage == 0 and set(weights) - {"t2t", "ti2t"}:
        raise UsageError("stage 0 trains the base MLLM on understanding data only: t2t and ti2t")
    if args.stage > 0 and set(weights) & {"t2i", "t2ti", "ti2ti"} and not (args.codes or args.vqgan):
        raise UsageError("data with output images needs --codes DIR (a VQ code cache) or --vqgan PATH")
    total = sum(weights.values())
    lines = [f"data: {k} {len(pools[k]):,} records x {w / total:.0%}" for k, w in weights.items()]
    return pools, weights, lines + [f"data: note: {n}" for n in notes]


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints: written to a temporary name and renamed, so a kill never leaves a broken ckpt.pt


def save_checkpoint(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_checkpoint(path, run, model, opt, args, global_batch):
    """ckpt.pt: everything an exact resume needs (README: model, optimizer, step, data position, the run's args)."""
    save_checkpoint(path, {
        "step": run.step, "trainable": {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
        "optimizer": opt.state_dict(), "data": run.data, "stats": run.stats, "nonfinite_skipped": run.nonfinite,
        "args": vars(args), "global_batch": global_batch, "config": model.config.to_dict()})


def resume(path, args, model, opt, stream, log):
    """Load ckpt.pt into the model, optimizer and data stream (after checking that the run's settings are the saved
    ones) -> the run's progress. A fresh start when there is no checkpoint (or no --resume)."""
    run = Progress()
    if not args.resume:
        return run
    if not os.path.exists(path):
        log(f"--resume: no {path} yet, starting from scratch")
        return run
    ck = torch.load(path, map_location="cpu", weights_only=False, mmap=True)  # mmap: no full copy per rank
    changed = [k for k in RESUME_FIXED if ck["args"].get(k) != getattr(args, k)]
    if ck["global_batch"] != stream.global_batch:
        changed.append(f"global batch {ck['global_batch']} -> {stream.global_batch}")
    if changed:
        raise UsageError(f"{path} was written by a run with other settings: {changed}")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if sorted(ck["trainable"]) != sorted(names):
        raise UsageError(f"{path} trains other tensors than this run, e.g. "
                         f"{sorted(set(ck['trainable']) ^ set(names))[:3]}")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(ck["trainable"][n])
    opt.load_state_dict(ck["optimizer"])
    stream.mixture.load_state_dict(ck["data"])
    run.step, run.stats, run.nonfinite = ck["step"], ck["stats"], ck["nonfinite_skipped"]
    log(f"resumed from {path} at step {run.step}")
    return run


def restart_metrics(path, step):
    """Keep metrics.jsonl's lines up to the checkpoint's step: the later ones are about to be redone."""
    kept = []
    if step and os.path.exists(path):
        with open(path) as f:
            kept = [ln for ln in f if ln.strip() and json.loads(ln)["step"] <= step]
    with open(path, "w") as f:
        f.writelines(kept)


def save_final(model, args, tok, tok_dir, base_dir, codes, log):
    """The trained model: an ARMOR checkpoint (save_pretrained) and its tokenizer, or in stage 0 a base in the
    released InternVL layout."""
    if args.stage == 0:
        armor.save_internvl(model, args.out)
        tok.save(args.out)
        return
    # a partial checkpoint holds ARMOR's tensors and the LM head; when other base tensors were trained (--train all)
    # the whole model is written
    touched = any(p.requires_grad for k, p in model.named_parameters()
                  if not k.startswith("armor.") and k not in armor.PARTIAL_BASE_KEYS)
    # absolute paths: the output folder can be moved or copied on this machine and still find both
    base = None if touched or base_dir is None else os.path.abspath(base_dir)
    armor.save_pretrained(model, args.out, base=base, vqgan=vqgan_of(args, codes))
    for fn in TOKENIZER_FILES:
        if os.path.exists(os.path.join(tok_dir, fn)):
            shutil.copyfile(os.path.join(tok_dir, fn), os.path.join(args.out, fn))


# ---------------------------------------------------------------------------------------------------------------------
# Training


def lr_at(step, args):
    """Linear warmup to --lr, then a cosine down to --min-lr at --steps (step is 1-based)."""
    if step <= args.warmup:
        return args.lr * step / args.warmup
    t = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * t))


def fmt_time(s):
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m" if s >= 60 else f"{s}s"


def fmt_lr(lr):
    m, e = f"{lr:.1e}".split("e")
    return f"{m.rstrip('0').rstrip('.')}e{int(e)}"


def micro_step(model, batch, args, n_text, n_img, pad_id, device, amp, is_armor):
    """Forward one micro-batch -> (loss, text loss, image loss), each a share of the step's global token means."""
    if batch is None:  # every example of this micro-batch was bad: a one-token forward with no target keeps
        ids = torch.full((1, 1), pad_id, dtype=torch.long)  # this rank in step with the others' collectives
        targets, pixels = torch.full((1, 1), -100, dtype=torch.long), None
    else:
        ids, targets, pixels = batch.ids, batch.targets, batch.pixels
    ids, targets = ids.to(device, non_blocking=True), targets.to(device, non_blocking=True)
    pixels = pixels.to(device, non_blocking=True) if pixels is not None else None
    with amp:
        if is_armor:
            out = model(ids, pixels, targets, args.alpha, args.beta, n_text, n_img)
            return out.loss, out.loss_text, out.loss_img
        logits, _ = model(ids, pixels, targets)  # stage 0: the base's LM head on the target positions
        loss = F.cross_entropy(logits.float(), targets[targets >= 0], reduction="sum") / n_text
        return loss, loss.detach(), torch.zeros((), device=device)


def main(argv=None):
    """Train; returns the trained model (unwrapped), for tests."""
    try:
        args = parse_args(argv)
    except UsageError as e:
        raise SystemExit(f"error: {e}")
    # DDP (torchrun sets RANK / LOCAL_RANK / WORLD_SIZE)
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank, local_rank, world = (int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]),
                               int(os.environ["WORLD_SIZE"])) if ddp else (0, 0, 1)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device not in ("cpu", "cuda") or (device == "cuda" and not torch.cuda.is_available()):
        raise SystemExit(f"error: --device {args.device}: expected auto, cpu or cuda (with a CUDA build of torch)")
    if device == "cuda":
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    if args.prepare:  # before the process group: a slow preparation must not run into its timeout
        run_prepare(args.prepare)
    if ddp:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    try:
        return train(args, ddp, rank, world, device, master, log)
    except UsageError as e:
        raise SystemExit(f"error: {e}")
    finally:
        if ddp:
            dist.destroy_process_group()


def run_prepare(cmd):
    """--prepare: run the command, with this interpreter for a leading `python` (an arguments file cannot name it)."""
    argv = shlex.split(cmd)
    if argv[:1] == ["python"]:
        argv[0] = sys.executable
    try:
        rc = subprocess.run(argv).returncode
    except OSError as e:
        raise SystemExit(f"error: --prepare {cmd!r}: {e}") from None
    if rc:
        raise SystemExit(f"error: --prepare {cmd!r} failed (exit status {rc})")


@contextmanager
def stop_signals():
    """SIGTERM / SIGINT -> the list gets the signal number; the loop saves after the current step and exits. Not
    an immediate exit on a second signal: torchrun forwards a Ctrl-C, so each worker sees it twice."""
    stop, old = [], {}
    if threading.current_thread() is threading.main_thread():  # handlers can only be set there
        for s in (signal.SIGTERM, signal.SIGINT):
            old[s] = signal.signal(s, lambda signum, frame: stop.append(signum))
    try:
        yield stop
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def open_vq(args, log):
    """Stages 1-3: the VQ code cache (--codes) and the VQGAN (--vqgan) that turn output images into codes."""
    codes = vqgan = None
    if args.stage > 0 and args.codes:
        from vqgan import CodeCache

        try:
            codes = CodeCache(args.codes)
        except FileNotFoundError as e:
            raise UsageError(str(e)) from None
        if not codes.meta.get("complete", True):
            log(f"warning: the code cache {args.codes} is incomplete (its build was interrupted)")
    if args.stage > 0 and args.vqgan:
        from vqgan import load_vqgan

        try:
            vqgan = load_vqgan(args.vqgan)
        except (FileNotFoundError, ValueError) as e:
            raise UsageError(f"--vqgan: {e}") from None
    return codes, vqgan


def setup_model(args, device, amp_dtype, codes, vqgan, master, ranks, log):
    """Build or load the model, check it against the tokenizer and the codes, mark its trainable tensors.
    ranks: the DDP world size, None without DDP. -> (model, tokenizer, tokenizer dir, base dir or None)."""
    try:
        model, tok, tok_dir, base_dir = build_model(args, device, codes, vqgan, master)
    except (armor.CheckpointError, FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None
    check_vocab(model.config, tok, tok_dir)
    if args.stage > 0:
        check_vq(model.config, codes, vqgan)
    what = trainable_set(model, args)
    if amp_dtype == torch.bfloat16:  # same numbers, half the memory (armor.frozen_matmuls)
        for p in armor.frozen_matmuls(model):
            p.data = p.data.to(amp_dtype)
    model.grad_ckpt = model.vision_model.grad_ckpt = args.grad_ckpt
    model.train()
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    log(f"stage {args.stage} ({STAGE_NAMES[args.stage]}): alpha {args.alpha:g}, beta {args.beta:g} | trainable "
        f"{n_train:,} of {n_all:,} parameters ({what}) | {device}, {str(amp_dtype).replace('torch.', '')}"
        + (f", {ranks} ranks" if ranks else ""))
    return model, tok, tok_dir, base_dir


def open_stream(args, tok, cfg, codes, vqgan, data, rank, world, log):
    """The training batches of this rank (data.TrainStream) from open_data's pools and weights."""
    pools, weights, lines = data
    builder = ExampleBuilder(tok, cfg, args.max_len, codes, vqgan, understanding_only=args.stage == 0)
    stream = TrainStream(pools, weights, builder, args.batch_size, args.grad_accum, rank, world, args.seed,
                         args.cfg_drop, args.strict_data, tok.pad if tok.pad is not None else 0)
    for line in lines:
        log(line)
    log(f"batch: {stream.global_batch} examples per step ({args.batch_size} x {args.grad_accum} micro-steps x {world} "
        f"ranks), max {args.max_len} tokens, condition dropout {args.cfg_drop:g}")
    if args.warmup >= args.steps:  # a smoke run with the default warmup would learn nothing and look fine
        log(f"warning: --warmup {args.warmup} is not shorter than --steps {args.steps}: the learning rate stays at or "
            f"below {lr_at(args.steps, args):.2g} (--lr {args.lr:g}); pass a shorter --warmup to train")
    return stream


def make_optimizer(params, args):
    """AdamW, with weight decay on matrices only (not on norms and biases)."""
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    betas = tuple(float(b) for b in args.adam_betas.split(","))
    # on a GPU the fused kernel updates every tensor in a few launches (the same update up to rounding)
    fused = all(p.is_cuda for p in params) or None
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=args.lr, betas=betas, fused=fused)


@dataclass
class Progress:
    """What a checkpoint records of the run besides the tensors."""
    step: int = 0  # optimizer steps taken
    stats: dict = field(default_factory=lambda: {k: 0 for k in BAD_KINDS})  # bad records skipped, by kind
    nonfinite: int = 0  # steps skipped for a non-finite loss or gradient (--skip-nonfinite)
    data: dict | None = None  # the data stream's position after the last step taken


def global_sum(values, ddp, device):
    """Sum a list of numbers over the ranks (one all_reduce; the identity in a single process)."""
    t = torch.tensor(values, dtype=torch.float64)
    if ddp:
        t = t.to(device)
        dist.all_reduce(t)
        t = t.cpu()
    return t


def global_counts(sd, vocab_size, ddp, device):
    """The step's token counts over every micro-batch of every rank, so that each micro-step's loss is its share of
    the step's token mean; with the bad records by kind and whether a rank stopped on bad data (--strict-data).
    -> SimpleNamespace(text, img, tokens, bad {kind: n}, strict_stop)."""
    n_text = n_img = n_tokens = 0
    for b in sd.batches:
        if b is not None:
            n_text += int(((b.targets >= 0) & (b.targets <= vocab_size)).sum())  # text targets, and <eoi>
            n_img += int((b.targets > vocab_size).sum())  # image code targets sit after the text vocabulary
            n_tokens += b.n_tokens
    bad = [sum(e.kind == kind for e in sd.bad) for kind in BAD_KINDS]
    c = global_sum([n_text, n_img, n_tokens, sd.error is not None, *bad], ddp, device)
    return SimpleNamespace(text=int(c[0]), img=int(c[1]), tokens=int(c[2]), strict_stop=bool(c[3]),
                           bad={kind: int(c[4 + k]) for k, kind in enumerate(BAD_KINDS)})


def log_step(run, args, lr, loss, loss_text, loss_img, gnorm, dt, t_data, n_tokens, eta, metrics_path, log):
    """One progress line per step (rank 0), and the same numbers in metrics.jsonl."""
    skipped = sum(run.stats.values())
    log(f"step {run.step}/{args.steps} | loss {loss:.3g} (text {on(args.alpha, loss_text)}, img "
        f"{on(args.beta, loss_img)}) | lr {fmt_lr(lr)} | {dt * 1000:.0f} ms | {n_tokens / dt:,.0f} tok/s | "
        f"eta {fmt_time(eta)}" + (f" | skipped {skipped:,}" if skipped else ""), flush=True)
    if metrics_path:
        rec = {"step": run.step, "loss": loss, "loss_text": loss_text, "loss_img": loss_img, "lr": lr,
               "grad_norm": gnorm, "ms": dt * 1000, "data_ms": t_data * 1000, "tokens": n_tokens,
               "tok_s": n_tokens / dt, "skipped": dict(run.stats), "nonfinite_skipped": run.nonfinite}
        with open(metrics_path, "a") as f:
            f.write(json.dumps(rec) + "\n")


def skip_or_stop_nonfinite(run, args, loss, sd, rank, log):
    """A non-finite loss or gradient: stop the run, or with --skip-nonfinite skip the update and count it. The same
    decision on every rank: loss and gradients are all-reduced."""
    batch_names = [n for b in sd.batches if b is not None for n in b.names]
    what = "loss" if not math.isfinite(loss) else "gradient"
    msg = f"non-finite {what} at step {run.step}; batch (rank {rank}): {', '.join(batch_names)}"
    if not args.skip_nonfinite:
        print(f"error: {msg}", flush=True)
        raise UsageError(f"stopped at step {run.step} on a non-finite {what} (--skip-nonfinite skips such steps)")
    run.nonfinite += 1
    log(f"skipped update: {msg}")


def after_step(step, stop):
    """Called after every step, its checkpoint written. Does nothing: tests replace it to interrupt a run at a
    known point (a crash, a SIGKILL or SIGTERM between two steps)."""


def skipped_text(stats):
    return ", ".join(f"{v:,} {k.replace('_', ' ')}" for k, v in stats.items() if v)


def train(args, ddp, rank, world, device, master, log):
    os.makedirs(args.out, exist_ok=True)
    ckpt_path, metrics_path = os.path.join(args.out, "ckpt.pt"), os.path.join(args.out, "metrics.jsonl")
    amp_dtype = (torch.bfloat16 if device.startswith("cuda") else torch.float32) if args.dtype == "auto" \
        else getattr(torch, args.dtype)
    amp = torch.autocast(device.split(":")[0], dtype=torch.bfloat16) if amp_dtype == torch.bfloat16 else nullcontext()

    data = open_data(args)  # checked before the (slow) model load
    codes, vqgan = open_vq(args, log)
    model, tok, tok_dir, base_dir = setup_model(args, device, amp_dtype, codes, vqgan, master,
                                                  world if ddp else None, log)
    cfg, params = model.config, [p for p in model.parameters() if p.requires_grad]
    stream = open_stream(args, tok, cfg, codes, vqgan, data, rank, world, log)
    opt = make_optimizer(params, args)

    # No RNG state in the checkpoint: every random draw of training (data order, type mix, condition-dropout coin,
    # t2i template) comes from generators seeded by (seed, example index) in data.Mixture, so the saved data position
    # is the whole random state, and the model has no dropout. The seeding below only makes any future draw
    # reproducible; tests/test_train_reference.py checks that the loop draws nothing from the global generators.
    torch.manual_seed(args.seed + rank)
    run = resume(ckpt_path, args, model, opt, stream, log)
    run.data = stream.mixture.state_dict()
    if master:
        restart_metrics(metrics_path, run.step)

    # DDP. A micro-batch may leave a trainable tensor out of the graph (no image target in a stage-3 micro-batch, no
    # image token for the new embedding rows in a t2t one): `touch` adds 0 * one element of every trainable tensor to
    # each loss, so every rank always produces every gradient (exactly zero where unused). That keeps
    # find_unused_parameters off and makes one process and N ranks run the same AdamW updates.
    dmodel = DDP(model, device_ids=[device] if device.startswith("cuda") else None) if ddp else model

    def touch():
        return sum(p.view(-1)[0] for p in params) * 0.0

    pad_id = tok.pad if tok.pad is not None else 0
    times, shown, t_start, step0, empty = [], 0, time.time(), run.step, 0
    wanted = " or ".join(k for k, w in (("text", args.alpha), ("image", args.beta)) if w)
    with stop_signals() as stop, closing(Prefetcher(stream.next_step, args.prefetch)) as prefetch:
        while run.step < args.steps:
            t0 = time.time()
            sd = prefetch.get()
            t_data = time.time() - t0
            n = global_counts(sd, cfg.llm.vocab_size, ddp, device)
            if n.strict_stop:
                raise UsageError(f"bad data (--strict-data): {sd.error}" if sd.error is not None
                                 else "another rank stopped on bad data (--strict-data)")
            for kind, k in n.bad.items():
                run.stats[kind] += k
            for e in sd.bad[:max(0, 10 - shown)]:  # the first few by name (rank 0's share), then only the counts
                log(f"data: skipped {e}")
                shown += 1
            if not (args.alpha * n.text + args.beta * n.img):
                # nothing this stage learns from in the whole step (every example dropped, or none with a target of
                # the stage's loss): no update, so decay, momentum and the schedule do not move on an empty step
                run.data, empty = sd.state, empty + 1
                log(f"step {run.step + 1}: no {wanted} targets in this step's {stream.global_batch} examples "
                    f"({sum(n.bad.values())} skipped as bad data): no update")
                if empty >= MAX_EMPTY_STEPS:
                    raise UsageError(f"{empty} steps in a row had nothing to train on; skipped so far: "
                                     f"{skipped_text(run.stats) or 'none'} (see --max-len and the data)")
                continue
            empty = 0

            lr = lr_at(run.step + 1, args)
            for g in opt.param_groups:
                g["lr"] = lr
            loss_text = loss_img = 0.0
            for m, batch in enumerate(sd.batches):
                sync = not ddp or m == len(sd.batches) - 1  # all-reduce gradients on the last micro-step only
                with (nullcontext() if sync else dmodel.no_sync()):
                    loss, lt, li = micro_step(dmodel, batch, args, max(1, n.text), max(1, n.img), pad_id, device,
                                              amp, args.stage > 0)
                    # DDP averages gradients over ranks, but the loss is already a share of the global mean: undo it
                    (loss * world + touch()).backward()
                loss_text, loss_img = loss_text + float(lt), loss_img + float(li)
            # the step's losses for the log, and whether any rank got SIGTERM / SIGINT
            sums = global_sum([loss_text, loss_img, float(bool(stop))], ddp, device)
            loss_text, loss_img, stopping = float(sums[0]), float(sums[1]), bool(sums[2])
            loss = args.alpha * loss_text + args.beta * loss_img
            gnorm = float(torch.nn.utils.clip_grad_norm_(params, args.grad_clip if args.grad_clip > 0 else math.inf))
            run.step += 1
            if math.isfinite(loss) and math.isfinite(gnorm):
                opt.step()
            else:
                skip_or_stop_nonfinite(run, args, loss, sd, rank, log)
            opt.zero_grad(set_to_none=True)
            run.data = sd.state
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            dt = time.time() - t0
            times = (times + [dt])[-20:]
            eta = sum(times) / len(times) * (args.steps - run.step)
            log_step(run, args, lr, loss, loss_text, loss_img, gnorm, dt, t_data, n.tokens, eta,
                     metrics_path if master else None, log)
            if master and (stopping or run.step % args.save_every == 0 or run.step == args.steps):
                write_checkpoint(ckpt_path, run, model, opt, args, stream.global_batch)
            if master and args.snapshot_every and run.step % args.snapshot_every == 0 and run.step < args.steps:
                snapshot = argparse.Namespace(**{**vars(args), "out": os.path.join(args.out, f"step{run.step}")})
                save_final(model, snapshot, tok, tok_dir, base_dir, codes, log)
            if stopping:
                signum = stop[0] if stop else signal.SIGTERM  # SIGTERM: the signal went to another rank
                log(f"stopped by {signal.Signals(signum).name} after step {run.step}; {ckpt_path} saved: rerun the "
                    f"same command with --resume to continue")
                raise SystemExit(128 + signum)
            after_step(run.step, stop)

    if master:
        save_final(model, args, tok, tok_dir, base_dir, codes, log)
        log(f"done: {run.step - step0} steps in {fmt_time(time.time() - t_start)}"
            + (f", {run.nonfinite} skipped as non-finite" if run.nonfinite else "") + f"; saved to {args.out}")
        if sum(run.stats.values()):
            log("data: skipped " + skipped_text(run.stats))
    if ddp:
        dist.barrier()
    return model


def on(weight, x):
    return f"{x:.3g}" if weight else "-"  # a loss term that this stage switches off


if __name__ == "__main__":
    main(sys.argv[1:])
