"""
The toy world, built from nothing in one resumable command: the whole ARMOR recipe at laptop scale.

No model hub is reachable here and ARMOR's data was never released, so the project trains its own small world
(pictures.py: coloured shapes and twelve scenes at 64 px; world.py: conversations of the four types), and inside it:
  1. data       world.py exports training conversations (JSONL + PNG) into --data
  2. tokenizer  a byte-level BPE on the world's text (tokenizer.py), the way Qwen2's is built
  3. vqgan      a small VQGAN (vqgan.py, Chameleon's architecture at toy width): 64 px -> 8x8 codes, each 8 px
                cell encoded alone (VQGANConfig.cell_local), so a code depends on its own cell only
  4. codes      the VQ code cache of every output image (vqgan.py cache)
  5. base       the "existing MLLM": InternViT + mlp1 + Qwen2-layout LLM at toy size, trained ONLY on
                understanding (t2t, ti2t) with train.py --stage 0. It cannot draw.
  6-8. WoHG     train.py --stage 1, 2, 3 on top of it: the paper's algorithm, unchanged
  9. ship       fp16 copies into toy/ (vqgan, base + tokenizer; armor's matrices as int8 rows): what sample.py and
                eval.py use by default

  python -m toy                    # everything; rerun after a kill and it continues where it stopped
  python -m toy --from base        # redo from a step on (drops that step's outputs and the later ones)
  python -m toy --quick --ship /tmp/toy --data /tmp/toy_data --runs /tmp/toy_runs   # a 2-minute smoke run
  python -m toy --vq-locality 5 --no-cell-local --data D --runs R --ship S   # the README's VQGAN locality experiment
  python -m toy --more position=0.25 --stage2-steps 15000 --data D --runs R --ship S   # more of one request, longer
  python -m toy --base-from toy --data D --runs R --ship S   # ARMOR again on the shipped base
  python -m toy --questions composed --data D --runs R --ship S   # a base asked in composed question phrasings
  python -m toy --image-after text --data D --runs R --ship S   # a t2ti answer's picture right after its text
  python -m toy.eval               # then: the measured table of the README
  python -m toy prepare --stage 2  # only the data a bare `python train.py --stage 2` reads (toy/stage2.args)

Each step is skipped when its output exists (the code cache only when a sample of its codes matches the VQGAN, so codes
of another VQGAN are refused with an error); the training steps resume from their own checkpoints (train.py --resume,
vqgan train_state.pt). Budgets below are sized for 2 CPU cores (see README for the measured times).
"""

import argparse
import dataclasses
import fcntl
import filecmp
import json
import os
import random
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIP = os.path.join(ROOT, "toy")  # committed: toy/vqgan, toy/base (with tokenizer.json), toy/armor
DATA = os.path.join(ROOT, "toy_data")  # generated, git-ignored
RUNS = os.path.join(ROOT, "runs", "toy")  # training outputs, git-ignored

