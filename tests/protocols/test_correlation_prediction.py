"""Predicted target error: calibrated against the truth, and the transfer gate built on it."""

from __future__ import annotations

import numpy as np
import pytest

from protocols.correlation.model_selection import choose_model
from protocols.correlation.points import SQUARE_MAX_ERROR_UM, correlate_points


def _lin(deg: float, sx: float, sy: float, mirrored: bool) -> np.ndarray:
    t = np.deg2rad(deg)
    rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    return rot @ np.diag([sx, sy]) @ (np.diag([-1.0, 1.0]) if mirrored else np.eye(2))


def _bend(rng: np.random.Generator, across_um: float):  # type: ignore[no-untyped-def]
    """A smooth random displacement (wavelengths >= 60 um) of about ``across_um``."""
    k = rng.normal(0, 2 * np.pi / 150, (3, 2))
    k *= np.minimum(1.0, (2 * np.pi / 60) / np.linalg.norm(k, axis=1, keepdims=True))
    amp, ph = rng.normal(0, across_um / 4, (3, 2)), rng.uniform(0, 2 * np.pi, 3)
    return lambda p: np.sin(p @ k.T + ph) @ amp


@pytest.mark.parametrize("layout", ["uniform", "bunched"])
def test_predicted_error_is_calibrated(layout: str) -> None:
    """About 63-68% of true errors within 1x the predicted RMS, ~95% within 2x.

    Targets anywhere in the square, beads spread over it or bunched in a third of it (so
    that many targets are extrapolated), localisation noise and bend vary per square.
    """
    rng = np.random.default_rng(5 if layout == "uniform" else 6)
    ratios = []
    for _ in range(40):
        n = int(rng.integers(6, 16))
        lo, hi = (-45, 45) if layout == "uniform" else (-45, -15)
        src = rng.uniform(lo, hi, (n, 2))
        bend = _bend(rng, rng.uniform(0.1, 0.5))
        lin = _lin(rng.uniform(0, 360), *rng.uniform(0.97, 1.03, 2), bool(rng.integers(2)))
        noise = rng.uniform(0.005, 0.04)

        def truth(p: np.ndarray) -> np.ndarray:
            return p @ lin.T + bend(p)  # noqa: B023

        dst = truth(src) + rng.normal(0, noise, src.shape)
        src_obs = src + rng.normal(0, noise, src.shape)
        targets = rng.uniform(-30, 30, (5, 2))
        choice = choose_model(src_obs, dst)
        err = np.linalg.norm(choice.best.apply(targets) - truth(targets), axis=1)
        ratios.append(err / choice.predicted_error(targets))
    r = np.concatenate(ratios)
    assert 0.55 <= np.mean(r <= 1.0) <= 0.85, np.mean(r <= 1.0)
    assert np.mean(r <= 2.0) >= 0.88, np.mean(r <= 2.0)


def test_similarity_choice_weighs_the_affine_instead_of_a_fixed_allowance() -> None:
    """From 6 pairs a chosen similarity is averaged with the affine alternatives, so its
    anisotropy allowance comes from the beads; with 4 pairs the fixed allowance stays."""
    rng = np.random.default_rng(3)
    src = rng.uniform(-40, 40, (8, 2))
    dst = src @ _lin(40, 1.0, 1.0, True).T + rng.normal(0, 0.01, src.shape)
    many = choose_model(src, dst)
    assert many.best.model == "similarity"
    assert {c.model for c in many.candidates} == {"similarity", "affine"}
    assert not many.anisotropy_allowance
    few = choose_model(src[:4], dst[:4])
    assert few.best.model == "similarity" and few.anisotropy_allowance
    far = np.array([[45.0, 45.0]])
    assert few.predicted_error(far)[0] > 0.4  # 1% per um from the beads' centroid


