"""Window features from raw samples: one function, used by training and by serving.

:func:`window_features` turns the samples of one machine window (columnar: times, channel
indices, values) into the float32 vector a model manifest names (a tuple of
:class:`~appliance.contracts.FeatureSpec`). The training scripts (``models/``), ``appliance
model fit`` and the serving pipeline (:class:`~appliance.features.samples.SampleFeatureBuilder`)
all call it, so a model is served exactly the features it was trained on.

Per channel (all vectorised over the channels of the window, numpy, no per-sample loop):
``mean std min max rms p2p skew kurtosis crest slope last`` — ``std`` is the population standard
deviation, ``skew`` and ``kurtosis`` (excess, 0 for a Gaussian) are 0 for a constant channel,
``crest`` is max|x| / rms (1 for a constant channel, 0 for an all-zero one), ``slope`` is the
least-squares trend in units per second (0 with fewer than two samples).

Spectral, for a waveform channel (the sample rate is taken from the samples' own times):
``band:LO-HI`` is the mean-square of the band LO ≤ f < HI Hz of the de-meaned signal in dB
(10·log10(ms + 1e-12), units² → dB), ``dom_freq`` the frequency of the strongest bin (Hz, DC
excluded) and ``centroid`` the power-weighted mean frequency (Hz). Relative to the rotation,
with the dominant frequency f0 taken as the shaft's (the fundamental dominates a healthy
spindle): ``order1_frac`` is the share of the power within :data:`ORDER_BW_HZ` of f0 (imbalance
raises it) and ``nonharmonic_frac`` the share outside that distance of f0, 2·f0 and 3·f0 (folded
at the Nyquist frequency): bearing tones and chatter raise it, whatever the speed.
``order_frac:K`` is the share of the power within :data:`ORDER_BW_HZ` of K·f0 (folded likewise)
and, for K other than 1, 2 and 3, not that close to f0, 2·f0 or 3·f0 (a tone aliased onto a
harmonic cannot be told from it): for a component at a known rotation order K. A bearing
defect's tone at the bearing's ball-pass frequency (e.g. ``order_frac:3.58``, the outer race of
a typical spindle bearing) takes a few percent of the power there, where a healthy spindle has
only noise.

``spectrogram(…)[k]`` (one column per pixel of a :class:`~appliance.contracts.SpectrogramSpec`
image; a manifest names the image once) is pixel *k* of the window's log-spectrogram image
(:mod:`appliance.features.spectrogram`), computed once per image.

A channel without a sample in the window gives NaN for all its features (the caller does not
score such a window).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import numpy.typing as npt

from appliance.contracts import (
    FeatureSpec,
    SpectrogramSpec,
    features_to_manifest,
    is_sample_feature_stat,
    parse_spectrogram_stat,
)
from appliance.features.spectrogram import spectrogram_image

F64 = npt.NDArray[np.float64]

_SPECTRAL = ("dom_freq", "centroid", "order1_frac", "nonharmonic_frac")
#: Half-width of the band counted as "at" a rotation order (Hz).
ORDER_BW_HZ = 3.0


def check_specs(features: Sequence[FeatureSpec]) -> None:
    """Raise ``ValueError`` naming the first feature whose statistic is unknown (or a
    spectrogram image whose columns are not all there, in order)."""
    for f in features:
        if not is_sample_feature_stat(f.stat):
            raise ValueError(f"feature {f.channel}:{f.stat}: unknown statistic {f.stat!r}")
    features_to_manifest(features)


@lru_cache(maxsize=64)
def _image_spec(stat: str) -> SpectrogramSpec:
    parsed = parse_spectrogram_stat(stat)
    if parsed is None:
        raise ValueError(f"not a spectrogram statistic: {stat!r}")
    return parsed[0]


def _images(features: Sequence[FeatureSpec]) -> list[tuple[int, str, SpectrogramSpec]]:
    """(first column, channel, spec) of each spectrogram image among ``features``."""
    out: list[tuple[int, str, SpectrogramSpec]] = []
    i = 0
    while i < len(features):
        f = features[i]
        if f.stat.startswith("spectrogram("):
            spec = _image_spec(f.stat)
            out.append((i, f.channel, spec))
            i += spec.size
        else:
            i += 1
    return out


def _band(stat: str) -> tuple[float, float]:
    lo, _, hi = stat[5:].partition("-")
    return float(lo), float(hi)


def _scalar_stats(ts: F64, x: F64, counts: npt.NDArray[np.int64]) -> dict[str, F64]:
    """Statistics of padded rows: ``x`` [C, N] with NaN beyond each row's ``counts``."""
    n = counts.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.nansum(x, axis=1) / n
        d = x - mean[:, None]
        m2 = np.nansum(d * d, axis=1) / n
        m3 = np.nansum(d**3, axis=1) / n
        m4 = np.nansum(d**4, axis=1) / n
        std = np.sqrt(m2)
        flat = m2 <= 1e-18 * np.maximum(mean * mean, 1e-30)
        skew = np.where(flat, 0.0, m3 / m2**1.5)
        kurt = np.where(flat, 0.0, m4 / (m2 * m2) - 3.0)
        rms = np.sqrt(np.nansum(x * x, axis=1) / n)
        mn = np.nanmin(np.where(np.isnan(x), np.inf, x), axis=1)
        mx = np.nanmax(np.where(np.isnan(x), -np.inf, x), axis=1)
        peak = np.maximum(np.abs(mn), np.abs(mx))
        crest = np.where(rms > 0, peak / rms, 0.0)
        tm = np.nansum(np.where(np.isnan(x), np.nan, ts), axis=1) / n
        dt = np.where(np.isnan(x), np.nan, ts - tm[:, None])
        sxx = np.nansum(dt * dt, axis=1)
        slope = np.where(sxx > 0, np.nansum(dt * d, axis=1) / sxx, 0.0)
    last_i = np.maximum(counts - 1, 0)
    last = x[np.arange(x.shape[0]), last_i] if x.shape[1] else np.full(x.shape[0], np.nan)
    empty = counts == 0
    out = {
        "mean": mean,
        "std": std,
        "min": mn,
        "max": mx,
        "rms": rms,
        "p2p": mx - mn,
        "skew": skew,
        "kurtosis": kurt,
        "crest": crest,
        "slope": slope,
        "last": last,
    }
    for v in out.values():
        v[empty] = np.nan
    return out


