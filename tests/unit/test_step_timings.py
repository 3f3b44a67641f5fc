"""The measured half of the sparse-or-dense-twin choice: probe both paths, keep the faster, re-probe now and then."""

from __future__ import annotations

from fusedserve.engine.model.llama import StepTimings


def run_steps(timings: StepTimings, count: int, sparse_s: float, twin_s: float, tokens: int = 2) -> list[bool]:
    """`count` steps of `tokens` tokens at 1 thread; returns which went to the twin."""
    chosen = []
    for _ in range(count):
        twin = timings.prefers_twin(1, tokens)
        timings.record(1, tokens, twin, twin_s if twin else sparse_s)
        chosen.append(twin)
    return chosen


def test_both_paths_are_probed_alternately_starting_with_the_sparse_one() -> None:
    assert run_steps(StepTimings(), 6, sparse_s=1.0, twin_s=2.0) == [False, True] * 3


def test_after_probing_the_faster_path_serves_and_the_other_is_reprobed_now_and_then() -> None:
    timings = StepTimings()
    chosen = run_steps(timings, 200, sparse_s=0.030, twin_s=0.020)
    after_probes = chosen[2 * StepTimings.PROBES :]
    assert sum(after_probes) > 0.9 * len(after_probes), "the twin was faster, so it serves"
    reprobes = [i for i, twin in enumerate(chosen) if not twin and i >= 2 * StepTimings.PROBES]
    periodic = [i for i in range(200) if i % StepTimings.REPROBE_EVERY == StepTimings.REPROBE_EVERY - 1]
    assert reprobes == sorted(set(StepTimings.EARLY_REPROBES) | set(periodic))


def test_probes_spoiled_by_a_burst_of_load_are_outvoted_early() -> None:
    """The twin's three probes all land in a slow spell: the sparse path serves until an early re-probe of the
    twin measures it as it is, long before the first periodic re-probe."""
    timings = StepTimings()
    chosen = []
    for step in range(2 * StepTimings.PROBES + 40):
        twin = timings.prefers_twin(1, 2)
        spoiled = step < 2 * StepTimings.PROBES
        timings.record(1, 2, twin, (0.040 if spoiled else 0.020) if twin else 0.030)
        chosen.append(twin)
    assert not any(chosen[2 * StepTimings.PROBES : StepTimings.EARLY_REPROBES[0]]), "the spoiled probes chose sparse"
    sparse_after = [i for i, twin in enumerate(chosen) if not twin and i >= StepTimings.EARLY_REPROBES[0]]
    assert sparse_after == list(StepTimings.EARLY_REPROBES[1:]), "from the first early re-probe on, the twin serves"


def test_a_change_of_speed_is_noticed_at_the_reprobes() -> None:
    timings = StepTimings()
    run_steps(timings, 100, sparse_s=0.030, twin_s=0.020)
    # now the sparse path wins (say, other load slows the dense one): re-probes refill its window
    chosen = run_steps(timings, 64 * StepTimings.WINDOW, sparse_s=0.010, twin_s=0.020)
    assert not any(chosen[-32:]), "the sparse path took over"


def test_step_sizes_and_thread_counts_are_measured_apart() -> None:
    timings = StepTimings()
    run_steps(timings, 20, sparse_s=0.030, twin_s=0.020, tokens=2)
    assert not timings.prefers_twin(1, 1), "one-token steps start with their own probes"
    assert not timings.prefers_twin(2, 2), "and so does another thread count"
