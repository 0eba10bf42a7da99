"""Fixtures of the modules whose exports are jobs of one torchrun launch (``tests/jobs.py``): each such module names
its jobs in ``JOBS``, keyed by test name."""
from __future__ import annotations

import pytest

from jobs import run_jobs, selected_jobs


@pytest.fixture(scope="module")
def exports(request, tmp_path_factory):
    """The exports of this module's selected tests (``JOBS``), run in one launch."""
    return run_jobs(tmp_path_factory.mktemp("exports"), selected_jobs(request, request.module.JOBS))


@pytest.fixture
def exported(exports, request):
    """This test's export."""
    return exports[request.node.name]
