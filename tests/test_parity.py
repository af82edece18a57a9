"""
Numerical parity of armor.py against transformers 5.23 on shared random weights (fp32, CPU).

  python -m pytest tests/test_parity.py -q

- InternVL2.5 with a Qwen2 LLM vs `InternVLForConditionalGeneration`: the whole image -> logits path with 3 tiles of
  a 4x4-patch tower (4 <IMG_CONTEXT> tokens per tile), then 20 greedy tokens from our KV-cache loop vs HF `generate`.
- InternVL2.5 with an InternLM2 LLM vs `LlamaForCausalLM` after the wqkv split: our weights are
  written in the released InternLM2 layout by save_internvl, read back by from_internvl, and compared at a length
  below and past a shrunk max_position_embeddings (64), where InternLM2's dynamic NTK rope changes the base.
Every tensor is randomised (LayerScale, norms, biases, position embeddings included), our state dict is mapped to the
HF names with the key map of transformers' InternVL conversion script, and HF loads it with strict=True.

Dynamic NTK and incremental decoding: HF's `dynamic_rope_update` recomputes `inv_freq` from max(position_ids) + 1 of
the current call whenever that exceeds the longest length seen so far, so in `generate` the prefill uses the base of
the prompt length and each new token's q/k use the base of the current total length, while the cached keys keep the
rotation they were written with. Our Rotary is stateless and takes the base from the current total length (cache
columns + new tokens), which is the same rule on a fresh model: test_internlm2_greedy_past_max_pos checks that our
cached greedy loop matches HF generate token for token and logit for logit across the max_pos boundary. (A cached
decode past max_pos is therefore not equal to one full forward over the same tokens, in HF as in ours and in the
original InternLM2 code; only the full-forward case is checked against a full forward.) HF's enlarged base is also
sticky: after a long call, a later shorter call that is still past max_pos reuses the larger base, where ours
recomputes it; so every HF comparison past max_pos here starts from a freshly built HF model.
"""

import pytest
import torch

import armor
from armor import ArmorConfig, LLMConfig, VisionConfig

# the oracle (requirements-test.txt): imported plainly, so a missing install fails instead of skipping the parity
from transformers import (InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig, LlamaConfig,
                          LlamaForCausalLM, Qwen2Config)
from conftest import randomize

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-4  # bound on max |delta logits| in fp32


def vision_hf_map(sd, prefix_ours, prefix_hf):
    """InternViT keys (released) -> InternVLVisionModel keys (transformers), splitting the fused qkv."""
    out = {}
    for k, v in sd.items():
        if not k.startswith(prefix_ours):
            continue
        r = k[len(prefix_ours):]
        r = (r.replace("embeddings.class_embedding", "embeddings.cls_token")
              .replace("embeddings.position_embedding", "embeddings.position_embeddings")
              .replace("embeddings.patch_embedding.", "embeddings.patch_embeddings.projection.")
              .replace("encoder.layers.", "encoder.layer.")
              .replace(".ls1", ".lambda_1").replace(".ls2", ".lambda_2")
              .replace(".norm1.", ".layernorm_before.").replace(".norm2.", ".layernorm_after.")
              .replace(".attn.proj.", ".attention.projection_layer."))
        if ".attn.qkv." in r:
            for n, part in zip("qkv", v.chunk(3, dim=0)):  # rows [0:C] = q, [C:2C] = k, [2C:3C] = v
                out[prefix_hf + r.replace(".attn.qkv.", f".attention.{n}_proj.")] = part
            continue
        out[prefix_hf + r] = v
    return out


def internvl_hf_state(model):
    sd = model.state_dict()
    out = vision_hf_map(sd, "vision_model.", "model.vision_tower.")
    for i, n in ((0, "layer_norm"), (1, "linear_1"), (3, "linear_2")):
        for t in ("weight", "bias"):
            out[f"model.multi_modal_projector.{n}.{t}"] = sd[f"mlp1.{i}.{t}"]
    for k, v in sd.items():
        if k.startswith("language_model.model."):
            out["model.language_model." + k[len("language_model.model."):]] = v
    out["lm_head.weight"] = sd["language_model.lm_head.weight"]
    return out


