"""tokenizer.py against reference tokenizers, all trained inside the test (no downloads):

- Qwen2 path: a byte-level BPE from `Tokenizer.train_bpe`, written out as the slow-file trio vocab.json + merges.txt
  + added_tokens.json, then compared with transformers' Qwen2Tokenizer loaded from those files and with the original
  slow (pure Python) Qwen2 algorithm written out below.
- InternLM2 path: SentencePiece BPE models with byte fallback trained with sentencepiece, laid out like InternVL2.5-2B
  (tokenizer.model + added_tokens.json + tokenizer_config.json renaming placeholder pieces to the chat markers),
  compared with sentencepiece the way HF's slow tokenizer calls it (split on added tokens, encode each chunk, BOS).
- The internvl2_5 chat template and the image placeholder expansion against hand-written strings.

  python -m pytest tests/test_tokenizer.py
"""
import json
import random
import re
import unicodedata

import pytest
import regex

from conftest import write_internlm2_tokenizer, write_qwen2_tokenizer
from tokenizer import QWEN2_SPLIT_REGEX, SYSTEM_MESSAGE, Tokenizer, build_prompt, expand_images

# ---- text ------------------------------------------------------------------------------------------------------------
WORDS = ("the quick brown fox jumps over lazy dog image model token vision language draw picture of a cat sitting on "
         "mat red blue green large small window house tree river mountain sky cloud").split()
WORDS_ZH = ["图片", "一只猫", "坐在", "垫子上", "红色的", "大模型", "视觉", "语言", "你好", "世界", "这是", "什么", "画一幅",
            "山和河流"]
WORDS_MISC = ["café", "naïve", "Zürich", "Ångström", "résumé", "12345", "3.14159", "2024-12-17", "x_1", "def", "f(x)",
              "return", "{'a': 1}", "[1, 2, 3]", "C++", "e-mail", "don't", "it's", "we'll", "😀", "🐱", "→", "©"]
SYLLABLES = ["ka", "lo", "mi", "tra", "ven", "sto", "qu", "ix", "ber", "on", "el", "ash"]


