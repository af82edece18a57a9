"""
The paper's ablations, re-run in the toy world. One command each; each writes a figure or a table to runs/ablations/.

  python -m toy.ablations switching     # Figure 7: stage-2 loss with forward switching vs one head over the whole
                                        #   vocabulary (same data, same steps) -> switching.png + switching.md
  python -m toy.ablations embeddings    # Section 6.3: stage 2 with vs without the new embedding rows trainable
                                        #   -> embeddings.png + embeddings.md (loss, GenEval-style score)
  python -m toy.ablations single-stage  # Tables 4-5: one stage training everything (alpha = beta = 1) vs WoHG's
                                        #   three stages, same total steps -> single_stage.md (understanding kept)
  python -m toy.ablations all --steps 600
  python -m toy.ablations upper-bound   # Tables 4-5 at full scale: one stage, everything trainable, on the shipped
                                        #   base and data (or a run's: --run runs/toy) for as many examples as stages
                                        #   1-3 together, beside the WoHG model -> figures/upper_bound.md
  python -m toy.ablations scaling --run runs/toy/stage2   # GenEval-style in both phrasings against stage-2
                                        #   compute, from the run's snapshots -> figures/scaling.png + .md

Every arm starts from the same point: the shipped toy base (toy/base) and, for the stage-2 ablations, one stage-1
run made here. Runs are cached in runs/ablations/<arm> (train.py --resume), so a rerun only redoes what is missing.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys

from PIL import Image, ImageDraw

from . import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "runs", "ablations")
COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]
# (batch, lr, warmup) of every arm's stage, one batch size for all, so that arms of the same steps see the same number
# of examples (pipeline.py's own stage 2 takes smaller batches; the single-stage arm must compare at equal data)
ARM = {1: (32, 1e-3, 25), 2: (32, 1.5e-3, 50), 3: (32, 3e-4, 15)}


def run(name, stage, start, steps, extra=()):
    """train.py for one arm (resumable); start = ("base", dir) or ("init", dir). Returns the run directory."""
    out = os.path.join(OUT, name)
    if os.path.exists(os.path.join(out, "model.safetensors")):
        return out
    p = pipeline.paths()
    batch, lr, warmup = ARM[stage]
    cmd = pipeline.train_cmd(stage, out, steps, batch, lr, min(warmup, steps // 10), pipeline._data_args(p, stage or 3),
                        save_every=200)
    cmd += ["--codes", p["codes"], f"--{start[0]}", start[1], *extra]
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return out


def curve(run_dir, key):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [(r["step"], r[key]) for r in rows if r.get(key) is not None]


def smooth(points, k=20):
    out = []
    for i in range(len(points)):
        w = points[max(0, i - k + 1):i + 1]
        out.append((points[i][0], sum(v for _, v in w) / len(w)))
    return out


def plot(curves, path, title, ylabel="loss", xlabel="step"):
    """A plain line plot with PIL (no plotting library at run time): {label: [(step, value)]} -> PNG."""
    W, H, L, R, T, B = 720, 440, 70, 20, 40, 50
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    xs = [x for c in curves.values() for x, _ in c]
    ys = [y for c in curves.values() for _, y in c]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    y1 += 0.05 * (y1 - y0) or 1
    sx = lambda x: L + (x - x0) / max(x1 - x0, 1) * (W - L - R)
    sy = lambda y: H - B - (y - y0) / max(y1 - y0, 1e-9) * (H - T - B)
    d.rectangle([L, T, W - R, H - B], outline="black")
    for i in range(5):
        yv = y0 + i * (y1 - y0) / 4
        d.text((5, sy(yv) - 6), f"{yv:.2f}", fill="black")
        xv = x0 + i * (x1 - x0) / 4
        d.text((sx(xv) - 10, H - B + 5), f"{xv:.0f}", fill="black")
    d.text((W // 2 - 20, H - 20), xlabel, fill="black")
    d.text((5, T - 25), ylabel, fill="black")
    d.text((L, 10), title, fill="black")
    # the legend in the right-hand corner the curves end away from: top for falling losses, bottom for rising scores
    ends_high = sum(c[-1][1] for c in curves.values()) / len(curves) > (y0 + y1) / 2
    top = H - B - 10 - 16 * len(curves) if ends_high else T + 10
    for i, (label, c) in enumerate(curves.items()):
        col = COLOURS[i % len(COLOURS)]
        d.line([(sx(x), sy(y)) for x, y in c], fill=col, width=2)
        d.text((W - R - 260, top + 16 * i), "-- " + label, fill=col)
    img.save(path)


def geneval(run_dir, n):
    """GenEval-style overall of a stage-2 checkpoint (cfg from sample.py's default)."""
    from . import eval as ev
    import sample
    model, tok, vq = sample.load(run_dir, vqgan=os.path.join(pipeline.SHIP, "vqgan"))
    return ev.eval_generation(model, tok, vq, n, sample.DEFAULT_CFG, 1234)["overall"]


def understanding(run_dir, items):
    from . import eval as ev
    import sample
    model, tok, _ = sample.load(run_dir)
    return ev.eval_understanding(model, tok, items)


def wohg(*steps):
    """The WoHG chain from the shipped base: stage 1 for steps[0], then stage 2, then stage 3 as given. Runs are
    named by their whole history (wohg_100_300 = stage 2 of 300 steps after stage 1 of 100), so arms share them."""
    out = None
    for i, n in enumerate(steps):
        name = "wohg_" + "_".join(map(str, steps[:i + 1]))
        out = run(name, i + 1, ("base", os.path.join(pipeline.SHIP, "base")) if i == 0 else ("init", out), n)
    return out


STAGE1 = 100  # the stage-1 run under the stage-2 arms (it only trains the text head and the new rows)


def write(name, text):
    path = os.path.join(OUT, name)
    with open(path, "w") as f:
        f.write(text + "\n")
    print(text)
    print(f"wrote {path}")


def compare(name, title, arms, n=None):
    """Stage-2 image-loss curves of the arms ({label: run dir}) -> name.png, and a table -> name.md (the mean of the
    last 50 steps, the loss at a quarter of the run, and with n the GenEval-style overall of each arm)."""
    curves = {label: curve(d, "loss_img") for label, d in arms.items()}
    steps = len(next(iter(curves.values())))
    plot({label: smooth(c) for label, c in curves.items()}, os.path.join(OUT, f"{name}.png"),
         f"{title}: stage-2 image loss, toy world ({steps} steps, same data)")
    head = "| stage 2 | image loss, last 50 steps | image loss at 25% of the steps |" + (" GenEval-style overall |" if n
                                                                                      else "")
    rows = [head, "|---|---|---|" + ("---|" if n else "")]
    for label, c in curves.items():
        last = sum(v for _, v in c[-50:]) / len(c[-50:])
        rows.append(f"| {label} | {last:.3f} | {c[len(c) // 4][1]:.3f} |" + (f" {geneval(arms[label], n):.3f} |"
                                                                            if n else ""))
    write(f"{name}.md", "\n".join(rows))


def switching(steps):
    s1 = wohg(STAGE1)
    # the "Normal" model of Section 4.4: the same network, but its stage-1 checkpoint is marked to score image
    # targets with one softmax over the whole vocabulary (ArmorConfig.forward_switching = False)
    normal = os.path.join(OUT, f"wohg_{STAGE1}_one_head")
    if not os.path.exists(os.path.join(normal, "config.json")):
        shutil.copytree(s1, normal, dirs_exist_ok=True)
        with open(os.path.join(normal, "config.json")) as f:
            meta = json.load(f)
        meta["armor"]["forward_switching"] = False  # "base" is relative and both folders sit side by side
        with open(os.path.join(normal, "config.json"), "w") as f:
            json.dump(meta, f, indent=2)
    compare("switching", "Forward switching (Figure 7)",
            {"forward switching (two heads)": wohg(STAGE1, steps),
             "one head over the whole vocabulary": run(f"one_head_{STAGE1}_{steps}", 2, ("init", normal), steps)})


def embeddings(steps, n):
    compare("embeddings", "New embedding rows in stage 2 (Section 6.3)",
            {"new rows + adapter + visual head (WoHG)": wohg(STAGE1, steps),
             "adapter + visual head only": run(f"no_new_rows_{STAGE1}_{steps}", 2, ("init", wohg(STAGE1)), steps,
                                               ["--train", "adapter,visual_head"])}, n)


def single_stage(steps, n):
    from . import eval as ev
    from . import world
    third = max(steps // 3, 50)
    s3 = wohg(third, third, third)
    one = run(f"single_stage_{3 * third}", 3, ("base", os.path.join(pipeline.SHIP, "base")), 3 * third,
              ["--train", "all"])
    items = world.understanding_set(5 * n, 1234)
    import armor
    import sample
    base = armor.from_internvl(os.path.join(pipeline.SHIP, "base"), armor=False, verbose=False).eval()
    _, tok, _ = sample.load(os.path.join(pipeline.SHIP, "armor"))
    u0 = ev.eval_understanding(base, tok, items, is_base=True)
    uw, us = understanding(s3, items), understanding(one, items)
    write("single_stage.md",
          f"| training ({3 * third} steps in all) | ti2t accuracy | Und. (kept of the base's {u0:.3f}) | "
          "GenEval-style overall |\n|---|---|---|---|\n"
          f"| WoHG: stages 1, 2, 3 | {uw:.3f} | {uw / u0:.3f} | {geneval(s3, n):.3f} |\n"
          f"| one stage, everything trainable, alpha = beta = 1 | {us:.3f} | {us / u0:.3f} | {geneval(one, n):.3f} |")


def scaling(run_dir, n, seeds, out_dir):
    """GenEval-style overall in the training phrasings and in unseen ones against stage-2 compute (examples seen =
    steps x global batch), from the snapshots a run saved (train.py --snapshot-every, as the pipeline's stage 2 does)
    and its final model. A snapshot is the run part-way, before its learning rate has come down, so the curve lies
    at or below what runs of those lengths would reach: a rising end says more compute would still pay."""
    import torch

    from . import eval as ev
    import sample
    ck = torch.load(os.path.join(run_dir, "ckpt.pt"), map_location="cpu", weights_only=False)
    batch, last = ck["global_batch"], ck["step"]
    snaps = sorted((int(d[4:]), os.path.join(run_dir, d)) for d in os.listdir(run_dir)
                   if d.startswith("step") and d[4:].isdigit())
    rows, curves = [], {"training phrasings": [], "unseen phrasings": []}
    for step, d in snaps + [(last, run_dir)]:
        model, tok, vq = sample.load(d, vqgan=os.path.join(pipeline.SHIP, "vqgan"))
        score = {ph: sum(ev.eval_generation(model, tok, vq, n, sample.DEFAULT_CFG, s, phrasing=ph)["overall"]
                         for s in seeds) / len(seeds) for ph in ("train", "unseen")}
        rows.append(f"| {step} | {step * batch:,} | {score['train']:.3f} | {score['unseen']:.3f} |")
        print(rows[-1], flush=True)
        curves["training phrasings"].append((step * batch / 1000, score["train"]))
        curves["unseen phrasings"].append((step * batch / 1000, score["unseen"]))
    os.makedirs(out_dir, exist_ok=True)
    plot(curves, os.path.join(out_dir, "scaling.png"), f"GenEval-style overall against stage-2 compute "
         f"(seeds {', '.join(map(str, seeds))}, {n} prompts per category)", "GenEval-style", "thousand examples")
    text = (f"Stage 2 of `{os.path.relpath(run_dir, ROOT)}`, global batch {batch}; GenEval-style overall, mean of "
            f"seeds {', '.join(map(str, seeds))} (`python -m toy.ablations scaling --run "
            f"{os.path.relpath(run_dir, ROOT)}`)\n\n| step | examples | training phrasings | unseen phrasings |\n"
            "|---|---|---|---|\n" + "\n".join(rows))
    with open(os.path.join(out_dir, "scaling.md"), "w") as f:
        f.write(text + "\n")
    print(text)


def upper_bound(pipe_dir, n, seeds, out_dir):
    """What ARMOR's freezing costs and buys (the paper's Tables 4-5 trade-off) at full scale: one stage from the base
    with every weight trainable and alpha = beta = 1 on all four conversation types, on the same data and for as many
    examples as stages 1-3 saw together, at stage 2's batch and learning rate; scored beside the WoHG model (stage 3)
    by eval.py's measures, averaged over seeds. pipe_dir: the shipped toy world (toy/: base, armor, vqgan; the recipe
    is pipeline.TRAIN) or a `python -m toy` run (runs/toy: base, stage1-3, vqgan; the recipe is in its checkpoints)."""
    import torch
    from . import eval as ev
    from . import world
    import armor
    import sample
    p = pipeline.paths()
    shipped = os.path.exists(os.path.join(pipe_dir, "armor", "config.json"))
    wohg = os.path.join(pipe_dir, "armor" if shipped else "stage3")
    if shipped:  # the recipe it was made with, and its data, made here as for the other arms
        recipe = {s: pipeline.TRAIN[s] for s in (1, 2, 3)}
        examples = sum(steps * batch for steps, batch, _, _ in recipe.values())
        _, batch, lr, warmup = recipe[2]
        data, codes = pipeline._data_args(p, 3), p["codes"]
        pipeline.make_data(p, pipeline.N_RECORDS)
        pipeline.make_codes(p, os.path.join(pipe_dir, "vqgan"))
    else:
        ck = {s: torch.load(os.path.join(pipe_dir, f"stage{s}", "ckpt.pt"), map_location="cpu", weights_only=False)
              for s in (1, 2, 3)}
        examples = sum(ck[s]["args"]["steps"] * ck[s]["global_batch"] for s in ck)
        batch, lr, warmup = ck[2]["global_batch"], ck[2]["args"]["lr"], ck[2]["args"]["warmup"]
        data, codes = ck[3]["args"]["data"], ck[3]["args"]["codes"]
    steps = examples // batch
    # the arm's run: beside the run it is compared with, or for the shipped world with the other arms
    name = f"upper_bound_{os.path.basename(os.path.abspath(pipe_dir))}_{steps}"
    out = os.path.join(OUT if shipped else pipe_dir, name)
    if not os.path.exists(os.path.join(out, "model.safetensors")):
        cmd = pipeline.train_cmd(3, out, steps, batch, lr, warmup, data, save_every=250)
        cmd += ["--codes", codes, "--base", os.path.join(pipe_dir, "base"), "--train", "all"]
        print("$ " + " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    vq_dir = os.path.join(pipe_dir, "vqgan")
    base = armor.from_internvl(os.path.join(pipe_dir, "base"), armor=False, verbose=False).eval()
    arms = {"WoHG: stages 1-3, the base frozen": wohg,
            "one stage, everything trainable, alpha = beta = 1": out}
    keys = ["overall", "unseen", "color_attr", "position", "counting", "held-out", "scenes", "ti2t", "kept",
            "modality"]
    score = {label: dict.fromkeys(keys, 0.0) for label in arms}
    u0 = 0.0
    for seed in seeds:
        items = world.understanding_set(5 * n, seed)
        tok = sample.load(wohg, vqgan=vq_dir)[1]
        b = ev.eval_understanding(base, tok, items, is_base=True)
        u0 += b / len(seeds)
        for label, d in arms.items():
            model, tok, vq = sample.load(d, vqgan=vq_dir)
            gen = ev.eval_generation(model, tok, vq, n, sample.DEFAULT_CFG, seed)
            u = ev.eval_understanding(model, tok, items)
            got = {"overall": gen["overall"], "color_attr": gen["color_attr"], "position": gen["position"],
                   "counting": gen["counting"],
                   "unseen": ev.eval_generation(model, tok, vq, n, sample.DEFAULT_CFG, seed, phrasing="unseen")[
                       "overall"],
                   "held-out": ev.eval_generation(model, tok, vq, n, sample.DEFAULT_CFG, seed, heldout=True)["overall"],
                   "scenes": ev.eval_scenes(model, tok, vq, n, sample.DEFAULT_CFG, seed),
                   "ti2t": u, "kept": u / b if b else 0.0,
                   "modality": ev.eval_modality(model, tok, max(1, n // 2) * 2, seed)["overall"]}
            print(f"seed {seed} | {label} | " + " | ".join(f"{k} {v:.3f}" for k, v in got.items()), flush=True)
            for k in keys:
                score[label][k] += got[k] / len(seeds)
    run_arg = "" if pipe_dir == pipeline.SHIP else f" --run {os.path.relpath(pipe_dir, ROOT)}"
    rows = [f"Mean of seeds {', '.join(map(str, seeds))}, {n} prompts per GenEval category, {5 * n} ti2t questions "
            f"per seed. Both start from {os.path.relpath(pipe_dir, ROOT)}/base and train on the same data for "
            f"{examples:,} examples (`python -m toy.ablations upper-bound{run_arg}`). "
            f"The base answers {u0:.3f} of the ti2t questions.", "",
            "| training | GenEval-style overall | unseen phrasings | colour attribution | position | counting | "
            "held-out compositions | scenes | ti2t accuracy | Und. (kept of the base) | response modality |",
            "|---|" + "---|" * len(keys)]
    rows += [f"| {label} | " + " | ".join(f"{v[k]:.3f}" for k in keys) + " |" for label, v in score.items()]
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "upper_bound.md"), "w") as f:
        f.write("\n".join(rows) + "\n")
    print("\n".join(rows))


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m toy.ablations", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("which", choices=["switching", "embeddings", "single-stage", "all", "scaling", "upper-bound"])
    ap.add_argument("--run", help="scaling: the stage-2 run whose snapshots are scored (runs/toy/stage2); "
                                  "upper-bound: the toy world to compare with (default the shipped toy/; "
                                  "or a `python -m toy` run, as runs/toy)")
    ap.add_argument("--seeds", default="1234,7,99", help="scaling, upper-bound: evaluation seeds")
    ap.add_argument("--figures", default=os.path.join(ROOT, "figures"),
                    help="scaling, upper-bound: where the figure / table goes")
    ap.add_argument("--steps", type=int, default=1000, help="stage-2 steps per arm (single-stage: total steps)")
    ap.add_argument("--n", type=int, default=10, help="prompts per GenEval category / 5x ti2t questions")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.which == "scaling":
        run_dir = args.run or os.path.join(ROOT, "runs", "toy", "stage2")
        if not os.path.exists(os.path.join(run_dir, "ckpt.pt")):
            sys.exit(f"error: {run_dir} holds no train.py run (no ckpt.pt)")
        return scaling(run_dir, args.n, seeds, args.figures)
    if args.which == "upper-bound":
        pipe_dir = args.run or pipeline.SHIP
        shipped = os.path.exists(os.path.join(pipe_dir, "armor", "config.json"))
        need = ("base", "vqgan") + (() if shipped else
                                    ("stage1/ckpt.pt", "stage2/ckpt.pt", "stage3/model.safetensors"))
        missing = [d for d in need if not os.path.exists(os.path.join(pipe_dir, d))]
        if missing:
            sys.exit(f"error: {pipe_dir} is neither the shipped toy world nor a finished `python -m toy` run "
                     f"(missing {', '.join(missing)})")
        return upper_bound(pipe_dir, args.n, seeds, args.figures)
    if not os.path.exists(os.path.join(pipeline.SHIP, "armor", "config.json")):
        sys.exit(f"error: the shipped toy world is missing from {pipeline.SHIP}; run `python -m toy` first")
    os.makedirs(OUT, exist_ok=True)
    p = pipeline.paths()
    pipeline.make_data(p, pipeline.N_RECORDS)
    pipeline.make_codes(p, os.path.join(pipeline.SHIP, "vqgan"))
    if args.which in ("switching", "all"):
        switching(args.steps)
    if args.which in ("embeddings", "all"):
        embeddings(args.steps, args.n)
    if args.which in ("single-stage", "all"):
        single_stage(args.steps, args.n)


if __name__ == "__main__":
    main()
