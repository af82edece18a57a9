"""
Checkpoint I/O of armor.py: the released InternVL2.5 layouts and ARMOR's own checkpoints.

  python -m pytest tests/test_loading.py -q

- A tiny checkpoint of each released layout, written by save_internvl in the exact released key names:
  Qwen2 as one model.safetensors, InternLM2 as shards + model.safetensors.index.json with the packed wqkv.
  The key set equals the released list, the tensor count follows the released files' formula, and from_internvl
  gives back every tensor bit for bit (fp32) or rounded to bf16 (dtype=bfloat16).
- Every malformed case fails with a CheckpointError that names the key or file (and both shapes for a mis-shaped
  tensor), before any weight is copied.
- ARMOR checkpoints: save_pretrained whole and partial (base=dir) round-trip exactly; a wrong base fails clearly.
"""

import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import armor
from armor import CheckpointError
from conftest import randomize, tiny_armor

pytestmark = pytest.mark.usefixtures("one_thread")


def released_keys(cfg):
    """The released key names (the released model.safetensors index), written out independently of armor.py's key
    map -> shapes."""
    v, l = cfg.vision, cfg.llm
    C, g = v.hidden_size, v.image_size // v.patch_size
    keys = {"vision_model.embeddings.class_embedding": (1, 1, C),
            "vision_model.embeddings.position_embedding": (1, 1 + g * g, C),
            "vision_model.embeddings.patch_embedding.weight": (C, 3, v.patch_size, v.patch_size),
            "vision_model.embeddings.patch_embedding.bias": (C,)}
    for n in range(v.num_layers):
        p = f"vision_model.encoder.layers.{n}."
        keys.update({p + "norm1.weight": (C,), p + "norm1.bias": (C,), p + "norm2.weight": (C,), p + "norm2.bias": (C,),
                     p + "attn.qkv.weight": (3 * C, C), p + "attn.qkv.bias": (3 * C,),
                     p + "attn.proj.weight": (C, C), p + "attn.proj.bias": (C,), p + "ls1": (C,), p + "ls2": (C,),
                     p + "mlp.fc1.weight": (v.intermediate_size, C), p + "mlp.fc1.bias": (v.intermediate_size,),
                     p + "mlp.fc2.weight": (C, v.intermediate_size), p + "mlp.fc2.bias": (C,)})
    W, d, I, hd = 4 * C, l.hidden_size, l.intermediate_size, l.head_dim
    keys.update({"mlp1.0.weight": (W,), "mlp1.0.bias": (W,), "mlp1.1.weight": (d, W), "mlp1.1.bias": (d,),
                 "mlp1.3.weight": (d, d), "mlp1.3.bias": (d,), "language_model.model.norm.weight": (d,)})
    qd, kvd = l.num_heads * hd, l.num_kv_heads * hd
    for n in range(l.num_layers):
        p = f"language_model.model.layers.{n}."
        if l.arch == "qwen2":
            keys.update({p + "self_attn.q_proj.weight": (qd, d), p + "self_attn.q_proj.bias": (qd,),
                         p + "self_attn.k_proj.weight": (kvd, d), p + "self_attn.k_proj.bias": (kvd,),
                         p + "self_attn.v_proj.weight": (kvd, d), p + "self_attn.v_proj.bias": (kvd,),
                         p + "self_attn.o_proj.weight": (d, qd), p + "mlp.gate_proj.weight": (I, d),
                         p + "mlp.up_proj.weight": (I, d), p + "mlp.down_proj.weight": (d, I),
                         p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,)})
        else:
            keys.update({p + "attention.wqkv.weight": (qd + 2 * kvd, d), p + "attention.wo.weight": (d, qd),
                         p + "feed_forward.w1.weight": (I, d), p + "feed_forward.w3.weight": (I, d),
                         p + "feed_forward.w2.weight": (d, I),
                         p + "attention_norm.weight": (d,), p + "ffn_norm.weight": (d,)})
    if l.arch == "qwen2":
        keys.update({"language_model.model.embed_tokens.weight": (l.vocab_size, d),
                     "language_model.lm_head.weight": (l.vocab_size, d)})
    else:
        keys.update({"language_model.model.tok_embeddings.weight": (l.vocab_size, d),
                     "language_model.output.weight": (l.vocab_size, d)})
    return keys


