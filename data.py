"""Data: InternVL image preprocessing (dynamic tiling + normalisation) and conversations -> ids, targets, masks.

  python -m pytest tests/test_tiling.py     # tiles and pixels equal to the reference algorithm
  python -m pytest tests/test_data.py       # masks of each conversation type, sources, mixtures, bad data
"""
import glob
import io
import json
import posixpath
import queue
import tarfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tokenizer import SYSTEM_MESSAGE, expand_images

# ===================================================================================================================
# InternVL image preprocessing (InternVL's internvl_chat/internvl/train/dataset.py
# `dynamic_preprocess` / `build_transform`, streamlit_demo/model_worker.py `load_image`)
# ===================================================================================================================

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def candidate_grids(min_num: int = 1, max_num: int = 12) -> list[tuple[int, int]]:
    """All tile grids (cols, rows) with min_num <= cols*rows <= max_num, in the order InternVL tries them."""
    # The reference builds the grids as a Python set and stable-sorts them by area, so grids of equal area keep
    # CPython's set order ((1,2) before (2,1) but (3,1) before (1,3)). That order only decides exact ties, but to
    # agree bit for bit we build the same set with the same insertions. Small ints hash to themselves and tuple
    # hashing is fixed, so this order does not change between runs.
    grids = set((i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                if min_num <= i * j <= max_num)
    return sorted(grids, key=lambda g: g[0] * g[1])


def find_grid(width: int, height: int, min_num: int = 1, max_num: int = 12, image_size: int = 448) -> tuple[int, int]:
    """The tile grid (cols, rows) whose aspect ratio is closest to the image's, as InternVL picks it."""
    aspect = width / height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in candidate_grids(min_num, max_num):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and width * height > 0.5 * image_size * image_size * cols * rows:
            # exact tie (a square image: 1x1, 2x2, 3x3): move to the bigger grid only while the image has more
            # pixels than half of that grid
            best = (cols, rows)
    return best


def dynamic_preprocess(img: Image.Image, min_num: int = 1, max_num: int = 12, image_size: int = 448,
                       use_thumbnail: bool = True) -> list[Image.Image]:
    """Resize to the chosen grid and cut it into image_size² tiles, row-major; with use_thumbnail and more than one
    tile, the whole image resized to one tile comes last."""
    cols, rows = find_grid(img.width, img.height, min_num, max_num, image_size)
    s = image_size
    # the reference calls resize() without a filter: PIL's default for RGB is bicubic
    resized = img.resize((cols * s, rows * s), Image.Resampling.BICUBIC)
    tiles = [resized.crop((c * s, r * s, (c + 1) * s, (r + 1) * s)) for r in range(rows) for c in range(cols)]
    if use_thumbnail and len(tiles) > 1:
        tiles.append(img.resize((s, s), Image.Resampling.BICUBIC))  # from the original image, not the grid
    return tiles


def load_image(img_or_path, image_size: int = 448, max_num: int = 12) -> torch.Tensor:
    """Image (PIL or path) -> (num_tiles, 3, image_size, image_size) float32, ImageNet-normalised like
    torchvision's ToTensor + Normalize. The reference's per-tile T.Resize((448, 448)) is a no-op on tiles that
    size already, so it is left out. The model casts to its own dtype."""
    img = img_or_path if isinstance(img_or_path, Image.Image) else Image.open(img_or_path)
    tiles = dynamic_preprocess(img.convert("RGB"), max_num=max_num, image_size=image_size, use_thumbnail=True)
    x = torch.from_numpy(np.stack([np.asarray(t) for t in tiles])).permute(0, 3, 1, 2)  # (N, 3, S, S) uint8
    # same fp32 operations as ToTensor (x / 255) then Normalize ((x - mean) / std), so the same bits
    x = x.to(torch.float32).div(255)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - mean) / std


# ===================================================================================================================
# Conversations -> token ids, next-token targets and the user mask (paper Section 3.1 label masks)
# ===================================================================================================================

GEN_IMAGE = "<gen_image>"  # marks a generated image inside an assistant turn (one per output image)


@dataclass
class Encoded:
    ids: list  # token ids in ARMOR's extended vocabulary
    targets: list  # targets[p] = the token at p + 1 when it is part of an answer, else -100
    user: list  # True on the tokens of user-turn contents (the unconditional form replaces them with <imgpad>)
    pixels: torch.Tensor | None  # (tiles, 3, S, S) for the <IMG_CONTEXT> runs, in order


