"""All protocol templates the service offers, gathered from the protocol families.

daemon/templates.py loads this one module by name; each family keeps its own
``clemd_templates()`` so that it can be read and tested on its own.
"""

from __future__ import annotations

from typing import Any

from protocols import autoclem, em_templates, lm_templates

__all__ = ["clemd_templates"]


def clemd_templates() -> list[tuple[Any, ...]]:
    return [*lm_templates.clemd_templates(), *em_templates.clemd_templates(),
            *autoclem.clemd_templates()]