def tensor_count(cfg):
    """Spec 2b: 4 embedding tensors + 14 per ViT layer, 6 in mlp1, embed + final norm + head, and per LLM layer 12
    (Qwen2: q/k/v weight+bias, o, gate/up/down, 2 norms) or 7 (InternLM2: wqkv, wo, w1/w2/w3, 2 norms)."""
    return 4 + 14 * cfg.vision.num_layers + 6 + 3 + cfg.llm.num_layers * (12 if cfg.llm.arch == "qwen2" else 7)


def test_released_key_list_matches_the_spec_counts():
    # the published tensor counts of the four released files (their model.safetensors.index.json), from the key list
    # and from the formula
    for name, count in (("internvl2_5-1b", 637), ("internvl2_5-2b", 517), ("internvl2_5-4b", 781),
                        ("internvl2_5-8b", 573)):
        cfg = armor.PRESETS[name]()
        assert len(released_keys(cfg)) == tensor_count(cfg) == count, name
    # and the 8B wqkv shape
    assert released_keys(armor.PRESETS["internvl2_5-8b"]())[
        "language_model.model.layers.0.attention.wqkv.weight"] == (6144, 4096)


def file_tensors(path):
    """key -> tensor over a released directory, checking the index against the shards when there is one."""
    index = os.path.join(path, "model.safetensors.index.json")
    if not os.path.exists(index):
        return load_file(os.path.join(path, "model.safetensors"))
    with open(index) as f:
        weight_map = json.load(f)["weight_map"]
    out = {}
    for fn in sorted(set(weight_map.values())):
        shard = load_file(os.path.join(path, fn))
        assert {k for k, v in weight_map.items() if v == fn} == set(shard), fn
        out.update(shard)
    return out


def base_fields(cfg):
    """The config fields an InternVL2.5 config.json carries (the ARMOR ones are defaults or overrides at load)."""
    d = cfg.to_dict()
    for k in ("num_image_codes", "image_grid", "image_px", "num_adapter_layers"):
        d.pop(k)
    return d


def make_base(path, preset, seed=0, max_shard_bytes=None):
    cfg = armor.PRESETS[preset]()
    model = randomize(armor.InternVL(cfg), seed)
    armor.save_internvl(model, str(path), max_shard_bytes=max_shard_bytes)
    return model