def encode_conversation(tok, cfg, messages, images=(), out_codes=(), add_generation_prompt=False) -> Encoded:
    """messages: [{"role": "user" | "assistant", "content": str}], user contents holding one `<image>` per input
    image (in order over the conversation), assistant contents one `<gen_image>` per generated image, whose codes
    (h, w) come in order from out_codes. The text is tokenised as one string (split only at generated images), so the
    ids equal those of InternVL's chat(); targets cover every assistant token and its `<|im_end|>`, so the head that
    predicts each target is fixed by the target itself (text head iff target <= V, see armor.py)."""
    tiles = [load_image(im, cfg.vision.image_size, cfg.max_tiles) for im in images]
    num_tiles = [len(t) for t in tiles]
    n_placeholders = sum(m["content"].count("<image>") for m in messages if m["role"] == "user")
    if n_placeholders != len(images):
        if n_placeholders == 0 and images and messages and messages[0]["role"] == "user":
            messages = [dict(messages[0], content="<image>\n" * len(images) + messages[0]["content"])] + messages[1:]
        else:
            raise ValueError(f"{len(images)} input image(s) but {n_placeholders} <image> placeholder(s)")
    # Build the prompt string turn by turn, recording the character spans of user contents and answers.
    system = cfg.system_message if cfg.system_message is not None else SYSTEM_MESSAGE
    text = f"<|im_start|>system\n{system}<|im_end|>\n"
    user_spans, answer_spans, k = [], [], 0
    for m in messages:
        content = m["content"]
        if m["role"] == "user":
            n = content.count("<image>")
            content = expand_images(content, num_tiles[k:k + n], cfg.tokens_per_tile) if n else content
            k += n
        elif m["role"] != "assistant":
            raise ValueError(f"message role must be 'user' or 'assistant', got {m['role']!r}")
        text += f"<|im_start|>{m['role']}\n"
        span = (len(text), len(text) + len(content))
        text += content
        if m["role"] == "assistant":
            span = (span[0], span[1] + len("<|im_end|>"))  # the end-of-turn marker is a target too
            answer_spans.append(span)
        else:
            user_spans.append(span)
        text += "<|im_end|>\n"
    if add_generation_prompt:
        text += "<|im_start|>assistant\n"
    n_gen = text.count(GEN_IMAGE)
    if n_gen != len(out_codes):
        raise ValueError(f"{len(out_codes)} output image(s) but {n_gen} {GEN_IMAGE} marker(s)")
    # Tokenise the pieces between generated images; each image becomes <imgbos> + h*w codes + <imgend>.
    ids, where, pos = [], [], 0  # where[i] = character span of token i in `text` (images: the marker's span)
    for i, piece in enumerate(text.split(GEN_IMAGE)):
        enc = tok.tk.encode(piece, add_special_tokens=(i == 0))
        ids += enc.ids
        where += [(pos + a, pos + b) for a, b in enc.offsets]
        pos += len(piece)
        if i < len(out_codes):
            codes = torch.as_tensor(np.asarray(out_codes[i]), dtype=torch.long)
            if tuple(codes.shape) != (cfg.image_grid, cfg.image_grid):
                raise ValueError(f"output image {i} has a code grid {tuple(codes.shape)}, the model draws "
                                 f"{cfg.image_grid}x{cfg.image_grid}")
            if int(codes.min()) < 0 or int(codes.max()) >= cfg.num_image_codes:
                raise ValueError(f"output image {i} has codes outside [0, {cfg.num_image_codes})")
            span = [cfg.imgbos_id] + (codes.flatten() + cfg.code_offset).tolist() + [cfg.imgend_id]
            ids += span
            where += [(pos, pos + len(GEN_IMAGE))] * len(span)
            pos += len(GEN_IMAGE)

    def inside(spans, a, b):
        return any(s <= a and b <= e and a < e for s, e in spans)

    user = [inside(user_spans, a, b) for a, b in where]
    answer = [inside(answer_spans, a, b) for a, b in where]
    targets = [ids[p + 1] if p + 1 < len(ids) and answer[p + 1] else -100 for p in range(len(ids))]
    pixels = torch.cat(tiles) if tiles else None
    return Encoded(ids, targets, user, pixels)


