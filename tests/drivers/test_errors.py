"""drivers.errors.config_error: one line naming each offending field, for every config model."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from drivers.errors import ConfigError, config_error, validation_problems


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Range(_Frozen):
    lower: float = 0.0
    upper: float = 1.0

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if self.lower >= self.upper:
            raise ValueError(f"upper {self.upper} must exceed lower {self.lower}")
        return self


class Source(_Frozen):
    name: str | None = None
    value: float | None = None

    @model_validator(mode="after")
    def _one(self) -> Source:
        if (self.name is None) == (self.value is None):
            raise ValueError("give exactly one of name or value")
        return self


class Root(_Frozen):
    ranges: dict[str, Range] = Field(default_factory=dict)
    sources: list[Source] = Field(default_factory=list)
    exposure_s: float = Field(default=1.0, gt=0)
    limit: float = 10.0

    @model_validator(mode="after")
    def _fits(self) -> Root:
        if self.exposure_s > self.limit:
            raise ValueError("exposure_s must not exceed limit")
        if self.limit > 100:
            raise ValueError("nothing here names a field, 100 is the most")
        return self


def _error(**values: object) -> ConfigError:
    with pytest.raises(ValidationError) as info:
        Root.model_validate(values)
    return config_error(info.value, "cfg")


def test_nested_location_is_dotted_under_the_prefix() -> None:
    err = _error(sources=[{"name": "a"}, {"value": "x"}])
    assert err.field == "cfg.sources.1.value"
    assert str(err) == "cfg.sources.1.value: Input should be a valid number, unable to parse " \
                       "string as a number"


def test_value_error_prefix_is_stripped_and_the_blamed_field_appended() -> None:
    err = _error(ranges={"z": {"lower": 5.0, "upper": 1.0}})
    assert err.field == "cfg.ranges.z.upper"
    assert str(err) == "cfg.ranges.z.upper: upper 1.0 must exceed lower 5.0"


def test_a_model_rule_that_names_no_field_stays_at_the_model() -> None:
    err = _error(sources=[{}])
    assert err.field == "cfg.sources.0"
    assert str(err) == "cfg.sources.0: give exactly one of name or value"


@pytest.mark.parametrize(("values", "line"), [
    ({"exposure_s": 20.0}, "cfg.exposure_s: exposure_s must not exceed limit"),
    ({"exposure_s": 20.0, "limit": 15.0}, "cfg.exposure_s: exposure_s must not exceed limit"),
    ({"limit": 200.0}, "cfg.nothing: nothing here names a field, 100 is the most"),
], ids=["blamed-field-defaulted", "blamed-field-given", "no-field-at-top"])
def test_empty_location_takes_the_field_the_message_starts_with(values: dict[str, object],
                                                                 line: str) -> None:
    """A top-level rule has no location; the prefix alone would name nothing."""
    assert str(_error(**values)) == line


def test_several_problems_in_one_line_first_names_the_error() -> None:
    err = _error(exposure_s=-1.0, sources=[{}], limt=3)
    assert err.field == "cfg.sources.0"
    assert str(err) == ("cfg.sources.0: give exactly one of name or value; "
                        "cfg.exposure_s: Input should be greater than 0; "
                        "cfg.limt: Extra inputs are not permitted")
    assert "\n" not in str(err)


def test_problems_are_pairs_of_field_and_message() -> None:
    """Below the top, the leading word is taken as a field only if the input names it: a
    defaulted field ("a" gives no upper) leaves the location at the model."""
    with pytest.raises(ValidationError) as info:
        Root.model_validate({"ranges": {"a": {"lower": 2.0}, "b": {"upper": -1.0}}})
    assert validation_problems(info.value, "lm") == [
        ("lm.ranges.a", "upper 1.0 must exceed lower 2.0"),
        ("lm.ranges.b.upper", "upper -1.0 must exceed lower 0.0"),
    ]


def test_it_is_a_config_error_and_a_value_error() -> None:
    err = _error(exposure_s=0)
    assert isinstance(err, ConfigError) and isinstance(err, ValueError)


def test_locations_can_be_rewritten_and_named_from_the_root() -> None:
    """The service config names fields from the root (empty prefix) and drops union tags."""
    with pytest.raises(ValidationError) as info:
        Root.model_validate({"ranges": {"a": {"lower": 2.0, "upper": 1.0}}, "exposure_s": -1})
    problems = validation_problems(info.value, "",
                                   lambda loc: [p for p in loc if p != "ranges"])
    assert [where for where, _ in problems] == ["a.upper", "exposure_s"]
    err = config_error(info.value, "", lambda loc: [p for p in loc if p != "ranges"])
    assert err.field == "a.upper"
