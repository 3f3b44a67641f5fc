"""`fusedserve prepare`: which steps run, in which order, with which sparsity; presets find their folders."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

import fusedserve.cli
import fusedserve.engine.model.default_model
from fusedserve.presets import (
    DEFAULT_SPARSITY,
    FUSED_SPARSITY,
    PRESETS,
    prepared_model_dir,
    preset_model_dir,
    register,
)


@pytest.fixture
def steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Every sub-command prepare runs, recorded instead of run, with the model cache in tmp_path."""
    monkeypatch.setenv("FUSEDSERVE_CACHE", str(tmp_path))
    monkeypatch.setattr(fusedserve.engine.model.default_model, "ensure_default_model", lambda: tmp_path / "default")
    recorded: list[list[str]] = []

    def fake_cli(argv: list[str]) -> int:
        recorded.append(argv)
        return 0

    monkeypatch.setattr(fusedserve.cli, "main", fake_cli)
    return recorded


def prepare(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["prepare", *argv])
    return args.handler(args)


def calibrations(recorded: list[list[str]]) -> dict[str, str]:
    """Output folder name -> --sparsity of every `larosa calibrate` step."""
    found = {}
    for argv in recorded:
        if argv[:2] == ["larosa", "calibrate"]:
            found[Path(argv[argv.index("--out") + 1]).name] = argv[argv.index("--sparsity") + 1]
    return found


def test_prepare_builds_the_vocabulary_then_tunes_it_then_calibrates_both_models(steps: list[list[str]]) -> None:
    assert prepare("--threads", "2") == 0
    assert [argv[:2] for argv in steps] == [
        ["adaptivocab", "build"],
        ["adaptivocab", "finetune"],
        ["larosa", "calibrate"],
        ["larosa", "calibrate"],
    ]
    assert calibrations(steps) == {
        prepared_model_dir("larosa").name: str(DEFAULT_SPARSITY),
        prepared_model_dir("fused").name: str(FUSED_SPARSITY),
    }
    fused = next(argv for argv in steps if prepared_model_dir("fused").name in " ".join(argv))
    assert fused[fused.index("--model") + 1] == str(prepared_model_dir("adaptivocab")), "fused = LaRoSA on AdaptiVocab"
    assert all(argv[-2:] == ["--threads", "2"] for argv in steps[1:])


def test_prepare_takes_each_models_sparsity_from_its_own_flag(steps: list[list[str]]) -> None:
    prepare("--only", "larosa", "fused", "--sparsity", "0.5", "--fused-sparsity", "0.15")
    assert sorted(calibrations(steps).values()) == ["0.15", "0.5"]


def test_prepare_skips_folders_that_exist(steps: list[list[str]]) -> None:
    for name in ("adaptivocab-init", "adaptivocab", "larosa"):
        prepared_model_dir(name).mkdir(parents=True)
        (prepared_model_dir(name) / "config.json").write_text("{}")
    prepare()
    assert list(calibrations(steps)) == [prepared_model_dir("fused").name]
    assert not any(argv[0] == "adaptivocab" for argv in steps)


def test_presets_find_their_folders_or_say_how_to_make_them(steps: list[list[str]]) -> None:
    assert preset_model_dir(PRESETS["baseline"]) is None
    with pytest.raises(FileNotFoundError, match="fusedserve prepare"):
        preset_model_dir(PRESETS["fused"])
    prepared_model_dir("fused").mkdir(parents=True)
    (prepared_model_dir("fused") / "config.json").write_text("{}")
    assert preset_model_dir(PRESETS["fused"]) == prepared_model_dir("fused")
