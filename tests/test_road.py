"""
The README's road with released weights ("Running on the released weights"), walked literally: every command is
a subprocess, run from a working folder with the README's relative paths, on tiny stand-ins written in the exact
released layouts.

  python -m pytest tests/test_road.py           # marked e2e (in the default run): about a minute on 2 CPU cores
  python -m pytest -m "not e2e"                 # everything else

Stand-ins (helpers from tests/conftest.py and tests/test_data.py):
- ckpt/InternVL2_5-8B: an InternLM2 LLM (preset tiny-internlm2) as sharded safetensors + model.safetensors.index.json
  with the packed wqkv, config.json (model_type internvl_chat), tokenizer.model + added_tokens.json +
  tokenizer_config.json (a SentencePiece BPE with byte fallback)
- ckpt/InternVL2_5-1B: a Qwen2 LLM (preset tiny) as one model.safetensors, vocab.json + merges.txt +
  added_tokens.json (a byte-level BPE)
- ckpt/chameleon: `python vqgan.py random` (vqgan.ckpt + vqgan.yaml, Chameleon's layout; f = 8, 64 codes)
- images/, t2t.jsonl, ti2t.jsonl, t2i.jsonl, t2ti.jsonl and laion/t2i-0.tar: test_data.py's miniature world

The road, on the 8B stand-in: `armor.py --load`, `vqgan.py recon`, `vqgan.py cache`, stages 1, 2, 3 with
`torchrun --standalone --nproc_per_node=2` (gloo on CPU), the README's two sample.py commands (with --vqgan; with
--image and no --vqgan), then the output folder moved elsewhere and sampled again (and with the base moved too:
one line naming it and --base). On the 1B stand-in: `armor.py --load`, stage 1 with `--train all` (a whole
checkpoint with the Qwen2 tokenizer files beside it) and sampling it with no flags.
Each check is what a user would look at: exit codes, the one-line errors, the files written (PNG, HTML, checkpoint
tensors and config).

The non-e2e tests at the bottom pin what `python armor.py --load DIR` refuses: another model's config.json and a
directory without a tokenizer that fits.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import armor
from conftest import write_internlm2_tokenizer, write_qwen2_tokenizer
from test_data import SYSTEM, picture, records, write_jsonl, write_tar, png_bytes
from tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
# one thread per process: two torchrun workers on a 2-core machine, and the same bits in every run
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
PROMPT_DRAW = "Draw a red circle."  # a t2i prompt of the training records: stage 1 teaches <imgbos> after it


def run(*args, cwd, timeout=180):
    """python ARGS in cwd -> CompletedProcess; the scripts are named by their path in the repository."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def torchrun(*args, cwd):
    return run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", REPO / "train.py", *args,
               cwd=cwd, timeout=300)


def ok(p):
    assert p.returncode == 0, f"exit {p.returncode}\n--- stdout\n{p.stdout[-3000:]}\n--- stderr\n{p.stderr[-3000:]}"
    return p


def error_line(p):
    """A refused command: non-zero exit and exactly one line that starts with `error:` (the last on stderr)."""
    assert p.returncode != 0, p.stdout + p.stderr
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error")]
    assert len(errors) == 1 and p.stderr.strip().splitlines()[-1] == errors[0], p.stderr
    assert "Traceback" not in p.stderr, p.stderr
    return errors[0]


# ---------------------------------------------------------------------------------------------------------------------
# Stand-ins in the released layouts


def base_config(preset, tok):
    """The preset's shapes with the tokenizer's vocabulary: the 9 InternVL tokens last, <IMG_CONTEXT> 7th from the end
    (ArmorConfig's img_context_id default), as in every released InternVL2.5."""
    d = armor.PRESETS[preset]().to_dict()
    d["llm"]["vocab_size"], d["img_context_id"], d["system_message"] = len(tok), -1, SYSTEM
    return armor.ArmorConfig(**d)


def write_base(path, preset, tok, max_shard_bytes=None, seed=0):
    torch.manual_seed(seed)
    model = armor.InternVL(base_config(preset, tok))
    armor.init_weights(model)
    armor.save_internvl(model, str(path), max_shard_bytes=max_shard_bytes)
    return model


def texts():
    """Every text of the training records, plus the chat template's words."""
    words = [SYSTEM, "system user assistant", PROMPT_DRAW, "What is this? Draw one in winter."]
    return words + [t["value"] for v in records().values() for r in v for t in r["conversations"]]


