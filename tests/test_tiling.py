"""InternVL dynamic tiling and pixel normalisation (data.py) against the reference algorithm, written out literally
below from InternVL's dataset.py (dynamic_preprocess): a set of candidate grids sorted by area, the closest aspect
ratio with the area tie rule, PIL's default (bicubic) resize, row-major crops, the thumbnail last, then torchvision's
Resize + ToTensor + Normalize redone with PIL + numpy.

  python -m pytest tests/test_tiling.py
"""
import random

import numpy as np
import pytest
import torch
from PIL import Image

from data import IMAGENET_MEAN, IMAGENET_STD, candidate_grids, dynamic_preprocess, find_grid, load_image


# ---- reference (in the shape of InternVL's dataset.py) --------------------------------------------------------------
def ref_find_closest_aspect_ratio(aspect_ratio, target_ratios, width, height, image_size):
    best_ratio_diff = float("inf")
    best_ratio = (1, 1)
    area = width * height
    for ratio in target_ratios:
        target_aspect_ratio = ratio[0] / ratio[1]
        ratio_diff = abs(aspect_ratio - target_aspect_ratio)
        if ratio_diff < best_ratio_diff:
            best_ratio_diff = ratio_diff
            best_ratio = ratio
        elif ratio_diff == best_ratio_diff:
            if area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
                best_ratio = ratio
    return best_ratio


