"""The run's model as an MLflow pyfunc: `mlflow.pyfunc.load_model`, the Model Registry and
`mlflow models serve` all score images with it.

Logged as code (`pyfunc_entry.py`, a readable file), not as a pickle, with the bank file as
its only artifact (the job logs it: `jobs/tracking.py`). Loading it through MLflow runs that
file, as every pyfunc load runs the model's code; `patchlab predict models:/NAME@ALIAS` reads
only the bank instead.
"""

import base64
import io
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from PIL import Image

from patchlab.data.mvtec import decode_image, read_image
from patchlab.deploy.loading import MODEL_NAME, load_predictor
from patchlab.deploy.predictor import Prediction
from patchlab.errors import UserError

__all__ = ["ENTRY", "MODEL_NAME", "REQUIREMENTS", "SIGNATURE", "PatchCoreModel"]
ENTRY = Path(__file__).with_name("pyfunc_entry.py")
REQUIREMENTS = [
    "torch",
    "torchvision",
    "timm",
    "faiss-cpu",
    "safetensors",
    "scipy",
    "pillow",
    "opencv-python-headless",
]
SIGNATURE = ModelSignature(
    inputs=Schema(
        [
            ColSpec("string", "path", required=False),  # a file the server can read
            ColSpec("string", "image", required=False),  # or the file's bytes, base64
        ]
    ),
    outputs=Schema(
        [
            ColSpec("double", "image_score"),
            ColSpec("double", "normalised_score"),
            ColSpec("boolean", "anomalous"),
            ColSpec("long", "defect_area_px", required=False),
            ColSpec("string", "map_png", required=False),
            ColSpec("string", "mask_png", required=False),
        ]
    ),
    params=ParamSchema([ParamSpec("return_maps", "boolean", False)]),
)


def decode(row: pd.Series) -> torch.Tensor:
    """One input row -> (3, H, W) uint8; `image` (base64 bytes) wins over `path`."""
    data = row.get("image")
    if isinstance(data, str) and data:
        return decode_image(io.BytesIO(base64.b64decode(data)), "posted image")
    path = row.get("path")
    if isinstance(path, str) and path:
        return read_image(Path(path))
    raise UserError("each row needs 'image' (base64-encoded file bytes) or 'path'")


def png_base64(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def row_of(prediction: Prediction, return_maps: bool) -> dict:
    row = {
        "image_score": prediction.score,
        "normalised_score": prediction.normalised_score,
        "anomalous": prediction.anomalous,
        "defect_area_px": prediction.defect_area,
    }
    if return_maps:
        row["map_png"] = png_base64(prediction.map_16bit())
        if prediction.mask is not None:
            row["mask_png"] = png_base64(prediction.mask.astype(np.uint8) * 255)
    return row


class PatchCoreModel(mlflow.pyfunc.PythonModel):
    """Scores a DataFrame of images (paths or base64 bytes) with the run's bank and decisions."""

    def load_context(self, context) -> None:
        self.predictor = load_predictor(Path(context.artifacts["bank"]))

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        return_maps = bool((params or {}).get("return_maps", False))
        frame = pd.DataFrame(model_input)
        rows = []
        batch = self.predictor.batch_size
        for start in range(0, len(frame), batch):
            images = [decode(row) for _, row in frame.iloc[start : start + batch].iterrows()]
            rows += [row_of(p, return_maps) for p in self.predictor.predict(images)]
        return pd.DataFrame(rows)