def sentence(rng):
    words = []
    for _ in range(rng.randint(3, 14)):
        r = rng.random()
        words.append(rng.choice(WORDS) if r < .5 else rng.choice(WORDS_ZH) if r < .65 else rng.choice(WORDS_MISC)
                     if r < .8 else "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4))))
    out = words[0]
    for w in words[1:]:
        out += rng.choice([" "] * 8 + ["  ", "\n", "\t", ", ", ". "]) + w
    return out


def corpus(n, seed):
    rng = random.Random(seed)
    return [sentence(rng) for _ in range(n)]


TEXTS = [
    "Hello, world!", "The quick brown fox jumps over the lazy dog.", "  leading and trailing  ", "a  b   c    d",
    "tabs\tand\nnewlines\n\n\nend\r\n", "\n", " ", "", "x",
    "def f(x):\n    return x ** 2  # square\n", "for (int i = 0; i < 10; ++i) { sum += a[i]; }",
    "Numbers: 1234567890, 3.14159, -42, 1e-5, 2024-12-17", "don't I'll we've they're it's HE'S",
    "你好，世界！这是一张图片。", "画一幅山和河流的画", "日本語のテキストも少し。", "한국어 텍스트",
    "emoji 😀🐱🦄 and flags 🇨🇳🇺🇸", "café naïve Zürich Ångström résumé", "e\u0301 vs é", "ﬁ ① Ⅻ full\u3000width",
    "<|im_start|>user\nDescribe this image.<|im_end|>\n<|im_start|>assistant\n",
    "<img><IMG_CONTEXT><IMG_CONTEXT><IMG_CONTEXT></img>\nWhat is in the picture?",
    "<img>x</img><ref>cat</ref><box>[[1, 2, 3, 4]]</box><quad></quad>",
    "not special: <im_start> <|im_start <IMG_CONTEX", "<|endoftext|>after", " <img> spaced </img> ",
    "mixed 中英 text with 123 numbers 和 标点。", "\u200bzero\u200d", "\x01\x7f",
]
FUZZ_POOL = (list("abcxyz XYZ019.,'!?-_") + [" ", "  ", "\n", "\t", "\r\n"] + list("猫图片你好世界。") +
             ["😀", "🦄", "ꙮ", "é", "e\u0301", "ﬁ", "①", "\u3000", "Ⅻ", "\u200b"] + WORDS[:12] + SYLLABLES +
             ["<img>", "</img>", "<IMG_CONTEXT>", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<s>", "</s>",
              "<box>"])


def fuzz(n, seed):
    rng = random.Random(seed)
    return ["".join(rng.choice(FUZZ_POOL) for _ in range(rng.randint(0, 25))) for _ in range(n)]


CHECK_TEXTS = TEXTS + fuzz(300, seed=1) + corpus(200, seed=2)


# ---- Qwen2 byte-level BPE ----------------------------------------------------------------------------------------
def bytes_to_unicode():
    """GPT-2's byte -> printable character table used by the slow Qwen2 tokenizer: printable Latin-1 bytes map to
    themselves, the other bytes to chr(256), chr(257), ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, n = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + n)
            n += 1
    return table


class SlowQwen2:
    """The original slow Qwen2Tokenizer algorithm: NFC, split on added tokens, the Qwen2 regex, bytes -> unicode,
    then greedy BPE by merge rank (merging every occurrence of the best pair at once)."""

    def __init__(self, d):
        self.vocab = json.loads((d / "vocab.json").read_text("utf-8"))
        lines = [ln for ln in (d / "merges.txt").read_text("utf-8").split("\n") if ln and not ln.startswith("#")]
        self.ranks = {tuple(ln.split(" ")): i for i, ln in enumerate(lines)}
        self.added = json.loads((d / "added_tokens.json").read_text("utf-8"))
        self.split = regex.compile("(" + "|".join(map(regex.escape, sorted(self.added, key=len, reverse=True))) + ")")
        self.pat = regex.compile(QWEN2_SPLIT_REGEX)
        self.byte_encoder = bytes_to_unicode()

    def bpe(self, token):
        word = list(token)
        while len(word) > 1:
            pairs = [(word[i], word[i + 1]) for i in range(len(word) - 1)]
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            new, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    new.append(word[i] + word[i + 1])
                    i += 2
                else:
                    new.append(word[i])
                    i += 1
            word = new
        return word

    def encode(self, text):
        ids = []
        for part in self.split.split(unicodedata.normalize("NFC", text)):
            if part in self.added:
                ids.append(self.added[part])
                continue
            for tok in self.pat.findall(part):
                ids += [self.vocab[p] for p in self.bpe("".join(self.byte_encoder[b] for b in tok.encode("utf-8")))]
        return ids


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    trio, saved = tmp_path_factory.mktemp("qwen_trio"), tmp_path_factory.mktemp("qwen_saved")
    tok = Tokenizer.train_bpe(corpus(3000, seed=0), vocab_size=1500, out_dir=saved)  # writes tokenizer.json
    added = write_qwen2_tokenizer(tok, trio)  # vocab.json + merges.txt + added_tokens.json, as Qwen2 ships them
    return tok, trio, saved, added


def test_bytes_to_unicode_table():
    table = bytes_to_unicode()
    assert len(set(table.values())) == 256 and table[ord("A")] == "A" and table[ord(" ")] == "Ġ"
    assert table[ord("\n")] == "Ċ"


def test_qwen2_matches_transformers_and_slow_reference(qwen):
    from transformers import Qwen2Tokenizer
    trained, trio, saved, added = qwen
    ours, reloaded = Tokenizer.from_dir(trio), Tokenizer.from_dir(saved)
    hf = Qwen2Tokenizer.from_pretrained(str(trio))
    slow = SlowQwen2(trio)
    assert len(ours) == len(trained) == len(reloaded) == len(hf) == max(added.values()) + 1
    assert len(trained) > 1200  # the corpus filled most of the 1500 (a vocabulary of bytes only would prove little)
    for text in CHECK_TEXTS:
        want = slow.encode(text)
        assert hf.encode(text) == want, text
        assert ours.encode(text) == want, text
        assert trained.encode(text) == want, text
        assert reloaded.encode(text) == want, text
        assert ours.decode(want) == unicodedata.normalize("NFC", text), text
    specials = ["<|im_start|>", "<img>", "<IMG_CONTEXT>", "</img>"]
    assert ours.encode("".join(specials)) == [added[t] for t in specials]
    assert ours.decode(ours.encode("a<img>b"), skip_special=True) == "ab"


def test_qwen2_special_ids(qwen):
    _, trio, _, added = qwen
    tok = Tokenizer.from_dir(trio)
    assert (tok.img_start, tok.img_end, tok.img_context) == (added["<img>"], added["</img>"], added["<IMG_CONTEXT>"])
    assert (tok.im_start, tok.im_end, tok.eos, tok.pad) == (added["<|im_start|>"], added["<|im_end|>"],
                                                            added["<|im_end|>"], added["<|endoftext|>"])
    assert tok.bos is None and tok.encode("") == []
    assert tok.token_to_id("</box>") == added["</box>"]
    with pytest.raises(KeyError, match="not in the vocabulary"):
        tok.token_to_id("<imgbos>")
    # an added token whose id does not follow the base vocabulary is refused, naming the token
    bad = dict(added, **{"</box>": added["</box>"] + 5})
    (trio / "added_tokens.json").write_text(json.dumps(bad))
    try:
        with pytest.raises(ValueError, match="</box>"):
            Tokenizer.from_dir(trio)
    finally:
        (trio / "added_tokens.json").write_text(json.dumps(added))


# ---- InternLM2 SentencePiece BPE --------------------------------------------------------------------------------
SP_VARIANTS = {
    # what InternLM2 is thought to use (prepend_scheme "never"); also carries a user-defined piece
    "no_dummy_prefix": dict(normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
                            user_defined_symbols=["<|user_sym|>"]),
    "dummy_prefix": dict(normalization_rule_name="identity", add_dummy_prefix=True, remove_extra_whitespaces=False),
    # sentencepiece's defaults: nmt_nfkc charsmap, dummy prefix, whitespace squeezing
    "sp_defaults": dict(),
}


@pytest.fixture(scope="module", params=list(SP_VARIANTS))
def internlm2(request, tmp_path_factory):
    """tokenizer.model + added_tokens.json + tokenizer_config.json laid out like InternVL2.5-2B: the chat markers
    are placeholder pieces renamed by tokenizer_config.json, the 9 InternVL tokens follow the vocabulary."""
    d = tmp_path_factory.mktemp(f"internlm2_{request.param}")
    sp, ids = write_internlm2_tokenizer(d, corpus(3000, seed=0), vocab_size=1500, **SP_VARIANTS[request.param])
    return sp, d, ids, request.param


def sp_reference(sp, specials, text):
    """HF's slow InternLM2 tokenizer: split on the added tokens, sentencepiece on each chunk, BOS in front."""
    ids = [1]
    for part in re.split("(" + "|".join(map(re.escape, sorted(specials, key=len, reverse=True))) + ")", text):
        ids += [specials[part]] if part in specials else sp.encode(part)
    return ids


def test_internlm2_matches_sentencepiece(internlm2):
    sp, d, specials, variant = internlm2
    tok = Tokenizer.from_dir(d)
    assert sp.get_piece_size() > 1200
    texts = CHECK_TEXTS + ["<|user_sym|>", "a<|user_sym|>b c"] * (variant == "no_dummy_prefix")
    n_fallback = 0
    for text in texts:
        want = sp_reference(sp, specials, text)
        assert tok.encode(text) == want, text
        n_fallback += any(sp.id_to_piece(i).startswith("<0x") for i in want[1:] if i < sp.get_piece_size())
        if not any(t in text for t in specials):
            assert tok.decode(want, skip_special=True) == sp.decode(want[1:]), text
    assert n_fallback > 20  # unseen characters went through byte fallback
    reloaded = Tokenizer.from_dir(_saved(tok, d))
    assert all(reloaded.encode(t) == tok.encode(t) for t in texts) and reloaded.bos == 1


def _saved(tok, d):
    out = d / "saved"
    tok.save(out)
    return out


def test_read_sentencepiece_model_matches_protobuf(internlm2):
    from sentencepiece import sentencepiece_model_pb2

    from tokenizer import _read_sentencepiece_model
    _, d, _, _ = internlm2
    data = (d / "tokenizer.model").read_bytes()
    ours, ref = _read_sentencepiece_model(data), sentencepiece_model_pb2.ModelProto.FromString(data)
    assert [(p["piece"], p["score"], p["type"]) for p in ours["pieces"]] == \
        [(p.piece, p.score, p.type) for p in ref.pieces]
    t, n = ref.trainer_spec, ref.normalizer_spec
    assert (ours["model_type"], ours["byte_fallback"], ours["bos_id"], ours["treat_whitespace_as_suffix"]) == \
        (t.model_type, t.byte_fallback, t.bos_id, t.treat_whitespace_as_suffix)
    assert (ours["charsmap"], ours["add_dummy_prefix"], ours["remove_extra_whitespaces"], ours["escape_whitespaces"]) \
        == (n.precompiled_charsmap, n.add_dummy_prefix, n.remove_extra_whitespaces, n.escape_whitespaces)


def test_internlm2_special_ids(internlm2):
    sp, d, ids, _ = internlm2
    tok = Tokenizer.from_dir(d)
    n = sp.get_piece_size()
    assert len(tok) == n + 9 and tok.bos == 1 and tok.pad == 2
    assert (tok.img_start, tok.img_end, tok.img_context) == (n, n + 1, n + 2)
    assert (tok.im_start, tok.im_end, tok.eos) == (ids["<|im_start|>"], ids["<|im_end|>"], ids["<|im_end|>"])
    assert tok.encode("") == [1]
    assert tok.encode("<|im_start|>") == [1, ids["<|im_start|>"]]


# ---- errors ---------------------------------------------------------------------------------------------------
def test_from_dir_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(ValueError, match="leaves no room"):
        Tokenizer.train_bpe(["abc"], vocab_size=200)


# ---- chat template and image placeholders -------------------------------------------------------------------------
SYS = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"


def test_build_prompt():
    assert SYSTEM_MESSAGE == SYS
    assert build_prompt([{"role": "user", "content": "<image>\nWhat is this?"}]) == (
        f"<|im_start|>system\n{SYS}<|im_end|>\n<|im_start|>user\n<image>\nWhat is this?<|im_end|>\n"
        f"<|im_start|>assistant\n")
    turns = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
             {"role": "user", "content": "q2"}]
    assert build_prompt(turns, system_message="Be brief.") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nq1<|im_end|>\n<|im_start|>assistant\na1<|im_end|>\n"
        "<|im_start|>user\nq2<|im_end|>\n<|im_start|>assistant\n")
    assert build_prompt(turns[:2], "S", add_generation_prompt=False) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nq1<|im_end|>\n<|im_start|>assistant\na1<|im_end|>\n")
    with pytest.raises(ValueError, match="role"):
        build_prompt([{"role": "system", "content": "x"}])