def _spectral(ts: F64, x: F64, stats: Sequence[str]) -> dict[str, float]:
    """Spectral statistics of one channel's samples (time-ordered)."""
    n = x.shape[0]
    out: dict[str, float] = {}
    if n < 4:
        return {s: float("nan") for s in stats}
    dt = float(np.median(np.diff(ts)))
    if not dt > 0:
        return {s: float("nan") for s in stats}
    spec = np.fft.rfft(x - x.mean())
    power = (spec.real**2 + spec.imag**2) * (2.0 / (n * n))  # mean-square per bin
    power[0] = 0.0
    freq = np.fft.rfftfreq(n, d=dt)
    total = float(power.sum())
    f0 = float(freq[int(np.argmax(power))]) if total > 0 else 0.0
    fs = 1.0 / dt
    near: list[npt.NDArray[np.bool_]] = []

    def at_order(k: float) -> npt.NDArray[np.bool_]:
        fk = abs(((k * f0 + fs / 2.0) % fs) - fs / 2.0)  # aliased into [0, fs/2]
        at: npt.NDArray[np.bool_] = np.abs(freq - fk) <= ORDER_BW_HZ
        return at

    for h in (1.0, 2.0, 3.0):
        near.append(at_order(h))
    for s in stats:
        if s.startswith("order_frac:"):
            order = float(s[11:])
            band = at_order(order)
            if order not in (1.0, 2.0, 3.0):  # a tone aliased onto a harmonic cannot be told apart
                band &= ~(near[0] | near[1] | near[2])
            out[s] = float(power[band].sum() / total) if total > 0 else 0.0
        elif s == "order1_frac":
            out[s] = float(power[near[0]].sum() / total) if total > 0 else 0.0
        elif s == "nonharmonic_frac":
            harmonic = near[0] | near[1] | near[2]
            out[s] = float(power[~harmonic].sum() / total) if total > 0 else 0.0
        elif s == "dom_freq":
            out[s] = float(freq[int(np.argmax(power))]) if total > 0 else 0.0
        elif s == "centroid":
            out[s] = float((freq * power).sum() / total) if total > 0 else 0.0
        else:
            lo, hi = _band(s)
            ms = float(power[(freq >= lo) & (freq < hi)].sum())
            out[s] = 10.0 * float(np.log10(ms + 1e-12))
    return out


def window_features(
    features: Sequence[FeatureSpec],
    channels: Sequence[str],
    ts: F64,
    channel: npt.NDArray[np.int32],
    value: F64,
) -> npt.NDArray[np.float32]:
    """The feature vector (manifest order, float32) of one window's GOOD samples.

    ``channel[i]`` indexes ``channels``; ``ts`` are the samples' times (s). A feature of a
    channel not in ``channels`` or without samples is NaN.
    """
    pos = {name: i for i, name in enumerate(channels)}
    wanted = sorted({pos[f.channel] for f in features if f.channel in pos})
    order = np.lexsort((ts, channel))
    ch_sorted = channel[order]
    starts = np.searchsorted(ch_sorted, wanted, side="left")
    ends = np.searchsorted(ch_sorted, wanted, side="right")
    counts = (ends - starts).astype(np.int64)
    width = int(counts.max()) if len(wanted) else 0
    row = {c: k for k, c in enumerate(wanted)}
    xs = np.full((len(wanted), width), np.nan)
    tt = np.full((len(wanted), width), np.nan)
    for k, (a, b) in enumerate(zip(starts.tolist(), ends.tolist(), strict=True)):
        xs[k, : b - a] = value[order[a:b]]
        tt[k, : b - a] = ts[order[a:b]]
    if width:
        t0 = np.nanmin(tt)
        tt = tt - t0  # slope in float64 without cancellation against epoch seconds
    scalar = _scalar_stats(tt, xs, counts) if wanted else {}
    spectral_stats: dict[int, list[str]] = {}
    for f in features:
        if f.channel in pos and (
            f.stat in _SPECTRAL or f.stat.startswith(("band:", "order_frac:"))
        ):
            spectral_stats.setdefault(pos[f.channel], []).append(f.stat)
    spectral = {
        c: _spectral(tt[row[c], : counts[row[c]]], xs[row[c], : counts[row[c]]], stats)
        for c, stats in spectral_stats.items()
    }
    out = np.empty(len(features), dtype=np.float32)
    images = _images(features)
    in_image = np.zeros(len(features), dtype=bool)
    for start, name, spec in images:
        in_image[start : start + spec.size] = True
        c = pos.get(name)
        if c is None:
            out[start : start + spec.size] = np.nan
        else:
            k, m = row[c], counts[row[c]]
            out[start : start + spec.size] = spectrogram_image(tt[k, :m], xs[k, :m], spec).ravel()
    for i, f in enumerate(features):
        if in_image[i]:
            continue
        c = pos.get(f.channel)
        if c is None:
            out[i] = np.nan
        elif c in spectral and f.stat in spectral[c]:
            out[i] = spectral[c][f.stat]
        else:
            out[i] = scalar[f.stat][row[c]]
    return out
