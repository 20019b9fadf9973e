"""Benchmarks: each module prints one JSON object on stdout; run them as modules
(``python -m benchmarks.NAME``) from the repository root.

Library logs go to stderr at warning level, so stdout holds only the JSON.
"""

import logging
import sys

import structlog

structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr),
                    wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
