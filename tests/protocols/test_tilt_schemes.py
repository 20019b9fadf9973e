"""Tilt schemes: angle order, dose split, limits refused before moving, config edge."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import TypeAdapter, ValidationError

from drivers.base import AxisLimits
from drivers.errors import ConfigError, LimitViolation
from protocols.tilt_schemes import (
    BidirectionalConfig,
    BidirectionalScheme,
    DoseSymmetricScheme,
    DoseWeighting,
    TiltSchemeConfig,
    check_limits,
    plan_tilts,
)

LIMITS = AxisLimits(-60.0, 60.0, "tilt", unit="deg", setting="em.tilt_limits_deg")


def test_bidirectional_as_in_the_paper() -> None:
    angles = BidirectionalScheme().angles()
    expected = [3.0 * k for k in range(21)] + [-3.0 * k for k in range(1, 21)]
    assert list(angles) == expected
    assert len(angles) == 41 and len(set(angles)) == 41


@pytest.mark.parametrize(
    ("scheme", "expected"),
    [
        (BidirectionalScheme(-9, 9, 3, start_deg=-3, first_direction=1),
         [-3, 0, 3, 6, 9, -6, -9]),
        (BidirectionalScheme(-9, 9, 3, start_deg=0, first_direction=-1),
         [0, -3, -6, -9, 3, 6, 9]),
        (BidirectionalScheme(-10, 10, 4), [0, 4, 8, -4, -8]),
        (DoseSymmetricScheme(-12, 12, 3), [0, 3, -3, -6, 6, 9, -9, -12, 12]),
        (DoseSymmetricScheme(-9, 9, 3, group_size=1), [0, 3, -3, 6, -6, 9, -9]),
        (DoseSymmetricScheme(-6, 12, 3), [0, 3, -3, -6, 6, 9, 12]),
        (DoseSymmetricScheme(-12, 12, 3, first_direction=-1), [0, -3, 3, 6, -6, -9, 9, 12, -12]),
    ],
    ids=["bidir-start-minus3", "bidir-negative-first", "bidir-uneven-step",
         "hagen-group2", "alternate-group1", "dose-sym-asymmetric-range", "dose-sym-negative-first"],
)
def test_angle_order(scheme: BidirectionalScheme | DoseSymmetricScheme, expected: list[float]) -> None:
    assert list(scheme.angles()) == pytest.approx(expected)


def test_every_angle_once_and_within_range() -> None:
    for scheme in (BidirectionalScheme(), DoseSymmetricScheme(), DoseSymmetricScheme(group_size=3)):
        angles = scheme.angles()
        assert sorted(angles) == pytest.approx([-60 + 3.0 * k for k in range(41)])


@pytest.mark.parametrize("weighting", list(DoseWeighting), ids=lambda w: w.value)
def test_dose_split_sums_to_total(weighting: DoseWeighting) -> None:
    plan = plan_tilts(BidirectionalScheme(), 100.0, weighting)
    doses = np.array([s.dose_e_per_a2 for s in plan.steps])
    assert doses.sum() == pytest.approx(100.0)
    prior = [s.prior_dose_e_per_a2 for s in plan.steps]
    assert prior[0] == 0.0 and prior[-1] == pytest.approx(100.0 - doses[-1])
    assert np.all(np.diff(prior) > 0)
    if weighting is DoseWeighting.CONSTANT:
        assert np.allclose(doses, 100.0 / 41)
    else:  # 1/cos: twice the dose at 60 deg as at 0
        by_angle = {s.tilt_deg: s.dose_e_per_a2 for s in plan.steps}
        assert by_angle[60.0] / by_angle[0.0] == pytest.approx(2.0)


def test_dose_symmetric_low_tilts_get_least_prior_dose() -> None:
    plan = plan_tilts(DoseSymmetricScheme(), 100.0)
    prior = {s.tilt_deg: s.prior_dose_e_per_a2 for s in plan.steps}
    assert prior[3.0] < prior[-6.0] < prior[9.0] < prior[60.0]


def test_tilt_range_beyond_limits_is_refused_with_reason() -> None:
    check_limits(BidirectionalScheme(), LIMITS)
    with pytest.raises(LimitViolation) as err:
        check_limits(BidirectionalScheme(-60, 66), LIMITS)
    assert str(err.value) == ("bidirectional tilt series refused before moving: tilt 66 deg "
                              "outside [-60, 60] (em.tilt_limits_deg)")
    with pytest.raises(LimitViolation, match="dose-symmetric.*tilt -69 deg"):
        check_limits(DoseSymmetricScheme(-70, 60), LIMITS)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"step_deg": 0.0}, "step_deg"), ({"start_deg": 70.0}, "start_deg"),
     ({"first_direction": 0}, "first_direction"), ({"max_deg": 95.0}, "bidirectional")],
    ids=["zero-step", "start-outside-range", "bad-direction", "beyond-90"],
)
def test_bad_scheme_is_a_config_error(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        BidirectionalScheme(**kwargs)


def test_negative_dose_is_refused() -> None:
    with pytest.raises(ConfigError, match="total_dose_e_per_a2"):
        plan_tilts(BidirectionalScheme(), -1.0)


def test_config_edge_is_tagged_and_strict() -> None:
    adapter = TypeAdapter(TiltSchemeConfig)
    cfg = adapter.validate_python({"kind": "dose_symmetric", "group_size": 2, "max_deg": 45})
    assert cfg.to_scheme() == DoseSymmetricScheme(max_deg=45)
    assert adapter.validate_python({"kind": "bidirectional"}).to_scheme() == BidirectionalScheme()
    with pytest.raises(ValidationError):
        adapter.validate_python({"kind": "bidirectional", "stepdeg": 2})  # misspelt key
    with pytest.raises(ValidationError):
        adapter.validate_python({"kind": "spiral"})
    with pytest.raises(ValidationError):
        BidirectionalConfig(step_deg=-3)
