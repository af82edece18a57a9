"""Tokenizers and the InternVL2.5 chat prompt, on the `tokenizers` library alone (no sentencepiece at run time).

Three kinds of tokenizer directory load through `Tokenizer.from_dir`, tried in this order:
  tokenizer.json                      -> loaded as is (what `Tokenizer.save` writes, or a converted Hub copy)
  vocab.json + merges.txt             -> Qwen2 byte-level BPE (InternVL2.5-1B / 4B)
  tokenizer.model                     -> InternLM2 SentencePiece BPE with byte fallback (InternVL2.5-2B / 8B),
                                         read with a small protobuf reader and rebuilt as a `tokenizers` BPE
Added tokens come from added_tokens.json and tokenizer_config.json's added_tokens_decoder (InternLM2 keeps its chat
markers there). The toy world trains its own Qwen2-style tokenizer with `Tokenizer.train_bpe`.

  python tokenizer.py /path/to/InternVL2_5-2B "<|im_start|>user\nHello<|im_end|>"   # ids, pieces, decode
  python -m pytest tests/test_tokenizer.py                                           # parity with references
"""
import argparse
import json
import struct
import sys
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# InternVL appends these 9 tokens to the LLM's vocabulary, in this order (GH train/constants.py, finetune token_list)
INTERNVL_TOKENS = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]
# the Qwen2 pre-tokenizer regex (transformers tokenization_qwen2.py): contractions, letter runs, single digits, ...
QWEN2_SPLIT_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                     r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the ids the model code needs. encode() recognises special tokens in the text
    as single ids and prepends BOS where the family does (InternLM2); Qwen2 adds nothing."""

    def __init__(self, tk: HFTokenizer):
        self.tk = tk
        self.img_start = tk.token_to_id("<img>")
        self.img_end = tk.token_to_id("</img>")
        self.img_context = tk.token_to_id("<IMG_CONTEXT>")
        self.im_start = tk.token_to_id("<|im_start|>")
        self.im_end = tk.token_to_id("<|im_end|>")
        # BOS lives in the post-processor (InternLM2 adds `<s>`, Qwen2 nothing), so encoding "" shows it
        empty = tk.encode("").ids
        self.bos = empty[0] if empty else None
        # chat() stops generation at <|im_end|>, for both families (InternVL's chat(): eos_token_id)
        self.eos = self.im_end
        # Qwen2 pads with <|endoftext|>, InternLM2 with </s> (id 2)
        self.pad = tk.token_to_id("<|endoftext|>") if tk.token_to_id("<|endoftext|>") is not None \
            else tk.token_to_id("</s>")

    # ---------------------------------------------------------------------------------------------------------------
    @staticmethod
    def kind_in(path) -> str | None:
        """Which tokenizer files from_dir would read in path ("tokenizer.json", "qwen2", "internlm2"), None if none."""
        path = Path(path)
        if (path / "tokenizer.json").is_file():
            return "tokenizer.json"
        if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            return "qwen2"
        if (path / "tokenizer.model").is_file():
            return "internlm2"
        return None

    @classmethod
    def from_dir(cls, path) -> "Tokenizer":
        path = Path(path)
        kind = cls.kind_in(path)
        if kind == "tokenizer.json":
            return cls(HFTokenizer.from_file(str(path / "tokenizer.json")))
        if kind == "qwen2":
            return cls(_qwen2_from_files(path))
        if kind == "internlm2":
            return cls(_sentencepiece_bpe_from_file(path))
        raise FileNotFoundError(f"{path}: no tokenizer found; expected tokenizer.json, vocab.json + merges.txt "
                                f"(Qwen2) or tokenizer.model (InternLM2 SentencePiece)")

    @classmethod
    def train_bpe(cls, texts, vocab_size: int, out_dir=None) -> "Tokenizer":
        """Train the toy world's tokenizer: a Qwen2-style byte-level BPE (same normalizer, pre-tokenizer and decoder
        as the Qwen2 files path), then the 3 Qwen specials and the 9 InternVL tokens appended after the learned
        vocabulary. vocab_size counts everything; a small corpus may run out of merges and stop short of it."""
        specials = QWEN_SPECIALS + INTERNVL_TOKENS
        n_learned = vocab_size - len(specials)
        if n_learned <= 256:
            raise ValueError(f"vocab_size {vocab_size} leaves no room for merges: need > {256 + len(specials)} "
                             f"(256 byte symbols + {len(specials)} special tokens)")
        tk = _qwen2_pipeline(BPE(unk_token=None, byte_fallback=False))
        trainer = BpeTrainer(vocab_size=n_learned, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                             special_tokens=[], show_progress=False)
        tk.train_from_iterator(texts, trainer)
        tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
        tok = cls(tk)
        if out_dir is not None:
            tok.save(out_dir)
        return tok

    def save(self, out_dir):
        """Write tokenizer.json; BOS handling is inside it (post-processor), so from_dir(out_dir) gives the same ids."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.tk.save(str(out_dir / "tokenizer.json"))

    # ---------------------------------------------------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Ids of text; add_bos=False leaves out InternLM2's BOS (for a piece that continues a sequence)."""
        return self.tk.encode(text, add_special_tokens=add_bos).ids

    def decode(self, ids, skip_special: bool = False) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special)

    def token_to_id(self, tok: str) -> int:
        i = self.tk.token_to_id(tok)
        if i is None:
            raise KeyError(f"token {tok!r} is not in the vocabulary")
        return i

    def __len__(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)