def make_world(root):
    """The files a user has before the README's commands: two InternVL2.5 directories, Chameleon's tokenizer folder
    (written by vqgan.py random, itself a step of the road), images and the training data."""
    (root / "images").mkdir(parents=True)
    for (c, s) in [(c, s) for c in ("red", "green", "blue", "yellow") for s in ("circle", "square")]:
        picture(c, s).save(root / "images" / f"{c}_{s}.png")
    for k, v in records().items():
        write_jsonl(root / f"{k}.jsonl", v)
    (root / "laion").mkdir()
    shard = [(f"s{i:03d}", {"png": png_bytes(picture(c, s)), "txt": f"a {c} {s}".encode()})
             for i, (c, s) in enumerate([("red", "circle"), ("blue", "square")])]
    write_tar(root / "laion" / "t2i-0.tar", shard)  # a webdataset shard of image + caption, LAION's form
    # InternVL2_5-8B: InternLM2, sharded, tokenizer.model
    b8 = root / "ckpt" / "InternVL2_5-8B"
    b8.mkdir(parents=True)
    write_internlm2_tokenizer(b8, texts() * 4, vocab_size=400, normalization_rule_name="identity",
                              add_dummy_prefix=False, remove_extra_whitespaces=False)
    write_base(b8, "tiny-internlm2", Tokenizer.from_dir(b8), max_shard_bytes=120_000)
    # InternVL2_5-1B: Qwen2, one model.safetensors, vocab.json + merges.txt
    b1 = root / "ckpt" / "InternVL2_5-1B"
    b1.mkdir(parents=True)
    write_qwen2_tokenizer(Tokenizer.train_bpe(texts() * 4, 400), b1)
    write_base(b1, "tiny", Tokenizer.from_dir(b1), seed=1)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("road")
    make_world(root)
    return root


