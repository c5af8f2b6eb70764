"""HU plausibility gate: does a volume hold CT numbers of a body, or values in the wrong units?

Physics. A CT number is ``HU = 1000 (mu - mu_water) / (mu_water - mu_air)``: water is 0 and air -1000 by
definition, and air is the least attenuating matter a scan holds, so nothing physical lies much below
-1000. A CT of a body therefore shows, in the histogram of its voxels,

- an **air peak** near -1000 HU: the air around the patient, the lungs (parenchyma -850 to -900 in
  inspiration, -950 with emphysema) and bowel gas;
- a **soft-tissue peak** near 0-60 HU: water, muscle (40-60), organs (liver 55-65 native, about 110 portal
  venous), blood (40; 150-300 with contrast); fat sits near -100 and may be the taller peak in the abdomen;
- a **valley** between them, [-600, -250] HU: little of a body lies between lung and fat (partial volume at
  the lungs' edges, diseased lung, spread thin over hundreds of HU), so no peak there is nearly as tall as
  the air or soft-tissue peak;
- little **outside the physical range** [-1100, 3071] HU: below -1100 only image noise in air, above 3071
  (the top of the 12-bit scale) only metal on extended scales. Scanners mark the pixels outside the
  reconstruction circle with one constant far below air (-2000, -2048, -3024): when the volume's minimum
  is below the range and holds at least ``padding_min_share`` of the voxels, it is taken as that padding
  value and left out of every share below.

The usual errors move these peaks in ways the measurements name:

- **raw stored values** (the rescale was never applied: ``HU = stored * RescaleSlope + RescaleIntercept``,
  usually slope 1 and intercept -1024): air near +24, soft tissue near +1064, nothing near -1000;
- **rescaled twice** (the intercept applied to values already in HU, e.g. CT-RATE v2 through the reference
  code): air near -2024, fat near -1124, soft tissue near -984, most of the volume below -1100;
- **not a CT intensity distribution**: a volume windowed or normalised to [0, 1] (or [0, 255]) spans a few
  units, an MR or PET volume has no air peak near -1000.

Measurements (:func:`measure`) run on a regular strided sample of at most ``max_sample_voxels`` voxels
(every ``s``-th voxel along each axis; a 512 x 512 x 300 volume is sampled every 4th voxel, 1.2 M voxels):
a histogram of ``bin_hu`` wide bins over [-4100, 8200), smoothed over ``smooth_bins`` bins; the air peak is
its mode below ``air_search_below_hu``; the soft-tissue peak its mode inside ``tissue_band_hu``; the air share
the share of voxels inside ``air_peak_hu``, the tissue share the share inside ``tissue_band_hu``; the valley
ratio the tallest smoothed bin inside ``valley_hu`` over the lower of the two peaks' heights; the outside
share the share outside ``physical_range_hu`` (padding excluded, non-finite values included); the 1st-99th
percentile span; the three tallest histogram peaks (50 HU smoothing, at least 200 HU apart).

A volume passes (:func:`judge`) when the air peak lies in ``air_peak_hu`` with at least ``min_air_share``,
the soft-tissue peak in ``tissue_peak_hu`` with at least ``min_tissue_share``, the valley ratio is at most
``max_valley_ratio``, and at most ``max_outside_share`` lies outside the physical range. A failing volume gets
a cause (:func:`diagnose`): a constant volume or a percentile span under ``min_span_hu`` is "not a CT
intensity distribution"; else the sample is re-measured under the usual rescales, slope 1 with each of
``rescale_intercepts_hu``: plausible after adding the intercept -> "raw stored values", after subtracting it
-> "rescaled twice"; neither -> "not a CT intensity distribution", with the linear map that would put the two
tallest peaks at -1000 and +40 HU as a hint (an unusual slope, MR, PET?).

Size. The criteria are shares and peak positions, so a small volume is judged like a large one; a volume
cropped inside the body with no air fails (pass ``--hu-check warn`` for such inputs). A constant volume
(every voxel one value) fails as not a CT intensity distribution.

The gate never changes a value: it measures, records and, in mode ``fail``, refuses.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

#: What a run does with a failing volume: ``fail`` (a failed case; default), ``warn`` (keep it, log and
#: record the failure), ``off`` (measure nothing).
HU_CHECK_MODES = ("fail", "warn", "off")
#: Histogram range (HU): wide enough for raw 12-bit values, doubly rescaled values and scanner padding.
HIST_RANGE_HU = (-4100.0, 8200.0)
#: Causes :func:`diagnose` names.
CAUSES = ("raw_stored_values", "rescaled_twice", "not_ct")
_NOMINAL_AIR_HU, _NOMINAL_TISSUE_HU = -1000.0, 40.0


class HUCheckError(ValueError):
    """A volume's intensities are not plausible HU of a body; the message names the peaks and the cause,
    ``record`` holds the measurements (as in ``case.json``)."""

    def __init__(self, message: str, record: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.record = record or {}


@dataclass(frozen=True)
class HUCheckConfig:
    """Thresholds of the HU plausibility gate (``hu_check:`` in ``configs/preprocess/*.yaml``); see the
    module docstring for the physics behind each value."""

    air_search_below_hu: float = -500.0
    """The air peak is the histogram's mode below this value."""
    air_peak_hu: tuple[float, float] = (-1100.0, -700.0)
    """Accepted position of the air peak (air -1000, lung parenchyma down to -700 in expiration)."""
    min_air_share: float = 0.002
    """Least share of voxels inside ``air_peak_hu`` (bowel gas alone in an abdominal scan is about 0.5 %)."""
    tissue_band_hu: tuple[float, float] = (-200.0, 300.0)
    """Fat, water, soft tissue and contrast-enhanced blood: the soft-tissue peak is the mode inside it."""
    tissue_peak_hu: tuple[float, float] = (-150.0, 150.0)
    """Accepted position of the soft-tissue peak (fat near -100 may be the taller one)."""
    min_tissue_share: float = 0.03
    """Least share of voxels inside ``tissue_band_hu``."""
    valley_hu: tuple[float, float] = (-600.0, -250.0)
    """Between lung and fat: little of a body lies here."""
    max_valley_ratio: float = 0.5
    """Most height of the tallest bin inside ``valley_hu`` relative to the lower of the air and soft-tissue peaks."""
    physical_range_hu: tuple[float, float] = (-1100.0, 3071.0)
    """Values a body CT holds: air minus noise up to the top of the 12-bit scale."""
    max_outside_share: float = 0.05
    """Most share of voxels (padding excluded) outside ``physical_range_hu``."""
    padding_min_share: float = 0.001
    """A minimum below ``physical_range_hu`` holding at least this share is the scanner's padding value."""
    min_span_hu: float = 300.0
    """A 1st-99th percentile span below this (a body CT spans about 1000 HU) is no CT distribution."""
    rescale_intercepts_hu: tuple[float, ...] = (-1024.0, -1000.0)
    """Usual RescaleIntercepts, tried (slope 1) to name raw stored values or a second rescale."""
    bin_hu: float = 10.0
    """Histogram bin width."""
    smooth_bins: int = 3
    """The peaks are read on the histogram smoothed by a moving average over this many bins."""
    max_sample_voxels: int = 2_000_000
    """The measurements use a strided sample of at most this many voxels."""

    def __post_init__(self) -> None:
        from configs.checks import ConfigError

        def check(ok: bool, what: str) -> None:
            if not ok:
                raise ConfigError(f"hu_check: {what}")

        for name in ("air_peak_hu", "tissue_band_hu", "tissue_peak_hu", "valley_hu", "physical_range_hu"):
            v = getattr(self, name)
            check(len(v) == 2 and v[0] < v[1], f"{name} must be [lo, hi] with lo < hi, got {list(v)}")
        for name in ("min_air_share", "min_tissue_share", "max_outside_share", "padding_min_share"):
            check(0.0 <= getattr(self, name) <= 1.0, f"{name} must lie in [0, 1], got {getattr(self, name)}")
        check(self.bin_hu > 0 and self.smooth_bins >= 1, "bin_hu must be > 0 and smooth_bins >= 1")
        check(self.max_sample_voxels >= 1000, "max_sample_voxels must be at least 1000")
        check(self.min_span_hu >= 0 and self.max_valley_ratio >= 0, "min_span_hu and max_valley_ratio must be >= 0")
        check(HIST_RANGE_HU[0] < self.air_search_below_hu < self.tissue_band_hu[1],
              "air_search_below_hu must lie inside the histogram range and below the tissue band's top")

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


@dataclass
class HUStats:
    """What :func:`measure` reads off a volume's histogram (HU; shares of the sampled non-padding voxels)."""

    sampled_voxels: int
    air_peak_hu: float | None
    air_share: float
    tissue_peak_hu: float | None
    tissue_share: float
    valley_ratio: float | None
    below_share: float
    above_share: float
    padding_value: float | None
    padding_share: float
    peaks_hu: list[float]
    p01: float
    p99: float
    min: float
    max: float

    @property
    def outside_share(self) -> float:
        return self.below_share + self.above_share

    def to_dict(self) -> dict[str, Any]:
        def hu(v: float | None) -> float | None:
            return None if v is None or not math.isfinite(v) else round(float(v), 1)

        return {
            "air_peak_hu": hu(self.air_peak_hu), "tissue_peak_hu": hu(self.tissue_peak_hu),
            "air_share": round(self.air_share, 5), "tissue_share": round(self.tissue_share, 5),
            "valley_ratio": None if self.valley_ratio is None else round(self.valley_ratio, 4),
            "outside_share": round(self.outside_share, 5), "below_share": round(self.below_share, 5),
            "above_share": round(self.above_share, 5),
            "padding": None if self.padding_value is None else {"value": hu(self.padding_value),
                                                                 "share": round(self.padding_share, 5)},
            "peaks_hu": [hu(p) for p in self.peaks_hu], "p01_hu": hu(self.p01), "p99_hu": hu(self.p99),
            "min_hu": hu(self.min), "max_hu": hu(self.max), "sampled_voxels": self.sampled_voxels,
        }


@dataclass
class HUCheck:
    """The gate's verdict on one volume."""

    status: str
    """``pass``, ``fail`` or ``off``."""
    stats: HUStats | None
    problems: list[str]
    cause: str | None = None
    """One of :data:`CAUSES` when failed."""
    explanation: str = ""
    """The cause in words, with what to do."""

    @property
    def passed(self) -> bool:
        return self.status == "pass"

    def message(self, cfg: HUCheckConfig) -> str:
        """One line: the measured peaks, what a body CT would show, the likely cause and the fix."""
        a, t, r = cfg.air_peak_hu, cfg.tissue_peak_hu, cfg.physical_range_hu
        return (f"implausible HU: {describe(self.stats, r)} (a body CT in HU: air peak {_fmt(a[0])} to {_fmt(a[1])}, "
                f"soft tissue {_fmt(t[0])} to {_fmt(t[1])}, at most {_pct(cfg.max_outside_share)} outside): "
                f"{self.explanation}")

    def to_dict(self, mode: str) -> dict[str, Any]:
        out: dict[str, Any] = {"mode": mode, "status": self.status}
        if self.stats is not None:
            out.update(self.stats.to_dict())
        if self.status == "fail":
            out.update({"cause": self.cause, "problems": self.problems, "explanation": self.explanation})
        return out


# ------------------------------------------------------------------------------------------ measuring


def sample_voxels(array: np.ndarray, max_voxels: int) -> np.ndarray:
    """A regular strided sample of ``array`` (any shape) as a flat float32 array of at most ``max_voxels``
    values (a copy): every ``s``-th voxel along each axis, ``s`` the smallest stride that fits."""
    a = np.asarray(array)
    s = 1
    while math.prod(-(-n // s) for n in a.shape) > max_voxels:
        s += 1
    # always a copy: ``array`` may be a view of a SimpleITK image's buffer, which does not outlive the image
    return np.array(a[(slice(None, None, s),) * a.ndim], dtype=np.float32, copy=True).reshape(-1)


def image_sample(image: Any, cfg: HUCheckConfig) -> np.ndarray:
    """:func:`sample_voxels` of a SimpleITK image (through a view: the volume is not copied)."""
    import SimpleITK as sitk

    return sample_voxels(sitk.GetArrayViewFromImage(image), cfg.max_sample_voxels)


def _moving_average(h: np.ndarray, k: int) -> np.ndarray:
    if k <= 1:
        return h.astype(np.float64)
    return np.convolve(h.astype(np.float64), np.ones(k) / k, mode="same")


def _tallest_peaks(h: np.ndarray, centres: np.ndarray, bin_hu: float, n: int = 3) -> list[float]:
    """Up to ``n`` local maxima of ``h`` (50 HU smoothing), tallest first, at least 200 HU apart, each
    holding at least 0.5 % of the voxels per 50 HU."""
    sm = _moving_average(h, max(1, int(round(50 / bin_hu))))
    if sm.max() <= 0:
        return []
    is_max = np.r_[sm[0] > sm[1], (sm[1:-1] >= sm[:-2]) & (sm[1:-1] > sm[2:]), sm[-1] > sm[-2]]
    idx = np.flatnonzero(is_max & (sm > 0))
    idx = idx[np.argsort(-sm[idx], kind="stable")]
    floor = 0.005 * h.sum() * bin_hu / 50
    out: list[float] = []
    for i in idx:
        if sm[i] < floor:
            break
        if all(abs(centres[i] - p) >= 200 for p in out):
            out.append(float(centres[i]))
        if len(out) == n:
            break
    return out


def measure(sample: np.ndarray, cfg: HUCheckConfig) -> HUStats:
    """The histogram measurements of a flat sample (see the module docstring). ``sample`` (N,) float."""
    v = np.asarray(sample, dtype=np.float32).reshape(-1)  # (N,)
    n_all = v.size
    if n_all == 0:
        return HUStats(0, None, 0.0, None, 0.0, None, 0.0, 0.0, None, 0.0, [], math.nan, math.nan, math.nan, math.nan)
    finite = np.isfinite(v)
    n_bad = int(n_all - finite.sum())
    if n_bad:
        v = v[finite]
    if v.size == 0:
        return HUStats(n_all, None, 0.0, None, 0.0, None, 1.0, 0.0, None, 0.0, [], math.nan, math.nan, math.nan,
                       math.nan)
    vmin, vmax = float(v.min()), float(v.max())
    pad_value, pad_share = None, 0.0
    if vmin < cfg.physical_range_hu[0]:
        n_min = int(np.count_nonzero(v == vmin))
        if n_min >= cfg.padding_min_share * n_all and n_min < v.size:
            pad_value, pad_share = vmin, n_min / n_all
            v = v[v != vmin]
    n = v.size + n_bad  # the denominator of every share: sampled voxels that are not padding
    lo, hi = HIST_RANGE_HU
    nbins = int(round((hi - lo) / cfg.bin_hu))
    h, edges = np.histogram(v, bins=nbins, range=(lo, hi))  # (nbins,)
    centres = 0.5 * (edges[:-1] + edges[1:])  # (nbins,)
    sm = _moving_average(h, cfg.smooth_bins)

    def mode_in(a: float, b: float) -> float | None:
        """Centre of the tallest raw bin near the smoothed histogram's maximum inside [a, b)."""
        sel = np.flatnonzero((centres >= a) & (centres < b))
        if not h[sel].any():
            return None
        i = int(sel[np.argmax(sm[sel])])
        near = sel[(sel >= i - cfg.smooth_bins) & (sel <= i + cfg.smooth_bins)]
        return float(centres[near[np.argmax(h[near])]])

    def share_in(a: float, b: float) -> float:
        return float(np.count_nonzero((v >= a) & (v <= b))) / n

    below = float(np.count_nonzero(v < cfg.physical_range_hu[0]) + n_bad) / n
    above = float(np.count_nonzero(v > cfg.physical_range_hu[1])) / n
    q = v[:: max(1, v.size // 200_000)]
    p01, p99 = (float(x) for x in np.percentile(q, [1, 99]))
    air, tissue = mode_in(lo, cfg.air_search_below_hu), mode_in(*cfg.tissue_band_hu)
    valley = None
    if air is not None and tissue is not None:
        height = min(sm[int((air - lo) // cfg.bin_hu)], sm[int((tissue - lo) // cfg.bin_hu)])
        in_valley = (centres >= cfg.valley_hu[0]) & (centres <= cfg.valley_hu[1])
        valley = float(sm[in_valley].max() / height) if height > 0 else math.inf
    return HUStats(
        sampled_voxels=n_all,
        air_peak_hu=air,
        air_share=share_in(*cfg.air_peak_hu),
        tissue_peak_hu=tissue,
        tissue_share=share_in(*cfg.tissue_band_hu),
        valley_ratio=valley,
        below_share=below,
        above_share=above,
        padding_value=pad_value,
        padding_share=pad_share,
        peaks_hu=_tallest_peaks(h, centres, cfg.bin_hu),
        p01=p01, p99=p99, min=vmin, max=vmax,
    )


# ------------------------------------------------------------------------------------------- judging


def _in(x: float | None, rng: tuple[float, float]) -> bool:
    return x is not None and rng[0] <= x <= rng[1]


def _fmt(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "none"
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %" if x >= 0.001 else f"{100 * x:.2g} %"


def describe(stats: HUStats | None, physical_range_hu: tuple[float, float] = (-1100.0, 3071.0)) -> str:
    """The measurements in words: air and soft-tissue peaks, outside share, the tallest histogram peaks."""
    if stats is None:
        return "not measured"
    def peak(name: str, x: float | None) -> str:
        return f"{name} peak {_fmt(x)} HU" if x is not None else f"no {name} peak"

    parts = [peak("air", stats.air_peak_hu), peak("soft-tissue", stats.tissue_peak_hu),
             f"{_pct(stats.outside_share)} outside [{_fmt(physical_range_hu[0])}, {_fmt(physical_range_hu[1])}]"]
    if stats.peaks_hu:
        parts.append("histogram peaks at " + ", ".join(_fmt(p) for p in stats.peaks_hu))
    return ", ".join(parts)


def judge(stats: HUStats, cfg: HUCheckConfig) -> list[str]:
    """What is implausible about ``stats`` for a body CT in HU; empty when it passes."""
    problems = []
    lo_a, hi_a = cfg.air_peak_hu
    if stats.air_peak_hu is None:
        problems.append(f"no air peak (no voxel below {_fmt(cfg.air_search_below_hu)} HU)")
    elif not _in(stats.air_peak_hu, cfg.air_peak_hu):
        problems.append(f"air peak at {_fmt(stats.air_peak_hu)} HU, expected {_fmt(lo_a)} to {_fmt(hi_a)}")
    elif stats.air_share < cfg.min_air_share:
        problems.append(f"only {_pct(stats.air_share)} of the voxels near air ({_fmt(lo_a)} to {_fmt(hi_a)} HU), "
                        f"expected at least {_pct(cfg.min_air_share)}")
    lo_t, hi_t = cfg.tissue_peak_hu
    if stats.tissue_share < cfg.min_tissue_share:
        problems.append(f"only {_pct(stats.tissue_share)} of the voxels in the soft-tissue band "
                        f"({_fmt(cfg.tissue_band_hu[0])} to {_fmt(cfg.tissue_band_hu[1])} HU), expected at least "
                        f"{_pct(cfg.min_tissue_share)}")
    elif not _in(stats.tissue_peak_hu, cfg.tissue_peak_hu):
        problems.append(f"soft-tissue peak at {_fmt(stats.tissue_peak_hu)} HU, expected {_fmt(lo_t)} to {_fmt(hi_t)}")
    if stats.valley_ratio is not None and stats.valley_ratio > cfg.max_valley_ratio:
        problems.append(f"a peak between lung and fat ({_fmt(cfg.valley_hu[0])} to {_fmt(cfg.valley_hu[1])} HU) "
                        f"{stats.valley_ratio:.2g} times as tall as the lower of the air and soft-tissue peaks, "
                        f"expected at most {cfg.max_valley_ratio:g}")
    if stats.outside_share > cfg.max_outside_share:
        p_lo, p_hi = cfg.physical_range_hu
        problems.append(f"{_pct(stats.outside_share)} of the voxels outside [{_fmt(p_lo)}, {_fmt(p_hi)}] HU "
                        f"({_pct(stats.below_share)} below), expected at most {_pct(cfg.max_outside_share)}")
    return problems


def plausible(sample: np.ndarray, cfg: HUCheckConfig) -> tuple[bool, HUStats]:
    """Whether the sample passes, and its measurements."""
    stats = measure(sample, cfg)
    return not judge(stats, cfg), stats


def _peak_fit(stats: HUStats) -> tuple[float, float] | None:
    """The map ``v -> s v + b`` that puts the lowest and highest of the two tallest peaks at air (-1000) and
    soft tissue (+40), or None (fewer than two peaks)."""
    if len(stats.peaks_hu) < 2:
        return None
    a, t = sorted(stats.peaks_hu[:2])
    s = (_NOMINAL_TISSUE_HU - _NOMINAL_AIR_HU) / (t - a)
    return s, _NOMINAL_AIR_HU - s * a


_TWICE = ("looks rescaled twice: values about {} HU low, a rescale intercept applied to values already in HU; "
          "remove one rescale (CT-RATE's second release stores HU: --ct-rate-version auto)")


def diagnose(sample: np.ndarray, stats: HUStats, cfg: HUCheckConfig) -> tuple[str, str]:
    """(cause, explanation with the fix) of a failing sample; see the module docstring."""
    not_ct = ("not_ct", "not a CT intensity distribution ({}): give the volume in HU")
    if not math.isfinite(stats.min) or stats.max == stats.min:
        return not_ct[0], not_ct[1].format(f"every voxel is {_fmt(stats.min)}")
    if stats.p99 - stats.p01 < cfg.min_span_hu:
        return not_ct[0], not_ct[1].format(
            f"values span only {_fmt(stats.p01)} to {_fmt(stats.p99)}, min {_fmt(stats.min)}, max {_fmt(stats.max)}: "
            "windowed or normalised, e.g. to [0, 1]?")
    for b in cfg.rescale_intercepts_hu:
        if plausible(sample + np.float32(b), cfg)[0]:
            return "raw_stored_values", (
                f"looks like raw stored values: add the rescale (HU = stored x RescaleSlope + RescaleIntercept; "
                f"intercept {_fmt(b)} makes them plausible)")
    for b in cfg.rescale_intercepts_hu:
        if plausible(sample - np.float32(b), cfg)[0]:
            return "rescaled_twice", _TWICE.format(_fmt(-b))
    hint = ""
    fit = _peak_fit(stats)
    if fit is not None and 0.01 <= fit[0] <= 100 and plausible(sample * np.float32(fit[0]) + np.float32(fit[1]),
                                                                cfg)[0]:
        hint = f"; value x {fit[0]:.3g} {'+' if fit[1] >= 0 else '-'} {_fmt(abs(fit[1]))} would look like HU"
    return not_ct[0], not_ct[1].format(f"not HU under the usual rescales{hint}: an unusual rescale slope, MR, PET "
                                       "or a windowed image?")


def check_sample(sample: np.ndarray, cfg: HUCheckConfig, stats: HUStats | None = None) -> HUCheck:
    """Measure (unless ``stats`` is given), judge and, when failing, diagnose one volume's sample."""
    stats = stats if stats is not None else measure(sample, cfg)
    problems = judge(stats, cfg)
    if not problems:
        return HUCheck("pass", stats, [])
    cause, explanation = diagnose(sample, stats, cfg)
    return HUCheck("fail", stats, problems, cause, explanation)


def check_image(image: Any, cfg: HUCheckConfig) -> HUCheck:
    """:func:`check_sample` of a SimpleITK image."""
    return check_sample(image_sample(image, cfg), cfg)


def gate_volume(volume: Any, cfg: HUCheckConfig, mode: str = "fail") -> tuple[dict[str, Any], str | None]:
    """Apply the gate to a :class:`~pipelines.preprocess.series.Volume` in ``mode`` (:data:`HU_CHECK_MODES`).

    Returns the record for ``case.json`` and, in mode ``warn`` with a failing volume, the warning line
    (else None). Raises :class:`HUCheckError` in mode ``fail`` when the volume fails. A loader that has
    already measured the final image (the CT-RATE adapter) leaves its stats in ``volume.meta["hu_stats"]``.
    """
    if mode not in HU_CHECK_MODES:
        raise ValueError(f"--hu-check must be one of {', '.join(HU_CHECK_MODES)}, got {mode!r}")
    if mode == "off":
        return {"mode": "off", "status": "off"}, None
    meta = getattr(volume, "meta", None) or {}
    known = meta.get("hu_stats")
    if known is not None and not judge(known, cfg):
        result = HUCheck("pass", known, [])
    else:
        result = check_sample(image_sample(volume.image, cfg), cfg, known)
    record = result.to_dict(mode)
    if result.passed:
        return record, None
    if mode == "fail":
        raise HUCheckError(f"{result.message(cfg)}; or pass --hu-check warn to keep it", record)
    return record, f"HU check failed, kept (--hu-check warn): {result.message(cfg)}"


__all__ = ["CAUSES", "HU_CHECK_MODES", "HUCheck", "HUCheckConfig", "HUCheckError", "HUStats", "check_image",
           "check_sample", "describe", "diagnose", "gate_volume", "image_sample", "judge", "measure", "plausible",
           "sample_voxels"]
