"""Embedding engines: every member's backbone and patch aggregation as one exported graph.

The detector scores the same way whatever produced its patch embeddings (see
`core/detector.py`); an engine only swaps its embedder for an ONNX Runtime or OpenVINO run of
the graph `export_onnx` traced. Graphs have a dynamic batch axis and one output per member,
and hold no bank, so their size does not grow with the training set.
"""

import importlib
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from patchlab.core.patches import TorchEmbedder
from patchlab.data.geometry import Size
from patchlab.errors import UserError

ONNX_FILE = "embedding.onnx"
OPENVINO_FILE = "embedding.xml"  # with embedding.bin beside it
ONNX_OPSET = 17
GRAPH_ENGINES = {"onnx": ONNX_FILE, "openvino": OPENVINO_FILE}
EXTRA_INSTALL = "pip install -e '.[export]'"


def graph_path(folder: Path, engine: str) -> Path:
    """The engine's graph beside the bank; a clear error when it was never exported."""
    path = folder / GRAPH_ENGINES[engine]
    if not path.is_file():
        raise UserError(
            f"--engine {engine} needs {path}, which does not exist: export it first with "
            f"patchlab export SOURCE --format {engine} --out {folder}"
        )
    return path


def import_extra(module: str) -> ModuleType:
    """An export-engine package, or one line saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise UserError(
            f"{module} is not installed; install the export extra: {EXTRA_INSTALL}"
        ) from error


class GraphEmbedder:
    """An exported graph as the detector's embedder; `run` maps a float32 NCHW array to the
    graph's outputs, one per member."""

    def __init__(self, run: Callable[[np.ndarray], list[np.ndarray]], size: Size) -> None:
        self.run = run
        # The widths from one blank image: graph metadata may leave them symbolic.
        self.feature_dims = [int(e.shape[1]) for e in self.embed(torch.zeros(1, 3, *size))]

    def embed(self, images: torch.Tensor) -> list[torch.Tensor]:
        array = np.ascontiguousarray(images.numpy(), dtype=np.float32)
        return [torch.from_numpy(np.asarray(output)) for output in self.run(array)]


def onnx_embedder(folder: Path, size: Size) -> GraphEmbedder:
    onnxruntime = import_extra("onnxruntime")
    session = onnxruntime.InferenceSession(
        str(graph_path(folder, "onnx")), providers=["CPUExecutionProvider"]
    )
    name = session.get_inputs()[0].name
    return GraphEmbedder(lambda array: session.run(None, {name: array}), size)


def openvino_embedder(folder: Path, size: Size) -> GraphEmbedder:
    openvino = import_extra("openvino")
    # On CPUs with bf16 units OpenVINO computes in bf16 unless told otherwise: scores then
    # drift by ~0.2%, enough to flip decisions near the threshold. f32 keeps torch's numbers.
    compiled = openvino.Core().compile_model(
        str(graph_path(folder, "openvino")), "CPU", {"INFERENCE_PRECISION_HINT": "f32"}
    )
    outputs = compiled.outputs

    def run(array: np.ndarray) -> list[np.ndarray]:
        results = compiled(array)
        return [results[output] for output in outputs]

    return GraphEmbedder(run, size)


EMBEDDERS: dict[str, Callable[[Path, Size], GraphEmbedder]] = {
    "onnx": onnx_embedder,
    "openvino": openvino_embedder,
}
ENGINES = ("torch", *EMBEDDERS)


def export_onnx(embedder: TorchEmbedder, size: Size, path: Path) -> None:
    """Traces every member's backbone + aggregation into one graph for (B, 3, H, W) inputs of
    `size`, the batch axis dynamic.

    Every input the detector embeds has that size (the geometry's input, or a tile of it), so
    the spatial axes are fixed: some backbones compute their padding from the input size, which
    a trace would freeze anyway. The tracing exporter is used: it needs no extra package and
    drops the backbone's layers past the deepest requested one as dead code (the early stop of
    training cannot be traced).
    """
    import_extra("onnx")
    example = torch.zeros(2, 3, *size)
    names = [f"embedding.{i}" for i in range(len(embedder.members))]
    extractors = [member.backbone for member in embedder.members]
    for extractor in extractors:
        extractor.stop_early = False
    try:
        with warnings.catch_warnings():
            # torch announces the tracing exporter's deprecation; it is still the exporter
            # that needs no onnxscript and gives an exact graph for these models.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(
                embedder,
                (example,),
                str(path),
                input_names=["images"],
                output_names=names,
                dynamic_axes={"images": {0: "batch"}} | {name: {0: "batch"} for name in names},
                opset_version=ONNX_OPSET,
                dynamo=False,
            )
    finally:
        for extractor in extractors:
            extractor.stop_early = True


def export_openvino(onnx_path: Path, path: Path) -> None:
    """Converts the ONNX graph to OpenVINO IR (`.xml` + `.bin`), fp32 weights kept."""
    openvino = import_extra("openvino")
    openvino.save_model(openvino.convert_model(str(onnx_path)), str(path), compress_to_fp16=False)