@pytest.mark.e2e
def test_stand_ins_have_the_released_layout(world):
    b8, b1 = world / "ckpt" / "InternVL2_5-8B", world / "ckpt" / "InternVL2_5-1B"
    index = json.loads((b8 / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and all(re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", s) for s in shards)
    assert not (b8 / "model.safetensors").exists() and (b8 / "tokenizer.model").is_file()
    assert "language_model.model.layers.0.attention.wqkv.weight" in index["weight_map"]
    assert sorted(p.name for p in b1.iterdir()) == ["added_tokens.json", "config.json", "merges.txt",
                                                     "model.safetensors", "vocab.json"]
    for b, arch in ((b8, "InternLM2ForCausalLM"), (b1, "Qwen2ForCausalLM")):
        cfg = json.loads((b / "config.json").read_text())
        assert cfg["model_type"] == "internvl_chat" and cfg["llm_config"]["architectures"] == [arch]


# ---------------------------------------------------------------------------------------------------------------------
# The road


@pytest.fixture(scope="module")
def chameleon(world):
    """`python vqgan.py random`: the stand-in for Chameleon's tokenizer/ folder."""
    p = ok(run(REPO / "vqgan.py", "random", "--out", "ckpt/chameleon", cwd=world))
    return world / "ckpt" / "chameleon", p


@pytest.mark.e2e
def test_random_vqgan_is_chameleons_layout(chameleon):
    d, p = chameleon
    assert sorted(f.name for f in d.iterdir()) == ["vqgan.ckpt", "vqgan.yaml"]
    assert re.fullmatch(r"random vqgan: \d+ tensors, [\d,]+ params, f = 8, 64 codes -> .*vqgan\.ckpt \+ vqgan\.yaml",
                        p.stdout.strip())
    # what chameleon/inference/vqgan.py's init_from_ckpt reads: {"state_dict": ...} of fp32 tensors, taming's keys
    sd = torch.load(d / "vqgan.ckpt", map_location="cpu", weights_only=True)
    assert list(sd) == ["state_dict"]
    sd = sd["state_dict"]
    assert all(v.dtype == torch.float32 for v in sd.values())
    for k in ("encoder.conv_in.weight", "encoder.down.0.block.0.norm1.weight", "encoder.mid.attn_1.q.weight",
              "quant_conv.weight", "quantize.embedding.weight", "post_quant_conv.bias",
              "decoder.up.3.upsample.conv.weight", "decoder.conv_out.weight"):
        assert k in sd, k
    assert tuple(sd["quantize.embedding.weight"].shape) == (64, 16)
    yaml = (d / "vqgan.yaml").read_text()
    assert yaml.startswith("model:\n") and "  target: taming.models.vqgan.VQModel\n" in yaml
    assert "      ch_mult:\n      - 1\n      - 1\n      - 1\n      - 1\n" in yaml and "n_embed: 64\n" in yaml


@pytest.mark.e2e
def test_load_released_directories(world):
    """`python armor.py --load DIR`: one summary line for each layout, naming the tokenizer it checked."""
    for name, tok_files in (("InternVL2_5-8B", "tokenizer.model"), ("InternVL2_5-1B", "vocab.json + merges.txt")):
        p = ok(run(REPO / "armor.py", "--load", f"ckpt/{name}", cwd=world))
        lines = p.stdout.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"loaded ") and f"from ckpt/{name}:" in lines[0], p.stdout
        assert f"; tokenizer {tok_files}, " in lines[0], lines[0]


@pytest.mark.e2e
def test_vqgan_recon(world, chameleon):
    """`python vqgan.py recon --vqgan vqgan.ckpt --images photo.jpg --out recon/`: the README's check of the VQGAN."""
    p = ok(run(REPO / "vqgan.py", "recon", "--vqgan", "ckpt/chameleon/vqgan.ckpt", "--images", "images/red_circle.png",
               "--out", "recon/", "--size", "32", cwd=world))
    assert "config: vqgan.yaml" in p.stdout
    assert Image.open(world / "recon" / "red_circle_recon.png").size == (64, 32)  # input | reconstruction


@pytest.fixture(scope="module")
def cache(world, chameleon):
    """Step 1: the VQ codes of every output image (JSONL records and a webdataset shard), at 32 px: 4x4 codes."""
    p = ok(run(REPO / "vqgan.py", "cache", "--vqgan", "ckpt/chameleon/vqgan.ckpt", "--size", "32", "--out", "cache/",
               "--data", "t2i.jsonl", "--data", "t2ti.jsonl", "--data", "laion/*.tar", cwd=world))
    return world / "cache", p


@pytest.mark.e2e
def test_code_cache(cache):
    d, p = cache
    # 8 pictures named by both JSONL files (the keys are the paths as written) + 2 in the shard
    assert "vq cache: 10 images, 0 skipped, 8 duplicate keys ignored" in p.stdout
    meta = json.loads((d / "meta.json").read_text())
    assert meta["complete"] and meta["grid"] == [4, 4] and meta["config"]["n_embed"] == 64
    assert (d / "codes.u16").stat().st_size == 10 * 16 * 2
    keys = [json.loads(ln)["key"] for ln in (d / "index.jsonl").read_text().splitlines()]
    assert "images/red_circle.png" in keys and "t2i-0.tar/s001.png" in keys


TRAIN = ["--steps", "12", "--batch-size", "2", "--lr", "1e-2", "--warmup", "1", "--device", "cpu"]
# Stages 1 and 3 weight t2i up: a random tiny base barely tells one prompt from another at the answer's first
# position, so in 12 steps the text head learns the mixture's most frequent first token. With t2i the majority that
# is <imgbos>, and greedy sampling draws (in the README's equal mix it would answer in words).
MIX = ["--mix", "t2t=1,ti2t=1,t2i=4,t2ti=1"]
DATA_ALL = ["--data", "t2t=t2t.jsonl", "--data", "ti2t=ti2t.jsonl", "--data", "t2i=laion/*.tar",
            "--data", "t2i=t2i.jsonl", "--data", "t2ti=t2ti.jsonl"]


@pytest.fixture(scope="module")
def stages(world, cache):
    """Step 2: WoHG stages 1, 2 and 3 on the 8B stand-in, each with 2-process torchrun, as the README writes them
    (plus the tiny budgets in TRAIN and MIX; t2i.jsonl beside the shard)."""
    out = {}
    out[1] = ok(torchrun("--stage", "1", "--base", "ckpt/InternVL2_5-8B", "--codes", "cache/", *DATA_ALL,
                         "--out", "out/stage1", *TRAIN, *MIX, cwd=world))
    out[2] = ok(torchrun("--stage", "2", "--init", "out/stage1", "--codes", "cache/", "--data", "t2i=laion/*.tar",
                         "--data", "t2i=t2i.jsonl", "--data", "t2ti=t2ti.jsonl", "--out", "out/stage2", "--grad-ckpt",
                         *TRAIN, cwd=world))
    out[3] = ok(torchrun("--stage", "3", "--init", "out/stage2", "--codes", "cache/", *DATA_ALL, "--out", "out/stage3",
                         *TRAIN, *MIX, cwd=world))
    return out


@pytest.mark.e2e
def test_stages_write_what_the_readme_says(world, stages):
    base = (world / "ckpt" / "InternVL2_5-8B").resolve()
    before = {}
    for s, p in stages.items():
        d = world / "out" / f"stage{s}"
        assert re.search(rf"^stage {s} \(.*\): .* \| cpu, float32, 2 ranks$", p.stdout, re.M), p.stdout[:2000]
        assert re.search(r"^step 12/12 \| loss [\d.]+ ", p.stdout, re.M), p.stdout[-2000:]
        assert f"saved to out/stage{s}" in p.stdout
        # a partial checkpoint: ARMOR's tensors and the LM head, config.json naming the base directory
        cfg = json.loads((d / "config.json").read_text())
        assert cfg["format"] == "armor" and (d / cfg["base"]).resolve() == base
        assert cfg["armor"]["num_image_codes"] == 64 and cfg["armor"]["image_grid"] == 4
        sd = load_file(d / "model.safetensors")
        assert set(sd) == {k for k in sd if k.startswith("armor.")} | {"language_model.lm_head.weight"}
        assert any(k.startswith("armor.adapter.") for k in sd)
        assert (d / "tokenizer.model").is_file() and (d / "ckpt.pt").is_file()
        assert len((d / "metrics.jsonl").read_text().splitlines()) == 12
        # each stage moved its own trainable set only (Figure 5): stage 2 leaves the text head, stage 1 the adapter
        if s == 2:
            assert torch.equal(sd["language_model.lm_head.weight"], before[1]["language_model.lm_head.weight"])
            assert not torch.equal(sd["armor.visual_head.weight"], before[1]["armor.visual_head.weight"])
        if s == 3:
            assert not torch.equal(sd["language_model.lm_head.weight"], before[2]["language_model.lm_head.weight"])
        before[s] = sd
    for s in (1, 2, 3):
        cfg = json.loads((world / "out" / f"stage{s}" / "config.json").read_text())
        assert "vqgan" in cfg, cfg  # so that sample.py --model draws with no --vqgan
        # the file or its folder (load_vqgan takes either), absolute or relative to the checkpoint
        vq = (world / "out" / f"stage{s}" / cfg["vqgan"]).resolve()
        assert vq in ((world / "ckpt/chameleon/vqgan.ckpt").resolve(), (world / "ckpt/chameleon").resolve()), vq


def answer_files(out):
    """-> (html text, [PNG paths]) of a single answer written by sample.py into out/."""
    page = (out / "answer.html").read_text()
    pngs = sorted(out.glob("answer_image*.png"))
    return page, pngs


@pytest.mark.e2e
def test_sample_with_vqgan(world, stages):
    """Step 3, the README's first command: `sample.py --model out/stage3 --vqgan ckpt/vqgan.ckpt PROMPT`."""
    p = ok(run(REPO / "sample.py", "--model", "out/stage3", "--vqgan", "ckpt/chameleon/vqgan.ckpt", "--greedy",
               "--max-new-tokens", "40", "--out", "samples/draw", PROMPT_DRAW, cwd=world))
    page, pngs = answer_files(world / "samples" / "draw")
    assert len(pngs) >= 1, p.stdout + p.stderr  # stage 1 taught the text head to open an image after PROMPT_DRAW
    assert all(Image.open(f).size == (32, 32) for f in pngs)
    assert f'<img src="{pngs[0].name}"' in page and PROMPT_DRAW in page
    # the closing line names the page, then each PNG
    assert re.search(rf"^\[(finished|stopped at the token budget)\] samples/draw/answer\.html\n  samples/draw/"
                     rf"{pngs[0].name}$", p.stdout, re.M), p.stdout


@pytest.mark.e2e
def test_sample_with_an_input_image(world, stages):
    """The README's second command: `sample.py --model out/stage3 --image photo.jpg PROMPT`, no --vqgan: the
    checkpoint names its VQGAN."""
    p = ok(run(REPO / "sample.py", "--model", "out/stage3", "--image", "images/red_square.png", "--greedy",
               "--max-new-tokens", "40", "--out", "samples/image", "What is this? Draw one in winter.", cwd=world))
    page, pngs = answer_files(world / "samples" / "image")
    assert "What is this? Draw one in winter." in page and "<h3>assistant</h3>" in page
    assert "no VQGAN" not in p.stderr + page
    assert len(pngs) >= 1 and f'<img src="{pngs[0].name}"' in page, p.stdout + p.stderr


@pytest.mark.e2e
def test_moved_output_folder(world, stages):
    """The output folder moved elsewhere (another disk, a copy to another machine) samples with no flag. When the
    base has moved too, sampling stops with one line that names the missing path and --base, and --base mends it."""
    moved = world / "elsewhere" / "runs"
    moved.parent.mkdir()
    shutil.copytree(world / "out", moved)
    ok(run(REPO / "sample.py", "--model", "elsewhere/runs/stage3", "--greedy", "--max-new-tokens", "40",
           "--out", "samples/moved", PROMPT_DRAW, cwd=world))
    _, pngs = answer_files(world / "samples" / "moved")
    assert len(pngs) >= 1  # the VQGAN is found too
    base, away = world / "ckpt" / "InternVL2_5-8B", world / "ckpt" / "InternVL2_5-8B.moved"
    base.rename(away)
    try:
        line = error_line(run(REPO / "sample.py", "--model", "elsewhere/runs/stage3", PROMPT_DRAW, cwd=world))
        assert str(base.resolve()) in line and "--base" in line, line
        ok(run(REPO / "sample.py", "--model", "elsewhere/runs/stage3", "--base", away, "--greedy",
               "--max-new-tokens", "40", "--out", "samples/moved2", PROMPT_DRAW, cwd=world))
        assert len(answer_files(world / "samples" / "moved2")[1]) >= 1
    finally:
        away.rename(base)


@pytest.fixture(scope="module")
def whole_1b(world, cache):
    """The Qwen2 stand-in through stage 1 with --train all: the whole model is trainable, so train.py writes a
    whole checkpoint (no base) with the base's vocab.json + merges.txt beside it."""
    return ok(torchrun("--stage", "1", "--base", "ckpt/InternVL2_5-1B", "--codes", "cache/", *DATA_ALL,
                       "--train", "all", "--out", "out1b/stage1", *TRAIN, *MIX, cwd=world))


@pytest.mark.e2e
def test_qwen2_whole_checkpoint_samples(world, whole_1b):
    d = world / "out1b" / "stage1"
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["format"] == "armor" and cfg["base"] is None
    sd = load_file(d / "model.safetensors")
    assert "vision_model.embeddings.patch_embedding.weight" in sd and "language_model.model.embed_tokens.weight" in sd
    assert (d / "vocab.json").is_file() and (d / "merges.txt").is_file() and (d / "added_tokens.json").is_file()
    # no --vqgan: the checkpoint names it; the tokenizer comes from the checkpoint's own vocab.json + merges.txt
    ok(run(REPO / "sample.py", "--model", "out1b/stage1", "--greedy", "--max-new-tokens", "40", "--out", "samples/1b",
           PROMPT_DRAW, cwd=world))
    page, _ = answer_files(world / "samples" / "1b")
    assert PROMPT_DRAW in page and "<h3>assistant</h3>" in page


# ---------------------------------------------------------------------------------------------------------------------
# What `python armor.py --load DIR` refuses (in-process, plus the CLI's one line)


@pytest.fixture(scope="module")
def qwen_base(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen_base")
    tok = Tokenizer.train_bpe(texts(), 320)
    write_qwen2_tokenizer(tok, d)
    write_base(d, "tiny", Tokenizer.from_dir(d))
    return d


def copy_of(src, dst, drop=(), edit_config=None):
    shutil.copytree(src, dst)
    for f in drop:
        (dst / f).unlink()
    if edit_config:
        cfg = json.loads((dst / "config.json").read_text())
        edit_config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_load_checks_a_good_directory(qwen_base, capsys):
    m = armor.from_internvl(str(qwen_base), armor=False, tokenizer=True)
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and line.endswith(f"; tokenizer vocab.json + merges.txt, {m.config.llm.vocab_size:,} ids")


@pytest.mark.parametrize("case, message", [
    ("another model_type", r"config\.json: model_type 'qwen2', expected 'internvl_chat' \(a released InternVL2\.5 "
                           r"directory\)$"),
    ("no model_type", r"config\.json: model_type None, expected 'internvl_chat'"),
    ("no tokenizer", r": no tokenizer; expected tokenizer\.json, vocab\.json \+ merges\.txt \(Qwen2\) or "
                     r"tokenizer\.model \(InternLM2\) beside config\.json$"),
    ("vocab.json alone", r": no tokenizer \(vocab\.json without its partner\); expected tokenizer\.json"),
    ("a tokenizer of another model", r": the tokenizer \(\d+ tokens, <IMG_CONTEXT> = None\) does not fit config\.json "
                                     r"\(vocab_size \d+, <IMG_CONTEXT> expected at \d+\)$"),
])
def test_load_refuses(qwen_base, tmp_path, case, message):
    d = tmp_path / "base"
    if case == "another model_type":  # e.g. the Qwen2.5-0.5B LLM directory instead of InternVL2_5-1B
        copy_of(qwen_base, d, edit_config=lambda c: c.update(model_type="qwen2"))
    elif case == "no model_type":
        copy_of(qwen_base, d, edit_config=lambda c: c.pop("model_type"))
    elif case == "no tokenizer":
        copy_of(qwen_base, d, drop=("vocab.json", "merges.txt", "added_tokens.json"))
    elif case == "vocab.json alone":
        copy_of(qwen_base, d, drop=("merges.txt",))
    else:  # the 9 InternVL tokens missing: the tokenizer of the bare LLM
        copy_of(qwen_base, d, drop=("added_tokens.json",))
    with pytest.raises(armor.CheckpointError, match=message) as e:
        armor.from_internvl(str(d), armor=False, tokenizer=True, verbose=False)
    assert str(d) in str(e.value) and "\n" not in str(e.value)
    if case == "another model_type":  # refused without tokenizer=True too: it is not an InternVL2.5 directory
        with pytest.raises(armor.CheckpointError, match=message):
            armor.from_internvl(str(d), armor=False, verbose=False)


def test_load_cli_refuses_in_one_line(qwen_base, tmp_path):
    d = copy_of(qwen_base, tmp_path / "base", drop=("vocab.json", "merges.txt"))
    line = error_line(run(REPO / "armor.py", "--load", d, cwd=tmp_path))
    assert line.startswith(f"error: {d}: no tokenizer; expected tokenizer.json"), line


# ---------------------------------------------------------------------------------------------------------------------
# vqgan.py random's pieces


def test_yaml_writer_reads_back_and_refuses_what_taming_cannot_say(tmp_path):
    import vqgan

    for cfg in (vqgan.VQGANConfig(), vqgan.VQGANConfig(ch=32, ch_mult=(1, 2), n_embed=16, embed_dim=8,
                                                       z_channels=8, num_res_blocks=1, resolution=64)):
        (tmp_path / "vqgan.yaml").write_text(vqgan.to_yaml(cfg))
        assert vqgan.VQGANConfig.from_yaml(tmp_path / "vqgan.yaml") == cfg
    with pytest.raises(ValueError, match="num_groups != 32"):
        vqgan.to_yaml(vqgan.VQGANConfig.toy())  # GroupNorm(4): only config.json (save_vqgan) can carry it
    with pytest.raises(SystemExit, match=r"^error: --ch 16 --ch-mult 1,1: widths \[16, 16\] are not multiples of 32"):
        vqgan.main(["random", "--out", str(tmp_path / "bad"), "--ch", "16", "--ch-mult", "1,1"])
    assert not (tmp_path / "bad").exists()


def test_random_vqgan_uses_its_codebook(tmp_path):
    """Different pictures get different codes (a VQGAN at its uniform codebook init sends nearly every cell to a few),
    and the same seed gives the same weights."""
    import vqgan

    cfg = vqgan.VQGANConfig(ch=32, ch_mult=(1, 1, 1, 1), n_embed=64, embed_dim=16, z_channels=16, num_res_blocks=1)
    a, b = vqgan.random_vqgan(cfg, seed=0), vqgan.random_vqgan(cfg, seed=0)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    pics = torch.stack([vqgan.preprocess(picture(c, s), 32) for c in ("red", "green", "blue", "yellow")
                        for s in ("circle", "square")])
    codes = a.encode(pics)
    assert len(codes.unique()) >= 16 and len({tuple(c.flatten().tolist()) for c in codes}) == 8
    vqgan.save_released(a, tmp_path)
    assert torch.equal(vqgan.load_vqgan(tmp_path).encode(pics), codes)
