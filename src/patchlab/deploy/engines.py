"""Embedding engines: the backbone and patch aggregation in torch, ONNX Runtime or OpenVINO.

Each engine is one function from the bank's folder and checked config to an `embed` callable
and the feature width it produces. Only the graph differs; the bank, search and
post-processing are shared (see `predictor.py`). Exported graphs have a dynamic batch axis and
hold no bank, so their size does not grow with the training set.
"""

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from patchlab.core.patches import PatchEmbedding
from patchlab.errors import UserError

ONNX_FILE = "embedding.onnx"
OPENVINO_FILE = "embedding.xml"  # with embedding.bin beside it
ONNX_OPSET = 17

Embed = Callable[[torch.Tensor], torch.Tensor]


def patch_embedding(cfg: DictConfig, weights: str | None = None) -> PatchEmbedding:
    """The run's backbone and aggregation; `cfg` must come from `outputs.bank_config`."""
    if weights is not None:
        cfg.backbone.weights = weights
    torch.manual_seed(cfg.seed)  # as in training, so even a random-init backbone comes back equal
    backbone = instantiate(cfg.backbone)
    return PatchEmbedding(backbone, cfg.model.patch_size, cfg.model.embedding_dim).eval()


def torch_engine(folder: Path, cfg: DictConfig, weights: str | None) -> tuple[Embed, int]:
    embedding = patch_embedding(cfg, weights)
    chunk = int(cfg.model.get("forward_chunk", 8))

    @torch.inference_mode()
    def embed(images: torch.Tensor) -> torch.Tensor:
        return torch.cat([embedding(part) for part in images.split(chunk)])

    return embed, embedding.feature_dim


def _graph(folder: Path, name: str, engine: str) -> Path:
    path = folder / name
    if not path.is_file():
        raise UserError(
            f"--engine {engine} needs {path}, which does not exist: export it first with "
            f"python -m patchlab.export SOURCE --format {engine} --out {folder}"
        )
    return path


def probed_width(embed: Embed, cfg: DictConfig) -> int:
    """Feature width of a graph, from one blank image: graph metadata may leave it symbolic."""
    size = int(cfg.data.crop_size)
    return int(embed(torch.zeros(1, 3, size, size)).shape[1])


def onnx_engine(folder: Path, cfg: DictConfig, weights: str | None) -> tuple[Embed, int]:
    import onnxruntime

    session = onnxruntime.InferenceSession(
        str(_graph(folder, ONNX_FILE, "onnx")), providers=["CPUExecutionProvider"]
    )
    name = session.get_inputs()[0].name

    def embed(images: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(images.numpy(), dtype=np.float32)
        return torch.from_numpy(session.run(None, {name: array})[0])

    return embed, probed_width(embed, cfg)


def openvino_engine(folder: Path, cfg: DictConfig, weights: str | None) -> tuple[Embed, int]:
    import openvino

    # On CPUs with bf16 units OpenVINO computes in bf16 unless told otherwise: scores then
    # drift by ~0.2%, enough to flip decisions near the threshold. f32 keeps torch's numbers.
    compiled = openvino.Core().compile_model(
        str(_graph(folder, OPENVINO_FILE, "openvino")), "CPU", {"INFERENCE_PRECISION_HINT": "f32"}
    )
    output = compiled.output(0)

    def embed(images: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(images.numpy(), dtype=np.float32)
        return torch.from_numpy(np.array(compiled(array)[output]))

    return embed, probed_width(embed, cfg)


ENGINES: dict[str, Callable[[Path, DictConfig, str | None], tuple[Embed, int]]] = {
    "torch": torch_engine,
    "onnx": onnx_engine,
    "openvino": openvino_engine,
}


def export_onnx(embedding: PatchEmbedding, crop_size: int, path: Path) -> None:
    """Traces backbone + aggregation into one graph, batch axis dynamic.

    The tracing exporter is used: it needs no extra package and drops the backbone's layers
    past the deepest requested one as dead code (the early stop of training cannot be traced).
    """
    example = torch.zeros(2, 3, crop_size, crop_size)
    embedding.backbone.stop_early = False
    try:
        with warnings.catch_warnings():
            # torch announces the tracing exporter's deprecation; it is still the exporter
            # that needs no onnxscript and gives an exact graph for these models.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(
                embedding,
                (example,),
                str(path),
                input_names=["images"],
                output_names=["embedding"],
                dynamic_axes={"images": {0: "batch"}, "embedding": {0: "batch"}},
                opset_version=ONNX_OPSET,
                dynamo=False,
            )
    finally:
        embedding.backbone.stop_early = True


def export_openvino(onnx_path: Path, path: Path) -> None:
    """Converts the ONNX graph to OpenVINO IR (`.xml` + `.bin`), fp32 weights kept."""
    import openvino

    openvino.save_model(openvino.convert_model(str(onnx_path)), str(path), compress_to_fp16=False)
