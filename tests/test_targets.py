"""Target profiles: the shipped ones, validation errors that name file/key/allowed, a fourth profile."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from edge_build.errors import EdgeBuildError
from edge_build.targets import ARTIFACTS, list_targets, load_target

TARGETS = Path(__file__).resolve().parents[1] / "targets"

MINIMAL = 'description = "tiny"\nartifacts = ["onnx_fp32"]\n'


def write_profile(directory: Path, name: str, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.toml"
    path.write_text(text, encoding="utf-8")
    return path


def error_of(directory: Path, name: str, text: str) -> str:
    write_profile(directory, name, text)
    with pytest.raises(EdgeBuildError) as info:
        load_target(name, directory)
    return str(info.value)


def test_shipped_profiles_load_with_their_contract():
    profiles = {p.name: p for p in list_targets(TARGETS)}
    assert set(profiles) >= {"cpu", "gpu", "lite"}
    lite, gpu, cpu = profiles["lite"], profiles["gpu"], profiles["cpu"]
    assert {"onnx_int8", "ort_int8", "mindir"} <= set(lite.artifacts)
    assert lite.runtime.threads == 2 and lite.bench.batch_sizes[0] == 1
    assert lite.quantization.method == "minmax" and lite.quantization.per_channel
    assert (lite.quantization.activation_type, lite.quantization.weight_type) == ("uint8", "int8")
    assert lite.quantization.input_format == "uint8_nhwc"
    assert lite.resolution.candidates == (224, 192, 160)
    assert lite.budget.max_accuracy_drop_pt == 0.5
    assert lite.tolerance("onnx_fp32").max_abs == 1e-4 and lite.tolerance("onnx_fp32").top1_agreement == 1.0
    assert lite.tolerance("mindir").max_abs == 1e-5
    assert lite.tolerance("ort_int8").max_abs is None and lite.tolerance("ort_int8").min_cosine == 0.95
    assert "onnx_fp16" in gpu.artifacts and gpu.runtime.wants_cuda
    assert gpu.tolerance("onnx_fp16").min_cosine is not None
    assert not cpu.runtime.wants_cuda and cpu.quantization.input_format == "float_nchw"
    for profile in profiles.values():
        assert set(profile.artifacts) <= set(ARTIFACTS)
        assert profile.summary().startswith(f"{profile.name}: ")


def test_a_fourth_profile_is_just_a_file(tmp_path):
    targets = tmp_path / "targets"
    shutil.copytree(TARGETS, targets)
    write_profile(
        targets,
        "edge",
        'description = "ARM board, int8 only"\nartifacts = ["ort_int8"]\n'
        "[runtime]\nthreads = 4\n[bench]\nbatch_sizes = [1, 4]\n[budget]\nmax_accuracy_drop_pt = 1.0\n",
    )
    names = [p.name for p in list_targets(targets)]
    assert names == sorted(names) and "edge" in names and len(names) == 4
    edge = load_target("edge", targets)
    assert edge.artifacts == ("ort_int8",) and edge.runtime.threads == 4 and edge.bench.batch_sizes == (1, 4)
    assert edge.budget.max_accuracy_drop_pt == 1.0 and edge.budget.latency_ms is None
    assert edge.tolerance("ort_int8").top1_agreement == 0.95  # defaults fill what a profile leaves out
    assert load_target(str(targets / "edge.toml"), tmp_path / "elsewhere").name == "edge"
    result = CliRunner().invoke(_cli(), ["targets", "--targets", str(targets)])
    assert result.exit_code == 0, result.output
    assert len(result.output.strip().splitlines()) == 4 and "edge: ort_int8" in result.output


def _cli():
    from edge_build.cli import main

    return main


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (MINIMAL + "colour = 1\n", ["tiny.toml", "unknown key 'colour'", "allowed top-level keys", "artifacts"]),
        (MINIMAL + "[bench]\nwarmpu = 3\n", ["tiny.toml", "bench.warmpu", "warmup, runs, min_time_s"]),
        (
            MINIMAL + '[quantization]\nmethod = "kl"\n',
            ["quantization.method = 'kl'", "'minmax', 'entropy', 'percentile'"],
        ),
        (MINIMAL + "[runtime]\nthreads = 0\n", ["runtime.threads = 0", "an integer >= 1"]),
        (MINIMAL + '[runtime]\nthreads = "two"\n', ["runtime.threads = 'two'", "an integer"]),
        (MINIMAL + "[runtime]\nthreads = true\n", ["runtime.threads = True"]),
        (
            MINIMAL + '[runtime]\nproviders = ["TensorrtExecutionProvider"]\n',
            ["runtime.providers", "CPUExecutionProvider", "CUDAExecutionProvider"],
        ),
        ('description = "x"\nartifacts = ["onnx_int4"]\n', ["artifacts = ['onnx_int4']", "onnx_int8"]),
        ('description = "x"\nartifacts = []\n', ["artifacts = []", "non-empty list"]),
        (MINIMAL + "[parity.bf16]\nmax_abs = 1\n", ["parity.bf16", "fp32, fp16, int8, mindir"]),
        (MINIMAL + "[parity.int8]\ntop1_agreement = 1.5\n", ["parity.int8.top1_agreement = 1.5", "<= 1"]),
        (MINIMAL + "[parity.int8]\ntop1_agreement = 0.9\n", ["[parity.int8] sets neither max_abs nor min_cosine"]),
        (MINIMAL + "[budget]\nmax_accuracy_drop_pt = -1\n", ["budget.max_accuracy_drop_pt = -1", ">= 0"]),
        (MINIMAL + "[bench]\nbatch_sizes = [1, 1]\n", ["bench.batch_sizes", "distinct"]),
        (MINIMAL + "[resolution]\nsize = 200\ncandidates = [224]\n", ["resolution.size = 200", "[224]"]),
        (MINIMAL + "[resolution]\ncandidates = [224, 200]\n", ["resolution size 200", "multiple of 32", "192"]),
        (MINIMAL + "[resolution]\nmax_accuracy_drop_pt = -2\n", ["resolution.max_accuracy_drop_pt = -2", ">= 0"]),
        (
            MINIMAL + '[quantization]\ninput_format = "uint8_nhwc"\nactivation_type = "int8"\n',
            ["input_format = 'uint8_nhwc' needs quantization.activation_type = 'uint8'"],
        ),
        (MINIMAL + "runtime = 3\n", ["'runtime' must be a table"]),
        ('artifacts = ["onnx_fp32"]\n', ["missing key 'description'"]),
        (MINIMAL + "[bench\n", ["not valid TOML"]),
    ],
)
def test_invalid_profiles_name_file_key_and_allowed_values(tmp_path, text, expected):
    message = error_of(tmp_path, "tiny", text)
    for part in expected:
        assert part in message, message


def test_unknown_target_lists_available(tmp_path):
    write_profile(tmp_path, "alpha", MINIMAL)
    write_profile(tmp_path, "beta", MINIMAL)
    with pytest.raises(EdgeBuildError, match=r"no target profile 'gamma'.*available: alpha, beta"):
        load_target("gamma", tmp_path)
    with pytest.raises(EdgeBuildError, match="target profile directory not found"):
        list_targets(tmp_path / "missing")


def test_list_targets_stops_at_the_first_invalid_file(tmp_path):
    write_profile(tmp_path, "good", MINIMAL)
    write_profile(tmp_path, "bad", MINIMAL + "[bench]\nruns = 0\n")
    with pytest.raises(EdgeBuildError, match=r"bad\.toml: bench\.runs = 0"):
        list_targets(tmp_path)
    result = CliRunner().invoke(_cli(), ["targets", "--targets", str(tmp_path)])
    assert result.exit_code == 2 and "bad.toml" in result.output


def test_profile_as_dict_is_json_and_pathless():
    import json

    payload = load_target("lite", TARGETS).as_dict()
    assert "path" not in payload and payload["quantization"]["method"] == "minmax"
    json.dumps(payload)