def make_unconditional(ids: torch.Tensor, user: torch.Tensor, cfg) -> torch.Tensor:
    """The unconditional form used by classifier-free guidance, in training (condition dropout) and sampling alike:
    the same sequence with every user-content token replaced by <imgpad>. Same length, so the conditional and
    unconditional rows share positions and need no padding; any input image is dropped with its tokens."""
    return torch.where(user, torch.full_like(ids, cfg.imgpad_id), ids)


# ===================================================================================================================
# Training data for train.py: records, sources, the per-stage mixture, length limit, bad-data accounting
# ===================================================================================================================
#
# Record format (one JSON object per line; what toy/world.py writes, InternVL/LLaVA style):
#   {"id": "t2ti-17", "type": "t2ti",
#    "conversations": [{"from": "human", "value": "<image>\nWhat is this? Draw one in winter."},
#                      {"from": "gpt", "value": "A teddy bear. Here it is in the snow: <gen_image>"}],
#    "image": ["images/00017.png"],          # input images, one `<image>` each (a single string is accepted too)
#    "out_images": ["images/00018.png"]}     # generated images, one `<gen_image>` each, in order
# Paths are relative to the JSONL's folder. `from` is human|gpt (user|assistant accepted); blank lines are skipped.
# The types of Section 3.3: t2t (text -> text), ti2t (image + text -> text), t2i (text -> image only), t2ti (text ->
# text + image), and ti2ti. The mixture pool of a file is the TYPE of `--data TYPE=PATH`; the `type` field is a label.
# The codes of an output image come from the VQ code cache (`vqgan.py cache`, key = the path string exactly as
# written in the record) or, without a cache entry, from encoding the image with the VQGAN at the model's image_px.
#
# Webdataset shards (`--data t2i=shards/*.tar`) are read as t2i data: a sample is the group of members sharing a
# basename up to its first dot (an image .jpg/.jpeg/.png/.webp and a caption .txt, or .json with a "caption",
# "prompt" or "text" field); the prompt is a template with `{caption}`; the cache key of the image is
# '<tar file name>/<member name>', as `vqgan.py cache` writes it.
#
# Sequence layout: the base's chat template (encode_conversation); an input image becomes <img> + <IMG_CONTEXT> x
# (tiles x tokens_per_tile) + </img>; an output image <imgbos> + h*w codes + <imgend>. Targets are -100 on every
# prompt position; a target <= V goes to the text head and > V to the visual head (armor.py's token layout).
#
# Length limit (max_len): an example longer than the limit is cut only in text after the end of its last image span
# (input or output image), and only if it then fits and still has a target; otherwise it is dropped and counted as
# too_long. An image span is never split: half an image would teach the visual head a wrong end.
#
# Bad data never stops a run: a record that cannot be parsed (malformed), has no conversation or answer (empty), names
# an image that is missing or cannot be decoded, has no codes for an output image, or cannot fit the length limit is
# skipped and counted by kind; with strict=True the stream stops at the first one (StepData.error names it).
#
# Condition dropout (guidance, stages 2-3): an example with image targets becomes, with probability cfg_drop, the
# unconditional form sampling uses (make_unconditional: user turns -> <imgpad>, no pixels) with its text targets
# dropped, because the answer text is the model's own output when sampling. Text-only examples are never dropped.
#
# Mixture: an infinite sequence of examples, deterministic in (seed, global index): example i picks its type by the
# mixture weights, takes the next record of that type (a fresh permutation each epoch of the type), and draws its
# condition-dropout coin and t2i template from the same per-index generator. Optimizer step s consumes indices
# [s*G, (s+1)*G) of the sequence (G = global batch), rank r the r-th contiguous share, so the global batch does not
# depend on the world size; the position (next index + per-type counts) is saved in checkpoints.


DATA_TYPES = ("t2t", "ti2t", "t2i", "t2ti", "ti2ti")
# paper Section 3.4: equal parts of the listed types per stage (stage 0 = the toy world's base MLLM pre-training)
STAGE_MIX = {0: {"t2t": 1.0, "ti2t": 1.0},
             1: {"t2t": 1.0, "ti2t": 1.0, "t2i": 1.0, "t2ti": 1.0},
             2: {"t2i": 1.0, "t2ti": 1.0},
             3: {"t2t": 1.0, "ti2t": 1.0, "t2i": 1.0, "t2ti": 1.0}}
