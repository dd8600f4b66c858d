pytest_plugins = ["testbed.fixtures", "testbed.real_model"]  # real_model: the smollm2 fixture

import os

import pytest


def pytest_collection_modifyitems(config, items):
    # A skip, not a deselection by -m: `pytest -m realhost` must not bring them back.
    if os.environ.get("BACKCHAT_RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow (see the test's docstring for its figures): BACKCHAT_RUN_SLOW=1 runs it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