def test_qwen2_single_file_released_layout(tmp_path):
    src = make_base(tmp_path, "tiny")
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    ft = file_tensors(tmp_path)
    expected = released_keys(src.config)
    assert {k: tuple(v.shape) for k, v in ft.items()} == expected
    assert len(ft) == tensor_count(src.config)
    assert "language_model.lm_head.weight" in ft and "mlp1.1.weight" in ft and "vision_model.encoder.layers.0.ls1" in ft
    sd = src.state_dict()
    for k, v in ft.items():  # Qwen2: our names are the released names
        assert torch.equal(v, sd[k]), k
    model = armor.from_internvl(str(tmp_path), armor=False, verbose=False)
    assert type(model) is armor.InternVL
    assert base_fields(model.config) == base_fields(src.config)
    assert model.state_dict().keys() == sd.keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_internlm2_sharded_released_layout(tmp_path):
    src = make_base(tmp_path, "tiny-internlm2", max_shard_bytes=60_000)
    files = sorted(os.listdir(tmp_path))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert "model.safetensors.index.json" in files and "model.safetensors" not in files and len(shards) >= 3
    n = len(shards)
    assert shards == [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    with open(tmp_path / "model.safetensors.index.json") as f:
        index = json.load(f)
    ft = file_tensors(tmp_path)
    assert {k: tuple(v.shape) for k, v in ft.items()} == released_keys(src.config)
    assert len(ft) == tensor_count(src.config)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in ft.values())
    for k in ("language_model.model.layers.0.attention.wqkv.weight", "language_model.output.weight",
              "language_model.model.tok_embeddings.weight", "language_model.model.layers.1.feed_forward.w3.weight"):
        assert k in ft, k

    # the packing, written out row by row from modeling_internlm2.py's rearrange: row ((h*(g+2)) + s)*hd + j holds
    # query head h*g+s (s < g), key head h (s = g) or value head h (s = g+1)
    l, sd = src.config.llm, src.state_dict()
    g, hd = l.num_heads // l.num_kv_heads, l.head_dim
    for n in range(l.num_layers):
        p = f"language_model.model.layers.{n}."
        q, k, v = (sd[p + f"self_attn.{x}_proj.weight"] for x in "qkv")
        w = ft[p + "attention.wqkv.weight"]
        for h in range(l.num_kv_heads):
            for s in range(g + 2):
                rows = w[(h * (g + 2) + s) * hd:(h * (g + 2) + s + 1) * hd]
                ref = q[(h * g + s) * hd:(h * g + s + 1) * hd] if s < g else (k if s == g else v)[h * hd:(h + 1) * hd]
                assert torch.equal(rows, ref), (n, h, s)
        assert torch.equal(ft[p + "attention.wo.weight"], sd[p + "self_attn.o_proj.weight"])
        assert torch.equal(ft[p + "feed_forward.w1.weight"], sd[p + "mlp.gate_proj.weight"])
        assert torch.equal(ft[p + "feed_forward.w3.weight"], sd[p + "mlp.up_proj.weight"])
        assert torch.equal(ft[p + "feed_forward.w2.weight"], sd[p + "mlp.down_proj.weight"])
    assert torch.equal(ft["language_model.output.weight"], sd["language_model.lm_head.weight"])

    model = armor.from_internvl(str(tmp_path), armor=False, verbose=False)
    assert base_fields(model.config) == base_fields(src.config)
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_from_internvl_bfloat16_and_armor_modules(tmp_path, capsys):
    src = make_base(tmp_path, "tiny-internlm2", max_shard_bytes=60_000)
    m = armor.from_internvl(str(tmp_path), dtype=torch.bfloat16, num_image_codes=64, num_adapter_layers=2)
    out = capsys.readouterr().out
    # the count is of our tensors: each packed wqkv became q, k and v
    n = tensor_count(src.config) + 2 * src.config.llm.num_layers
    assert f"loaded {n} tensors" in out and "bfloat16" in out and "ARMOR adds" in out
    assert type(m) is armor.Armor
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    sd = src.state_dict()
    for k, v in m.state_dict().items():
        if not k.startswith("armor."):
            assert torch.equal(v, sd[k].to(torch.bfloat16)), k
    assert m.armor.embed_new.weight.shape == (3 + 64, 64) and len(m.armor.adapter) == 2
    assert all(torch.isfinite(p).all() and p.float().std() > 0 for p in m.armor.parameters() if p.dim() == 2)


# --- malformed checkpoints: each gives a CheckpointError naming what is wrong -------------------------------------


def rewrite(path, fn, edit):
    f = os.path.join(path, fn)
    t = load_file(f)
    edit(t)
    save_file(t, f, metadata={"format": "pt"})


def shard_of(path, key):
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        return json.load(f)["weight_map"][key]


def edit_config(path, edit):
    with open(os.path.join(path, "config.json")) as f:
        c = json.load(f)
    edit(c)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(c, f)


def truncate(f):
    size = os.path.getsize(f)
    with open(f, "r+b") as fh:
        fh.truncate(size - 100)


