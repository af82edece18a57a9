"""
Device correctness without a GPU: every model kind built and initialised on the `meta` device. A tensor made on the
CPU next to a model elsewhere ("Expected all tensors to be on the same device" on the first GPU that runs it) fails
here the same way, since meta tensors refuse to mix with CPU ones.
(Forward passes cannot run there: a decode step reads token ids back on the host, which meta tensors cannot do.)

  python -m pytest tests/test_devices.py -q
"""

import pytest
import torch

import armor


def meta_model(preset, kind=armor.Armor):
    with torch.device("meta"):
        model = kind(armor.PRESETS[preset]())
    armor.init_weights(model)
    if kind is armor.Armor:
        armor.init_armor(model, seed=0)
    return model


@pytest.mark.parametrize("preset", ["tiny", "tiny-internlm2", "toy", "internvl2_5-1b", "internvl2_5-8b"])
def test_every_model_kind_builds_and_initialises_on_the_model_device(preset):
    """The base MLLM and ARMOR, both LLM layouts, up to the released sizes (meta tensors hold no data: instant)."""
    for kind in (armor.InternVL, armor.Armor):
        model = meta_model(preset, kind)
        assert {p.device.type for p in model.parameters()} == {"meta"}
        assert {b.device.type for b in model.buffers()} <= {"meta"}


def test_init_armor_draws_the_same_weights_whatever_the_device():
    """The seed fixes the new tensors; the device they land on does not change them."""
    cpu = armor.Armor(armor.PRESETS["tiny"]())
    armor.init_weights(cpu)
    twin = armor.Armor(armor.PRESETS["tiny"]())
    twin.load_state_dict(cpu.state_dict())
    armor.init_armor(cpu, seed=3)
    armor.init_armor(twin.to(torch.float64), seed=3)  # another dtype stands in for another device here
    for (n, a), b in zip(cpu.armor.state_dict().items(), twin.armor.state_dict().values()):
        assert torch.allclose(a.double(), b, atol=1e-6), n
