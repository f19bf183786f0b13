"""Shared pytest setup. The suite runs in two worker processes (pytest-xdist, `-n 2` in
pytest.ini), one per core of the CI machine; each worker then uses one torch thread, so the two
workers do not fight over the cores. Measured: the tiny model's forward is bit-identical with one
thread or two. `-n 0` runs the suite in one process, with torch's own thread count."""
import os

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

# The two longest files (a cold start each, minutes) run first, one per worker, while the other
# files fill in around them. xdist hands out whole files (--dist loadfile) in collection order
# (--no-loadscope-reorder; its default puts files with more tests first, and these two last).
FIRST = ("test_skills.py", "test_learning.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
