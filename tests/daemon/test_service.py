"""Service lifecycle: one service per data directory, start failures close what was built."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from daemon.config import config_from_mapping
from daemon.errors import JournalError
from daemon.service import Service
from drivers.errors import ConfigError
from tests.daemon.helpers import Running, config_dict


def test_second_service_on_the_same_data_dir_is_refused(
        make_service: Callable[..., Running]) -> None:
    first = make_service()
    cfg = config_from_mapping(config_dict(first.cfg.data_dir))
    second = Service(cfg)
    with pytest.raises(JournalError, match="another clemd is running"):
        second.start()
    assert first.client().status()["state"] == "serving"


def test_a_failed_start_releases_everything(make_service: Callable[..., Running],
                                            tmp_path: object) -> None:
    first = make_service()
    # the same ports: binding fails after the journal and instruments were built
    cfg = config_from_mapping(config_dict(first.cfg.data_dir.parent / "other",
                                          api={"bind": first.cfg.api.bind,
                                               "events": first.cfg.api.events}))
    second = Service(cfg)
    with pytest.raises(ConfigError, match="api.events: cannot listen on"):
        second.start()
    assert second.journal is None and second.instruments is None
    # its data directory is free again
    third = Service(config_from_mapping(config_dict(first.cfg.data_dir.parent / "other")))
    third.start()
    third.close()