T2I_TEMPLATES = ("{caption}", "Draw {caption}", "Generate an image of {caption}", "Please draw a picture of {caption}",
                 "Can you create an image of {caption}?", "Show me a picture of {caption}")
BAD_KINDS = ("malformed", "empty", "missing_image", "unreadable_image", "missing_codes", "too_long")
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
TAR_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


class BadData(Exception):
    """A record that cannot be trained on: kind is one of BAD_KINDS, name says which record (file:line (id))."""

    def __init__(self, kind, name, why):
        assert kind in BAD_KINDS
        super().__init__(f"{name}: {kind.replace('_', ' ')}: {why}")
        self.kind, self.name = kind, name


@dataclass
class Raw:
    """A record before tokenisation: chat messages, and zero-argument openers of its images."""
    name: str
    messages: list  # [{"role": "user" | "assistant", "content": str}]
    images: list  # input images: openers -> PIL
    out_images: list  # output images: (cache key, opener -> PIL)


def _file_opener(path):
    def open_():
        img = Image.open(path)
        img.load()  # decode now, so a broken file fails here
        return img
    return open_


def _bytes_opener(path, offset, size):
    def open_():
        with open(path, "rb") as f:
            f.seek(offset)
            img = Image.open(io.BytesIO(f.read(size)))
        img.load()
        return img
    return open_


def open_image(opener, name, what):
    try:
        return opener()
    except FileNotFoundError as e:
        raise BadData("missing_image", name, f"{what}: {e.filename or e}") from None
    except Exception as e:  # any decoder error: the file is there but is no image we can read
        raise BadData("unreadable_image", name, f"{what}: {type(e).__name__}: {e}") from None


def record_to_raw(rec, root: Path, name: str) -> Raw:
    """A parsed JSONL record -> Raw, paths resolved against root (the JSONL's folder)."""
    if not isinstance(rec, dict):
        raise BadData("malformed", name, f"a record must be a JSON object, got {type(rec).__name__}")
    convs = rec.get("conversations")
    if not convs:
        raise BadData("empty", name, "no conversations")
    if not isinstance(convs, list):
        raise BadData("malformed", name, "'conversations' must be a list of turns")
    messages = []
    for t, turn in enumerate(convs):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or turn.get("from") not in ROLES:
            raise BadData("malformed", name, f"turn {t} needs 'from' (human|gpt) and a string 'value'")
        messages.append({"role": ROLES[turn["from"]], "content": turn["value"]})
    if not any(m["role"] == "assistant" for m in messages):
        raise BadData("empty", name, "no gpt turn to learn from")
    images, out = rec.get("image") or [], rec.get("out_images") or []
    images = [images] if isinstance(images, str) else images
    for key, v in (("image", images), ("out_images", out)):
        if not isinstance(v, list) or not all(isinstance(p, str) for p in v):
            raise BadData("malformed", name, f"'{key}' must be a path or a list of paths")
    return Raw(name, messages, [_file_opener(root / p) for p in images],
               [(p, _file_opener(root / p)) for p in out])


class JsonlSource:
    """Random access to the records of a JSONL file (byte offsets of its non-blank lines, read once)."""

    def __init__(self, path):
        self.path = Path(path)
        offsets, lines, pos = [], [], 0
        with open(self.path, "rb") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    offsets.append(pos)
                    lines.append(n)
                pos += len(line)
        self.offsets, self.lines = np.array(offsets, dtype=np.int64), np.array(lines, dtype=np.int64)

    def __len__(self):
        return len(self.offsets)

    def get(self, i, u_template=0.0) -> Raw:
        with open(self.path, "rb") as f:  # opened per record: cheap, and safe from any thread
            f.seek(int(self.offsets[i]))
            line = f.readline()
        name = f"{self.path.name}:{self.lines[i]}"
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadData("malformed", name, f"not JSON ({e})") from None
        if isinstance(rec, dict) and isinstance(rec.get("id"), (str, int)):
            name += f" ({rec['id']})"
        return record_to_raw(rec, self.path.parent, name)


