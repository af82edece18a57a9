"""
The released InternVL2.5-1B and -8B `config.json` (written out here from the published values) read by the loader's
own path (from_internvl -> config_from_internvl) into armor.PRESETS, and the released-size models built on the meta
device through from_internvl, with every tensor of the released key list shape-checked by the loader and the
published parameter counts.

  python -m pytest tests/test_released_configs.py -q
"""

import json
from types import SimpleNamespace

import pytest
import torch

import armor
from test_loading import released_keys

TOP = dict(architectures=["InternVLChatModel"], model_type="internvl_chat", template="internvl2_5",
           downsample_ratio=0.5, ps_version="v2", select_layer=-1, force_image_size=448, dynamic_image_size=True,
           use_thumbnail=True, min_dynamic_patch=1, max_dynamic_patch=12, use_backbone_lora=0, use_llm_lora=0,
           torch_dtype="bfloat16")
VISION = dict(architectures=["InternVisionModel"], model_type="intern_vit_6b", hidden_size=1024, num_hidden_layers=24,
              num_attention_heads=16, intermediate_size=4096, image_size=448, patch_size=14, num_channels=3,
              norm_type="layer_norm", layer_norm_eps=1e-6, qkv_bias=True, qk_normalization=False, drop_path_rate=0.0,
              dropout=0.0, attention_dropout=0.0, initializer_factor=1.0, use_flash_attn=True)
RELEASED = {
    "internvl2_5-1b": dict(TOP, vision_config=VISION, llm_config=dict(
        architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=896, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, intermediate_size=4864, vocab_size=151674, rope_theta=1e6,
        rms_norm_eps=1e-6, max_position_embeddings=32768, tie_word_embeddings=False, bos_token_id=151643,
        eos_token_id=151645, use_sliding_window=False, hidden_act="silu")),
    "internvl2_5-8b": dict(TOP, vision_config=VISION, llm_config=dict(
        architectures=["InternLM2ForCausalLM"], model_type="internlm2", hidden_size=4096, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336, vocab_size=92553, rope_theta=1e6,
        rope_scaling={"type": "dynamic", "factor": 2.0}, rms_norm_eps=1e-5, max_position_embeddings=32768,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, bias=False, hidden_act="silu")),
}
# the released configs as plain numbers: the released key list and its shapes come from these, not from the parsed
# config
SHAPES = {"internvl2_5-1b": dict(arch="qwen2", hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2,
                                 head_dim=64, intermediate_size=4864, vocab_size=151674),
          "internvl2_5-8b": dict(arch="internlm2", hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                                 head_dim=128, intermediate_size=14336, vocab_size=92553)}
VIT = dict(hidden_size=1024, image_size=448, patch_size=14, num_layers=24, intermediate_size=4096)
TOTAL = {"internvl2_5-1b": 938_193_024, "internvl2_5-8b": 8_075_365_376}  # the model cards' counts


def released_dir(tmp_path, name, monkeypatch):
    """A released directory: the real config.json, and tensors of the released names and shapes on the meta device
    in place of the safetensors files (the loader's file reading is replaced, nothing else)."""
    (tmp_path / "config.json").write_text(json.dumps(RELEASED[name], indent=2))
    shapes = released_keys(SimpleNamespace(vision=SimpleNamespace(**VIT), llm=SimpleNamespace(**SHAPES[name])))
    monkeypatch.setattr(armor, "_open_safetensors", lambda path: {k: k for k in shapes})
    monkeypatch.setattr(armor, "_read_tensor", lambda key, _: torch.empty(shapes[key], dtype=torch.bfloat16,
                                                                          device="meta"))
    return shapes


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_config_is_the_preset_and_builds_on_meta(name, tmp_path, monkeypatch, capsys):
    shapes = released_dir(tmp_path, name, monkeypatch)
    model = armor.from_internvl(str(tmp_path), dtype=torch.bfloat16, device="meta", armor=False)
    assert model.config.to_dict() == armor.PRESETS[name]().to_dict()
    # every released tensor, shape-checked (InternLM2's packed wqkv becomes our q, k, v: 2 more per layer)
    ours = len(shapes) + (2 * SHAPES[name]["num_layers"] if SHAPES[name]["arch"] == "internlm2" else 0)
    assert f"loaded {ours} tensors" in capsys.readouterr().out
    assert sum(p.numel() for p in model.parameters()) == TOTAL[name]
    assert all(p.is_meta and p.dtype == torch.bfloat16 for p in model.parameters())
    if name == "internvl2_5-1b":  # Qwen2 keys are ours as released: every shape one to one
        assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes
    # a released tensor of another shape is refused, naming it
    key = "language_model.model.layers.0.mlp.down_proj.weight" if name.endswith("1b") else \
        "language_model.model.layers.0.feed_forward.w2.weight"
    shapes[key] = shapes[key][::-1]
    with pytest.raises(armor.CheckpointError, match=key.replace(".", r"\.")):
        armor.from_internvl(str(tmp_path), device="meta", armor=False)


def test_armor_additions_of_the_1b_on_meta():
    cfg = armor.PRESETS["internvl2_5-1b"]()
    with torch.device("meta"):
        model = armor.Armor(cfg)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith("armor.")}
    # Section 3.2 at 8192 codes: rows for <imgbos>, <imgend>, <imgpad> + codes; the <imgbos> row of the text head;
    # the visual head over <imgend>, <imgpad> + codes; 3 adapter blocks shaped like Qwen2.5-0.5B's layers
    want = {"armor.embed_new.weight": (8195, 896), "armor.imgbos_head.weight": (1, 896),
            "armor.visual_head.weight": (8194, 896), "armor.adapter_norm.weight": (896,)}
    for i in range(3):
        p = f"armor.adapter.{i}."
        want.update({p + "self_attn.q_proj.weight": (896, 896), p + "self_attn.q_proj.bias": (896,),
                     p + "self_attn.k_proj.weight": (128, 896), p + "self_attn.k_proj.bias": (128,),
                     p + "self_attn.v_proj.weight": (128, 896), p + "self_attn.v_proj.bias": (128,),
                     p + "self_attn.o_proj.weight": (896, 896), p + "mlp.gate_proj.weight": (4864, 896),
                     p + "mlp.up_proj.weight": (4864, 896), p + "mlp.down_proj.weight": (896, 4864),
                     p + "input_layernorm.weight": (896,), p + "post_attention_layernorm.weight": (896,)})
    assert got == want
