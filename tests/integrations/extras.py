"""The optional dependencies the integration tests need.

A test of an integration whose library is not installed is skipped, saying
which extra installs it; under ``CI=true`` the skip is a failure instead,
so that CI cannot go green by testing nothing.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` (at a test module's top), or skip the whole test
    module (fail it under CI=true) saying ``pip install 'brokerq[extra]'``."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        why = f"{module} is not installed ({exc}): pip install 'brokerq[{extra}]'"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true and {why}", pytrace=False)
        pytest.skip(why, allow_module_level=True)