# Records per type for the training sets (stage mixtures draw from these; t2i/t2ti are the generation data).
N_RECORDS = {"t2t": 3000, "ti2t": 40000, "t2i": 16000, "t2ti": 6000}
VOCAB = 1024  # BPE vocabulary incl. the 12 special tokens
VQ_STEPS, VQ_BATCH = 2000, 8
# vqgan.train_vqgan's locality term (equal cells, equal codes), a soft version of cell_local: off by default;
# --vq-locality 5 --no-cell-local is the README's experiment (GenEval-style up, scenes and modality down)
VQ_LOCALITY = 0.0
# the toy VQGAN encodes every 8 px cell alone (vqgan.VQGANConfig.cell_local): a code is then a function of its cell
# (H(code | cell) = 0); --no-cell-local trains the whole-image encoder of the VQGAN shipped before
VQ_CELL_LOCAL = True
# half of the t2i object requests that name no colour (single object, two objects, counting, position) name the colours
# drawn (world.with_colours): only "colors" and "color_attr" requests did, and the drawing model read colour words
# weakly (README, "colours named"); --name-colours 0 gives the data of the model shipped before
NAME_COLOURS = 0.5
# how far apart (px) a t2i position picture's two objects may sit on the other axis (pictures.ACROSS): at 8 one of a
# left/right pair is often a cell higher, so raster order often draws the right-hand one first; 0 puts the pair on
# one row (python -m toy.probe draw --across 0 against plain draw: within the spread between runs).
# MORE: extra object requests of a GenEval category, as a share of the t2i records (which ask for each category once in
# twelve): the three categories the model drew worst, with stage 2 made longer (TRAIN) so that the t2i records keep
# their passes; more positions alone reached the position target and lost colour binding (docs/toy_history.md)
DRAW_ACROSS = 0
MORE = {"position": 0.25, "counting": 0.15, "color_attr": 0.15}
# extra ti2t records per ti2t record, each an open question about where one object is compared to another: the
# direction of a relation is the last thing a base learns to read (python -m toy.probe relation: the axis at once,
# which way round only after about 3,000 steps of nothing else), so the base sees about 100,000 of them in 8,000
# steps; its other question kinds keep the number of examples they had at 4,000 steps without them
WHERE = 1.0
# how the base's training questions about a picture are phrased (world.questions_as): "plain", two or three wordings
# per kind of question; "composed", question frames x four wordings, as the drawing requests are composed
QUESTIONS = "plain"
# what parts a t2ti answer's text from its picture: "\n", or "" (world.image_right_after), where the choice to draw is
# the <imgbos> row's and not that of the BPE's merged ".\n" token, which a base taught to refuse drawing outvotes
IMAGE_AFTER = "\n"
# (steps, batch, lr, warmup) per train.py stage (toy/stage<N>.args repeats them for a bare train.py command;
# tests/test_train.py keeps the two equal). The base's learning rate is 3e-4: at 2e-3 it never learnt to read shapes
# (the shape word's loss stayed at ln 3, chance among three shapes, even on single-object pictures, while colours,
# which a mean over the picture gives, were learnt), and at 3e-4 it reads them within 500 steps
# (tests/test_toy.py::test_base_learns_to_read_shapes). Stage 2's 24,000 steps: GenEval-style rose with its length up
# to about 21,000 steps and not after (figures/scaling.md)
TRAIN = {0: (8000, 32, 3e-4, 40), 1: (250, 32, 1e-3, 25), 2: (24000, 8, 1e-3, 100), 3: (150, 32, 3e-4, 15)}
# train.py --mix per stage where it is not the stage's own (data.STAGE_MIX): the base reads three pictures for every
# text record, since what it must learn about pictures (binding colours, counts and places to objects) is the slow part
MIX = {0: "t2t=1,ti2t=3"}
# the stage-2 run saves this many snapshots on its way (train.py --snapshot-every): the scaling figure's points
# (python -m toy.ablations scaling)
SNAPSHOTS = 8


QUICK = {"records": 64, "vq_steps": 20, "train_steps": 4}


def _amp():
    """bf16 autocast where the CPU has native bf16 matmuls (AVX512-BF16/AMX: 1.4x faster training measured on the
    2-core EPYC), fp32 elsewhere."""
    ok = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)()
    return "bfloat16" if ok else "float32"


def toy_config():
    """The toy base MLLM: InternVL2.5's architecture (InternViT, pixel shuffle, mlp1, Qwen2 LLM) at toy size.
    64 px single-tile images, 8 px patches -> 8x8 patches -> 4x4 = 16 <IMG_CONTEXT> tokens per image."""
    import armor
    return armor.PRESETS["toy"]()


def paths(data=DATA, runs=RUNS, ship=SHIP):
    return dict(data=data, runs=runs, ship=ship, codes=os.path.join(data, "codes"),
                vq_run=os.path.join(runs, "vqgan"), tok=os.path.join(runs, "tokenizer"),
                base=os.path.join(runs, "base"), stage={s: os.path.join(runs, f"stage{s}") for s in (1, 2, 3)})


