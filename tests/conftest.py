import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Tests in other files that run whole programs in subprocesses (the toy pipeline, sample.py's CLI on the shipped
# model, vqgan.py's cache killed and resumed) or score the shipped toy model end to end over many sampled answers:
# marked e2e here, like the ones marked in their own file, so that `-m "not e2e"` stays a quick loop.
E2E = {"test_toy.py::test_sample_cli_draws_and_answers", "test_toy.py::test_pipeline_quick_end_to_end",
       "test_toy.py::test_shipped_model_draws_what_is_asked",
       "test_toy.py::test_shipped_model_starts_a_picture_for_casual_drawing_requests",
       "test_toy.py::test_prompt_reading_tells_a_read_word_from_noise",
       "test_toy.py::test_vqgan_ceiling_counts_what_the_tokenizer_lets_through",
       "test_vqgan.py::test_cache_kill_and_resume"}


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
