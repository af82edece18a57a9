import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer files in the released layouts (spec internvl25.md section 7), shared by tests/test_tokenizer.py and
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
# Markers

# Tests in other files that run whole programs in subprocesses (the toy pipeline, sample.py's CLI, vqgan.py's
# cache and toy.py's data preparation killed or run twice at once) or score the shipped toy model end to end over
# many sampled answers: marked e2e here, like the ones marked in their own file, so that `-m "not e2e"` stays a
# quick loop.
E2E = {"test_toy.py::test_sample_cli_draws_and_answers", "test_toy.py::test_pipeline_quick_end_to_end",
       "test_toy.py::test_shipped_model_draws_what_is_asked",
       "test_toy.py::test_shipped_model_starts_a_picture_for_casual_drawing_requests",
       "test_toy.py::test_prompt_reading_tells_a_read_word_from_noise",
       "test_toy.py::test_vqgan_ceiling_counts_what_the_tokenizer_lets_through",
       "test_vqgan.py::test_cache_kill_and_resume",
       "test_commands.py::test_two_processes_preparing_the_toy_data_at_once",
       "test_commands.py::test_a_killed_preparation_is_redone_not_read",
       "test_sample_cli.py::test_bad_input_in_a_subprocess_has_no_traceback"}


def pytest_collection_modifyitems(config, items):
    """Mark the E2E tests; leave out the tests marked slow unless the -m expression mentions them (pytest.ini). An
    -m in addopts would be replaced by the command line's own -m, so `pytest -m "not e2e"` would run them too."""
    for item in items:
        if item.nodeid.split("/")[-1].split("[")[0] in E2E:
            item.add_marker(pytest.mark.e2e)
    if "slow" in (config.getoption("markexpr") or ""):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        items[:] = [item for item in items if not item.get_closest_marker("slow")]
        config.hook.pytest_deselected(items=slow)
