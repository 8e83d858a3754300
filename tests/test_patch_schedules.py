"""Patch-size schedules: presets, nearest lookup, coverage, JSON files and clear errors."""

import json
import math

import pytest
import torch

from analytic_diffusion.denoisers.patch_presets import (
    ALIASES,
    KAMB_TABLES,
    PRESETS,
    PSPC_CIFAR10_SIZES,
    as_patch_schedule,
    list_presets,
    load_patch_schedule,
)
from analytic_diffusion.denoisers.patch_schedule import PatchSchedule
from analytic_diffusion.grids import get_schedule, kamb_sigma, karras

KAMB_NAMES = [
    "kamb-mnist-resnet-zeros",
    "kamb-mnist-resnet-circular",
    "kamb-mnist-unet-zeros",
    "kamb-fashionmnist-resnet-zeros-cond",
    "kamb-fashionmnist-unet-zeros-cond",
    "kamb-cifar10-resnet-zeros-cond",
    "kamb-cifar10-resnet-circular-cond",
    "kamb-cifar10-unet-zeros-cond",
    "kamb-celeba-resnet-zeros",
    "kamb-celeba-unet-zeros",
]


def test_preset_names():
    assert sorted(KAMB_NAMES + ["pspc-cifar10"]) == sorted(list_presets())
    assert set(list_presets(aliases=True)) == set(PRESETS) | set(ALIASES)
    assert load_patch_schedule("kamb-mnist").sizes == KAMB_TABLES["kamb-mnist-resnet-zeros"]


@pytest.mark.parametrize("name", KAMB_NAMES)
def test_kamb_tables_in_sigma(name):
    sch = load_patch_schedule(name)
    assert len(sch.sizes) == len(sch.sigmas) == 20 and sch.odd
    assert sch.sigmas[0] == 0.0
    assert sch.sigmas[1] == pytest.approx(0.0781, abs=5e-4)  # t = 0.05: tan(0.05/1.008·π/2)
    assert sch.sigmas[10] == pytest.approx(math.tan(0.5 / 1.008 * math.pi / 2))  # t = 0.5: σ ≈ 0.986
    assert sch.sigmas[19] == pytest.approx(kamb_sigma(0.95)) and sch.sigmas[19] == pytest.approx(11.03, abs=0.01)
    assert all(a < b for a, b in zip(sch.sigmas, sch.sigmas[1:]))
    # Kamb's 19-step machine visits i = 19 … 1 exactly; each step gets its own table entry.
    grid = get_schedule("kamb-cosine", 19).sigmas[:-1].tolist()
    sch.check_covers(grid)
    assert [sch.k_for(s) for s in grid] == sch.sizes[19:0:-1]


def test_specific_table_values():
    mnist = load_patch_schedule("kamb-mnist-resnet-zeros")
    assert mnist.k_for(kamb_sigma(0.95)) == 15 and mnist.k_for(kamb_sigma(0.05)) == 3
    assert mnist.k_for(kamb_sigma(0.5)) == 11
    assert load_patch_schedule("kamb-mnist-unet-zeros").k_for(kamb_sigma(0.95)) == 27
    assert load_patch_schedule("kamb-mnist-resnet-circular").k_for(kamb_sigma(0.9)) == 3
    assert load_patch_schedule("kamb-celeba-unet-zeros").max_size == 27


def test_pspc_cifar10_on_the_karras_grid():
    sch = load_patch_schedule("pspc-cifar10")
    assert sch.sizes == PSPC_CIFAR10_SIZES and not sch.odd  # 32 = the whole image: an even crop
    k18 = karras(18).sigmas
    assert sch.sigmas == pytest.approx(k18[:-1].tolist()) and sch.sigmas[0] == pytest.approx(80.0)
    assert sch.sigmas[-1] == pytest.approx(0.002)
    sch.check_covers(k18.tolist())
    assert [sch.k_for(float(s)) for s in k18[:-1]] == PSPC_CIFAR10_SIZES
    assert sch.k_for(100.0) == 32 and sch.k_for(0.0025) == 3
    with pytest.raises(ValueError, match="covers"):
        sch.check_covers([300.0])


def test_presets_are_copies():
    a = load_patch_schedule("kamb-mnist")
    a.sizes[0] = 99
    assert load_patch_schedule("kamb-mnist").sizes[0] == 3


def test_nearest_lookup_in_log_sigma():
    sch = PatchSchedule([3, 7, 11], [0.1, 1.0, 10.0], name="t")
    assert sch.k_for(1.0) == 7
    assert sch.k_for(0.3) == 3 and sch.k_for(0.33) == 7  # geometric midpoint √0.1 ≈ 0.316
    assert sch.k_for(3.0) == 7 and sch.k_for(3.3) == 11
    assert sch.k_for(0.1 / 1.4) == 3 and sch.k_for(14.0) == 11  # within the 1.5× tolerance
    assert PatchSchedule.constant(5).k_for(1e6) == 5
    zero = PatchSchedule([3, 5], [0.0, 1.0], name="z")
    assert zero.k_for(1e-4) == 3 and zero.k_for(0.99) == 3 and zero.k_for(1.01) == 5  # σ = 0: below the rest