QWEN = "language_model.model.layers.1.self_attn.k_proj.bias"
WQKV = "language_model.model.layers.1.attention.wqkv.weight"
WO = "language_model.model.layers.0.attention.wo.weight"

# (preset, how to break the directory, substrings the error message must contain)
MALFORMED = {
    "missing key": ("tiny", lambda p: rewrite(p, "model.safetensors", lambda t: t.pop(QWEN)),
                    ["missing", QWEN]),
    "unexpected key": ("tiny", lambda p: rewrite(p, "model.safetensors",
                                                 lambda t: t.update({"vision_model.extra.weight": torch.zeros(3)})),
                       ["unexpected", "vision_model.extra.weight"]),
    "mis-shaped key": ("tiny", lambda p: rewrite(p, "model.safetensors",
                                                 lambda t: t.update({"mlp1.1.weight": torch.zeros(64, 100)})),
                       ["'mlp1.1.weight'", "(64, 100)", "(64, 128)"]),
    "truncated file": ("tiny", lambda p: truncate(os.path.join(p, "model.safetensors")),
                       ["model.safetensors", "cannot read"]),
    "no weights": ("tiny", lambda p: os.remove(os.path.join(p, "model.safetensors")), ["no model.safetensors"]),
    "no config.json": ("tiny", lambda p: os.remove(os.path.join(p, "config.json")), ["no config.json"]),
    "unsupported architecture": ("tiny", lambda p: edit_config(
        p, lambda c: c["llm_config"].update(architectures=["LlamaForCausalLM"])), ["config.json", "LlamaForCausalLM"]),
    "config field missing": ("tiny", lambda p: edit_config(p, lambda c: c["vision_config"].pop("patch_size")),
                             ["config.json", "patch_size"]),
    # InternLM2, sharded: the messages use the released names (wqkv, wo), not armor.py's internal ones
    "missing wqkv": ("tiny-internlm2", lambda p: rewrite(p, shard_of(p, WQKV), lambda t: t.pop(WQKV)), [WQKV]),
    "mis-shaped wqkv": ("tiny-internlm2", lambda p: rewrite(p, shard_of(p, WQKV),
                                                            lambda t: t.update({WQKV: t[WQKV][:-16]})),
                        [WQKV, "(112, 64)", "(128, 64)"]),
    "truncated shard": ("tiny-internlm2", lambda p: truncate(os.path.join(p, shard_of(p, WQKV))),
                        ["cannot read", "-of-"]),
    "index names a missing shard": ("tiny-internlm2", lambda p: os.remove(os.path.join(p, shard_of(p, WQKV))),
                                    ["names shard(s) that are not in the directory", "-of-"]),
    "index lists a key no shard has": ("tiny-internlm2", lambda p: rewrite(p, shard_of(p, WO), lambda t: t.pop(WO)),
                                       ["missing from their shards", WO]),
}


@pytest.fixture(scope="module")
def good_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("good")
    make_base(root / "tiny", "tiny")
    make_base(root / "tiny-internlm2", "tiny-internlm2", max_shard_bytes=60_000)
    return root


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_checkpoint_errors(case, good_dirs, tmp_path):
    preset, breakit, words = MALFORMED[case]
    d = tmp_path / "ckpt"
    shutil.copytree(good_dirs / preset, d)
    breakit(str(d))
    with pytest.raises(CheckpointError) as e:
        armor.from_internvl(str(d), verbose=False)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_internlm2_missing_key_without_index_names_the_released_key(tmp_path):
    # one file (no index), so the strict key comparison reports it, in the file's own key names
    make_base(tmp_path, "tiny-internlm2")
    rewrite(tmp_path, "model.safetensors", lambda t: t.pop(WO))
    with pytest.raises(CheckpointError, match="missing key.*attention.wo.weight"):
        armor.from_internvl(str(tmp_path), verbose=False)