def test_targets_outside_the_beads_are_not_refused_for_distance_alone() -> None:
    """A dozen beads bunched on one side of a barely bent square: targets 20-30 um outside
    them are transferred (ok) within their predicted error; refusal follows the
    predicted error, not the distance."""
    rng = np.random.default_rng(11)
    g = rng.uniform(-45, -5, (12, 2))
    lin = _lin(-70, 1.01, 0.99, False)
    em = g @ lin.T + [300.0, 50.0] + rng.normal(0, 0.01, g.shape)
    lm = g + rng.normal(0, 0.02, g.shape)
    targets = np.array([[15.0, 10.0], [20.0, -20.0], [-20.0, 20.0]])
    res = correlate_points(lm, em, targets)
    assert res.status == "ok", res.reason
    assert res.targets_um is not None and res.target_errors_um is not None
    err = np.linalg.norm(res.targets_um - (targets @ lin.T + [300.0, 50.0]), axis=1)
    assert np.all(err < 3 * res.target_errors_um), (err, res.target_errors_um)
    assert np.median(res.target_errors_um) <= SQUARE_MAX_ERROR_UM


def test_far_targets_of_few_bunched_beads_are_refused() -> None:
    """Five beads within 15 um and targets 50-70 um away on a square bent by ~0.5 um: the
    beads match, but the transfer is refused with the reason and the per-target flags,
    and rightly so (the answer would be over 250 nm off)."""
    rng = np.random.default_rng(2)
    g = np.concatenate([rng.uniform(-45, -35, (4, 2)), [[-40.0, -28.0]]])
    lin = _lin(25, 1.01, 0.99, False)

    def truth(p: np.ndarray) -> np.ndarray:
        return p @ lin.T + 0.25 * np.sin(2 * np.pi * p[:, ::-1] / 80.0)

    em = truth(g) + rng.normal(0, 0.01, g.shape)
    targets = np.array([[20.0, 20.0], [10.0, 25.0], [25.0, 5.0]])
    res = correlate_points(g, em, targets)
    assert res.match.status == "ok", res.match.reason
    assert res.status == "no_confident_match" and "too far" in res.reason, res.reason
    assert res.target_reliable is not None and not res.target_reliable.any()
    assert res.targets_um is not None
    err = np.linalg.norm(res.targets_um - truth(targets), axis=1)
    assert np.median(err) > 0.25, err


@pytest.mark.parametrize("n", [6, 7, 8, 12])
def test_a_field_is_used_only_from_eight_beads(n: int) -> None:
    """Six or seven beads cannot pin a residual field's length scale down: the best
    candidate (the predicted error's centre) is the affine, while the predicted error
    still weighs the fields the beads allow (so a bend between them widens it). From
    eight beads the best candidate has a field."""
    rng = np.random.default_rng(40 + n)
    src = rng.uniform(0, 90, (n, 2))
    bend = _bend(rng, 0.5)
    dst = src @ _lin(30.0, 1.01, 0.99, False).T + bend(src) + rng.normal(0, 0.01, (n, 2))
    choice = choose_model(src, dst)
    assert (choice.best.signal_ratio > 0) == (n >= 8)
    assert any(c.signal_ratio > 0 for c in choice.candidates)
    mid = np.array([[45.0, 45.0]])
    own = choice.best.predicted_error(mid, anisotropy_allowance=False)[0]
    assert choice.predicted_error(mid)[0] >= own


@pytest.mark.parametrize("seed", range(4))
def test_four_pairs_are_not_fitted_with_an_affine(seed: int) -> None:
    """Four pairs leave an affine 2 degrees of freedom to estimate its own noise: the map
    is the similarity, whose predicted error carries the anisotropy it cannot see, so the
    prediction at targets 20-30 um from the beads' centre covers the 2% anisotropy."""
    rng = np.random.default_rng(90 + seed)
    src = rng.uniform(20, 70, (4, 2))
    lin = _lin(rng.uniform(0, 360), 1.02, 1.0, bool(seed % 2))
    dst = src @ lin.T + rng.normal(0, 0.03, (4, 2))
    choice = choose_model(src, dst)
    assert choice.best.model == "similarity"
    far = src.mean(0) + np.array([[25.0, 0.0], [0.0, 25.0], [-20.0, -15.0]])
    err = np.linalg.norm(choice.best.apply(far) - far @ lin.T, axis=1)
    assert np.all(err <= 2.5 * choice.predicted_error(far)), (err, choice.predicted_error(far))


