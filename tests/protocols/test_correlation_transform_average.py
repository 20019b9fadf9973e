"""The averaged transform: the weighted mean of the candidates, serialised exactly, and
closer to the truth than the best candidate alone on bent squares with few beads."""

from __future__ import annotations

import json

import numpy as np
import pytest

from protocols.correlation.errors import CorrelationInputError
from protocols.correlation.model_selection import choose_model
from protocols.correlation.transform_average import AveragedTransform
from protocols.correlation.transforms import fit_transform


def _lin(deg: float, sx: float, sy: float, mirrored: bool) -> np.ndarray:
    t = np.deg2rad(deg)
    rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    return rot @ np.diag([sx, sy]) @ (np.diag([-1.0, 1.0]) if mirrored else np.eye(2))


def _bent_square(seed: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Beads, their EM positions, targets and theirs, on a square bent by 0.1-0.5 um with
    wavelengths about the square's size (sum of sines, as an outside generator draws)."""
    rng = np.random.default_rng(seed)
    field = 75.0
    lin = _lin(rng.uniform(0, 360), *rng.uniform(0.97, 1.03, 2), bool(rng.integers(2)))
    k = rng.normal(0, 1, (2, 3, 2)) * (2 * np.pi / (1.5 * field))
    ph = rng.uniform(0, 2 * np.pi, (2, 3))
    amp = rng.uniform(0.1, 0.5)

    def truth(p: np.ndarray) -> np.ndarray:
        bend = np.stack([np.sum(np.sin(p @ k[a].T + ph[a]), axis=1) for a in range(2)], 1)
        return p @ lin.T + bend * amp / 3

    g = rng.uniform(-0.5, 0.5, (n, 2)) * field
    t = rng.uniform(-0.3, 0.3, (5, 2)) * field
    return g + rng.normal(0, 0.005, g.shape), truth(g) + rng.normal(0, 0.005, g.shape), t, \
        truth(t)


def test_the_mean_is_the_weighted_mean_of_the_candidates() -> None:
    src, dst, t, _ = _bent_square(1, 12)
    choice = choose_model(src, dst)
    expect = sum(w * c.apply(t) for w, c in zip(choice.weights, choice.candidates))
    assert np.allclose(choice.apply(t), expect, atol=1e-6)
    assert len(choice.candidates) > 2 and choice.transform.field_weight > 0
    # Its parametric part is the mean of theirs; its residuals and LOO errors too.
    assert np.allclose(choice.transform.matrix,
                       sum(w * c.matrix for w, c in zip(choice.weights, choice.candidates)),
                       atol=1e-6)
    assert np.allclose(choice.transform.residuals_um,
                       sum(w * c.residuals_um for w, c in zip(choice.weights,
                                                              choice.candidates)), atol=1e-6)


def test_json_round_trip_maps_identically() -> None:
    src, dst, t, _ = _bent_square(2, 10)
    avg = choose_model(src, dst).transform
    back = AveragedTransform.from_dict(json.loads(json.dumps(avg.to_dict())))
    probe = np.concatenate([t, src, [[100.0, -80.0]]])
    assert np.allclose(back.apply(probe), avg.apply(probe), atol=1e-12)
    assert back.mirrored == avg.mirrored and back.n_pairs == len(src)
    assert np.allclose(back.matrix, avg.matrix)


def test_negligible_candidates_drop_out_and_the_rest_renormalise() -> None:
    src, dst, t, _ = _bent_square(3, 8)
    a = fit_transform(src, dst, "affine")
    b = fit_transform(src, dst, "affine", field_length_um=30.0, field_ratio=100.0)
    avg = AveragedTransform.of([a, b], [1.0, 1e-9])
    assert len(avg.parts) == 1 and np.allclose(avg.apply(t), a.apply(t))
    half = AveragedTransform.of([a, b], [2.0, 2.0])
    assert np.allclose(half.apply(t), 0.5 * (a.apply(t) + b.apply(t)))


def test_candidates_of_other_points_or_bad_weights_are_refused() -> None:
    src, dst, _, _ = _bent_square(4, 8)
    a = fit_transform(src, dst, "affine")
    other = fit_transform(src[:7], dst[:7], "affine")
    with pytest.raises(CorrelationInputError, match="different points"):
        AveragedTransform.of([a, other], [0.5, 0.5])
    for w in ([1.0], [0.0, 0.0], [np.nan, 1.0], [-1.0, 2.0]):
        with pytest.raises(CorrelationInputError, match="weight"):
            AveragedTransform.of([a, a], w)
    with pytest.raises(CorrelationInputError, match="malformed"):
        AveragedTransform.from_dict({"model": "averaged"})
    with pytest.raises(CorrelationInputError, match="not 'averaged'"):
        AveragedTransform.from_dict(a.to_dict())


def test_refit_keeps_the_candidates_and_weights() -> None:
    src, dst, _, _ = _bent_square(5, 10)
    avg = choose_model(src, dst).transform
    again = avg.refit(src, dst)
    assert [(p.model, p.signal_ratio) for p in again.parts] == \
        [(p.model, p.signal_ratio) for p in avg.parts]
    assert np.allclose(again.apply(src), avg.apply(src), atol=1e-9)


def test_the_mean_beats_the_best_candidate_on_bent_squares_with_few_beads() -> None:
    """Six or seven beads on squares bent with wavelengths about the square's size: the
    weighted mean misses the targets by less than the best-scoring candidate alone."""
    ours, best = [], []
    for seed in range(60):
        src, dst, t, t_true = _bent_square(100 + seed, 6 + seed % 2)
        choice = choose_model(src, dst)
        ours += list(np.linalg.norm(choice.apply(t) - t_true, axis=1))
        best += list(np.linalg.norm(choice.best.apply(t) - t_true, axis=1))
    assert np.median(ours) < 0.9 * np.median(best), (np.median(ours), np.median(best))
    assert np.percentile(ours, 90) < np.percentile(best, 90)