class TarSource:
    """Webdataset shards of image + caption pairs, read as t2i examples with a prompt template."""

    def __init__(self, paths, templates=T2I_TEMPLATES):
        self.templates = tuple(templates)
        # (tar path, sample key, image (member, offset, size) or None, caption (ext, offset, size) or None)
        self.samples = []
        for p in paths:
            groups = {}
            with tarfile.open(p, "r:") as tf:
                for m in tf:
                    if m.isfile():
                        folder, base = posixpath.split(m.name)
                        stem, _, ext = base.partition(".")  # webdataset: the key ends at the first dot
                        groups.setdefault(posixpath.join(folder, stem), {})[ext.lower()] = (m.name, m.offset_data,
                                                                                            m.size)
            for key, g in groups.items():  # tar order
                img = next((g[e] for e in TAR_IMAGE_EXTS if e in g), None)
                cap = next(((e, g[e][1], g[e][2]) for e in ("txt", "json") if e in g), None)
                self.samples.append((Path(p), key, img, cap))

    def __len__(self):
        return len(self.samples)

    def get(self, i, u_template=0.0) -> Raw:
        path, key, img, cap = self.samples[i]
        name = f"{path.name}:{key}"
        if img is None:
            raise BadData("missing_image", name, f"no {'/'.join(TAR_IMAGE_EXTS)} member")
        if cap is None:
            raise BadData("empty", name, "no .txt or .json caption")
        ext, off, size = cap
        with open(path, "rb") as f:
            f.seek(off)
            data = f.read(size)
        try:
            text = data.decode("utf-8")
            if ext == "json":
                meta = json.loads(text)
                text = next((meta[k] for k in ("caption", "prompt", "text") if isinstance(meta.get(k), str)), "")
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
            raise BadData("malformed", name, f"caption .{ext}: {e}") from None
        caption = text.strip()
        if not caption:
            raise BadData("empty", name, "empty caption")
        template = self.templates[min(int(u_template * len(self.templates)), len(self.templates) - 1)]
        messages = [{"role": "user", "content": template.replace("{caption}", caption)},
                    {"role": "assistant", "content": GEN_IMAGE}]
        return Raw(name, messages, [], [(f"{path.name}/{img[0]}", _bytes_opener(path, img[1], img[2]))])


def read_templates(path) -> tuple:
    """One prompt template per non-blank line, each holding {caption}."""
    lines = [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]
    bad = [ln for ln in lines if "{caption}" not in ln]
    if not lines or bad:
        raise ValueError(f"{path}: every line must be a template holding {{caption}}" +
                         (f"; this one does not: {bad[0]!r}" if bad else " (the file is empty)"))
    return tuple(lines)


def open_sources(spec, templates=T2I_TEMPLATES) -> list:
    """A --data PATH: a .jsonl, a webdataset .tar, or a glob of them (sorted) -> sources."""
    paths = sorted(glob.glob(spec)) if glob.has_magic(spec) else [spec]
    if not paths:
        raise FileNotFoundError(f"{spec}: matches nothing")
    out, tars = [], []
    for p in paths:
        if not Path(p).is_file():
            raise FileNotFoundError(f"{p}: no such file (expected a .jsonl, a .tar shard or a glob of them)")
        if p.endswith(".tar"):
            tars.append(p)
        elif p.endswith(".jsonl"):
            out.append(JsonlSource(p))
        else:
            raise ValueError(f"{p}: expected a .jsonl of records or a webdataset .tar shard")
    if tars:
        out.append(TarSource(tars, templates))
    return out


class Pool:
    """All sources of one data type, indexed as one list."""

    def __init__(self, kind, sources):
        self.kind, self.sources = kind, list(sources)
        self.ends = np.cumsum([len(s) for s in self.sources])

    def __len__(self):
        return int(self.ends[-1]) if len(self.ends) else 0

    def get(self, j, u_template=0.0) -> Raw:
        s = int(np.searchsorted(self.ends, j, side="right"))
        return self.sources[s].get(j - (int(self.ends[s - 1]) if s else 0), u_template)


@dataclass
class Pick:
    index: int  # position in the global sequence
    kind: str
    record: int  # index into the type's pool
    u_drop: float  # condition-dropout coin
    u_template: float  # t2i template choice