def _within_2x(rng: np.random.Generator, beads: np.ndarray, truth,  # type: ignore[no-untyped-def]
               half: float) -> list[bool]:
    """Correlate ``beads`` (10 nm noise on both sides) with their ``truth`` images and 5
    targets within +-``half`` um; for an accepted square, whether each target's true error
    is within 2x its predicted one."""
    em = truth(beads) + rng.normal(0, 0.01, beads.shape)
    targets = rng.uniform(-half, half, (5, 2))
    res = correlate_points(beads + rng.normal(0, 0.01, beads.shape), em, targets)
    if res.status != "ok":
        return []
    assert res.targets_um is not None and res.target_errors_um is not None
    err = np.linalg.norm(res.targets_um - truth(targets), axis=1)
    return list(err <= 2 * res.target_errors_um)


def test_few_beads_predict_bends_they_cannot_see() -> None:
    """Five to seven beads over 76 um and a bend of 40-110 um wavelengths (0.1-0.4 um):
    an affine can fit the beads to a few tens of nm while targets between them are
    0.2-0.4 um off. Over 60 such squares, the accepted ones' targets must fall within 2x
    their predicted error as often as a Gaussian error would (95%); without the
    allowance for distance to the nearest bead, 91% did."""
    cover: list[bool] = []
    for seed in range(60):
        rng = np.random.default_rng(seed)
        g = rng.uniform(-38, 38, (int(rng.integers(5, 8)), 2))
        lin = _lin(rng.uniform(0, 360), 1.0 + rng.uniform(0, 0.02), 1.0, False)
        k = rng.normal(0, 1, (2, 3, 2)) * (2 * np.pi / 110)
        phase = rng.uniform(0, 2 * np.pi, (2, 3))
        amp = rng.uniform(0.1, 0.4)

        def truth(p: np.ndarray, lin: np.ndarray = lin, k: np.ndarray = k,
                  phase: np.ndarray = phase, amp: float = amp) -> np.ndarray:
            bend = np.stack([np.sum(np.sin(p @ k[a].T + phase[a]), axis=1)
                             for a in range(2)], axis=1)
            return p @ lin.T + bend * amp / 3

        cover += _within_2x(rng, g, truth, 25)
    assert len(cover) >= 150, len(cover)            # most squares are answered
    assert np.mean(cover) >= 0.95, np.mean(cover)


def test_a_field_candidate_counts_the_scatter_it_leaves_at_targets() -> None:
    """Eight to twelve beads over 76 um and, on top of a smooth bend, a ripple of 12-20 um
    wavelength (0.05-0.15 um) that no residual field tried (15-60 um) can follow between
    beads ~20 um apart: each field leaves it as scatter. Counted only for candidates
    without a field, the predicted error at targets between the beads was that of a
    field fitting the beads to within the scatter, and too small (80% of the accepted
    targets within 2x); every candidate counts it now (94%)."""
    cover: list[bool] = []
    for seed in range(40):
        rng = np.random.default_rng(100 + seed)
        g = rng.uniform(-38, 38, (int(rng.integers(8, 13)), 2))
        lin = _lin(rng.uniform(0, 360), *rng.uniform(0.98, 1.02, 2), False)
        bend = _bend(rng, rng.uniform(0.1, 0.3))
        wave = 2 * np.pi / rng.uniform(12, 20, 2)
        angle = rng.uniform(0, np.pi, 2)
        k = wave[:, None] * np.c_[np.cos(angle), np.sin(angle)]
        ripple, phase = rng.uniform(0.05, 0.15), rng.uniform(0, 2 * np.pi, 2)

        def truth(p: np.ndarray, lin: np.ndarray = lin, bend=bend,  # type: ignore[no-untyped-def]
                  k: np.ndarray = k, ripple: float = ripple,
                  phase: np.ndarray = phase) -> np.ndarray:
            return p @ lin.T + bend(p) + ripple * np.sin(p @ k.T + phase)

        cover += _within_2x(rng, g, truth, 30)
    assert len(cover) >= 100, len(cover)
    assert np.mean(cover) >= 0.9, np.mean(cover)
