"""New images -> scores, decisions, anomaly maps and defect masks at the input's resolution.

One path for every consumer (the predict CLI, the MLflow model, the exported graphs): the
run's own detector scores the preprocessed images, as in the test pass (its embedder is the
torch backbone or an exported graph), and the decisions the run stored turn scores into
verdicts and masks.
"""

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from patchlab.core.detector import PatchCore
from patchlab.data.mvtec import ImageTransform
from patchlab.tuning.postprocess import PostProcessing, binarize


@dataclass(frozen=True)
class Decisions:
    """Where scores become decisions; stored in the bank's metadata by the run.

    With threshold=optuna: the validation-tuned image threshold and mask post-processing.
    Otherwise the test set's F1-optimal thresholds (`thresholds_from` says which).
    """

    image_threshold: float
    post: PostProcessing | None = None
    pixel_threshold: float | None = None  # raw map threshold, when there is no post-processing
    thresholds_from: str = "unknown"

    @classmethod
    def from_extra(cls, extra: dict) -> "Decisions":
        post = extra.get("post_processing")
        return cls(
            image_threshold=float(extra["image_threshold"]),
            post=PostProcessing(**post) if post else None,
            pixel_threshold=extra.get("pixel_threshold"),
            thresholds_from=extra.get("thresholds_from", "unknown"),
        )

    def pixel_scale(self, maps: torch.Tensor) -> torch.Tensor:
        """Maps on a scale where 0.5 is the pixel decision threshold (1 is twice as far)."""
        if self.post is not None:
            normalised = (maps - self.post.low) / max(self.post.high - self.post.low, 1e-12)
            return normalised / (2 * max(self.post.threshold, 1e-12))
        threshold = self.pixel_threshold or self.image_threshold
        return maps / (2 * threshold)


@dataclass
class Prediction:
    """One image's result; `map` is on the scale of `Decisions.pixel_scale`."""

    score: float
    normalised_score: float  # 0.5 is the decision threshold, clipped to [0, 1]
    anomalous: bool
    map: np.ndarray  # (H, W) float32 at the input's size
    mask: np.ndarray | None  # (H, W) bool at the input's size; None without a pixel threshold

    def map_16bit(self) -> np.ndarray:
        """The map as 16-bit pixels, 32768 = the pixel decision threshold (PNG-ready)."""
        return np.clip(self.map * 65535, 0, 65535).astype(np.uint16)

    @property
    def defect_area(self) -> int | None:
        return None if self.mask is None else int(self.mask.sum())


def resized_size(height: int, width: int, resize: int) -> tuple[int, int]:
    """torchvision's Resize(int): the short side becomes `resize`, the long one keeps aspect."""
    if height <= width:
        return resize, int(resize * width / height)
    return int(resize * height / width), resize


def uncrop(crop_maps: torch.Tensor, size: tuple[int, int], resize: int, mode: str) -> torch.Tensor:
    """(C, C) crop-resolution map -> (H, W) at the original image's size.

    The centre crop is put back where it came from in the resized image; the border the crop
    cut off (6% a side at 256/224) repeats the nearest scored pixel, then the whole is resized
    to the original size.
    """
    crop = crop_maps.shape[-1]
    height, width = resized_size(*size, resize)
    top, left = round((height - crop) / 2.0), round((width - crop) / 2.0)
    padding = (left, width - crop - left, top, height - crop - top)
    canvas = F.pad(crop_maps[None, None].float(), padding, mode="replicate")
    extra = {} if mode == "nearest" else {"align_corners": False}
    return F.interpolate(canvas, size=size, mode=mode, **extra)[0, 0]


class Predictor:
    """A fitted detector with its preprocessing and decisions."""

    def __init__(
        self,
        detector: PatchCore,
        preprocessing: dict,
        decisions: Decisions,
        batch_size: int = 16,
    ) -> None:
        self.detector = detector
        # The run's test batch: search and convolution rounding depend on the batch, so at
        # this size a run's own test images get bit-identical scores.
        self.batch_size = batch_size
        self.resize = int(preprocessing["resize"])
        self.crop = int(preprocessing["crop_size"])
        self.transform = ImageTransform(
            self.resize, self.crop, preprocessing["mean"], preprocessing["std"]
        )
        self.decisions = decisions

    def crop_results(
        self, images: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(B,) image scores, (B, C, C) maps and masks at crop resolution, as the test pass had
        them: the masks are exactly what tuning's post-processing makes of the maps."""
        batch = torch.stack([self.transform.image(image) for image in images])
        post = self.decisions.post
        scores, maps, _ = self.detector.predict(batch, post.sigma if post else None)
        if post is not None:
            masks = binarize(maps, post)
        elif self.decisions.pixel_threshold is not None:
            masks = maps >= self.decisions.pixel_threshold
        else:
            masks = None
        return scores, maps, masks

    @torch.inference_mode()
    def predict(self, images: list[torch.Tensor]) -> list[Prediction]:
        """(3, H, W) uint8 images of any sizes -> one Prediction each, at each one's size."""
        scores, maps, masks = self.crop_results(images)
        threshold = self.decisions.image_threshold
        scaled = self.decisions.pixel_scale(maps)
        results = []
        for i, image in enumerate(images):
            size = tuple(image.shape[-2:])
            mask = None
            if masks is not None:
                mask = uncrop(masks[i], size, self.resize, "nearest").numpy() > 0.5
            score = float(scores[i])
            results.append(
                Prediction(
                    score=score,
                    normalised_score=min(max(score / (2 * threshold), 0.0), 1.0),
                    anomalous=score >= threshold,
                    map=uncrop(scaled[i], size, self.resize, "bilinear").numpy(),
                    mask=mask,
                )
            )
        return results
