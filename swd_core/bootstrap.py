"""Bootstrap intervals over prompts, for the evaluate stage's metrics and the retraining gate.

Every model is scored on the same prompts and seeds, so the unit that varies is the prompt: an
interval resamples prompts with replacement, and a paired difference resamples the *same* prompts
for both models (their per-prompt scores are correlated, so the difference is much tighter than
two separate intervals suggest). Two kinds of readings:

- per-prompt values (CLIP score, PickScore, a per-image loss): the statistic is their mean;
- features against a reference set paired by prompt (the reference image of prompt i beside the
  model's image of prompt i): the statistic is the Fréchet distance, with both sets resampled
  by the same prompts.

Means get percentile intervals: the `(1 - level) / 2` and `(1 + level) / 2` quantiles of the
resampled statistic. A resample repeats some prompts and drops others, which a Fréchet distance
reads as lost variety: resampled FDs lie above the FD of all prompts (192 random 1024-d features:
1327 on all prompts, 1478 to 1524 resampled). So an FD, and a difference of FDs, gets the normal
interval instead: its value ± z × the standard deviation of the resampled statistic. The Fréchet
distances are `swd_core.frechet`'s, batched over resamples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from swd_core.frechet import frechet_distance, frechet_distances

RESAMPLES = 1000
LEVEL = 0.95
CHUNK = 64  # resamples per batched Fréchet-distance call (memory: CHUNK × n × d doubles)


def resample_indices(n: int, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """Prompt indices drawn with replacement, with a fixed seed so a report is reproducible.

    Args:
        n (`int`): the prompts.
        resamples (`int`): the bootstrap resamples.
        seed (`int`): the generator's seed.

    Returns:
        `np.ndarray`: (resamples, n) integer indices in [0, n).
    """
    if n < 1:
        raise ValueError("a bootstrap needs at least one prompt")
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def percentile_interval(samples: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The percentile interval: the `(1 - level) / 2` and `(1 + level) / 2` quantiles of the
    resampled statistic (for means).

    Args:
        samples (`np.ndarray`): the statistic on each resample.
        level (`float`): the confidence level, in (0, 1).

    Returns:
        `tuple[float, float]`: the interval's ends.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    lo, hi = np.quantile(np.asarray(samples, dtype=np.float64), [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def normal_interval(value: float, samples: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The normal interval, for Fréchet distances (their resamples are biased upwards, see the
    module): value ± z × the standard deviation of `samples`, z the normal quantile of `level`.

    Args:
        value (`float`): the statistic on all prompts.
        samples (`np.ndarray`): the statistic on each resample.
        level (`float`): the confidence level, in (0, 1).

    Returns:
        `tuple[float, float]`: the interval's ends.
    """
    from scipy.stats import norm

    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    half = float(norm.ppf((1 + level) / 2)) * float(np.std(samples, ddof=1))
    return value - half, value + half


@dataclass
class Estimate:
    """A statistic on all prompts and its bootstrap interval.

    Args:
        value (`float`): the statistic on all prompts.
        lo (`float`), hi (`float`): the interval's ends.
        n (`int`): the prompts.
        level (`float`): the interval's confidence level.
    """

    value: float
    lo: float
    hi: float
    n: int
    level: float

    def as_dict(self) -> dict:
        """The fields by name, for a JSON report."""
        return {"value": self.value, "lo": self.lo, "hi": self.hi, "n": self.n, "level": self.level}