def _data_args(p, stage):
    from data import STAGE_MIX
    # the base (stage 0) reads its own t2t pool: t2t plus draw requests answered in words (world.base_text_mixture)
    name = lambda t: "base_t2t" if stage == 0 and t == "t2t" else t
    return [f"{t}={os.path.join(p['data'], f'{name(t)}_train.jsonl')}" for t in STAGE_MIX[stage]]


def prepare(p, stage):
    """The data of train.py's toy defaults (toy/stage<N>.args), made on first use: the training sets the stage reads,
    and after stage 0 their codes from the shipped VQGAN. train.py runs it on every rank before it opens the data
    (--prepare `python -m toy prepare --stage N`): one process prepares while any others wait (torchrun starts
    every rank with the same arguments)."""
    from data import STAGE_MIX
    if not os.path.exists(os.path.join(p["ship"], "armor", "config.json")):
        raise SystemExit(f"error: the toy checkpoints are missing from {p['ship']}; build them with `python -m toy`")
    kinds = {t: N_RECORDS[t] for t in STAGE_MIX[stage] if t in N_RECORDS}
    with prepared_once(p["data"]):
        make_data(p, kinds, base_text=stage == 0)
        if stage > 0:
            make_codes(p, os.path.join(p["ship"], "vqgan"))


