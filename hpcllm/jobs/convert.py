"""Moved: `hpcllm convert` lives in ``hpcllm.checkpoint.convert`` (it is not an executor job) and
``launched_world`` in ``hpcllm.world.launch``.  This old name stays only until the remaining
callers (tests/conftest.py, tests/test_classify.py, bench/) import from there; then it goes."""

from hpcllm.checkpoint.convert import convert, import_source  # noqa: F401
from hpcllm.world.launch import launched_world  # noqa: F401