def test_expand_images():
    ctx = "<IMG_CONTEXT>"
    assert expand_images("What is this?", [2], tokens_per_tile=3) == "<img>" + ctx * 6 + "</img>\nWhat is this?"
    assert expand_images("A <image> and B <image>.", [1, 2], 2) == f"A <img>{ctx * 2}</img> and B <img>{ctx * 4}</img>."
    assert expand_images("no images", []) == "no images"
    assert expand_images("q", [13]).count(ctx) == 3328  # 1024x768 with max_num 12: 4x3 + thumbnail
    for text, tiles in [("<image>", []), ("x", [1, 1]), ("<image><image>", [1])]:
        with pytest.raises(ValueError, match="placeholder"):
            expand_images(text, tiles)


def test_prompt_tokenizes_to_image_block(qwen, internlm2):
    _, trio, _, _ = qwen
    _, d, _, _ = internlm2
    for tok in (Tokenizer.from_dir(trio), Tokenizer.from_dir(d)):
        prompt = build_prompt([{"role": "user", "content": expand_images("Describe it.", [2], tokens_per_tile=4)}])
        ids = tok.encode(prompt)
        head = [tok.bos] if tok.bos is not None else []
        assert ids[:len(head) + 1] == head + [tok.im_start]
        s = ids.index(tok.img_start)
        assert ids[s + 1:s + 9] == [tok.img_context] * 8 and ids[s + 9] == tok.img_end
        assert ids.count(tok.img_context) == 8
    qwen_tok = Tokenizer.from_dir(trio)  # byte-level BPE: the prompt decodes back exactly
    assert qwen_tok.decode(qwen_tok.encode(prompt)) == prompt