@dataclass
class Reading:
    """What one model's images gave for one metric, per prompt: `values` (n,), or `features`
    (n, d) to be compared with `reference` (n, d), row i of both belonging to prompt i.

    Args:
        values (`np.ndarray`, *optional*): per-prompt values, whose statistic is their mean.
        features (`np.ndarray`, *optional*): per-prompt features, whose statistic is the Fréchet
            distance to `reference`; exactly one of `values` and `features`.
        reference (`np.ndarray`, *optional*): the reference features, one row per prompt.
    """

    values: np.ndarray | None = None
    features: np.ndarray | None = None
    reference: np.ndarray | None = None

    def __post_init__(self):
        if (self.values is None) == (self.features is None):
            raise ValueError("a reading has per-prompt values or features, not both")
        if self.features is not None and (self.reference is None or len(self.reference) != len(self.features)):
            raise ValueError("features need a reference with one row per prompt")

    def __len__(self) -> int:
        return len(self.values if self.values is not None else self.features)

    def head(self, n: int) -> "Reading":
        """The reading of the first `n` prompts.

        Args:
            n (`int`): how many prompts to keep.

        Returns:
            `Reading`: of the same kind.
        """
        if self.values is not None:
            return Reading(values=self.values[:n])
        return Reading(features=self.features[:n], reference=self.reference[:n])

    @property
    def is_fd(self) -> bool:
        """Whether the statistic is a Fréchet distance (features), not a mean (values)."""
        return self.features is not None

    def statistic(self) -> float:
        """The statistic on all prompts.

        Returns:
            `float`: the values' mean, or the Fréchet distance of the features to the reference.
        """
        if self.values is not None:
            return float(np.mean(np.asarray(self.values, dtype=np.float64)))
        return frechet_distance(self.features, self.reference)

    def resampled(self, idx: np.ndarray, device: str = "cpu") -> np.ndarray:
        """The statistic on each resample of the prompts (Fréchet distances batched, `CHUNK` at a time).

        Args:
            idx (`np.ndarray`): (R, n) prompt indices, as `resample_indices` draws them.
            device (`str`): where the Fréchet distances are computed.

        Returns:
            `np.ndarray`: (R,) float64.
        """
        if self.values is not None:
            return np.asarray(self.values, dtype=np.float64)[idx].mean(1)
        feats = torch.as_tensor(np.asarray(self.features), dtype=torch.float64, device=device)
        ref = torch.as_tensor(np.asarray(self.reference), dtype=torch.float64, device=device)
        out = []
        for start in range(0, len(idx), CHUNK):
            rows = torch.as_tensor(idx[start:start + CHUNK], device=device)
            out.append(frechet_distances(feats[rows], ref[rows]).cpu())
        return torch.cat(out).numpy()


def estimate(reading: Reading, resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0,
             device: str = "cpu") -> Estimate:
    """The statistic on all prompts, with its bootstrap interval over prompts (percentile for a
    mean, normal for a Fréchet distance).

    Args:
        reading (`Reading`): one model's per-prompt values or features.
        resamples (`int`): the bootstrap resamples.
        level (`float`): the confidence level.
        seed (`int`): the resampling seed.
        device (`str`): where Fréchet distances are computed.

    Returns:
        `Estimate`
    """
    idx = resample_indices(len(reading), resamples, seed)
    return _estimate(reading.statistic(), reading.resampled(idx, device), reading.is_fd, len(reading), level)


def _estimate(value: float, samples: np.ndarray, fd: bool, n: int, level: float) -> Estimate:
    lo, hi = normal_interval(value, samples, level) if fd else percentile_interval(samples, level)
    return Estimate(value, lo, hi, n, level)


def paired_difference(a: Reading, b: Reading, resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0,
                      device: str = "cpu") -> Estimate:
    """statistic(a) − statistic(b) on their common prompts (the first min(len) of each), and its
    interval from resampling the same prompts for both.

    Args:
        a (`Reading`), b (`Reading`): two models' readings of the same kind, prompt i in row i.
        resamples (`int`), level (`float`), seed (`int`), device (`str`): as for `estimate`.

    Returns:
        `Estimate`: of the difference; `n` is the common prompts.

    Raises:
        ValueError: one reading is values and the other features.
    """
    n = min(len(a), len(b))
    a, b = a.head(n), b.head(n)
    idx = resample_indices(n, resamples, seed)
    if a.is_fd != b.is_fd:
        raise ValueError("a paired difference needs two readings of the same kind")
    samples = a.resampled(idx, device) - b.resampled(idx, device)
    return _estimate(a.statistic() - b.statistic(), samples, a.is_fd, n, level)


def win_rate(a: np.ndarray, b: np.ndarray, resamples: int = RESAMPLES, level: float = LEVEL,
             seed: int = 0) -> Estimate:
    """The fraction of common prompts on which `a` scores above `b` (a tie counts one half).

    Args:
        a (`np.ndarray`), b (`np.ndarray`): per-prompt scores of two models, prompt i in row i.
        resamples (`int`), level (`float`), seed (`int`): as for `estimate`.

    Returns:
        `Estimate`: the win rate, in [0, 1], with its percentile interval.
    """
    n = min(len(a), len(b))
    a, b = np.asarray(a[:n], dtype=np.float64), np.asarray(b[:n], dtype=np.float64)
    wins = (a > b) + 0.5 * (a == b)
    return estimate(Reading(values=wins), resamples, level, seed)
