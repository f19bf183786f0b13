"""Shared pytest setup. The suite runs in two worker processes (pytest-xdist, `-n 2` in
pytest.ini), one per core of the CI machine; each worker then uses one torch thread, so the two
workers do not fight over the cores. One thread or two give the same results (the tiny model's
forward is bit-identical either way), so a test does not depend on which worker runs it."""
import os

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