def ref_target_ratios(min_num, max_num):
    target_ratios = set(
        (i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
        if i * j <= max_num and i * j >= min_num)
    return sorted(target_ratios, key=lambda x: x[0] * x[1])


def ref_dynamic_preprocess(image, min_num=1, max_num=12, image_size=448, use_thumbnail=False):
    orig_width, orig_height = image.size
    aspect_ratio = orig_width / orig_height
    target_ratios = ref_target_ratios(min_num, max_num)
    target_aspect_ratio = ref_find_closest_aspect_ratio(aspect_ratio, target_ratios, orig_width, orig_height,
                                                        image_size)
    target_width = image_size * target_aspect_ratio[0]
    target_height = image_size * target_aspect_ratio[1]
    blocks = target_aspect_ratio[0] * target_aspect_ratio[1]
    resized_img = image.resize((target_width, target_height))  # no filter given: PIL's default
    processed_images = []
    for i in range(blocks):
        box = ((i % (target_width // image_size)) * image_size,
               (i // (target_width // image_size)) * image_size,
               ((i % (target_width // image_size)) + 1) * image_size,
               ((i // (target_width // image_size)) + 1) * image_size)
        processed_images.append(resized_img.crop(box))
    if use_thumbnail and len(processed_images) != 1:
        processed_images.append(image.resize((image_size, image_size)))
    return processed_images


def ref_load_image(image, image_size=448, max_num=12):
    image = image.convert("RGB")
    out = []
    for tile in ref_dynamic_preprocess(image, image_size=image_size, use_thumbnail=True, max_num=max_num):
        tile = tile.resize((image_size, image_size), Image.Resampling.BICUBIC)  # T.Resize((S, S), BICUBIC)
        x = np.asarray(tile, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32) / np.float32(255)  # ToTensor
        mean = np.array(IMAGENET_MEAN, dtype=np.float32)[:, None, None]
        std = np.array(IMAGENET_STD, dtype=np.float32)[:, None, None]
        out.append((x - mean) / std)  # Normalize
    return np.stack(out)


# ---- helpers -------------------------------------------------------------------------------------------------------
def make_image(w, h, seed=0, mode="RGB"):
    """Smooth gradients plus noise, so resampling differences would show in the pixels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / max(w - 1, 1), yy * 255 / max(h - 1, 1), (xx + yy) % 256], axis=-1)
    arr = np.clip(base + rng.normal(0, 30, size=(h, w, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB").convert(mode)


# worked examples (max_num 12, thumbnail on): size -> (grid, tiles incl. thumbnail)
WORKED = {(448, 448): ((1, 1), 1), (224, 224): ((1, 1), 1), (1000, 1000): ((3, 3), 10), (800, 600): ((4, 3), 13),
          (1024, 768): ((4, 3), 13), (1920, 1080): ((4, 2), 9), (300, 1200): ((1, 4), 5)}

SPEC_ORDER_12 = [(1, 1), (1, 2), (2, 1), (3, 1), (1, 3), (2, 2), (4, 1), (1, 4), (5, 1), (1, 5), (1, 6), (6, 1),
                 (3, 2), (2, 3), (7, 1), (1, 7), (4, 2), (2, 4), (1, 8), (8, 1), (1, 9), (3, 3), (9, 1), (2, 5),
                 (5, 2), (10, 1), (1, 10), (11, 1), (1, 11), (12, 1), (3, 4), (4, 3), (1, 12), (6, 2), (2, 6)]


def test_candidate_order():
    assert candidate_grids(1, 12) == SPEC_ORDER_12
    for lo, hi in [(1, 1), (1, 6), (2, 9), (1, 24), (3, 40)]:
        assert candidate_grids(lo, hi) == ref_target_ratios(lo, hi), (lo, hi)


def test_worked_examples():
    for (w, h), (grid, n) in WORKED.items():
        assert find_grid(w, h) == grid, (w, h)
        assert len(dynamic_preprocess(Image.new("RGB", (w, h)))) == n, (w, h)


def test_find_grid_matches_reference_sweep():
    # many aspect ratios and areas around the tie thresholds, several tile budgets and tile sizes
    sides = sorted({1, 2, 3, 7, 100, 224, 300, 317, 448, 449, 600, 633, 634, 672, 800, 896, 897, 950, 1000, 1024,
                    1080, 1200, 1344, 1500, 1920, 2000, 3000, 5000})
    n = 0
    for lo, hi in [(1, 12), (1, 6), (1, 1), (2, 12), (1, 24)]:
        for s in (448, 224):
            cands = ref_target_ratios(lo, hi)
            for w in sides:
                for h in sides:
                    want = ref_find_closest_aspect_ratio(w / h, cands, w, h, s)
                    assert find_grid(w, h, lo, hi, s) == want, (w, h, lo, hi, s)
                    n += 1
    assert n == 5 * 2 * len(sides) ** 2


RANDOM_SIZES = [(random.Random(k).randint(20, 1600), random.Random(k + 100).randint(20, 1600)) for k in range(5)]


@pytest.mark.parametrize("size", list(WORKED) + [(2000, 12), (12, 2000), (1, 1), (3000, 5)] + RANDOM_SIZES,
                         ids=lambda s: f"{s[0]}x{s[1]}")
def test_tiles_and_pixels_match_reference(size):
    img = make_image(*size, seed=sum(size))
    ours, ref = dynamic_preprocess(img), ref_dynamic_preprocess(img, use_thumbnail=True)
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref):  # same crops in the same order, thumbnail last
        assert a.size == b.size == (448, 448)
        assert a.tobytes() == b.tobytes()
    x = load_image(img)
    assert x.dtype == torch.float32 and x.shape == (len(ref), 3, 448, 448)
    assert np.array_equal(x.numpy(), ref_load_image(img))  # bit-exact fp32


def test_load_image_modes_path_and_max_num(tmp_path):
    # grayscale / RGBA inputs are converted to RGB; a path loads the same as the image; max_num and a small tile
    for mode in ("L", "RGBA", "P"):
        img = make_image(700, 500, seed=3, mode=mode)
        assert np.array_equal(load_image(img, max_num=6).numpy(), ref_load_image(img, max_num=6))
    img = make_image(900, 300, seed=4)
    img.save(tmp_path / "x.png")
    assert torch.equal(load_image(tmp_path / "x.png", image_size=224, max_num=4), load_image(img, 224, 4))
    assert np.array_equal(load_image(img, 224, 4).numpy(), ref_load_image(img, image_size=224, max_num=4))