def llama_hf_state(model):
    sd = model.state_dict()
    out = {k[len("language_model."):]: v for k, v in sd.items() if k.startswith("language_model.model.")}
    out["lm_head.weight"] = sd["language_model.lm_head.weight"]
    return out


def qwen_config():
    # a 4x4 patch grid, so pixel shuffle mixes 2x2 blocks and 4 tokens per tile keep their spatial order
    return ArmorConfig(VisionConfig(56, 14, 32, 2, 2, 64), LLMConfig("qwen2", 300, 64, 2, 4, 2, 128),
                       num_image_codes=64, image_grid=4, image_px=64, num_adapter_layers=2)


def hf_internvl(cfg):
    v, l = cfg.vision, cfg.llm
    vc = InternVLVisionConfig(hidden_size=v.hidden_size, num_hidden_layers=v.num_layers,
                              num_attention_heads=v.num_heads, intermediate_size=v.intermediate_size,
                              image_size=v.image_size, patch_size=v.patch_size,
                              attention_bias=True, use_qk_norm=False, norm_type="layer_norm",
                              layer_norm_eps=v.layer_norm_eps, use_mean_pooling=True)
    tc = Qwen2Config(vocab_size=l.vocab_size, hidden_size=l.hidden_size, num_hidden_layers=l.num_layers,
                     num_attention_heads=l.num_heads, num_key_value_heads=l.num_kv_heads,
                     intermediate_size=l.intermediate_size, rms_norm_eps=l.rms_norm_eps, rope_theta=l.rope_theta,
                     max_position_embeddings=l.max_position_embeddings, tie_word_embeddings=False)
    # a pitfall: the top-level tie_word_embeddings defaults to True and wins, so pass False explicitly
    c = InternVLConfig(vision_config=vc, text_config=tc, image_token_id=cfg.img_context_id,
                       downsample_ratio=cfg.downsample_ratio, vision_feature_layer=-1,
                       vision_feature_select_strategy="default", tie_word_embeddings=False)
    c._attn_implementation = "eager"
    return InternVLForConditionalGeneration(c).eval()


def hf_llama(l: LLMConfig, dynamic=True):
    rope = {"rope_type": "dynamic", "factor": l.rope_dynamic_factor, "rope_theta": l.rope_theta} if dynamic else \
        {"rope_type": "default", "rope_theta": l.rope_theta}
    c = LlamaConfig(vocab_size=l.vocab_size, hidden_size=l.hidden_size, num_hidden_layers=l.num_layers,
                    num_attention_heads=l.num_heads, num_key_value_heads=l.num_kv_heads, head_dim=l.head_dim,
                    intermediate_size=l.intermediate_size, rms_norm_eps=l.rms_norm_eps, attention_bias=False,
                    rope_parameters=rope, max_position_embeddings=l.max_position_embeddings,
                    tie_word_embeddings=False)
    c._attn_implementation = "eager"
    return LlamaForCausalLM(c).eval()


def load_strict(hf_model, state):
    hf_model.load_state_dict(state, strict=True)
    # shared weights really are shared: every HF tensor now equals one of ours (no tie, no leftover init)
    for k, v in hf_model.state_dict().items():
        assert torch.equal(v, state[k]), k
    return hf_model


def no_eos(hf_model):
    hf_model.generation_config.eos_token_id = None
    hf_model.generation_config.pad_token_id = 0
    return hf_model