class Mixture:
    """The infinite deterministic sequence of picks (see the section comment); state = next index + per-type counts."""

    def __init__(self, sizes: dict, weights: dict, seed=0):
        self.kinds = [k for k in DATA_TYPES if weights.get(k, 0) > 0]
        assert self.kinds and all(sizes.get(k, 0) > 0 for k in self.kinds), "every weighted type needs records"
        w = np.array([weights[k] for k in self.kinds], dtype=np.float64)
        self.cum = np.cumsum(w / w.sum())
        self.sizes, self.seed = sizes, seed
        self.next, self.counts = 0, {k: 0 for k in self.kinds}
        self._perm = {}

    def _order(self, kind, epoch):
        if (kind, epoch) not in self._perm:
            self._perm = {k: v for k, v in self._perm.items() if k[0] != kind}  # keep one epoch per type
            rng = np.random.default_rng([self.seed, DATA_TYPES.index(kind), epoch])
            self._perm[(kind, epoch)] = rng.permutation(self.sizes[kind])
        return self._perm[(kind, epoch)]

    def take(self, n) -> list:
        out = []
        for _ in range(n):
            # per-index draws (type, dropout coin, template); 1 << 20 keeps these seeds apart from _order's
            u = np.random.default_rng([self.seed, 1 << 20, self.next]).random(3)
            kind = self.kinds[min(int(np.searchsorted(self.cum, u[0], side="right")), len(self.kinds) - 1)]
            epoch, r = divmod(self.counts[kind], self.sizes[kind])
            out.append(Pick(self.next, kind, int(self._order(kind, epoch)[r]), float(u[1]), float(u[2])))
            self.counts[kind] += 1
            self.next += 1
        return out

    def state_dict(self):
        return {"next": self.next, "counts": dict(self.counts)}

    def load_state_dict(self, state):
        if set(state["counts"]) != set(self.kinds):
            raise ValueError(f"the saved data position is for the types {sorted(state['counts'])}, this run mixes "
                             f"{sorted(self.kinds)}")
        self.next, self.counts = int(state["next"]), dict(state["counts"])


def image_span_end(ids: torch.Tensor, tok, cfg) -> int:
    """1 + the position of the last token of any image span (<img> .. </img> inputs, <imgbos> .. <imgend> outputs)."""
    img = (ids >= cfg.llm.vocab_size) | (ids == tok.img_start) | (ids == tok.img_end) | (ids == tok.img_context)
    where = img.nonzero()
    return int(where[-1]) + 1 if len(where) else 0


@dataclass
class Example:
    ids: torch.Tensor  # (T,) long
    targets: torch.Tensor  # (T,) long, -100 = no target
    pixels: torch.Tensor | None  # (tiles, 3, S, S)
    name: str


class ExampleBuilder:
    """Raw record -> Example: images opened, output codes looked up (or encoded), tokenised with the label masks,
    the length limit applied, and the unconditional form when the condition-dropout coin says so."""

    def __init__(self, tok, cfg, max_len, codes=None, vqgan=None, understanding_only=False):
        self.tok, self.cfg, self.max_len = tok, cfg, max_len
        self.codes, self.vqgan, self.understanding_only = codes, vqgan, understanding_only

    def out_codes(self, key, opener, name):
        if self.codes is not None and key in self.codes:
            return self.codes.get(key).astype(np.int64)
        if self.vqgan is None:
            where = "in the code cache" if self.codes is not None else "(no --codes cache and no --vqgan given)"
            raise BadData("missing_codes", name, f"no codes for output image {key!r} {where}")
        from vqgan import encode_pil  # slow path: one VQGAN encode per image

        img = open_image(opener, name, f"output image {key!r}")
        with torch.no_grad():
            return encode_pil(self.vqgan, [img], self.cfg.image_px)[0].numpy()

    def __call__(self, raw: Raw, uncond=False) -> Example:
        cfg, V = self.cfg, self.cfg.llm.vocab_size
        if self.understanding_only and raw.out_images:
            raise BadData("malformed", raw.name, "output images in understanding-only (stage 0) data")
        images = [open_image(op, raw.name, f"input image {k}") for k, op in enumerate(raw.images)]
        codes = [self.out_codes(key, op, raw.name) for key, op in raw.out_images]
        try:
            enc = encode_conversation(self.tok, cfg, raw.messages, images, codes)
        except ValueError as e:  # placeholder counts, code grids: the record disagrees with itself or the model
            raise BadData("malformed", raw.name, str(e)) from None
        ids, targets = torch.tensor(enc.ids, dtype=torch.long), torch.tensor(enc.targets, dtype=torch.long)
        user = torch.tensor(enc.user, dtype=torch.bool)
        if len(ids) > self.max_len:
            end = image_span_end(ids, self.tok, cfg)
            if end > self.max_len or not bool((targets[:self.max_len] >= 0).any()):
                raise BadData("too_long", raw.name, f"{len(ids)} tokens (images end at {end}), limit {self.max_len}")
            ids, targets, user = ids[:self.max_len], targets[:self.max_len], user[:self.max_len]
        pixels = enc.pixels
        if uncond and bool((targets > V).any()):
            # classifier-free guidance training: the prompt becomes the unconditional form sample.py uses, and only
            # the image targets stay (the answer text is the model's own output when sampling)
            ids = make_unconditional(ids, user, cfg)
            targets = torch.where(targets > V, targets, torch.full_like(targets, -100))
            pixels = None
        return Example(ids, targets, pixels, raw.name)


