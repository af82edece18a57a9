import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer files in the released layouts, shared by tests/test_tokenizer.py and
# tests/test_road.py. Imported lazily: sentencepiece and the repository's modules load only when a test asks.

import json  # noqa: E402

# InternLM2's chat markers, stored in tokenizer.model as placeholder pieces and renamed by tokenizer_config.json
CHAT_MARKERS = ["<|plugin|>", "<|interpreter|>", "<|action_end|>", "<|action_start|>", "<|im_end|>", "<|im_start|>"]


def write_qwen2_tokenizer(tok, path):
    """A byte-level BPE (tokenizer.Tokenizer.train_bpe) written as InternVL2.5-1B ships its tokenizer: vocab.json +
    merges.txt (the slow Qwen2Tokenizer files) and added_tokens.json with the Qwen specials and the 9 InternVL tokens
    right after the base vocabulary. -> {added token: id}."""
    from tokenizer import INTERNVL_TOKENS, QWEN_SPECIALS

    tok.tk.model.save(str(path))  # vocab.json + merges.txt
    n = tok.tk.get_vocab_size(with_added_tokens=False)
    added = {t: n + k for k, t in enumerate(QWEN_SPECIALS + INTERNVL_TOKENS)}
    (path / "added_tokens.json").write_text(json.dumps(added))
    return added


def write_internlm2_tokenizer(path, texts, vocab_size=1500, **sp_options):
    """A SentencePiece BPE with byte fallback laid out like InternVL2.5-2B / 8B: tokenizer.model whose chat markers
    are placeholder pieces renamed by tokenizer_config.json, and the 9 InternVL tokens in added_tokens.json after
    the pieces. -> (sentencepiece processor, {special token: id})."""
    import io

    import sentencepiece as spm

    from tokenizer import INTERNVL_TOKENS

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=buf, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, character_coverage=0.999, hard_vocab_limit=False, num_threads=2, minloglevel=2,
        control_symbols=[f"[UNUSED_TOKEN_{k}]" for k in range(6)], **sp_options)
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    (path / "tokenizer.model").write_bytes(buf.getvalue())
    n = sp.get_piece_size()
    ids = {"<unk>": 0, "<s>": 1, "</s>": 2}
    ids.update({t: sp.piece_to_id(f"[UNUSED_TOKEN_{k}]") for k, t in enumerate(CHAT_MARKERS)})
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"add_bos_token": True,
         "added_tokens_decoder": {str(i): {"content": t, "special": True} for t, i in ids.items()}}))
    ids.update({t: n + k for k, t in enumerate(INTERNVL_TOKENS)})
    (path / "added_tokens.json").write_text(json.dumps({t: n + k for k, t in enumerate(INTERNVL_TOKENS)}))
    return sp, ids


# ---------------------------------------------------------------------------------------------------------------------
# Shared helpers of the model tests


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: waking a second OpenMP thread costs more than the math on a loaded 2-core box (20 ms vs 12 us per
    64x64 matmul), and one thread gives the same bits in every process. A module opts in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`; the setting is restored afterwards."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def randomize(model, seed=0):
    """Every tensor random and O(1)-scaled, so that no path (LayerScale, biases, norms, positions) is a no-op and a
    mix-up of two tensors shows. -> model."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if name.endswith(("ls1", "ls2")):
                p.copy_(0.5 + 0.3 * r)
            elif p.dim() == 1 and ("norm" in name or name.startswith("mlp1.0.")) and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * r)  # RMSNorm / LayerNorm gains
            elif p.dim() == 1:
                p.copy_(0.1 * r)  # biases
            elif "embed" in name or "class_embedding" in name or "position_embedding" in name:
                p.copy_(0.5 * r)
            else:
                p.copy_(r * 1.5 / p[0].numel() ** 0.5)
    return model



def tiny_armor(seed=0, preset="tiny"):
    """An Armor of a tiny preset with randomize'd weights, in eval mode."""
    import armor

    return randomize(armor.Armor(armor.PRESETS[preset]()).eval(), seed)

# ---------------------------------------------------------------------------------------------------------------------
# Markers

def pytest_collection_modifyitems(config, items):
    """Leave out the tests marked slow unless the -m expression mentions them (pytest.ini). An -m in addopts would
    be replaced by the command line's own -m, so `pytest -m "not e2e"` would run them too."""
    if "slow" in (config.getoption("markexpr") or ""):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        items[:] = [item for item in items if not item.get_closest_marker("slow")]
        config.hook.pytest_deselected(items=slow)
