"""New images -> scores, decisions, anomaly maps and defect masks at the input's resolution.

One path for every consumer (the predict CLI, the MLflow model, the exported graphs): the
run's own detector scores the preprocessed images, as in the test pass (its embedder is the
torch backbone or an exported graph), and the decisions the run stored turn scores into
verdicts and masks.
"""

from dataclasses import dataclass

import numpy as np
import torch

from patchlab.core.detector import PatchCore
from patchlab.data.preprocessing import Preprocessing
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
    operating_point: str = "f1"  # the objective the image threshold was chosen by

    @classmethod
    def from_extra(cls, extra: dict) -> "Decisions":
        post = extra.get("post_processing")
        return cls(
            image_threshold=float(extra["image_threshold"]),
            post=PostProcessing(**post) if post else None,
            pixel_threshold=extra.get("pixel_threshold"),
            thresholds_from=extra.get("thresholds_from", "unknown"),
            operating_point=extra.get("operating_point", "f1"),
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
    map: np.ndarray  # (H, W) float32 at the input's size; NaN where not scored
    mask: np.ndarray | None  # (H, W) bool at the input's size; None without a pixel threshold

    def map_16bit(self) -> np.ndarray:
        """The map as 16-bit pixels (PNG-ready): 0 = not scored, 1..65535 the scored scale,
        32768 = the pixel decision threshold."""
        scored = np.clip(np.nan_to_num(self.map, nan=0.0) * 65535, 1, 65535).astype(np.uint16)
        return np.where(np.isnan(self.map), np.uint16(0), scored)

    @property
    def defect_area(self) -> int | None:
        return None if self.mask is None else int(self.mask.sum())


class Predictor:
    """A fitted detector with its preprocessing and decisions."""

    def __init__(
        self,
        detector: PatchCore,
        preprocessing: Preprocessing,
        decisions: Decisions,
        batch_size: int = 16,
    ) -> None:
        self.detector = detector
        # The run's test batch: search and convolution rounding depend on the batch, so at
        # this size a run's own test images get bit-identical scores.
        self.batch_size = batch_size
        self.preprocessing = preprocessing
        self.decisions = decisions

    def input_results(
        self, images: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(B,) image scores, (B, H, W) maps and masks at the model's input resolution, as the
        test pass had them: the masks are exactly what tuning's post-processing makes of the
        maps. Pixels not scored are NaN in the maps and False in the masks."""
        batch = torch.stack([self.preprocessing.image(image) for image in images])
        valid = torch.stack([self.preprocessing.valid(tuple(i.shape[-2:])) for i in images])
        post = self.decisions.post
        scores, maps, _ = self.detector.predict(batch, post.sigma if post else None, valid)
        if post is not None:
            masks = binarize(maps, post)
        elif self.decisions.pixel_threshold is not None:
            masks = maps >= self.decisions.pixel_threshold
        else:
            masks = None
        return scores, maps, masks

    @torch.inference_mode()
    def predict(self, images: list[torch.Tensor]) -> list[Prediction]:
        """(3, H, W) uint8 images of any sizes -> one Prediction each, at each one's size.

        Maps hold NaN, and masks False, wherever nothing was scored: outside a crop, in
        padding, in an ignored region. Nothing is filled in.
        """
        scores, maps, masks = self.input_results(images)
        threshold = self.decisions.image_threshold
        scaled = self.decisions.pixel_scale(maps)
        geometry = self.preprocessing.geometry
        results = []
        for i, image in enumerate(images):
            size = tuple(image.shape[-2:])
            mask = None
            if masks is not None:
                mask = (geometry.to_source(masks[i].float(), size, nearest=True) > 0.5).numpy()
            score = float(scores[i])
            results.append(
                Prediction(
                    score=score,
                    normalised_score=min(max(score / (2 * threshold), 0.0), 1.0),
                    anomalous=score >= threshold,
                    map=geometry.to_source(scaled[i], size).numpy(),
                    mask=mask,
                )
            )
        return results