@contextmanager
def prepared_once(folder):
    """Hold an exclusive lock on `folder` while preparing what goes into it: with several processes asking at once
    (torchrun's ranks, two runs) the first prepares and the others wait, then find it made. The kernel releases the
    lock of a process that dies, so a killed preparation blocks no one; its half-written files are never read, since
    every file is renamed into place whole and the code cache records whether it is complete."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, ".lock"), "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process to prepare {folder} ...", flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# -----------------------------------------------------------------------------------------------------------------
# the steps


def make_data(p, n_records, seed=0, name_colours=NAME_COLOURS, across=DRAW_ACROSS, more=MORE, where=WHERE,
              base_text=True, questions=QUESTIONS, image_after=IMAGE_AFTER):
    """The training sets of the types in n_records (and, with base_text, the base's text pool) into p["data"];
    name_colours and across are world.make_mixture's for the t2i records, more ({category: share}) its extra object
    requests as a share of them; the ti2t set with `where` extra open position questions per record, every question
    phrased as `questions` says (world.questions_as); the t2ti answers' pictures after `image_after` ("\n" or "")."""
    from . import world
    if image_after not in ("\n", ""):
        raise ValueError(f"image_after is '\\n' or '', got {image_after!r}")
    os.makedirs(p["data"], exist_ok=True)
    more = {c: s for c, s in sorted(more.items()) if s}
    recipe = {"name_colours": name_colours, "across": across, "more": more, "where": where, "questions": questions,
              "image_after": image_after}
    path = os.path.join(p["data"], "recipe.json")
    made = os.path.exists(os.path.join(p["data"], "t2i_train.jsonl"))
    # what data made before a setting was recorded had
    unrecorded = {"name_colours": 0.0, "across": 8, "more": {}, "where": 0.0, "questions": "plain", "image_after": "\n"}
    if os.path.exists(path):
        with open(path) as f:
            before = {**unrecorded, **json.load(f)}
        if "positions" in before:  # recorded before other categories could be asked for more often
            positions = before.pop("positions")
            before["more"] = {"position": positions} if positions else {}
    else:
        before = unrecorded if made else recipe
    if before != recipe:  # the steps below reuse what exists: data of another recipe would pass for this one
        raise SystemExit(f"{p['data']} holds data made with {before}, not {recipe}: pass another --data "
                         f"directory, or --from data to make it again")
    with open(path + ".tmp", "w") as f:
        json.dump(recipe, f)
    os.replace(path + ".tmp", path)
    for kind, n in n_records.items():
        if not os.path.exists(os.path.join(p["data"], f"{kind}_train.jsonl")):
            drawing = dict(across=across, more={c: round(s * n) for c, s in more.items()}) if kind == "t2i" else {}
            with world.questions_as(questions):
                records = world.make_mixture(kind, n, seed, "train", name_colours, **drawing)
                if kind == "ti2t" and where:
                    rng = random.Random(f"ti2t-where/{seed}")  # its own stream: the mixture's records stay as they were
                    records += [world.make_record("ti2t", rng, rid=f"ti2t-where-{seed}-{i}", category="where")
                                for i in range(round(n * where))]
                if kind == "t2ti" and image_after == "":
                    records = [world.image_right_after(r) for r in records]
            world.write_dataset(records, p["data"], f"{kind}_train")
    if base_text and not os.path.exists(os.path.join(p["data"], "base_t2t_train.jsonl")):
        n = n_records.get("t2t", N_RECORDS["t2t"]) * 2
        world.write_dataset(world.base_text_mixture(n, seed), p["data"], "base_t2t_train")


def make_tokenizer(p, n_records, seed=0, vocab=VOCAB, questions=QUESTIONS):
    """A Qwen2-style byte-level BPE trained on every text of the training sets (prompts, answers, system text). It is
    the base MLLM's tokenizer, so it reads the sets as world.make_mixture makes them with no drawing-data option
    (name_colours 0), in the base's question phrasings, not the files in --data: a change to ARMOR's drawing data
    (--name-colours) leaves the tokenizer, and with it the base, byte for byte as they were."""
    from . import world
    from tokenizer import Tokenizer
    if os.path.exists(os.path.join(p["tok"], "tokenizer.json")):
        return
    with world.questions_as(questions):
        texts = [t["value"] for kind, n in n_records.items() for r in world.make_mixture(kind, n, seed, "train")
                 for t in r["conversations"]]
    Tokenizer.train_bpe(texts, vocab, out_dir=p["tok"])


def take_base(p, shipped):
    """Seed the runs with a shipped folder's tokenizer, VQGAN and base (its fp16 weights, as toy/ holds them), so the
    steps that would train them find them made: only the data, codes and the WoHG stages run. This is the paper's
    setting, an existing MLLM upgraded, and retrains ARMOR on the shipped base in a fraction of the recipe's time."""
    base, vq = os.path.join(shipped, "base"), os.path.join(shipped, "vqgan")
    # (what to copy, where it goes, the file in it that tells whether what is there already is the same)
    parts = [(base, p["base"], "model.safetensors"), (vq, p["vq_run"], "model.safetensors"),
             (os.path.join(base, "tokenizer.json"), os.path.join(p["tok"], "tokenizer.json"), None)]
    key = lambda d, k: os.path.join(d, k) if k else d
    for src, dst, k in parts:
        if not os.path.isfile(key(src, k)):
            raise SystemExit(f"error: --base-from {shipped} has no {os.path.relpath(key(src, k), shipped)}: pass a "
                             f"folder that `python -m toy` shipped, such as toy")
        if os.path.exists(dst) and not filecmp.cmp(key(src, k), key(dst, k), shallow=False):
            raise SystemExit(f"error: {dst} holds another model than {src}: pass another --runs")
    for src, dst, k in parts:
        if not os.path.exists(dst):  # copied whole, then renamed: a killed copy is never taken for a model
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.rmtree(dst + ".tmp", ignore_errors=True)  # a copy killed before
            (shutil.copytree if k else shutil.copyfile)(src, dst + ".tmp")
            os.replace(dst + ".tmp", dst)


def make_vqgan(p, steps=VQ_STEPS, batch=VQ_BATCH, locality=VQ_LOCALITY, cell_local=VQ_CELL_LOCAL, device="cpu"):
    """The toy VQGAN on fresh renders of the world (objects and scenes, training compositions only)."""
    import random

    import vqgan

    from . import pictures, vqgan_train
    if os.path.exists(os.path.join(p["vq_run"], "model.safetensors")):
        return

    def at(step):  # the batch of a step, independent of history, so a resumed run sees the same images
        rng = random.Random(f"vqgan/{step}")
        pics = []
        for _ in range(batch):
            if rng.random() < 0.5:
                pics.append(pictures.scene_picture(rng.choice(list(pictures.SCENES)), rng))
            else:
                pics.append(pictures.random_objects(rng))
        return torch.stack([vqgan.preprocess(pictures.render(pic), pictures.SIZE) for pic in pics])

    cfg = dataclasses.replace(vqgan.VQGANConfig.toy(), cell_local=cell_local)
    vqgan_train.train_vqgan(cfg, at, steps, out_dir=p["vq_run"], locality=locality, device=device)


def make_codes(p, vq_dir, device="cpu"):
    import vqgan
    model = vqgan.load_vqgan(vq_dir, device=device)
    if os.path.exists(os.path.join(p["codes"], "meta.json")) and _cache_complete(p):
        agree = codes_agree(p, model)
        if agree < 0.9:
            raise SystemExit(f"error: {p['codes']} holds the codes of another VQGAN: re-encoding its first images "
                             f"with {vq_dir} gives the same code for only {agree:.0%} of their positions. Delete "
                             f"it (or run `python -m toy --from codes`) to encode the images again.")
        return
    srcs = [os.path.join(p["data"], f"{t}_train.jsonl") for t in ("t2i", "t2ti")]
    srcs = [s for s in srcs if os.path.exists(s)]  # train.py's toy defaults export only what their stage reads
    vqgan.build_cache(model, srcs, p["codes"], size=64, batch=64, vqgan_path=vq_dir)


def codes_agree(p, model, n=32):
    """Share of code positions on which a complete cache and `model` agree, over the cache's first n images. The
    weights' fingerprint cannot decide it: the pipeline caches with its fp32 VQGAN, train.py's toy defaults with the
    shipped fp16 copy, and both must be accepted, while codes of a retrained VQGAN must not (they trained a
    stage 3 without a warning once: GenEval-style 0.008)."""
    from PIL import Image

    import vqgan
    cache = vqgan.CodeCache(p["codes"])
    keys = list(cache.index)[:n]
    want = torch.stack([torch.from_numpy(cache.get(k).astype("int64")) for k in keys])
    with torch.no_grad():
        got = vqgan.encode_pil(model, [Image.open(os.path.join(p["data"], k)) for k in keys], cache.meta["size"])
    return (got == want).float().mean().item()


def _cache_complete(p):
    with open(os.path.join(p["codes"], "meta.json")) as f:
        meta = json.load(f)
    return meta.get("complete", True)


def train_cmd(stage, out, steps, batch, lr, warmup, data, save_every=100, device="cpu"):
    """The train.py command line of one resumable run (the pipeline's stages and ablations.py's arms)."""
    dtype = _amp() if device == "cpu" else "bfloat16"
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--stage", str(stage), "--out", out, "--resume",
           "--steps", str(steps), "--batch-size", str(batch), "--lr", str(lr), "--warmup", str(warmup),
           "--save-every", str(save_every), "--device", device, "--dtype", dtype]
    for d in data:
        cmd += ["--data", d]
    return cmd


