"""
sample.py where users run it: loading every checkpoint layout, moved folders, bad input up front, chat, outputs.

  python -m pytest tests/test_sample_cli.py -q

Checked:
- load_armor (sample.py and train.py --init) loads whole and partial ARMOR checkpoints with each tokenizer kind:
  tokenizer.json, Qwen2's vocab.json + merges.txt, InternLM2's tokenizer.model; the checkpoint's own tokenizer files
  first, else the base's.
- A moved checkpoint fails in one line naming the missing path, the config.json that named it and the flag to pass
  (sample.py and armor.from_pretrained alike); a checkpoint with no VQGAN is refused, not answered as codes only.
- Each bad input (image, config.json, tokenizer, VQGAN, prompt length, <image> tags) ends before the model loads, in
  one line on stderr naming the file or value, with exit code 2 (command line) or 1 (a file's contents).
- --chat answers turn N as generate() answers the whole conversation (toy model, greedy).
- Outputs are written whole (temporary name, then rename); a rewritten page never sits beside an earlier run's PNGs;
  --n prints no <gen_image> placeholder.
"""

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import sentencepiece as spm
import torch
from PIL import Image

import armor
import sample
from sample import Sampling
from tokenizer import INTERNVL_TOKENS, Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent
TOY = ROOT / "toy"
TEXTS = ["draw a red circle", "here is a blue square", "what colour is the sky? it is blue", "Sure, here it is.",
         "done. the picture shows a sunset over the sea", "You are ARMOR."] * 3


# --- one loader for every checkpoint layout ---------------------------------------------------------------------


def write_qwen2_files(tok, d):
    """A train_bpe tokenizer as Qwen2 ships one: vocab.json + merges.txt, the added tokens in added_tokens.json."""
    d.mkdir(parents=True, exist_ok=True)
    tok.tk.model.save(str(d))
    added = {t.content: i for i, t in tok.tk.get_added_tokens_decoder().items()}
    (d / "added_tokens.json").write_text(json.dumps(added))


def write_internlm2_files(d):
    """A SentencePiece BPE tokenizer.model with the chat markers and the 9 InternVL tokens, as InternVL2.5-2B."""
    buf = io.BytesIO()
    markers = ["<|im_end|>", "<|im_start|>"]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXTS), model_writer=buf, model_type="bpe", vocab_size=400,
                                   byte_fallback=True, hard_vocab_limit=False, num_threads=1, minloglevel=2,
                                   user_defined_symbols=markers)
    d.mkdir(parents=True, exist_ok=True)
    (d / "tokenizer.model").write_bytes(buf.getvalue())
    n = spm.SentencePieceProcessor(model_proto=buf.getvalue()).get_piece_size()
    (d / "added_tokens.json").write_text(json.dumps({t: n + k for k, t in enumerate(INTERNVL_TOKENS)}))


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """Tokenizer directories of the three kinds."""
    root = tmp_path_factory.mktemp("tokenizers")
    tok = Tokenizer.train_bpe(TEXTS, vocab_size=300, out_dir=root / "tokenizer.json")
    write_qwen2_files(tok, root / "qwen2")
    write_internlm2_files(root / "internlm2")
    assert [Tokenizer.kind_in(root / k) for k in ("tokenizer.json", "qwen2", "internlm2")] == \
        ["tokenizer.json", "qwen2", "internlm2"]
    return root


def tiny_model(tok, seed=0):
    cfg = armor.PRESETS["tiny"]()
    cfg.llm.vocab_size, cfg.img_context_id = len(tok), tok.img_context
    torch.manual_seed(seed)
    m = armor.Armor(cfg)
    armor.init_weights(m, std=0.05)
    armor.init_armor(m, seed=seed)
    return m


def copy_tokenizer(src, dst):
    for f in src.iterdir():
        shutil.copyfile(f, dst / f.name)