@torch.no_grad()
def greedy(model, ids, n, pixels=None, vocab=None):
    """Our KV-cache loop: prefill, then one token per step; argmax over the first `vocab` text-head outputs."""
    state = model.new_state(ids.shape[0], ids.shape[1] + n)
    h = model.extend(state, ids, pixels)
    out, logits = [], []
    for _ in range(n):
        lg = model.text_logits(h[:, -1])[..., :vocab]
        logits.append(lg)
        tok = lg.argmax(-1, keepdim=True)
        out.append(tok)
        h = model.extend(state, tok)
    return torch.cat(out, 1), torch.stack(logits, 1)


def image_prompt(cfg, tiles, seed=0):
    g = torch.Generator().manual_seed(seed)
    V, ctx = cfg.llm.vocab_size, cfg.img_context_id
    text = lambda n: torch.randint(0, V - 9, (n,), generator=g)  # ordinary text ids, below the 9 InternVL tokens
    ids = torch.cat([text(5), torch.tensor([V - 9]), torch.full((tiles * cfg.tokens_per_tile,), ctx),
                     torch.tensor([V - 8]), text(7)])[None]
    pixels = torch.randn(tiles, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    return ids, pixels


def test_internvl_qwen2_matches_hf_three_tiles():
    cfg = qwen_config()
    assert cfg.tokens_per_tile == 4
    ours = randomize(armor.InternVL(cfg).eval())
    hf = load_strict(hf_internvl(cfg), internvl_hf_state(ours))
    assert hf.lm_head.weight.data_ptr() != hf.model.language_model.embed_tokens.weight.data_ptr()  # untied
    ids, pixels = image_prompt(cfg, tiles=3)
    with torch.no_grad():
        a = ours(ids, pixels)[0]
        b = hf(input_ids=ids, pixel_values=pixels).logits
        b_other = hf(input_ids=ids, pixel_values=pixels.flip(0)).logits  # tiles in another order
        # the vision tower alone (CLS included) and the projected features, to localise a failure
        va = ours.vision_model(pixels)
        vb = hf.model.vision_tower(pixel_values=pixels).last_hidden_state
        fa = ours.extract_feature(pixels)
        fb = hf.model.get_image_features(pixel_values=pixels).pooler_output
    assert (va - vb).abs().max() <= TOL
    assert (fa - fb).abs().max() <= TOL
    assert a.shape == b.shape == (1, ids.shape[1], cfg.llm.vocab_size)
    assert (a - b).abs().max() <= TOL, (a - b).abs().max()
    # meaningful: the logits depend on the images and on their order, well above the tolerance
    assert (b_other - b).abs().max() > 100 * TOL
    assert b.std() > 0.5


def test_internvl_qwen2_greedy_matches_hf_generate():
    cfg = qwen_config()
    ours = randomize(armor.InternVL(cfg).eval(), seed=1)
    hf = no_eos(load_strict(hf_internvl(cfg), internvl_hf_state(ours)))
    ids, pixels = image_prompt(cfg, tiles=3, seed=1)
    toks, _ = greedy(ours, ids, 20, pixels)
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=20, do_sample=False)[:, ids.shape[1]:]
    assert ref.shape == (1, 20)
    assert toks.tolist() == ref.tolist()
    assert len(set(ref[0].tolist())) > 3  # not a degenerate repeat of one token

    # ARMOR on the same base: the text head has V + 1 outputs; restricted to [:V] it decodes the same tokens
    arm = armor.Armor(cfg).eval()
    missing, unexpected = arm.load_state_dict(ours.state_dict(), strict=False)
    assert unexpected == [] and all(k.startswith("armor.") for k in missing)
    armor.init_armor(arm, seed=0)
    toks_a, _ = greedy(arm, ids, 20, pixels, vocab=cfg.llm.vocab_size)
    assert toks_a.tolist() == ref.tolist()


