"""The run's model as an MLflow pyfunc: `mlflow.pyfunc.load_model`, the Model Registry and
`mlflow models serve` all score images with it.

Logged as code (`pyfunc_entry.py`, a readable file), not as a pickle, with the bank file as
its only artifact (the job logs it: `jobs/tracking.py`). Loading it through MLflow runs that
file, as every pyfunc load runs the model's code; `patchlab predict models:/NAME@ALIAS` reads
only the bank instead. Loading refuses an entry file or a bank that differs from what the run
wrote. A batch is answered row by row: a bad image gets an `error` and the rest are scored.
"""

import base64
import binascii
import io
import logging
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from PIL import Image

from patchlab.artifacts.bank import verify_bank
from patchlab.data.mvtec import decode_image
from patchlab.deploy.loading import MODEL_NAME, load_predictor
from patchlab.deploy.predictor import Prediction
from patchlab.deploy.provenance import (
    DIGESTS_KEY,
    ENTRY,
    run_tags,
    verify_model,
)
from patchlab.errors import UserError

__all__ = [
    "DIGESTS_KEY",
    "ENTRY",
    "MAX_PIXELS",
    "MODEL_NAME",
    "REQUIREMENTS",
    "SIGNATURE",
    "PatchCoreModel",
]
log = logging.getLogger(__name__)
# The largest image a served row may hold (width x height), checked from the file's header
# before it is decoded: a 16k x 16k PNG is a few MB posted and 768 MB decoded.
MAX_PIXELS = 50_000_000
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
            ColSpec("string", "operating_point", required=False),  # what the threshold serves
            ColSpec("long", "defect_area_px", required=False),
            ColSpec("string", "map_png", required=False),
            ColSpec("string", "mask_png", required=False),
            ColSpec("string", "error", required=False),  # why this row has no result
        ]
    ),
    params=ParamSchema([ParamSpec("return_maps", "boolean", False)]),
)


def decode(row: pd.Series) -> torch.Tensor:
    """One input row -> (3, H, W) uint8; `image` (base64 bytes) wins over `path`.

    Every failure is a UserError whose message names only what the client sent.
    """
    data, path = row.get("image"), row.get("path")
    if isinstance(data, str) and data:
        try:
            source, name = io.BytesIO(base64.b64decode(data, validate=True)), "posted image"
        except (binascii.Error, ValueError) as error:
            raise UserError("'image' is not base64-encoded file bytes") from error
    elif isinstance(path, str) and path:
        source, name = Path(path), path
        if not source.is_file():
            raise UserError(f"no image file at path {path!r}")
    else:
        raise UserError("each row needs 'image' (base64-encoded file bytes) or 'path'")
    check_size(source, name)
    return decode_image(source, name)


def check_size(source: Path | io.BytesIO, name: str) -> None:
    """Refuses an image over MAX_PIXELS from its header, before decoding it."""
    try:
        with Image.open(source) as image:
            width, height = image.size
    except Exception as error:  # decode_image names what is wrong with an unreadable file
        log.debug("header of %s: %s", name, error)
        return
    finally:
        if isinstance(source, io.BytesIO):
            source.seek(0)
    if width * height > MAX_PIXELS:
        raise UserError(f"{name}: {width}x{height} pixels, over the limit of {MAX_PIXELS}")


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
        bank = Path(context.artifacts["bank"])
        run_id = verify_model(bank)
        if run_id:
            try:
                tags = run_tags(run_id, None)
            except Exception as error:  # served without its tracking server: the model's record
                log.warning("Run %s not reachable to verify the bank against: %s", run_id, error)
                tags = {}
            verify_bank(bank, tags, f"run {run_id}")
        self.predictor = load_predictor(bank)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        return_maps = bool((params or {}).get("return_maps", False))
        rows: list[dict] = []
        images: dict[int, torch.Tensor] = {}
        for index, (_, row) in enumerate(pd.DataFrame(model_input).iterrows()):
            try:
                images[index] = decode(row)
                rows.append({})
            except UserError as error:
                rows.append({"error": str(error)})
        good, batch = list(images), self.predictor.batch_size
        point = self.predictor.decisions.operating_point
        for start in range(0, len(good), batch):
            chunk = good[start : start + batch]
            scored = self._rows([images[i] for i in chunk], return_maps)
            for index, row in zip(chunk, scored, strict=True):
                rows[index] = row | ({} if "error" in row else {"operating_point": point})
        # None, not NaN, in a failed row's numbers: JSON has no NaN
        answer = pd.DataFrame(rows, columns=[c.name for c in SIGNATURE.outputs.inputs])
        return answer.astype(object).where(answer.notna(), None)

    def _rows(self, images: list[torch.Tensor], return_maps: bool) -> list[dict]:
        """The batch's result rows; if the batch fails, each image alone, so that an image the
        model cannot score fails only its own row (with no trace or path in its error)."""
        try:
            return [row_of(p, return_maps) for p in self.predictor.predict(images)]
        except Exception:
            if len(images) == 1:
                log.exception("scoring an image failed")
                return [{"error": "the model could not score this image"}]
        return [row for image in images for row in self._rows([image], return_maps)]