@pytest.mark.parametrize("kind", ["tokenizer.json", "qwen2", "internlm2"])
@pytest.mark.parametrize("layout", ["whole", "partial", "partial with copies"])
def test_load_armor_reads_every_tokenizer_kind(tokenizers, tmp_path, kind, layout):
    tok_src = tokenizers / kind
    ref = Tokenizer.from_dir(tok_src)
    m = tiny_model(ref)
    base = None
    if layout != "whole":  # the base InternVL2.5 directory holds the tokenizer, as a released one does
        base = tmp_path / "base"
        armor.save_internvl(m, str(base))
        copy_tokenizer(tok_src, base)
    armor.save_pretrained(m, str(tmp_path / "ckpt"), base=None if base is None else str(base))
    if layout != "partial":  # train.py copies the tokenizer files into its output
        copy_tokenizer(tok_src, tmp_path / "ckpt")
    model, tok, ck = sample.load_armor(tmp_path / "ckpt", verbose=False)
    assert ck.tokenizer_dir == (tmp_path / "ckpt" if layout != "partial" else base)
    assert ck.base == base and ck.vqgan is None
    text = "<|im_start|>user\nwhat colour is the sky?<|im_end|>"
    assert tok.encode(text) == ref.encode(text) and tok.img_context == ref.img_context
    for k, v in m.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    # train.py --init goes through the same loader: same tokenizer, its source, and the base for save_pretrained
    import train

    args = SimpleNamespace(stage=2, base=None, init=str(tmp_path / "ckpt"))
    _, ttok, src, tbase = train.build_model(args, "cpu", None, None, verbose=False)
    assert ttok.encode(text) == ref.encode(text) and src == str(ck.tokenizer_dir)
    assert tbase == (None if base is None else str(base))


# --- the toy checkpoint, moved and broken ------------------------------------------------------------------------


@pytest.fixture
def toy(tmp_path):
    """A copy of the shipped toy: armor (partial, "base": "../base", "vqgan": "../vqgan"), base, vqgan."""
    for d in ("armor", "base", "vqgan"):
        shutil.copytree(TOY / d, tmp_path / d)
    return tmp_path


def run_main(argv, capsys, monkeypatch):
    """sample.main in process -> (exit code, stderr). The model must never load: each check comes before it."""
    monkeypatch.setattr(sample, "load_model", lambda *a, **k: pytest.fail("the model loaded before the check"))
    with pytest.raises(SystemExit) as e:
        sample.main(argv)
    err = capsys.readouterr().err
    return e.value.code, err


def one_line(err):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err and len(lines) >= 1 and lines[-1].startswith("error: ")
    return lines[-1]


def test_moved_checkpoint_names_the_missing_path_the_config_and_the_flag(toy, tmp_path, capsys, monkeypatch):
    moved = tmp_path / "elsewhere" / "armor"
    shutil.move(str(toy / "armor"), str(moved))
    cfg = moved / "config.json"
    code, err = run_main(["--model", str(moved), "draw an aurora"], capsys, monkeypatch)
    line = one_line(err)
    assert code == 1 and str(tmp_path / "elsewhere" / "base") in line and str(cfg) in line and "--base DIR" in line
    # armor.from_pretrained (train.py --init) says the same
    with pytest.raises(armor.CheckpointError) as e:
        armor.from_pretrained(str(moved), verbose=False)
    assert str(tmp_path / "elsewhere" / "base") in str(e.value) and str(cfg) in str(e.value)
    assert "--base DIR" in str(e.value)
    # with --base the VQGAN is the next missing path
    code, err = run_main(["--model", str(moved), "--base", str(toy / "base"), "draw an aurora"], capsys, monkeypatch)
    line = one_line(err)
    assert code == 1 and str(tmp_path / "elsewhere" / "vqgan") in line and str(cfg) in line and "--vqgan PATH" in line
    # a missing override is the command line's fault
    code, err = run_main(["--model", str(moved), "--base", str(tmp_path / "nope"), "hi"], capsys, monkeypatch)
    assert code == 2 and str(tmp_path / "nope") in one_line(err) and "--base" in one_line(err)


