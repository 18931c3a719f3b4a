"""int8 quantization: QDQ model checks, the accuracy gate (passing and failing on purpose), uint8 input, ORT."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from quant_fixtures import CONV_NAME, SIZE, make_colour_dataset, make_colour_model

from edge_build import stages
from edge_build.calibration import generate_calibration, load_calibration, write_calibration
from edge_build.dataset import list_split
from edge_build.errors import CheckFailed, EdgeBuildError
from edge_build.preprocessing import Preprocessing
from edge_build.quantize import AccuracyGateFailed, quantize_model
from edge_build.runners import UINT8_NHWC, OnnxRunner
from edge_build.targets import load_target

TARGETS = Path(__file__).resolve().parents[1] / "targets"
PREPROCESSING = Preprocessing(size=SIZE)


@pytest.fixture(scope="module")
def colour(tmp_path_factory):
    root = tmp_path_factory.mktemp("colour")
    data = make_colour_dataset(root / "data", train_per_class=3, val_per_class=2)
    path = write_calibration(root / "cal.json", generate_calibration(data, per_class=2))
    val = list_split(data, "val")
    return {
        "data": data,
        "calibration": load_calibration(path, data),
        "model": make_colour_model(root / "colours.onnx", big_channel=True),
        "images": [ref.path for ref in val],
        "labels": [ref.label for ref in val],
    }


def run(colour, out_dir, profile, **kwargs):
    return quantize_model(
        colour["model"],
        colour["calibration"],
        PREPROCESSING,
        out_dir,
        profile,
        colour["images"],
        colour["labels"],
        **kwargs,
    )


def with_quantization(profile, **changes):
    return dataclasses.replace(profile, quantization=dataclasses.replace(profile.quantization, **changes))


def test_cpu_profile_quantizes_checks_and_caches(colour, tmp_path):
    import onnx

    profile = load_target("cpu", TARGETS)
    result = run(colour, tmp_path / "q", profile)
    assert result.ran and result.passed
    assert result.fp32_top1 == 100.0 and result.int8_top1 == 100.0 and result.drop_pt == 0.0 and result.agreement == 1
    assert result.val_images == 52 and result.int8_ort is None
    model = onnx.load(str(result.int8_onnx))
    ops = {node.op_type for node in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    weights = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 4]
    assert len(weights) == 1, "the conv weight is stored as int8"
    dequantize = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == weights[0].name)
    scales = next(i for i in model.graph.initializer if i.name == dequantize.input[1])
    assert list(scales.dims) == [8], "one scale per output channel"
    assert OnnxRunner(result.int8_onnx).input_format == "float_nchw"
    report = json.loads((tmp_path / "q" / "quantize.json").read_text())
    assert report["passed"] and report["settings"]["method"] == "minmax"
    listing = json.loads((tmp_path / "q" / "artifacts.json").read_text())
    assert listing["artifacts"]["onnx_int8"]["file"] == result.int8_onnx.name
    executions = len(stages.EXECUTIONS)
    again = run(colour, tmp_path / "q", profile)
    assert not again.ran and len(stages.EXECUTIONS) == executions
    assert again.int8_onnx == result.int8_onnx and again.int8_top1 == result.int8_top1
    entropy = run(colour, tmp_path / "q", with_quantization(profile, method="entropy"))
    assert entropy.ran and entropy.settings["method"] == "entropy" and entropy.passed


def test_bias_correction_is_recorded_and_switching_it_off_requantizes(colour, tmp_path):
    import onnx
    from onnx import numpy_helper

    def biases(path):
        model = onnx.load(str(path))
        int32 = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT32]
        return {i.name: numpy_helper.to_array(i) for i in int32 if i.name.endswith("_quantized")}

    # the fixture's weights are exact multiples of their int8 scale: rounding them shifts nothing
    model = onnx.load(str(colour["model"]))
    weight = next(i for i in model.graph.initializer if i.name == "w")
    values = numpy_helper.to_array(weight)
    noise = np.random.default_rng(0).uniform(0.9, 1.1, size=values.shape).astype(np.float32)
    weight.CopyFrom(numpy_helper.from_array(values * noise, "w"))
    onnx.save(model, str(tmp_path / "rough.onnx"))
    rough = {**colour, "model": tmp_path / "rough.onnx"}

    profile = load_target("cpu", TARGETS)
    corrected = run(rough, tmp_path / "corrected", profile)
    applied = corrected.settings["bias_correction_applied"]
    assert corrected.settings["bias_correction"] is True
    assert applied["layers"] >= 1 and applied["max_abs_shift"] > 0
    assert applied["calibration_images"] == len(colour["calibration"])
    corrected_biases = biases(corrected.int8_onnx)
    plain = run(rough, tmp_path / "corrected", with_quantization(profile, bias_correction=False))
    assert plain.ran and plain.settings["bias_correction_applied"] is None
    plain_biases = biases(plain.int8_onnx)
    assert corrected_biases.keys() == plain_biases.keys() and corrected_biases
    changed = [name for name in plain_biases if not np.array_equal(plain_biases[name], corrected_biases[name])]
    assert changed, "the corrected biases reach the shipped int8 model"


def test_opset_11_is_refused_before_the_quantizer_writes_an_invalid_model(colour, tmp_path):
    old = make_colour_model(tmp_path / "old.onnx", opset=11)
    with pytest.raises(EdgeBuildError, match=r"opset 11 cannot be quantized.*opset >= 13"):
        quantize_model(
            old,
            colour["calibration"],
            PREPROCESSING,
            tmp_path / "q",
            load_target("cpu", TARGETS),
            colour["images"],
            colour["labels"],
        )
    assert not (tmp_path / "q" / "model_int8.onnx").exists()


def test_accuracy_gate_fails_on_purpose_names_the_culprit_and_exclusion_fixes_it(colour, tmp_path):
    per_tensor = with_quantization(load_target("cpu", TARGETS), per_channel=False)
    with pytest.raises(AccuracyGateFailed) as info:
        run(colour, tmp_path / "q", per_tensor)
    failure = info.value
    assert isinstance(failure, CheckFailed) and failure.exit_code == 1
    assert failure.result.fp32_top1 == 100.0 and failure.result.int8_top1 < 50.0
    assert failure.result.sensitivity[0]["node"] == CONV_NAME
    assert CONV_NAME in str(failure) and "--exclude-nodes" in str(failure)
    assert not (tmp_path / "q" / "model_int8.onnx").exists()
    assert not (tmp_path / "q" / "record.json").exists()
    report = json.loads((tmp_path / "q" / "quantize.json").read_text())
    assert report["passed"] is False and report["sensitivity"][0]["node"] == CONV_NAME
    fixed = run(colour, tmp_path / "q", per_tensor, exclude_nodes=[CONV_NAME])
    assert fixed.passed and fixed.int8_top1 == 100.0 and fixed.settings["exclude_nodes"] == [CONV_NAME]
    with pytest.raises(EdgeBuildError, match="no node named 'nope'"):
        run(colour, tmp_path / "q2", per_tensor, exclude_nodes=["nope"])


def test_lite_uint8_input_and_ort_format(colour, tmp_path):
    lite = load_target("lite", TARGETS)
    result = run(colour, tmp_path / "lite", lite)
    assert result.passed and result.int8_top1 == 100.0
    fold = result.settings["uint8_input"]
    assert fold["zero_point"] == 128 and fold["scale"] == pytest.approx(1 / 127.5)
    assert fold["shift_folded_into"] == [CONV_NAME]
    int8 = OnnxRunner(result.int8_onnx)
    assert int8.input_format == UINT8_NHWC
    pixels = np.stack([PREPROCESSING.resize_rgb(np.asarray(_rgb(p))) for p in colour["images"]])
    fp32_logits = OnnxRunner(colour["model"]).run(PREPROCESSING.normalize(pixels))
    int8_logits = int8.run(pixels)
    cosine = (
        np.sum(fp32_logits * int8_logits, 1) / np.linalg.norm(fp32_logits, axis=1) / np.linalg.norm(int8_logits, axis=1)
    )
    assert float(cosine.min()) > 0.999
    assert result.int8_ort is not None and result.int8_ort.suffix == ".ort"
    assert (tmp_path / "lite" / "model_int8.required_operators.config").is_file()
    ort_runner = OnnxRunner(result.int8_ort)
    assert ort_runner.input_format == UINT8_NHWC
    np.testing.assert_allclose(ort_runner.run(pixels), int8_logits, atol=1e-5)
    listing = json.loads((tmp_path / "lite" / "artifacts.json").read_text())["artifacts"]
    assert listing["ort_int8"] == {"file": "model_int8.ort", "input_format": UINT8_NHWC, "outputs": ["logits"]}


def _rgb(path):
    from edge_build.images import load_rgb

    return load_rgb(path)


def test_quantize_command_end_to_end_and_failing_gate_exit_code(colour, tmp_path):
    from click.testing import CliRunner

    from edge_build.cli import main

    common = ["--model", str(colour["model"]), "--data", str(colour["data"]), "--build", str(tmp_path / "build")]
    common += ["--calibration", str(tmp_path / "calibration"), "--targets", str(TARGETS)]
    result = CliRunner().invoke(main, ["quantize", "--target", "cpu", *common])
    assert result.exit_code == 0, result.output
    assert "int8 top-1 100.00 %" in result.output
    assert (tmp_path / "build" / "quantize-cpu" / "model_int8.onnx").is_file()
    assert (tmp_path / "calibration" / "data.json").is_file()
    bad = tmp_path / "targets"
    bad.mkdir()
    (bad / "strict.toml").write_text(
        (TARGETS / "cpu.toml").read_text().replace("per_channel = true", "per_channel = false")
    )
    failed = CliRunner().invoke(main, ["quantize", "--target", "strict", *common[:-2], "--targets", str(bad)])
    assert failed.exit_code == 1, failed.output
    assert "accuracy gate failed" in failed.output and CONV_NAME in failed.output


def test_mslite_kit_holds_config_binary_calibration_and_command(colour, tmp_path):
    from edge_build.mslite import export_mslite_config

    mindir = tmp_path / "network.mindir"
    mindir.write_bytes(b"stand-in: the input name is given")
    written = export_mslite_config(mindir, colour["calibration"], PREPROCESSING, tmp_path, per_class=1, input_name="x")
    kit = tmp_path / "mslite"
    bins = sorted((kit / "calibration").glob("*.bin"))
    assert len(bins) == 26 and set(written) >= set(bins)
    first = np.frombuffer(bins[0].read_bytes(), dtype="<f4").reshape(1, 3, SIZE, SIZE)
    np.testing.assert_array_equal(first, PREPROCESSING.prepare_batch([colour["calibration"].refs[0].path]))
    config = (kit / "converter_ptq.cfg").read_text()
    assert "quant_type=FULL_QUANT" in config and "calibrate_path=x:calibration" in config
    assert "calibrate_size=26" in config and "input_type=BIN" in config and "per_channel=true" in config
    script = (kit / "convert.sh").read_text()
    assert (
        "--modelFile=../network.mindir --outputFile=network_int8 --configFile=converter_ptq.cfg "
        f'--inputShape="x:1,3,{SIZE},{SIZE}"' in script
    )
    assert "untested" in (kit / "README.md").read_text().lower()


def test_fp16_model_runs_on_cpu_close_to_fp32(colour, tmp_path):
    import onnx

    from edge_build.fp16 import fp16_stage

    path = fp16_stage(colour["model"], tmp_path / "fp16")
    model = onnx.load(str(path))
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in model.graph.initializer)
    batch = PREPROCESSING.prepare_batch(colour["images"])
    fp32, fp16 = OnnxRunner(colour["model"]).run(batch), OnnxRunner(path).run(batch)
    assert fp16.dtype == np.float32 and np.array_equal(fp16.argmax(1), fp32.argmax(1))
    assert float(np.max(np.abs(fp16 - fp32))) < 1e-2
    listing = json.loads((tmp_path / "fp16" / "artifacts.json").read_text())["artifacts"]
    assert listing["onnx_fp16"]["file"] == path.name


@pytest.mark.parametrize("pads", [[0, 0, 1, 1], [1, 1, 1, 1]])
def test_stem_column_grouping_is_the_same_integer_arithmetic(colour, tmp_path, pads):
    import onnx

    from edge_build import quant_graph
    from edge_build.quantize import prepare_float_model, quantization_settings, quantize_prepared

    source = make_colour_model(tmp_path / "m.onnx", big_channel=False)
    model = onnx.load(str(source))
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    next(a for a in conv.attribute if a.name == "pads").ints[:] = pads
    onnx.save(model, str(source))
    prepared = prepare_float_model(source, tmp_path / "prepared.onnx")
    assert [n.op_type for n in prepared.graph.node][-3:] == ["GlobalAveragePool", "Flatten", "Gemm"]
    settings = quantization_settings(load_target("lite", TARGETS))
    quantize_prepared(tmp_path / "prepared.onnx", tmp_path / "qdq.onnx", colour["calibration"], PREPROCESSING, settings)
    model = onnx.load(str(tmp_path / "qdq.onnx"))
    quant_graph.fold_uint8_input(model, PREPROCESSING)
    onnx.save(model, str(tmp_path / "plain.onnx"))
    info = quant_graph.group_stem_columns(model)
    assert info == {"conv": CONV_NAME, "input_channels": 12, "kernel": [3, 2]}
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(tmp_path / "grouped.onnx"))
    pixels = np.random.default_rng(1).integers(0, 256, size=(3, SIZE, SIZE, 3), dtype=np.uint8)
    plain, grouped = OnnxRunner(tmp_path / "plain.onnx"), OnnxRunner(tmp_path / "grouped.onnx")
    np.testing.assert_array_equal(grouped.run(pixels), plain.run(pixels))


def test_a_failed_gate_on_a_cpu_without_vnni_points_at_reduce_range(colour, tmp_path, monkeypatch):
    from edge_build import quantize

    monkeypatch.setattr(quantize, "u8s8_may_saturate", lambda: True)
    eight_bit = with_quantization(load_target("cpu", TARGETS), per_channel=False, reduce_range=False)
    with pytest.raises(AccuracyGateFailed) as info:
        run(colour, tmp_path / "q8", eight_bit)
    assert "no VNNI" in info.value.hint and "reduce_range = true" in info.value.hint
    assert "--exclude-nodes" in info.value.hint
    seven_bit = with_quantization(eight_bit, reduce_range=True)  # cannot saturate: the hint would mislead
    with pytest.raises(AccuracyGateFailed) as info:
        run(colour, tmp_path / "q7", seven_bit)
    assert "VNNI" not in info.value.hint


@pytest.mark.parametrize(
    ("flags", "saturates"),
    [
        ("fpu sse4_1 avx2 fma", True),  # AVX2 only (the AMD EPYC this was found on)
        ("avx2 avx512f avx512bw", True),  # AVX-512 without VNNI (Skylake-SP)
        ("avx2 avx512f avx512_vnni", False),  # Cascade Lake and later
        ("avx2 avx_vnni", False),  # Alder Lake
        ("sse4_1 sse4_2", False),  # no AVX2: ONNX Runtime's SSE kernels widen to int32
        ("", False),
    ],
)
def test_u8s8_saturation_is_read_from_the_cpu_flags(flags, saturates):
    from edge_build.quantize import u8s8_may_saturate

    assert u8s8_may_saturate(f"processor\t: 0\nflags\t\t: {flags}\n") is saturates
    assert u8s8_may_saturate("Features\t: fp asimd asimddp\n") is False  # ARM: no x86 flags line


def test_a_failed_gate_falls_back_to_the_profiles_next_calibration_method(colour, tmp_path, monkeypatch):
    from edge_build import quantize

    real = quantize._quantize_and_judge
    tried = []

    def minmax_loses_accuracy(*args):
        settings = args[7]
        tried.append(settings["method"])
        result = real(*args)
        if settings["method"] == "minmax":  # as if one validation image flipped
            result.int8_top1, result.drop_pt = result.fp32_top1 - 1.0, 1.0
            raise AccuracyGateFailed(result, tmp_path / "report.json")
        return result

    monkeypatch.setattr(quantize, "_quantize_and_judge", minmax_loses_accuracy)
    profile = with_quantization(load_target("cpu", TARGETS), fallback_methods=("percentile", "entropy"))
    result = run(colour, tmp_path / "q", profile)
    assert tried == ["minmax", "percentile"]
    assert result.passed and result.settings["method"] == "percentile"
    assert [a["method"] for a in result.attempts] == ["minmax"] and not result.attempts[0]["passed"]
    assert "percentile calibration (after minmax failed the gate)" in result.summary()
    record = json.loads((tmp_path / "q" / "quantize.json").read_text())
    assert record["settings"]["method"] == "percentile" and record["attempts"][0]["method"] == "minmax"
    tried.clear()
    again = run(colour, tmp_path / "q", profile)  # the decision is cached with the stage
    assert not again.ran and tried == [] and again.settings["method"] == "percentile"

    no_fallback = with_quantization(profile, fallback_methods=())
    with pytest.raises(AccuracyGateFailed):
        run(colour, tmp_path / "q2", no_fallback)
    assert tried == ["minmax"]
