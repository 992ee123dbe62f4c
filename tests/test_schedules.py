"""Schedules: the official cosine_scheduler / teacher-temperature numbers."""
import ml_collections
import numpy as np
import pytest

from dino_jax import schedules
from official_fixtures import cases, load


def _official_cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0,
                               start_warmup_value=0):
    # Independent transcription of utils.cosine_scheduler for the comparison.
    warmup_iters = warmup_epochs * niter_per_ep
    warm = np.linspace(start_warmup_value, base_value, warmup_iters) if warmup_epochs > 0 else []
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    cos = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((warm, cos))


@pytest.mark.parametrize("args", [(5e-4, 1e-6, 10, 7, 2), (0.04, 0.4, 3, 5, 0),
                                  (0.996, 1.0, 4, 3, 0), (1.0, 0.0, 2, 1, 1), (2e-3, 1e-5, 3, 4, 1, 1e-4)])
def test_cosine_scheduler_matches_official(args):
    ours = schedules.cosine_scheduler(*args)
    ref = _official_cosine_scheduler(*args)
    assert ours.shape == ref.shape
    np.testing.assert_array_equal(ours, ref)


def test_cosine_scheduler_shape_points():
    s = schedules.cosine_scheduler(1.0, 0.0, epochs=4, niter_per_ep=10, warmup_epochs=1)
    assert len(s) == 40
    assert s[0] == 0.0 and s[9] == 1.0          # warm-up includes both ends
    assert s[10] == 1.0                          # cosine starts at the base value
    assert 0 < s[-1] < 0.01                      # ... and never reaches the final value
    assert np.all(np.diff(s[10:]) < 0)


@pytest.mark.parametrize("name", cases("loss"))
def test_teacher_temp_schedule_matches_fixture(name):
    meta, arrays = load(name)
    temps = schedules.teacher_temp_schedule(meta["warmup_teacher_temp"], meta["teacher_temp"],
                                            meta["warmup_teacher_temp_epochs"], meta["epochs"])
    assert len(temps) == meta["epochs"]
    for e in range(meta["epochs"]):
        assert abs(temps[e] - arrays[f"outputs/teacher_temp/epoch{e}"]) < 1e-7


def _config(**kw):
    return ml_collections.ConfigDict({**dict(
        batch_size=512, epochs=5, total_steps=0, lr=5e-4, min_lr=1e-6, warmup_epochs=2,
        weight_decay=0.04, weight_decay_end=0.4, momentum_teacher=0.996, freeze_last_layer=1,
        warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=3), **kw})


def test_build_schedules_official_recipe():
    c = _config()
    s = schedules.build_schedules(c, steps_per_epoch=6)
    assert set(s) == set(schedules.SCHEDULE_KEYS)
    assert all(len(v) == 30 for v in s.values())
    np.testing.assert_array_equal(s["lr"], _official_cosine_scheduler(5e-4 * 512 / 256, 1e-6, 5, 6, 2))
    np.testing.assert_array_equal(s["weight_decay"], _official_cosine_scheduler(0.04, 0.4, 5, 6))
    np.testing.assert_array_equal(s["momentum"], _official_cosine_scheduler(0.996, 1, 5, 6))
    assert s["lr"].max() == pytest.approx(1e-3)
    np.testing.assert_array_equal(s["epoch"], np.repeat(np.arange(5), 6))
    np.testing.assert_allclose(s["teacher_temp"][::6], [0.04, 0.055, 0.07, 0.07, 0.07])
    np.testing.assert_array_equal(s["last_layer_frozen"], np.arange(30) < 6)
    dev = schedules.device_schedules(s)
    assert dev["lr"].dtype == np.float32 and dev["last_layer_frozen"].dtype == bool


def test_build_schedules_total_steps_override():
    s = schedules.build_schedules(_config(total_steps=13, warmup_epochs=1), steps_per_epoch=4)
    assert all(len(v) == 13 for v in s.values())
    assert s["epoch"][-1] == 3
    np.testing.assert_array_equal(s["lr"][:4], np.linspace(0, 1e-3, 4))
    with pytest.raises(ValueError):
        schedules.build_schedules(_config(), steps_per_epoch=0)


def test_build_schedules_fractional_warmup():
    s = schedules.build_schedules(_config(warmup_epochs=0.5, epochs=2), steps_per_epoch=8)
    np.testing.assert_array_equal(s["lr"][:4], np.linspace(0, 1e-3, 4))
    assert s["lr"][4] == pytest.approx(1e-3)