# -------------------------------------------------------------------------------------------------------------------
# Qwen2 byte-level BPE (transformers models/qwen2/tokenization_qwen2.py)

def _qwen2_pipeline(model: BPE) -> HFTokenizer:
    tk = HFTokenizer(model)
    tk.normalizer = normalizers.NFC()
    # the regex split does the word boundaries, so ByteLevel only maps bytes to its printable alphabet
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    return tk  # no post-processor: Qwen2 adds no BOS/EOS


def _qwen2_from_files(path: Path) -> HFTokenizer:
    vocab = json.loads((path / "vocab.json").read_text(encoding="utf-8"))
    merges = []
    for n, line in enumerate((path / "merges.txt").read_text(encoding="utf-8").split("\n"), 1):
        if not line or line.startswith("#version"):
            continue
        pair = line.split(" ")
        if len(pair) != 2:
            raise ValueError(f"{path / 'merges.txt'}:{n}: expected two space-separated symbols, got {line!r}")
        merges.append((pair[0], pair[1]))
    tk = _qwen2_pipeline(BPE(vocab, merges, unk_token=None, byte_fallback=False))
    _add_tokens(tk, _read_added_tokens(path), path)
    return tk


def _read_added_tokens(path: Path) -> dict[int, str]:
    """id -> content, from added_tokens.json ({content: id}) and tokenizer_config.json's added_tokens_decoder
    ({id: {content: ...}}); the two must agree where both name an id."""
    added: dict[int, str] = {}
    sources = []
    if (path / "added_tokens.json").is_file():
        sources.append(("added_tokens.json", {int(i): t for t, i in
                                              json.loads((path / "added_tokens.json").read_text("utf-8")).items()}))
    if (path / "tokenizer_config.json").is_file():
        cfg = json.loads((path / "tokenizer_config.json").read_text("utf-8"))
        sources.append(("tokenizer_config.json",
                        {int(i): d["content"] for i, d in cfg.get("added_tokens_decoder", {}).items()}))
    for name, tokens in sources:
        for i, t in tokens.items():
            if added.get(i, t) != t:
                raise ValueError(f"{path / name}: id {i} is {t!r} but another file says {added[i]!r}")
            added[i] = t
    return added


def _add_tokens(tk: HFTokenizer, added: dict[int, str], path: Path, plain: frozenset = frozenset()):
    """Add tokens matched whole in the text; those in `plain` stay ordinary text for decode(skip_special=True)."""
    # tokenizers hands out ids in call order after the model's vocabulary, so add in id order, then check every id
    for i in sorted(added):
        t = added[i]
        if t in plain:
            tk.add_tokens([AddedToken(t, special=False, normalized=False)])
        else:
            tk.add_special_tokens([AddedToken(t, special=True, normalized=False)])
    for i, t in sorted(added.items()):
        if tk.token_to_id(t) != i:
            raise ValueError(f"{path}: added token {t!r} should have id {i} but got {tk.token_to_id(t)} "
                             f"(base vocabulary has {tk.get_vocab_size(with_added_tokens=False)} entries)")


# -------------------------------------------------------------------------------------------------------------------
# SentencePiece BPE (InternLM2) without sentencepiece: read the ModelProto, rebuild it as a `tokenizers` BPE.
# Field numbers from sentencepiece_model.proto.

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SP_BPE = 2


def _proto_fields(buf: bytes):
    """Yield (field number, value) for one protobuf message: varints as int, fixed32 / length-delimited as bytes."""
    def varint(i):
        v = shift = 0
        while True:
            b = buf[i]
            v |= (b & 0x7F) << shift
            i += 1
            if b < 0x80:
                return v, i
            shift += 7
    i = 0
    while i < len(buf):
        key, i = varint(i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            val, i = varint(i)
        elif wire == 1:
            val, i = buf[i:i + 8], i + 8
        elif wire == 2:
            n, i = varint(i)
            val, i = buf[i:i + n], i + n
        elif wire == 5:
            val, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"tokenizer.model: unsupported protobuf wire type {wire} (field {num})")
        yield num, val