def test_no_vqgan_is_an_error_not_codes_only(toy, capsys, monkeypatch):
    cfg = toy / "armor" / "config.json"
    meta = json.loads(cfg.read_text())
    del meta["vqgan"]
    cfg.write_text(json.dumps(meta))
    code, err = run_main(["--model", str(toy / "armor"), "draw an aurora"], capsys, monkeypatch)
    line = one_line(err)
    assert code == 2 and "--vqgan PATH" in line and str(cfg) in line and "codes only" not in err


@pytest.mark.parametrize("case", ["missing image", "not an image", "truncated image", "garbage config",
                                  "missing config", "missing tokenizer", "garbage tokenizer", "missing vqgan weights",
                                  "garbage vqgan", "prompt too long", "too many image tags", "bad flag value"])
def test_bad_input_ends_in_one_line_before_the_model_loads(case, toy, capsys, monkeypatch):
    png = toy / "in.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(png)
    ck = toy / "armor"
    argv, prompt, named = [], "draw an aurora", None
    if case == "missing image":
        argv, named, want = ["--image", str(toy / "nope.png")], toy / "nope.png", 2
    elif case == "not an image":
        (toy / "notes.png").write_text("not a picture")
        argv, named, want = ["--image", str(toy / "notes.png")], toy / "notes.png", 1
    elif case == "truncated image":
        data = png.read_bytes()
        (toy / "cut.png").write_bytes(data[:len(data) // 2])
        argv, named, want = ["--image", str(toy / "cut.png")], toy / "cut.png", 1
    elif case == "garbage config":
        (ck / "config.json").write_bytes(b"\xff\xfe garbage")
        named, want = ck / "config.json", 1
    elif case == "missing config":
        (ck / "config.json").unlink()
        named, want = ck, 1
    elif case == "missing tokenizer":
        (toy / "base" / "tokenizer.json").unlink()
        named, want = toy / "base", 1
    elif case == "garbage tokenizer":
        (toy / "base" / "tokenizer.json").write_text("{ not json")
        named, want = toy / "base", 1
    elif case == "missing vqgan weights":
        (toy / "vqgan" / "model.safetensors").unlink()
        named, want = toy / "vqgan", 1
    elif case == "garbage vqgan":
        (toy / "vqgan" / "model.safetensors").write_bytes(b"\x00" * 100)
        named, want = toy / "vqgan", 1
    elif case == "prompt too long":
        meta = json.loads((ck / "config.json").read_text())
        meta["armor"]["llm"]["max_position_embeddings"] = 600  # the toy's context, made small
        (ck / "config.json").write_text(json.dumps(meta))
        prompt, named, want = "draw an aurora " * 100, "--max-new-tokens 512", 2
    elif case == "too many image tags":
        argv, prompt, named, want = ["--image", str(png)], "<image> and <image>: which is red?", "2 <image> tag", 2
    else:
        argv, named, want = ["--n", "two"], "--n", 2
    code, err = run_main(["--model", str(ck), "--out", str(toy / "out")] + argv + [prompt], capsys, monkeypatch)
    line = one_line(err)
    assert code == want and str(named) in line, line
    assert not (toy / "out").exists()  # nothing written either


@pytest.mark.e2e
def test_bad_input_in_a_subprocess_has_no_traceback(toy):
    (toy / "notes.png").write_text("not a picture")
    (toy / "armor" / "config.json").write_bytes(b"\xff" * 10)
    for argv, want, named in ((["--image", str(toy / "notes.png")], 1, toy / "notes.png"), ([], 1, "config.json")):
        r = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--model", str(toy / "armor")] + argv + ["hi"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == want and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and str(named) in r.stderr, r.stderr


# --- chat, outputs -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy_model():
    return sample.load(TOY / "armor")


GREEDY = dict(max_new_tokens=80, text=Sampling(0.0), image=Sampling(0.0), cfg=1.5, seed=0)


def test_chat_turn_answers_as_the_whole_conversation(toy_model, tmp_path, capsys):
    model, tok, vq = toy_model
    ck = sample.read_checkpoint(TOY / "armor")
    lines = iter(["draw an aurora", "what colour is the sky?", "draw a red circle", ""])
    history = sample.chat(model, tok, sample.Writer(tmp_path, vq, ["chat"]), [], GREEDY, ck,
                          read=lambda prompt: next(lines))
    assert [m["role"] for m in history] == ["user", "assistant"] * 3
    assert len(history[1]["codes"]) == 1  # the first answer is an image, carried as its codes
    for n in (1, 3, 5):  # each turn equals generate() on the conversation up to it, sent whole
        (a,) = sample.generate(model, tok, [history[:n]], **GREEDY)
        assert a.text == history[n]["content"] and len(a.images) == len(history[n]["codes"])
        assert all(torch.equal(x, y) for x, y in zip(a.images, history[n]["codes"]))
    page = (tmp_path / "chat.html").read_text()
    assert page.count("<h3>user</h3>") == 3 and "what colour is the sky?" in page


def test_outputs_whole_and_no_stale_images(toy, capsys, monkeypatch):
    out = toy / "out"
    out.mkdir()
    for stale in ("answer_image0.png", "answer_image1.png", "answer.html"):
        (out / stale).write_text("an earlier run's")
    (out / "keep.png").write_text("not ours")
    writes = []
    real = sample.os.replace
    monkeypatch.setattr(sample.os, "replace", lambda a, b: writes.append((Path(a), Path(b))) or real(a, b))
    sample.main(["--model", str(toy / "armor"), "--out", str(out), "--greedy", "--max-new-tokens", "80",
                 "what colour is the sky?"])
    assert sorted(p.name for p in out.iterdir()) == ["answer.html", "keep.png"]  # a text answer: no PNG left over
    assert [b.name for a, b in writes] == ["answer.html"] and writes[0][0].parent == out
    assert not any(p.name.endswith(".tmp") for p in out.iterdir())
    sample.main(["--model", str(toy / "armor"), "--out", str(out), "--greedy", "--max-new-tokens", "80",
                 "draw an aurora"])
    assert sorted(p.name for p in out.iterdir()) == ["answer.html", "answer_image0.png", "keep.png"]
    assert Image.open(out / "answer_image0.png").size == (64, 64)
    assert [b.name for a, b in writes[1:]] == ["answer_image0.png", "answer.html"]


def test_an_answer_image_read_back_into_the_next_question(toy, toy_model, capsys):
    """The README's second command reads the first one's picture from samples/: the run's clean-up of its own earlier
    PNGs must not take the input image away before it is read."""
    out = toy / "out"
    sample.main(["--model", str(toy / "armor"), "--out", str(out), "--greedy", "--max-new-tokens", "80",
                 "draw an aurora"])
    drawn = Image.open(out / "answer_image0.png").copy()
    capsys.readouterr()
    sample.main(["--model", str(toy / "armor"), "--out", str(out), "--greedy", "--max-new-tokens", "40",
                 "--image", str(out / "answer_image0.png"), "what is in this picture?"])
    model, tok, _ = toy_model
    (a,) = sample.generate(model, tok, [[{"role": "user", "content": "what is in this picture?"}]], [[drawn]],
                           **{**GREEDY, "max_new_tokens": 40})
    assert a.text and a.text in capsys.readouterr().out  # the answer about the drawn picture, not an error


def test_n_answers_print_no_placeholder_token(toy, capsys):
    sample.main(["--model", str(toy / "armor"), "--out", str(toy / "out"), "--n", "2", "--greedy",
                 "--max-new-tokens", "80", "draw an aurora"])
    out = capsys.readouterr().out
    assert "<gen_image>" not in out and out.count("--- answer") == 2
    assert f"[image: {toy / 'out' / 'answer0_image0.png'}]" in out


def test_special_token_text_is_not_shown(toy_model, tmp_path):
    _, tok, vq = toy_model
    w = sample.Writer(tmp_path, vq, ["answer"], sample.visible(tok))
    w.paths[0] = [tmp_path / "answer_image0.png"]
    segments = ["Sure<|endoftext|>, here", torch.zeros(8, 8, dtype=torch.long), "<|im_start|>done"]
    assert w.shown(0, segments) == f"Sure, here[image: {tmp_path / 'answer_image0.png'}]done"
    assert "endoftext" not in w.html(0, [("assistant", segments)]).read_text()