def test_check_covers_errors():
    sch = PatchSchedule([3, 7, 11], [0.1, 1.0, 10.0], name="mine")
    sch.check_covers([14.0, 1.0, 0.07, 0.0])  # 0 (the last σ of a grid) is never evaluated
    with pytest.raises(ValueError, match=r"'mine'.*sampler visits σ = 80"):
        sch.check_covers(karras(5).sigmas.tolist())
    with pytest.raises(ValueError, match="0.01"):
        sch.check_covers([1.0, 0.01])
    with pytest.raises(ValueError, match="covers"):
        sch.k_for(50.0)
    # Kamb's tables do not reach σ = 80 (σ_max of the EDM grid).
    with pytest.raises(ValueError, match="kamb-mnist-resnet-zeros"):
        load_patch_schedule("kamb-mnist").check_covers(karras(18).sigmas.tolist())


def test_json_round_trip(tmp_path):
    for name in ("kamb-cifar10-unet-zeros-cond", "pspc-cifar10"):
        sch = load_patch_schedule(name)
        path = tmp_path / f"{name}.json"
        sch.save(path)
        back = load_patch_schedule(str(path))
        assert back.sizes == sch.sizes and back.sigmas == sch.sigmas and back.odd == sch.odd
        assert back.name == name
    unnamed = tmp_path / "mine.json"
    unnamed.write_text(json.dumps({"sigmas": [0.5, 2.0], "patch_sizes": [3, 9]}))
    back = as_patch_schedule(str(unnamed))
    assert back.k_for(0.5) == 3 and back.k_for(2.0) == 9 and back.name == "mine.json"


def test_unknown_names_and_bad_files(tmp_path):
    with pytest.raises(ValueError, match=r"unknown patch schedule 'kamb-mnistt'.*kamb-mnist-resnet-zeros.*pspc"):
        load_patch_schedule("kamb-mnistt")
    with pytest.raises(FileNotFoundError, match=r"missing\.json.*kamb-celeba-unet-zeros"):
        load_patch_schedule(str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="unknown patch schedule"):
        as_patch_schedule("nope")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"bad\.json.*not valid JSON.*kamb-mnist"):
        load_patch_schedule(str(bad))
    cases = {
        "nokey.json": {"sigmas": [1.0]},
        "list.json": [3, 5],
        "str.json": {"sigmas": "x", "patch_sizes": [3]},
        "nan.json": {"sigmas": [None], "patch_sizes": [3]},
        "even.json": {"sigmas": [1.0], "patch_sizes": [4]},
        "lens.json": {"sigmas": [1.0, 2.0], "patch_sizes": [3]},
        "neg.json": {"sigmas": [-1.0], "patch_sizes": [3]},
    }
    for fname, obj in cases.items():
        path = tmp_path / fname
        path.write_text(json.dumps(obj))
        with pytest.raises(ValueError, match=fname.replace(".", r"\.")):
            load_patch_schedule(str(path))
    with pytest.raises(ValueError, match="folder"):
        load_patch_schedule(str(tmp_path))


def test_invalid_tables_rejected():
    with pytest.raises(ValueError, match="odd"):
        PatchSchedule([3, 4], [1.0, 2.0])
    with pytest.raises(ValueError, match="odd"):
        PatchSchedule.constant(8)
    with pytest.raises(ValueError, match="odd"):
        as_patch_schedule(6)
    assert PatchSchedule([4, 32], [1.0, 2.0], odd=False).k_for(2.0) == 32  # PSPC-style crops
    with pytest.raises(ValueError, match="positive"):
        PatchSchedule([0], [1.0], odd=False)
    with pytest.raises(ValueError, match="2 σ values for 3 patch sizes"):
        PatchSchedule([3, 5, 7], [1.0, 2.0])
    with pytest.raises(ValueError, match="one σ per patch size"):
        PatchSchedule([3, 5])
    with pytest.raises(ValueError, match="finite"):
        PatchSchedule([3], [float("inf")])
    with pytest.raises(ValueError, match="no patch sizes"):
        PatchSchedule([], [])
    with pytest.raises(TypeError):
        as_patch_schedule(3.5)


def test_preset_tensor_sigmas_match_kamb_grid():
    t = torch.arange(20, dtype=torch.float64) / 20
    assert load_patch_schedule("kamb-mnist").sigmas == pytest.approx(kamb_sigma(t).tolist())