def _read_sentencepiece_model(data: bytes) -> dict:
    """The parts of ModelProto a BPE encoder needs, with proto2 defaults for absent fields."""
    m = dict(pieces=[], model_type=1, byte_fallback=False, bos_id=1, treat_whitespace_as_suffix=False,
             charsmap=b"", add_dummy_prefix=True, remove_extra_whitespaces=True, escape_whitespaces=True)
    for num, val in _proto_fields(data):
        if num == 1:  # repeated SentencePiece {piece = 1, score = 2, type = 3}
            p = dict(piece="", score=0.0, type=NORMAL)
            for n, v in _proto_fields(val):
                if n == 1:
                    p["piece"] = v.decode("utf-8")
                elif n == 2:
                    p["score"] = struct.unpack("<f", v)[0]
                elif n == 3:
                    p["type"] = v
            m["pieces"].append(p)
        elif num == 2:  # TrainerSpec
            for n, v in _proto_fields(val):
                if n == 3:
                    m["model_type"] = v
                elif n == 35:
                    m["byte_fallback"] = bool(v)
                elif n == 41:
                    m["bos_id"] = v - (1 << 64) if v >= 1 << 63 else v  # int32 -1 comes as a 10-byte varint
                elif n == 24:
                    m["treat_whitespace_as_suffix"] = bool(v)
        elif num == 3:  # NormalizerSpec
            for n, v in _proto_fields(val):
                if n == 2:
                    m["charsmap"] = v
                elif n == 3:
                    m["add_dummy_prefix"] = bool(v)
                elif n == 4:
                    m["remove_extra_whitespaces"] = bool(v)
                elif n == 5:
                    m["escape_whitespaces"] = bool(v)
    return m


def _sentencepiece_bpe_from_file(path: Path) -> HFTokenizer:
    file = path / "tokenizer.model"
    m = _read_sentencepiece_model(file.read_bytes())
    if m["model_type"] != SP_BPE:
        raise ValueError(f"{file}: model_type {m['model_type']} is not BPE ({SP_BPE}); only SentencePiece BPE "
                         f"(InternLM2) is supported")
    if m["treat_whitespace_as_suffix"] or not m["escape_whitespaces"]:
        raise ValueError(f"{file}: treat_whitespace_as_suffix / escape_whitespaces=False are not supported")
    pieces = m["pieces"]
    names = [p["piece"] for p in pieces]
    types = [p["type"] for p in pieces]
    added = _read_added_tokens(path)
    # InternLM2 keeps its chat markers as placeholder pieces in tokenizer.model and renames them in
    # tokenizer_config.json (e.g. 92543 -> <|im_start|>); like GH's InternLM2Converter, rename in place.
    for i, t in added.items():
        if i < len(pieces):
            names[i], types[i] = t, CONTROL
    vocab = {t: i for i, t in enumerate(names)}
    if len(vocab) != len(names):
        raise ValueError(f"{file}: duplicate pieces in the vocabulary")

    # SentencePiece BPE stores no merge list. Its encoder starts from characters and repeatedly joins the adjacent
    # pair whose concatenation is the best-scoring piece (leftmost first on equal scores). A `tokenizers` BPE joins
    # the pair of lowest merge rank, so list every split (left, right) of every piece the encoder can build, ranked
    # by the built piece's score, best first. Only normal pieces take part: control/byte/unknown pieces are never
    # the result of a merge, and user-defined ones are matched whole (they become added tokens below). Not
    # reproduced: sentencepiece's UNUSED pieces (merged, then split back) and its leftmost-first order when two
    # different splits of one piece compete at once; neither shows in the tests' models.
    mergeable = {t: i for i, t in enumerate(names) if types[i] == NORMAL}
    ranked = []
    for t, i in mergeable.items():
        for k in range(1, len(t)):
            left, right = t[:k], t[k:]
            if left in mergeable and right in mergeable:
                ranked.append((-pieces[i]["score"], i, mergeable[left], mergeable[right], left, right))
    ranked.sort(key=lambda r: r[:4])
    merges = [(left, right) for *_, left, right in ranked]

    unk = next((names[i] for i in range(len(names)) if types[i] == UNKNOWN), None)
    # fuse_unk: SentencePiece reports a run of unknown characters as one <unk>
    tk = HFTokenizer(BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=m["byte_fallback"]))

    # SentencePiece's normalizer: optional charsmap (e.g. nmt_nfkc), then with remove_extra_whitespaces strip leading
    # and trailing spaces and squeeze runs, then the dummy "▁" prefix, then spaces become "▁"
    norms = [normalizers.Precompiled(m["charsmap"])] if m["charsmap"] else []
    if m["remove_extra_whitespaces"]:
        norms += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if m["add_dummy_prefix"]:
        norms.append(normalizers.Prepend("▁"))
    norms.append(normalizers.Replace(" ", "▁"))
    tk.normalizer = normalizers.Sequence(norms)
    decs = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if m["add_dummy_prefix"]:
        decs.append(decoders.Strip(" ", 1, 0))  # drop the dummy prefix again
    tk.decoder = decoders.Sequence(decs)

    # control / unknown / user-defined pieces and every added token are matched whole in the text, as HF's slow
    # tokenizer does (it splits on them before calling sentencepiece). One known gap: sentencepiece itself matches
    # user-defined pieces after normalisation, so with add_dummy_prefix / remove_extra_whitespaces the text right
    # after one is normalised as its own segment here (e.g. gets a "▁" prefix) but not by sentencepiece.
    for i, t in enumerate(names):
        if types[i] in (CONTROL, UNKNOWN, USER_DEFINED) and i not in added:
            added[i] = t
    user_defined = frozenset(names[i] for i in range(len(names)) if types[i] == USER_DEFINED)
    _add_tokens(tk, added, path, plain=user_defined)  # sentencepiece decodes user-defined pieces as text
    if m["bos_id"] >= 0:  # InternLM2's tokenizer has add_bos_token=True
        tk.post_processor = processors.TemplateProcessing(single=f"{names[m['bos_id']]} $A",
                                                          special_tokens=[(names[m["bos_id"]], m["bos_id"])])
    return tk