def test_strict_load_copies_nothing_on_error():
    """load_state checks every key and shape before the first copy: a failing load leaves the model as it was."""
    cfg = armor.PRESETS["tiny"]()
    model = randomize(armor.InternVL(cfg))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    good = {k: (lambda v=v: torch.ones_like(v)) for k, v in before.items()}
    last = list(good)[-1]  # the bad tensor comes last, after every good one has been read
    bad = dict(good)
    bad[last] = lambda: torch.ones(1, 2, 3)
    with pytest.raises(CheckpointError, match=r"has shape \(1, 2, 3\)"):
        armor.load_state(model, bad, torch.float32, "cpu")
    missing = dict(good)
    missing.pop(last)
    with pytest.raises(CheckpointError, match="1 missing key"):
        armor.load_state(model, missing, torch.float32, "cpu")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert armor.load_state(model, good, torch.float32, "cpu") == len(before)  # the good set does load
    assert all(bool((v == 1).all()) for v in model.state_dict().values())


# --- ARMOR checkpoints ---------------------------------------------------------------------------------------------


def assert_same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def test_save_pretrained_whole_roundtrip(tmp_path):
    m = tiny_armor()
    armor.save_pretrained(m, str(tmp_path))
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(m.state_dict())
    loaded = armor.from_pretrained(str(tmp_path), verbose=False)
    assert type(loaded) is armor.Armor and loaded.config == m.config
    assert_same(loaded, m)


def partial_setup(root):
    """A base directory, and an ARMOR model on top of it whose new tensors and LM head differ from the base."""
    make_base(root / "base", "tiny")
    m = armor.from_internvl(str(root / "base"), verbose=False, num_image_codes=64, image_grid=4, image_px=64,
                            num_adapter_layers=2, max_tiles=4)
    with torch.no_grad():  # as if trained: the new modules and the text head moved
        randomize(m.armor, seed=5)
        m.language_model.lm_head.weight.add_(0.01)
    return m


def test_save_pretrained_partial_roundtrip(tmp_path, monkeypatch):
    m = partial_setup(tmp_path)
    armor.save_pretrained(m, str(tmp_path / "ckpt"), base=str(tmp_path / "base"))
    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert keys == {k for k in m.state_dict() if k.startswith("armor.")} | {"language_model.lm_head.weight"}
    assert_same(armor.from_pretrained(str(tmp_path / "ckpt"), verbose=False), m)

    # relative paths: the stored base is relative to the checkpoint, so the pair can move together; an explicit
    # base= argument is a path as given (relative to the working directory)
    monkeypatch.chdir(tmp_path)
    armor.save_pretrained(m, "runs/ckpt2", base="base")
    with open(tmp_path / "runs" / "ckpt2" / "config.json") as f:
        assert json.load(f)["base"] == os.path.join("..", "..", "base")
    shutil.move(str(tmp_path / "runs"), str(tmp_path / "moved" / "runs"))
    shutil.move(str(tmp_path / "base"), str(tmp_path / "moved" / "base"))
    monkeypatch.chdir(tmp_path / "moved" / "runs")
    assert_same(armor.from_pretrained("ckpt2", verbose=False), m)
    monkeypatch.chdir(tmp_path)
    assert_same(armor.from_pretrained("moved/runs/ckpt2", base="moved/base", verbose=False), m)


