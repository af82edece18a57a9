"""
bench.py's GPU table, run at tiny shapes on the CPU (`python bench.py --device cpu --smoke`): every row the CUDA run
makes (decode against transformers and alone, the text-only answer against the bare LLM's loop, seconds per image
with the text head pinned to <imgbos>, the VQGAN decode, the stage-2 training steps) goes through the same code, so a GPU run does not die on a
typo after minutes of set-up.

  python -m pytest tests/test_bench.py -q
"""

import pytest

import bench

pytestmark = pytest.mark.usefixtures("one_thread")


def test_gpu_rows_run_at_tiny_shapes_on_the_cpu(capsys):
    rows = bench.main(["--device", "cpu", "--smoke"])
    names = [r[0] for r in rows]
    assert names == ["decode tiny shape bf16 batch 1", "decode tiny shape bf16 batch 2", "decode tiny shape bf16 batch 8",
                     "text-only answer tiny shape bf16", "image tiny shape bf16, 16 codes, cfg 1.5",
                     "decode tiny-internlm2 shape bf16 batch 1", "image tiny-internlm2 shape bf16, 16 codes, cfg 1.5",
                     "vqgan decode 4x4 codes (cpu)", "train stage 2, tiny, bf16, 2x80 tokens",
                     "train stage 2, tiny, bf16, 2x80 tokens, activation checkpointing"]
    assert all(r[1].endswith(("tok/s", "ms/tok", "s/image")) for r in rows)
    assert all(r[3].startswith("MFU ") for r in rows[-2:])
    assert "| vqgan decode 4x4 codes (cpu) |" in capsys.readouterr().out  # the table is printed
