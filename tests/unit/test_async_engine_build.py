"""AsyncEngine builds its engine on the engine thread (the one OpenMP team) and reports a failed build."""

from __future__ import annotations

import threading

import pytest

from fusedserve.engine.async_engine import AsyncEngine


class BuildFailed(RuntimeError):
    pass


def test_the_engine_is_built_on_the_engine_thread_and_a_failed_build_raises_in_the_caller() -> None:
    seen: list[str] = []

    def build():
        seen.append(threading.current_thread().name)
        raise BuildFailed("no weights here")

    with pytest.raises(BuildFailed, match="no weights here"):
        AsyncEngine(build, "m")
    assert seen == ["fusedserve-engine"]
    assert not any(t.name == "fusedserve-engine" for t in threading.enumerate())