def test_bfloat16_error_like_hf():
    """Our bf16 forward is as far from our fp32 one as HF's bf16 forward is from HF's fp32 one (same weights), so
    the casts (RMSNorm in fp32 then cast, rope tables built in fp32, LayerNorm) follow the released order."""
    cfg = qwen_config()
    ours = randomize(armor.InternVL(cfg).eval())
    hf = load_strict(hf_internvl(cfg), internvl_hf_state(ours))
    ids, pixels = image_prompt(cfg, tiles=3)
    with torch.no_grad():
        a32, b32 = ours(ids, pixels)[0], hf(input_ids=ids, pixel_values=pixels).logits
        a16 = ours.to(torch.bfloat16)(ids, pixels)[0]
        b16 = hf.to(torch.bfloat16)(input_ids=ids, pixel_values=pixels.bfloat16()).logits
    assert a16.dtype == b16.dtype == torch.bfloat16 and torch.isfinite(a16).all()
    ours_err = (a16.float() - a32).abs().max()
    hf_err = (b16.float() - b32).abs().max()
    assert hf_err > 0.005 * b32.abs().max()  # bf16 really rounds here: the comparison has something to compare
    # measured: ours 2.7%, HF 2.7% of the largest |logit| (seeds 0-2: ours 2.6-3.1%, HF 2.7-4.7%)
    assert ours_err <= 1.5 * hf_err, (float(ours_err), float(hf_err))


def internlm2_config():
    c = armor.PRESETS["tiny-internlm2"]()
    c.llm.max_position_embeddings = 64  # shrunk, so the dynamic NTK rope acts past 64 tokens
    return c


def internlm2_roundtrip(tmp_path, seed=0):
    """Our random InternLM2-layout model -> released layout (packed wqkv) on disk -> from_internvl."""
    cfg = internlm2_config()
    src = randomize(armor.InternVL(cfg).eval(), seed=seed)
    armor.save_internvl(src, tmp_path)
    model = armor.from_internvl(str(tmp_path), armor=False, verbose=False).eval()
    for k, v in src.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert model.config.llm.max_position_embeddings == 64 and model.config.llm.rope_dynamic_factor == 2.0
    return model


def test_internlm2_matches_llama_below_and_past_max_pos(tmp_path):
    model = internlm2_roundtrip(tmp_path)
    l = model.config.llm
    g = torch.Generator().manual_seed(3)
    hf = load_strict(hf_llama(l), llama_hf_state(model))
    for T in (17, 94):  # 94 > max_pos 64: the dynamic NTK base; ascending so HF's sticky base is the right one
        ids = torch.randint(0, l.vocab_size - 9, (1, T), generator=g)  # no InternVL specials
        with torch.no_grad():
            a = model(ids)[0]
            b = hf(input_ids=ids).logits
        assert (a - b).abs().max() <= TOL, (T, (a - b).abs().max())
        if T > l.max_position_embeddings:
            # meaningful: plain RoPE (no dynamic scaling) is measurably different at this length
            plain = load_strict(hf_llama(l, dynamic=False), llama_hf_state(model))
            with torch.no_grad():
                c = plain(input_ids=ids).logits
            assert (c - b).abs().max() > 10 * TOL


@pytest.mark.parametrize("prompt_len", [20, 54])  # 20 + 20 stays below max_pos 64; 54 + 20 crosses it
def test_internlm2_greedy_matches_llama_generate(tmp_path, prompt_len):
    model = internlm2_roundtrip(tmp_path, seed=prompt_len)
    l = model.config.llm
    hf = no_eos(load_strict(hf_llama(l), llama_hf_state(model)))  # fresh: no sticky dynamic base
    ids = torch.randint(0, l.vocab_size - 9, (1, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    toks, logits = greedy(model, ids, 20)
    with torch.no_grad():
        out = hf.generate(input_ids=ids, max_new_tokens=20, do_sample=False, output_logits=True,
                          return_dict_in_generate=True)
    assert toks.tolist() == out.sequences[:, prompt_len:].tolist()
    ref = torch.stack(out.logits, 1)
    assert (logits - ref).abs().max() <= TOL
    assert len(set(toks[0].tolist())) > 3