@dataclass
class Batch:
    ids: torch.Tensor  # (B, T), right-padded
    targets: torch.Tensor  # (B, T), -100 on padding
    pixels: torch.Tensor | None  # (tiles, 3, S, S), the examples' tiles in order
    names: list
    n_tokens: int  # real (unpadded) tokens


def collate(examples, pad_id) -> Batch | None:
    if not examples:
        return None
    T = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), T), -100, dtype=torch.long)
    for b, e in enumerate(examples):  # right padding: the causal model never lets a real token see it
        ids[b, :len(e.ids)], targets[b, :len(e.ids)] = e.ids, e.targets
    tiles = [e.pixels for e in examples if e.pixels is not None]
    return Batch(ids, targets, torch.cat(tiles) if tiles else None, [e.name for e in examples],
                 sum(len(e.ids) for e in examples))


@dataclass
class StepData:
    batches: list  # grad_accum micro-batches of this rank (None where every example of one was bad)
    bad: list  # BadData of this rank's share, in order
    state: dict  # the mixture position after this step
    error: BadData | None = None  # strict mode: the first bad record


class TrainStream:
    """This rank's micro-batches of each optimizer step, in order (see the section comment)."""

    def __init__(self, pools: dict, weights: dict, builder: ExampleBuilder, micro_batch, grad_accum, rank=0, world=1,
                 seed=0, cfg_drop=0.0, strict=False, pad_id=0):
        self.pools, self.builder = pools, builder
        self.mixture = Mixture({k: len(p) for k, p in pools.items()}, weights, seed)
        self.micro, self.accum, self.rank, self.world = micro_batch, grad_accum, rank, world
        self.cfg_drop, self.strict, self.pad_id = cfg_drop, strict, pad_id

    @property
    def global_batch(self):
        return self.micro * self.accum * self.world

    def next_step(self) -> StepData:
        picks = self.mixture.take(self.global_batch)  # every rank draws the whole global batch: same positions
        share = len(picks) // self.world
        mine = picks[self.rank * share:(self.rank + 1) * share]
        batches, bad = [], []
        for m in range(self.accum):
            examples = []
            for p in mine[m * self.micro:(m + 1) * self.micro]:
                try:
                    raw = self.pools[p.kind].get(p.record, p.u_template)
                    examples.append(self.builder(raw, uncond=p.u_drop < self.cfg_drop))
                except BadData as e:
                    if self.strict:
                        return StepData([], bad, self.mixture.state_dict(), error=e)
                    bad.append(e)
            batches.append(collate(examples, self.pad_id))
        return StepData(batches, bad, self.mixture.state_dict())


class Prefetcher:
    """Runs fn() in a background thread, `depth` results ahead, in order (tokenising, PNG decoding and tiling
    overlap the model's step; torch and PIL release the GIL). depth=0 calls fn inline."""

    def __init__(self, fn, depth=2):
        self.fn, self.depth = fn, depth
        if depth:
            self.q, self.stop = queue.Queue(maxsize=depth), threading.Event()
            self.thread = threading.Thread(target=self._run, daemon=True)
            self.thread.start()

    def _run(self):
        while not self.stop.is_set():
            try:
                item = self.fn()
            except BaseException as e:  # hand any failure to the consumer, which raises it
                item = e
            while not self.stop.is_set():
                try:
                    self.q.put(item, timeout=0.1)
                    break
                except queue.Full:
                    pass
            if isinstance(item, BaseException):
                return

    def get(self):
        item = self.q.get() if self.depth else self.fn()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self):
        if self.depth:
            self.stop.set()
            self.thread.join()