# -------------------------------------------------------------------------------------------------------------------
# InternVL2.5 chat template (`internvl2_5` in InternVL's conversation.py, and chat())

SYSTEM_MESSAGE = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"


def build_prompt(messages: list[dict], system_message: str = SYSTEM_MESSAGE, add_generation_prompt: bool = True) -> str:
    """ChatML with InternVL's system prompt: every turn is `<|im_start|>{role}\\n{content}<|im_end|>\\n`, and with
    add_generation_prompt an open `<|im_start|>assistant\\n` at the end for the model to continue."""
    out = f"<|im_start|>system\n{system_message}<|im_end|>\n"
    for msg in messages:
        if msg["role"] not in ("user", "assistant"):
            raise ValueError(f"message role must be 'user' or 'assistant', got {msg['role']!r}")
        out += f"<|im_start|>{msg['role']}\n{msg['content']}<|im_end|>\n"
    if add_generation_prompt:
        out += "<|im_start|>assistant\n"
    return out


def expand_images(text: str, num_tiles: list[int], tokens_per_tile: int = 256) -> str:
    """Replace the k-th `<image>` by `<img>` + `<IMG_CONTEXT>` x (tokens_per_tile * num_tiles[k]) + `</img>`.
    Like chat(), a text with images but no `<image>` gets `<image>\\n` in front first (so pass the question, or a
    prompt that already holds its placeholders)."""
    if num_tiles and "<image>" not in text:
        text = "<image>\n" + text
    parts = text.split("<image>")
    if len(parts) - 1 != len(num_tiles):
        raise ValueError(f"{len(num_tiles)} image(s) but {len(parts) - 1} <image> placeholder(s) in the text; "
                         f"put one <image> per image")
    out = parts[0]
    for n, part in zip(num_tiles, parts[1:]):
        out += "<img>" + "<IMG_CONTEXT>" * (tokens_per_tile * n) + "</img>" + part
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Encode a string with a tokenizer directory and show ids and pieces.")
    ap.add_argument("path", help="directory with tokenizer.json, vocab.json + merges.txt, or tokenizer.model")
    ap.add_argument("text")
    args = ap.parse_args()
    try:
        tok = Tokenizer.from_dir(args.path)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    text = args.text.replace("\\n", "\n")  # let a shell argument spell newlines as \n
    ids = tok.encode(text)
    print(f"vocab {len(tok)} | bos {tok.bos} | im_start {tok.im_start} | im_end {tok.im_end} | "
          f"img_context {tok.img_context}")
    print("ids   ", ids)
    print("pieces", [tok.tk.id_to_token(i) for i in ids])
    print("decode", repr(tok.decode(ids)))
