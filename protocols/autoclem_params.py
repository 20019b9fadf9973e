"""Parameters of the AutoCLEM session (protocols/autoclem.py): one validated, frozen model.

The session chains every LM and EM protocol, so its params nest theirs with the paper's
defaults (docs/clem-workflow.md): a 20x atlas of the whole 3.05 mm grid, two squares chosen
after inspection at 100x, a 40 min time-lapse every 5 min with 405 at the end, static
viruses only, a 14 x 14 EM atlas, 12 x 12 square maps at 4,700x and tilt series from -60 to
+60 degrees in 3 degree steps. What the session decides (the positions of the time-lapse, the
squares to map, the targets of the tilt series) is not a parameter: the nested models below
leave those fields out and the plan fills them in from committed results.

The few numbers an operator changes most (squares, targets per square, the static filter,
the tilt scheme) sit at the top; giving one of them a second time inside a nested model is
refused rather than silently overridden. Whether the operator checkpoint is confirmed
automatically is the service's configuration, never a session parameter.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from drivers.base import LowDoseArea
from protocols.em_atlas import EMAtlasParams
from protocols.em_params import SettingsOverride, StitchParams
from protocols.lm_atlas import LMAtlasParams
from protocols.square_map import SquareMapParams, SquareSpec
from protocols.square_selection import SquareSelectionParams
from protocols.target_extraction import TargetExtractionParams
from protocols.tilt_schemes import BidirectionalConfig, TiltSchemeConfig
from protocols.tilt_series import TargetSpec, TiltSeriesParams
from protocols.time_lapse import LatePolicy, StagePositionUm, TimeLapseParams

__all__ = ["AutoCLEMParams", "CorrelationSettings", "LiveImagingSettings",
           "SquareMapSettings"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class LiveImagingSettings(_Frozen):
    """The live time-lapse at every chosen square (TimeLapseParams without positions, which
    are the chosen squares' centres at the 100x focus the inspection found; ``refocus``
    focuses each again first)."""

    objective: str = Field("100x", min_length=1)
    channels: tuple[str, ...] = Field(("488", "640"), min_length=1)
    interval_s: float = Field(300.0, gt=0, le=86400)
    duration_s: float = Field(2400.0, ge=0, le=7 * 86400)
    z_range_um: float = Field(8.0, ge=0, le=200)
    z_step_um: float = Field(1.0, gt=0, le=50)
    final_channels: tuple[str, ...] = Field(("488", "640", "405"), min_length=1)
    focus_channel: str = Field("DIC", min_length=1)
    focus_range_um: float = Field(16.0, gt=0, le=200)
    focus_step_um: float = Field(0.5, gt=0, le=10)
    late_policy: LatePolicy = "acquire"
    late_tolerance_s: float = Field(5.0, ge=0)
    refocus: bool = False

    def to_params(self, positions: tuple[StagePositionUm, ...]) -> TimeLapseParams:
        """The time-lapse of ``positions`` (z None: focused by the time-lapse itself)."""
        values = self.model_dump(exclude={"refocus"})
        return TimeLapseParams.model_validate({**values, "positions": positions})


class SquareMapSettings(_Frozen):
    """How each chosen square is mapped (SquareMapParams without the squares)."""

    tiles_xy: tuple[int, int] = (12, 12)
    overlap: float = Field(default=0.2, ge=0.05, lt=0.5)
    area: LowDoseArea = LowDoseArea.VIEW
    settings: SettingsOverride | None = None
    stitch: StitchParams = StitchParams()
    approach_um: float = Field(default=5.0, ge=0, le=50)
    acquisition: Literal["auto", "tiles", "montage"] = "auto"

    def to_params(self, square: SquareSpec) -> SquareMapParams:
        return SquareMapParams.model_validate({**self.model_dump(), "squares": (square,)})


class CorrelationSettings(_Frozen):
    """Acceptance numbers of the two correlations.

    ``atlas_min_squares`` is register_atlas's gate on square openings paired (its margin
    over the next pose is its own, in robust sigmas); ``atlas_pitch_range`` bounds
    the lattice search around the known mesh pitch (square_selection.pitch_um), so that a
    harmonic of the bars cannot pass for the pitch. ``bead_channel`` is the fLM channel of
    the final set that shows the beads; ``max_target_error_um`` is the predicted error above
    which a target is not worth a tilt series (a 39,000x field is ~1 um wide).
    """

    atlas_min_squares: int = Field(12, ge=4)
    atlas_pitch_range: tuple[float, float] = (0.8, 1.25)
    atlas_channel: str = Field("BF", min_length=1)
    bead_channel: str = Field("405", min_length=1)
    max_target_error_um: float = Field(0.25, gt=0, le=5)

    @field_validator("atlas_pitch_range")
    @classmethod
    def _range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] < 1 < v[1]:
            raise ValueError(f"atlas_pitch_range {v} must bracket 1 (fractions of the pitch)")
        return v


def _tilt_series_check(value: dict[str, Any]) -> dict[str, Any]:
    """Validate the tilt-series settings as TiltSeriesParams would, with a placeholder target."""
    if "targets" in value:
        raise ValueError("tilt_series.targets: the session's targets come from the "
                         "correlation; submit extra targets to the session instead")
    if "scheme" in value:
        raise ValueError("tilt_series.scheme: give the tilt scheme once, as tilt_scheme")
    try:
        TiltSeriesParams.model_validate({**value, "targets": [_PLACEHOLDER]})
    except ValidationError as err:
        first = err.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ValueError(f"tilt_series.{where}: {first['msg']}") from err
    return value


_PLACEHOLDER = {"id": "placeholder", "x_um": 0.0, "y_um": 0.0}


class AutoCLEMParams(_Frozen):
    """The whole AutoCLEM session; see the module docstring for what is left to the plan."""

    kind: Literal["autoclem"] = "autoclem"
    n_squares: int = Field(2, ge=1, le=12)
    max_targets_per_square: int = Field(5, ge=1, le=100)
    static_only: bool = True
    tilt_scheme: TiltSchemeConfig = Field(
        default_factory=lambda: BidirectionalConfig.model_validate({}))
    lm_atlas: LMAtlasParams = Field(default_factory=lambda: LMAtlasParams.model_validate({}))
    square_selection: SquareSelectionParams = Field(
        default_factory=lambda: SquareSelectionParams.model_validate({}))
    live: LiveImagingSettings = Field(default_factory=lambda: LiveImagingSettings.model_validate({}))
    target_extraction: TargetExtractionParams = Field(default_factory=lambda: TargetExtractionParams.model_validate({}))
    em_atlas: EMAtlasParams = Field(default_factory=lambda: EMAtlasParams.model_validate({}))
    square_maps: SquareMapSettings = Field(default_factory=lambda: SquareMapSettings.model_validate({}))
    correlation: CorrelationSettings = Field(default_factory=lambda: CorrelationSettings.model_validate({}))
    tilt_series: dict[str, Any] = Field(default_factory=dict)
    navigator_file: str = Field(default="clemd.nav", pattern=r"^[\w.+-]+\.nav$")
    #: A realignment whose last iteration still moved the estimate by more than this has not
    #: converged: the target's position is unknown at that level, so it is skipped.
    max_realign_change_um: float = Field(0.05, gt=0, le=5)

    @field_validator("tilt_series")
    @classmethod
    def _tilt_series(cls, v: dict[str, Any]) -> dict[str, Any]:
        return _tilt_series_check(v)

    @model_validator(mode="after")
    def _consistent(self) -> AutoCLEMParams:
        """Copy the top-level numbers into the nested models (a nested value given and
        different is refused), so that a dumped model validates again to itself."""
        for nested, key, top in (("square_selection", "select", "n_squares"),
                                 ("target_extraction", "max_targets", "max_targets_per_square"),
                                 ("target_extraction", "static_only", "static_only")):
            inner, value = getattr(self, nested), getattr(self, top)
            if key in inner.model_fields_set and getattr(inner, key) != value:
                raise ValueError(f"{nested}.{key} ({getattr(inner, key)!r}) disagrees with "
                                 f"{top} ({value!r}): give it once, as {top}")
            # validated just above; the frozen model is still being built
            object.__setattr__(self, nested, _replace(inner, **{key: value}))
        reg = self.target_extraction.register_channel
        if reg is None or reg not in self.live.channels or reg not in self.live.final_channels:
            raise ValueError(f"target_extraction.register_channel {reg!r} must be imaged at "
                             "every time point and in the final set (live.channels, "
                             "live.final_channels): the visits of a square are registered "
                             "on it, since the stage lands ~1 um elsewhere at each")
        if self.target_extraction.timelapse_prefix != "timelapse":
            raise ValueError("target_extraction.timelapse_prefix: the session's time-lapse "
                             "is always under 'timelapse'")
        if self.square_selection.atlas_key != f"{self.lm_atlas.prefix}/stitch":
            raise ValueError(f"square_selection.atlas_key must be "
                             f"'{self.lm_atlas.prefix}/stitch' (the session's own LM atlas)")
        return self

    # -- the sub-plans' params, with the session's own choices filled in --------------------

    def selection(self) -> SquareSelectionParams:
        """Square selection, inspecting at least as many squares as are to be chosen."""
        return _replace(self.square_selection,
                        inspect=max(self.square_selection.inspect, self.n_squares))

    def extraction(self) -> TargetExtractionParams:
        return self.target_extraction

    def tilts(self, targets: tuple[TargetSpec, ...]) -> TiltSeriesParams:
        return TiltSeriesParams.model_validate({**self.tilt_series, "targets": targets,
                                                "scheme": self.tilt_scheme})


M = TypeVar("M", bound=BaseModel)


def _replace(model: M, **changes: Any) -> M:
    """A copy of a params model with ``changes``, validated again (never model_copy)."""
    return type(model).model_validate({**model.model_dump(), **changes})
