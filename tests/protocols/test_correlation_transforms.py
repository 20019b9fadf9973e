"""Transform models: exact recovery, closed-form leave-one-out, honest predicted error, JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest

from protocols.correlation.errors import CorrelationInputError
from protocols.correlation.model_selection import loo_rms, select_model
from protocols.correlation.targets import pixel_to_stage, stage_to_pixel, transfer_pixels
from protocols.correlation.transforms import Transform2D, fit_transform

RNG_SRC = np.random.default_rng(7).uniform(-45, 45, (12, 2)) + [1500.0, -800.0]


def _lin(angle_deg: float, sx: float, sy: float, mirrored: bool) -> np.ndarray:
    t = np.deg2rad(angle_deg)
    rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    return rot @ np.diag([sx, sy]) @ (np.diag([-1.0, 1.0]) if mirrored else np.eye(2))


@pytest.mark.parametrize(("model", "angle", "sx", "sy", "mirrored"), [
    ("similarity", 0.0, 1.0, 1.0, False),
    ("similarity", 137.0, 1.07, 1.07, False),
    ("similarity", -63.0, 0.93, 0.93, True),
    ("affine", 210.0, 1.03, 0.97, False),
    ("affine", 33.0, 0.98, 1.02, True),
], ids=["identity", "rot-scale", "mirror", "affine", "affine-mirror"])
def test_exact_recovery_noise_free(model: str, angle: float, sx: float, sy: float,
                                   mirrored: bool) -> None:
    lin = _lin(angle, sx, sy, mirrored)
    dst = RNG_SRC @ lin.T + [12.5, -3.0]
    for ratio in (0.0, 100.0):  # with or without a residual field: exact data stay exact
        t = fit_transform(RNG_SRC, dst, model, field_ratio=ratio,  # type: ignore[arg-type]
                          mirrored=mirrored if model == "similarity" else None)
        np.testing.assert_allclose(t.apply(RNG_SRC), dst, atol=1e-8)
        np.testing.assert_allclose(t.matrix[:, :2], lin, atol=1e-9)
        assert t.mirrored == mirrored
        assert loo_rms(t) < 1e-6


def test_similarity_finds_mirror_state_by_itself() -> None:
    dst = RNG_SRC @ _lin(40.0, 1.0, 1.0, True).T
    assert fit_transform(RNG_SRC, dst, "similarity").mirrored is True
    dst = RNG_SRC @ _lin(40.0, 1.0, 1.0, False).T
    assert fit_transform(RNG_SRC, dst, "similarity").mirrored is False


@pytest.mark.parametrize(("model", "ratio"), [("similarity", 0.0), ("affine", 0.0),
                                              ("similarity", 30.0), ("affine", 300.0)])
def test_closed_form_loo_equals_refitting(model: str, ratio: float) -> None:
    rng = np.random.default_rng(3)
    dst = RNG_SRC @ _lin(20, 1.02, 0.99, False).T + rng.normal(0, 0.05, RNG_SRC.shape) \
        + 0.3 * np.sin(RNG_SRC / 25.0)
    t = fit_transform(RNG_SRC, dst, model, mirrored=False, field_ratio=ratio)  # type: ignore[arg-type]
    for i in range(len(RNG_SRC)):
        keep = np.arange(len(RNG_SRC)) != i
        # The left-out fit keeps the hyperparameters, so its length scale in um must match.
        ti = fit_transform(RNG_SRC[keep], dst[keep], model, mirrored=False,  # type: ignore[arg-type]
                           field_ratio=ratio, field_length_um=30.0)
        np.testing.assert_allclose(dst[i] - ti.apply(RNG_SRC[i])[0], t.loo_errors_um[i],
                                   atol=1e-9)


def test_predicted_error_tracks_true_error() -> None:
    """Over many noisy fits the RMS of the true target error matches the prediction."""
    rng = np.random.default_rng(11)
    lin = _lin(75, 1.01, 0.99, False)
    targets = np.array([[1500.0, -800.0], [1530.0, -770.0], [1620.0, -800.0]])  # in, edge, out
    errs, preds = [], []
    for _ in range(300):
        dst = RNG_SRC @ lin.T + rng.normal(0, 0.04, RNG_SRC.shape)
        t = fit_transform(RNG_SRC, dst, "affine")
        errs.append(np.linalg.norm(t.apply(targets) - targets @ lin.T, axis=1))
        preds.append(t.predicted_error(targets))
    true_rms = np.sqrt(np.mean(np.square(errs), axis=0))
    ratio = true_rms / np.mean(preds, axis=0)
    assert np.all((ratio > 0.7) & (ratio < 1.4)), ratio
    assert true_rms[2] > 2 * true_rms[0]  # extrapolation is worse, and predicted so


def test_model_selection_follows_the_data() -> None:
    rng = np.random.default_rng(5)
    src = rng.uniform(-45, 45, (30, 2))
    noise = rng.normal(0, 0.03, src.shape)
    assert select_model(src, src @ _lin(30, 1, 1, False).T + noise).model in ("similarity",
                                                                               "affine")
    assert select_model(src, src @ _lin(30, 1.03, 0.97, False).T + noise).model == "affine"
    warped = src @ _lin(30, 1.03, 0.97, False).T + 1.5 * np.sin(src / 20.0) + noise
    bent = select_model(src, warped)
    plain = select_model(src, warped, use_field=False)
    assert bent.signal_ratio > 0 and loo_rms(bent) < 0.5 * loo_rms(plain)
    few = select_model(src[:3], src[:3] @ _lin(30, 1.03, 0.97, False).T)
    assert few.model == "similarity" and few.signal_ratio == 0


def test_predicted_error_grows_away_from_the_beads_under_distortion() -> None:
    """Beads bunched in one corner of a bent square: far targets are honestly uncertain.

    Over many draws of a smooth random bend, targets between the beads stay accurate and
    are predicted so; targets 40-60 um from every bead are predicted several times worse,
    and about as bad as they really are (not the noise-level error a plain affine claims).
    """
    rng = np.random.default_rng(12)
    near = np.array([[10.0, 10.0], [18.0, 14.0]])
    far = np.array([[60.0, 55.0], [70.0, 20.0]])
    errs, preds, plain_preds = [], [], []
    for _ in range(60):
        src = rng.uniform(0, 30, (12, 2))
        k = rng.normal(0, 2 * np.pi / 120, (2, 2))
        amp, ph = rng.normal(0, 0.25, (2, 2)), rng.uniform(0, 2 * np.pi, 2)

        def truth(p: np.ndarray) -> np.ndarray:
            return p @ _lin(50, 1.02, 0.98, True).T + np.sin(p @ k.T + ph) @ amp  # noqa: B023

        dst = truth(src) + rng.normal(0, 0.02, src.shape)
        t = select_model(src, dst)
        pts = np.concatenate([near, far])
        errs.append(np.linalg.norm(t.apply(pts) - truth(pts), axis=1))
        preds.append(t.predicted_error(pts))
        plain_preds.append(select_model(src, dst, use_field=False).predicted_error(pts))
    e, p, q = (np.sqrt(np.mean(np.square(a), axis=0)) for a in (errs, preds, plain_preds))
    assert np.all(p[2:] > 3 * p[:2].max()), p
    assert np.all((e[2:] / p[2:] > 0.5) & (e[2:] / p[2:] < 2.0)), (e, p)
    assert np.all(e[2:] > 2 * q[2:]), (e, q)  # the parametric error alone is over-confident


def test_json_round_trip_is_exact() -> None:
    rng = np.random.default_rng(2)
    src = rng.uniform(-45, 45, (10, 2))
    dst = src @ _lin(-120, 1.02, 0.98, True).T + np.sin(src / 15.0) + rng.normal(0, .03, src.shape)
    for model, ratio in (("similarity", 0.0), ("affine", 0.0), ("affine", 50.0)):
        t = fit_transform(src, dst, model, field_ratio=ratio,  # type: ignore[arg-type]
                          from_frame="lm_stage", to_frame="em_stage")
        back = Transform2D.from_dict(json.loads(json.dumps(t.to_dict())))
        probe = rng.uniform(-60, 60, (5, 2))
        np.testing.assert_allclose(back.apply(probe), t.apply(probe), atol=1e-12)
        np.testing.assert_allclose(back.predicted_error(probe), t.predicted_error(probe),
                                   atol=1e-12)
        assert (back.model, back.mirrored, back.from_frame) == (model, t.mirrored, "lm_stage")


@pytest.mark.parametrize(("src", "model", "match"), [
    ([[0, 0], [np.nan, 1], [2, 2]], "similarity", "NaN"),
    ([[0, 0]], "similarity", "at least 2"),
    ([[0, 0], [1, 1], [2, 2], [3, 3]], "affine", "collinear"),
    ([[0, 0], [1, 0], [0, 1]], "quadratic", "unknown transform model"),
], ids=["nan", "one-point", "collinear-affine", "unknown-model"])
def test_bad_input_raises(src: list[list[float]], model: str, match: str) -> None:
    with pytest.raises(CorrelationInputError, match=match):
        fit_transform(src, src, model)  # type: ignore[arg-type]


def test_malformed_json_raises() -> None:
    with pytest.raises(CorrelationInputError, match="malformed"):
        Transform2D.from_dict({"model": "affine"})


def test_pixel_stage_pixel_round_trip_and_transfer() -> None:
    t = np.deg2rad(12.0)
    a_lm = np.array([[0.065 * np.cos(t), -0.065 * np.sin(t), 1200.0],
                     [0.065 * np.sin(t), 0.065 * np.cos(t), -300.0]])
    a_em = np.array([[0.0, 0.012, -40.0], [-0.012, 0.0, 55.0]])  # rotated 90 deg, flipped
    px = np.array([[0.0, 0.0], [1023.5, 17.25], [511.0, 2047.0]])
    np.testing.assert_allclose(stage_to_pixel(a_lm, pixel_to_stage(a_lm, px)), px, atol=1e-9)
    # LM stage -> EM stage: a known similarity fitted from exact points.
    src = pixel_to_stage(a_lm, np.random.default_rng(0).uniform(0, 2048, (8, 2)))
    lin = _lin(160, 1.0, 1.0, True)
    lm_to_em = fit_transform(src, src @ lin.T + [-1250.0, 400.0], "similarity")
    out = transfer_pixels(px, a_lm, lm_to_em, a_em)
    expected_um = pixel_to_stage(a_lm, px) @ lin.T + [-1250.0, 400.0]
    np.testing.assert_allclose(out.em_stage_um, expected_um, atol=1e-8)
    np.testing.assert_allclose(pixel_to_stage(a_em, out.em_px), expected_um, atol=1e-8)
    np.testing.assert_allclose(out.predicted_error_px, out.predicted_error_um / 0.012)
    with pytest.raises(CorrelationInputError, match="singular"):
        pixel_to_stage(np.zeros((2, 3)), px)
