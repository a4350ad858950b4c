"""Guard settings as they appear in node.yaml (section ``guard``)."""

from __future__ import annotations

from dataclasses import dataclass

from protocols.typed import setting

__all__ = ["GuardSettings", "METRIC_NAMES"]

METRIC_NAMES = ("pixel_rmse", "contrast_rmse", "shift_flip", "embedding")


@dataclass
class GuardSettings:
    threshold_quantile: float = setting(
        0.01,
        "default threshold = this quantile (order statistic) of the distances from holdout\n"
        "patients' slices to their nearest slice of another patient: about 1 % of genuinely\n"
        "new patients' slices fall below it per metric (at most ~4 % over four metrics,\n"
        "within a 5 % budget)",
    )
    max_shift_px: int = setting(4, "shift-tolerant metric: largest integer shift tried (pixels)")
    rotations_deg: list[float] = setting(
        [-3.5, 0.0, 3.5],
        "shift-tolerant metric: rotations of the candidate also tried (degrees); with +-3.5 a\n"
        "copy rotated by up to 5 degrees is within 1.75 degrees of one of them",
    )
    metrics: list[str] = setting(
        list(METRIC_NAMES), "metrics; an image is rejected if ANY finds it too close"
    )
    pca_components: int = setting(
        256, "principal axes of the exact search's lower bound (speed only, never results)"
    )
    canaries_per_alteration: int = setting(
        8, "canaries of each alteration planted in every generate / screen run"
    )
    batch_size: int = setting(
        32, "generate: candidates sampled per sampler call (screened in groups sized to fill "
        "the request)"
    )
    max_tries_factor: float = setting(
        4.0, "generate: stop after sampling this many times the requested count"
    )
    min_acceptance_rate: float = setting(
        0.5, "generate: below this acceptance rate the run says the generator copies too much"
    )
    calibration_folds: int = setting(
        5, "calibration without a holdout split: patient groups / slabs left out in turn"
    )
    slab_gap: int = setting(
        2, "one-patient calibration: slices either side of a left-out slab also left out"
    )
    neighbour_pairs: int = setting(
        200, "calibration: neighbouring-slice pairs measured for the record (0: none)"
    )
    encoder_steps: int = setting(400, "embedding metric: contrastive training steps")
    encoder_embed_dim: int = setting(64, "embedding metric: embedding dimension")
    encoder_batch_size: int = setting(64, "embedding metric: slices per training batch")
    encoder_seed: int = setting(0, "embedding metric: seed of weights and augmentations")

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold_quantile < 0.5:
            raise ValueError("threshold_quantile must be in [0, 0.5)")
        if self.max_shift_px < 0:
            raise ValueError("max_shift_px must be >= 0")
        if any(abs(a) > 45 for a in self.rotations_deg):
            raise ValueError("rotations_deg must be within 45 degrees")
        unknown = [m for m in self.metrics if m not in METRIC_NAMES]
        if unknown or not self.metrics or len(set(self.metrics)) != len(self.metrics):
            raise ValueError(f"metrics must be distinct names from {list(METRIC_NAMES)}")
        if self.canaries_per_alteration < 1:
            raise ValueError("canaries_per_alteration must be >= 1 (canaries are not optional)")
        if self.batch_size < 1 or self.max_tries_factor < 1.0:
            raise ValueError("batch_size must be >= 1 and max_tries_factor >= 1")
        if not 0 <= self.pca_components <= 512:
            raise ValueError("pca_components must be in 0..512")
