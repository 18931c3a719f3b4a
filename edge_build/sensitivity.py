"""Which nodes lose the most to quantization: float vs QDQ activations, node by node.

Both models run the same images with every intermediate tensor exposed. For a tensor
the signal-to-quantization-noise ratio (SQNR, dB) measures how far the int8 model's
value has drifted from the float one; a node's *degradation* is how much SQNR it
loses from its inputs to its output, i.e. the error its own input/weight quantization
adds. The nodes with the largest degradation are the ones worth excluding.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

_QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})


def sqnr_db(reference: np.ndarray, other: np.ndarray) -> float:
    signal = float(np.sum(np.square(reference, dtype=np.float64)))
    noise = float(np.sum(np.square(reference.astype(np.float64) - other.astype(np.float64))))
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def _run_exposing(model: Any, names: list[str], batch: np.ndarray) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    from edge_build.onnx_graph import expose_outputs

    expose_outputs(model, names)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.log_severity_level = 3
    # No graph optimization: fused nodes would hide the tensors compared here.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    outputs = [o.name for o in session.get_outputs()]
    return dict(zip(outputs, session.run(outputs, {input_name: batch}), strict=True))


def _dequantized_alias(model: Any) -> dict[str, str]:
    """float tensor T -> the DequantizeLinear output that carries T's int8 value (T -> Q -> DQ)."""
    consumers: dict[str, list[Any]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    alias = {}
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear":
            continue
        dequantizers = [n for n in consumers.get(node.output[0], []) if n.op_type == "DequantizeLinear"]
        if dequantizers:
            alias[node.input[0]] = dequantizers[0].output[0]
    return alias


def rank_sensitive_nodes(float_path: Path, qdq_path: Path, batch: np.ndarray, top: int = 10) -> list[dict[str, Any]]:
    """The `top` quantized nodes that degrade SQNR most, worst first (names as in --exclude-nodes).

    A node's output is compared after its output quantization (the DequantizeLinear that
    follows it), its inputs as the node sees them (dequantized), both against the float
    model's tensors of the same names.
    """
    import onnx

    float_model, qdq_model = onnx.load(str(float_path)), onnx.load(str(qdq_path))
    float_tensors = {t for node in float_model.graph.node for t in node.output} | {float_model.graph.input[0].name}
    float_nodes = {node.name for node in float_model.graph.node}
    alias = _dequantized_alias(qdq_model)
    produced_by_dq = {node.output[0]: node for node in qdq_model.graph.node if node.op_type == "DequantizeLinear"}
    quantize_inputs = {
        node.output[0]: node.input[0] for node in qdq_model.graph.node if node.op_type == "QuantizeLinear"
    }

    def float_source(dq_output: str) -> str | None:
        """The float tensor a DequantizeLinear output stands for (None for weights and biases)."""
        return quantize_inputs.get(produced_by_dq[dq_output].input[0])

    plans = []
    for node in qdq_model.graph.node:
        if node.op_type in _QDQ_OPS or node.name not in float_nodes or not node.output:
            continue
        inputs = [(float_source(n), n) for n in node.input if n in produced_by_dq]
        inputs = [(ref, got) for ref, got in inputs if ref in float_tensors]
        out = node.output[0]
        if not inputs or out not in float_tensors:
            continue
        plans.append((node, inputs, (out, alias.get(out, out))))
    wanted_float = sorted({ref for _, ins, (out, _) in plans for ref, _ in ins} | {out for _, _, (out, _) in plans})
    wanted_qdq = sorted({got for _, ins, (_, got_out) in plans for _, got in ins} | {g for _, _, (_, g) in plans})
    graph_input = float_model.graph.input[0].name
    reference = _run_exposing(float_model, [n for n in wanted_float if n != graph_input], batch)
    quantized = _run_exposing(qdq_model, wanted_qdq, batch)
    reference[graph_input] = batch

    ranking = []
    for node, inputs, (out_ref, out_got) in plans:
        before = min(sqnr_db(reference[ref], quantized[got]) for ref, got in inputs)
        after = sqnr_db(reference[out_ref], quantized[out_got])
        degradation = (before - after) if math.isfinite(before) else (99.0 - after)
        ranking.append(
            {
                "node": node.name,
                "op_type": node.op_type,
                "input_sqnr_db": round(before, 2) if math.isfinite(before) else None,
                "output_sqnr_db": round(after, 2) if math.isfinite(after) else None,
                "degradation_db": round(degradation, 2) if math.isfinite(degradation) else 99.0,
            }
        )
    ranking.sort(key=lambda row: row["degradation_db"], reverse=True)
    return ranking[:top]