def train(stage, p, extra=(), quick=False, device="cpu", steps=None):
    """One train.py run in a subprocess (resumable: --resume continues from the run's ckpt.pt); steps: the recipe's
    (TRAIN) unless given."""
    steps, (_, batch, lr, warmup) = steps or TRAIN[stage][0], TRAIN[stage]
    if quick:
        steps, batch, warmup = QUICK["train_steps"], 4, 1
    out = p["base"] if stage == 0 else p["stage"][stage]
    if os.path.exists(os.path.join(out, "model.safetensors")) and not os.path.exists(os.path.join(out, ".running")):
        return
    os.makedirs(out, exist_ok=True)
    open(os.path.join(out, ".running"), "w").close()
    cmd = train_cmd(stage, out, steps, batch, lr, warmup, _data_args(p, stage), device=device)
    cmd += ["--mix", MIX[stage]] if stage in MIX else []
    cmd += ["--snapshot-every", str(steps // SNAPSHOTS)] if stage == 2 and not quick else []
    if stage == 0:
        cmd += ["--preset", "toy", "--tokenizer", p["tok"]]
    else:
        cmd += ["--codes", p["codes"]]
        cmd += ["--base", p["base"]] if stage == 1 else ["--init", p["stage"][stage - 1]]
    cmd += list(extra)
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2")))
    os.remove(os.path.join(out, ".running"))


def ship(p):
    """fp16 copies of the trained tokenizer, VQGAN, base and ARMOR into the shipped folder (toy/ in the repo):
    half the bytes of fp32, ARMOR's matrices a quarter (int8 rows, armor.save_pretrained: every shipped version stays
    in git's history, which has a size budget), and the evaluation runs on exactly these weights."""
    import armor
    import vqgan
    from tokenizer import Tokenizer
    s = p["ship"]
    vq = vqgan.load_vqgan(p["vq_run"]).half()
    vqgan.save_vqgan(vq, os.path.join(s, "vqgan"))
    base = armor.from_internvl(p["base"], armor=False, dtype=torch.float16, verbose=False)
    armor.save_internvl(base, os.path.join(s, "base"))
    Tokenizer.from_dir(p["tok"]).save(os.path.join(s, "base"))
    model = armor.from_pretrained(p["stage"][3], dtype=torch.float16, base=os.path.join(s, "base"), verbose=False)
    # relative paths (from here): config.json then names ../base and ../vqgan, so the folder works from any clone
    armor.save_pretrained(model, os.path.join(s, "armor"), base=os.path.relpath(os.path.join(s, "base")),
                          vqgan=os.path.relpath(os.path.join(s, "vqgan")), int8=True)
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(s) for f in fs)
    print(f"shipped the toy world into {s}: {total / 1e6:.1f} MB")


STEPS = ("data", "tokenizer", "vqgan", "codes", "base", "stage1", "stage2", "stage3", "ship")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m toy", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", nargs="?", default="build", choices=["build", "prepare"],
                    help="build: every step below (the default); prepare: only the data of train.py's toy defaults "
                         "for --stage (what toy/stage<N>.args has train.py run)")
    ap.add_argument("--stage", type=int, choices=[0, 1, 2, 3], help="prepare: the train.py stage")
    ap.add_argument("--data", default=DATA, help="where the generated conversations and code cache go")
    ap.add_argument("--runs", default=RUNS, help="where training outputs go")
    ap.add_argument("--ship", default=SHIP, help="where the shipped checkpoints go")
    ap.add_argument("--from", dest="start", choices=STEPS, help="redo this step and every later one")
    ap.add_argument("--quick", action="store_true", help="tiny budgets: checks the pipeline end to end in minutes")
    ap.add_argument("--device", default="cpu", help="cpu | cuda: where the VQGAN, the codes and every stage run "
                                                    "(the shipped recipe ran on the CPU)")
    ap.add_argument("--vq-locality", type=float, default=VQ_LOCALITY,
                    help="weight of the VQGAN's locality term (vqgan.train_vqgan); 0 = the shipped recipe")
    ap.add_argument("--no-cell-local", dest="cell_local", action="store_false",
                    help="the VQGAN's encoder reads the whole image (the VQGAN shipped before), not each cell alone")
    ap.add_argument("--across", type=float, default=DRAW_ACROSS,
                    help="how far apart (px) a t2i position picture's two objects may sit on the other axis "
                         "(pictures.ACROSS); 0 puts a left/right pair on one row")
    ap.add_argument("--more", action="append", default=[], metavar="CATEGORY=SHARE",
                    help="extra t2i object requests of a GenEval category (position, counting, color_attr, ...), as a "
                         f"share of the t2i records; repeat for several. Given, it replaces the recipe's ({MORE}); "
                         "position=0 asks for none")
    ap.add_argument("--stage2-steps", type=int, default=TRAIN[2][0],
                    help="stage 2's length (the recipe's batch and learning rate), e.g. longer beside --more")
    ap.add_argument("--base-from", metavar="SHIPPED",
                    help="take the tokenizer, VQGAN and base of a shipped folder (e.g. toy) instead of training them: "
                         "ARMOR's stages retrained on an existing base")
    ap.add_argument("--name-colours", type=float, default=NAME_COLOURS,
                    help="share of t2i object requests that name no colour rewritten to name the colours drawn "
                         "(world.with_colours); 0 = the data of the model shipped before")
    ap.add_argument("--questions", choices=("plain", "composed"), default=QUESTIONS,
                    help="the base's questions about pictures: plain, two or three wordings per kind (the recipe); "
                         "composed, question frames x four wordings (world.COMPOSED_QUESTIONS)")
    ap.add_argument("--image-after", choices=("newline", "text"), default="newline" if IMAGE_AFTER else "text",
                    help="what a t2ti answer's picture follows: a line break after its text (the recipe), or the "
                         "text itself (world.image_right_after)")
    args = ap.parse_args(argv)
    from .pictures import CATEGORIES
    if args.across < 0:
        ap.error("--across cannot be negative")
    if args.stage2_steps < 2 * TRAIN[2][3]:
        ap.error(f"--stage2-steps must be at least {2 * TRAIN[2][3]} (twice the warmup)")
    more = {} if args.more else MORE
    for m in args.more:
        cat, _, share = m.partition("=")
        try:
            more[cat] = float(share)
        except ValueError:
            ap.error(f"--more wants CATEGORY=SHARE, as position=0.25, not {m!r}")
        if cat not in CATEGORIES or more[cat] < 0:
            ap.error(f"--more {m}: the category must be one of {', '.join(CATEGORIES)} and the share not negative")
    p = paths(args.data, args.runs, args.ship)
    if args.command == "prepare":
        if args.stage is None:
            ap.error("prepare needs --stage")
        return prepare(p, args.stage)
    if args.start:  # forget the outputs of this step and the later ones
        order = {"data": [p["data"]], "tokenizer": [p["tok"]], "vqgan": [p["vq_run"]], "codes": [p["codes"]],
                 "base": [p["base"]], "stage1": [p["stage"][1]], "stage2": [p["stage"][2]],
                 "stage3": [p["stage"][3]], "ship": []}
        for step in STEPS[STEPS.index(args.start):]:
            for d in order[step]:
                shutil.rmtree(d, ignore_errors=True)
    n = {k: QUICK["records"] for k in N_RECORDS} if args.quick else N_RECORDS
    if args.base_from:
        take_base(p, args.base_from)
    t0 = time.time()
    timings = {}

    def timed(name, fn, *a, **kw):
        t = time.time()
        print(f"== toy: {name}", flush=True)
        fn(*a, **kw)
        timings[name] = time.time() - t

    with prepared_once(p["data"]):
        timed("data", make_data, p, n, name_colours=args.name_colours, across=args.across, more=more,
              questions=args.questions, image_after="\n" if args.image_after == "newline" else "")
    timed("tokenizer", make_tokenizer, p, n, questions=args.questions)
    timed("vqgan", make_vqgan, p, QUICK["vq_steps"] if args.quick else VQ_STEPS, locality=args.vq_locality,
          cell_local=args.cell_local, device=args.device)
    with prepared_once(p["data"]):
        timed("codes", make_codes, p, p["vq_run"], args.device)
    for stage in (0, 1, 2, 3):
        timed("base" if stage == 0 else f"stage{stage}", train, stage, p, quick=args.quick, device=args.device,
              steps=args.stage2_steps if stage == 2 else None)
    timed("ship", ship, p)
    print("toy: done in " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()) + f"; total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