def test_int8_rows_roundtrip_within_half_a_step(tmp_path):
    """save_pretrained(int8=True), what the toy world ships: each matrix as int8 with one fp32 scale per row, within
    half a step of the weights (and no closer to a coarser grid); vectors kept as they are; broken pairs refused."""
    m = partial_setup(tmp_path)
    with torch.no_grad():
        m.armor.visual_head.weight[3] = 0  # an all-zero row must stay zero (no 0 / 0)
    armor.save_pretrained(m, str(tmp_path / "ckpt"), base=str(tmp_path / "base"), int8=True)
    stored = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    sd = m.state_dict()
    mats = {k for k in stored if not k.endswith(armor.INT8_SCALE) and sd[k].dim() == 2}
    assert mats and "language_model.lm_head.weight" in mats
    assert set(stored) == {k for k in sd if k.startswith("armor.")} | {"language_model.lm_head.weight"} \
        | {k + armor.INT8_SCALE for k in mats}
    loaded = armor.from_pretrained(str(tmp_path / "ckpt"), verbose=False).state_dict()
    for k in stored:
        if k.endswith(armor.INT8_SCALE):
            continue
        if k not in mats:  # norms, biases: exact
            assert stored[k].dtype == torch.float32 and torch.equal(loaded[k], sd[k]), k
            continue
        q, s = stored[k], stored[k + armor.INT8_SCALE]
        assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (q.shape[0], 1), k
        assert q.abs().amax(1).max() == 127  # the scale is set by each row's largest entry
        err = (loaded[k] - sd[k]).abs()
        assert (err <= s / 2 * (1 + 1e-5)).all(), k
        assert err.max() > 0, k  # it did round: int8 is not exact for random weights
    assert torch.equal(loaded["armor.visual_head.weight"][3], torch.zeros_like(sd["armor.visual_head.weight"][3]))
    # the rest of the model comes from the base, bit for bit
    for k in sd.keys() - stored.keys():
        assert torch.equal(loaded[k], sd[k]), k

    rewrite(tmp_path / "ckpt", "model.safetensors", lambda t: t.update(
        {"armor.visual_head.weight" + armor.INT8_SCALE: t["armor.visual_head.weight" + armor.INT8_SCALE][:-1]}))
    with pytest.raises(CheckpointError, match="one scale per row"):
        armor.from_pretrained(str(tmp_path / "ckpt"), verbose=False)
    rewrite(tmp_path / "ckpt", "model.safetensors", lambda t: t.update({"armor.nothing" + armor.INT8_SCALE: s}))
    with pytest.raises(CheckpointError, match="scales no tensor"):
        armor.from_pretrained(str(tmp_path / "ckpt"), verbose=False)


def test_partial_checkpoint_with_a_mismatched_base_errors(tmp_path):
    m = partial_setup(tmp_path)
    armor.save_pretrained(m, str(tmp_path / "ckpt"), base=str(tmp_path / "base"))
    other = armor.PRESETS["tiny"]()
    other.llm.num_layers = 3  # another base model: same keys for the new tensors, another config
    armor.save_internvl(randomize(armor.InternVL(other)), str(tmp_path / "other"))
    with pytest.raises(CheckpointError, match="another config"):
        armor.from_pretrained(str(tmp_path / "ckpt"), base=str(tmp_path / "other"), verbose=False)
    wide = armor.PRESETS["tiny"]()
    wide.llm.vocab_size = 320  # a base whose vocabulary differs
    armor.save_internvl(randomize(armor.InternVL(wide)), str(tmp_path / "wide"))
    with pytest.raises(CheckpointError, match="another config"):
        armor.from_pretrained(str(tmp_path / "ckpt"), base=str(tmp_path / "wide"), verbose=False)
    with pytest.raises(CheckpointError, match="no config.json"):
        armor.from_pretrained(str(tmp_path / "ckpt"), base=str(tmp_path / "nowhere"), verbose=False)
    # a released directory is not an ARMOR checkpoint
    with pytest.raises(CheckpointError, match="not an ARMOR checkpoint"):
        armor.from_pretrained(str(tmp_path / "base"), verbose=False)


def test_whole_checkpoint_with_a_missing_tensor_errors(tmp_path):
    m = tiny_armor()
    armor.save_pretrained(m, str(tmp_path))
    rewrite(tmp_path, "model.safetensors", lambda t: t.pop("armor.visual_head.weight"))
    with pytest.raises(CheckpointError, match="missing key.*armor.visual_head.weight"):
        armor.from_pretrained(str(tmp_path), verbose=False)
