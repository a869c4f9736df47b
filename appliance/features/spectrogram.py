"""Log-spectrogram images of a waveform window, for image models (a CNN fault classifier).

:func:`spectrogram_image` turns one window's samples of a waveform channel into the fixed-size
image a :class:`~appliance.contracts.SpectrogramSpec` describes:

1. the de-meaned samples are cut into Hann-windowed segments of ``nperseg`` samples every
   ``hop`` samples (one strided view, one ``rfft`` over all segments);
2. power per bin as mean-square (a sine of RMS *a* gives *a²* in its bin, before leakage),
   without the DC bin: ``nperseg / 2`` rows from ``rate_hz / nperseg`` to ``rate_hz / 2``;
3. 10·log10(power + 1e-12) dB;
4. resized with OpenCV (``cv2.resize``, ``INTER_AREA``) to ``height × width`` (rows:
   frequency, lowest first; columns: time, oldest first), in float32;
5. normalised: (dB − ``offset_db``) / ``scale_db``.

The window's own sample count sets the number of segments, which the resize maps to ``width``
columns. A window with fewer than ``min_samples`` samples, or whose sample rate (median spacing
of the samples' times) differs from ``rate_hz`` by more than 2 %, gives an all-NaN image: the
window is not scored (``incomplete_windows``), as for a channel without samples.

OpenCV (``opencv-python-headless``, a dependency of the package) is imported on the first
image, so an appliance whose models name no spectrogram never loads it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from appliance.contracts import SpectrogramSpec

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]

#: Largest relative difference between the samples' rate and the spec's ``rate_hz``.
RATE_TOLERANCE = 0.02

_cv2: Any = None


def _opencv() -> Any:
    global _cv2
    if _cv2 is None:
        try:
            import cv2
        except ImportError as err:
            raise ImportError(
                "a spectrogram feature needs OpenCV: pip install opencv-python-headless "
                f"(import cv2 failed: {err})"
            ) from err
        _cv2 = cv2
    return _cv2


def spectrogram_db(x: F64, nperseg: int, hop: int) -> F64:
    """Log-power STFT of ``x`` [n ≥ nperseg]: dB [nperseg // 2, segments], DC bin left out."""
    win = np.hanning(nperseg + 2)[1:-1]  # periodic-like Hann without zero end points
    seg = np.lib.stride_tricks.sliding_window_view(x - x.mean(), nperseg)[::hop]
    spec = np.fft.rfft(seg * win, axis=1)
    power = (spec.real**2 + spec.imag**2) * (2.0 / float(win.sum()) ** 2)
    db: F64 = 10.0 * np.log10(power[:, 1 : nperseg // 2 + 1].T + 1e-12)
    return db


def spectrogram_image(ts: F64, x: F64, spec: SpectrogramSpec) -> F32:
    """The normalised image [height, width] (float32) of one window's samples (time order),
    or an all-NaN image when the window cannot give one (see the module docstring)."""
    n = x.shape[0]
    if n < spec.min_samples or n < 2:
        return np.full((spec.height, spec.width), np.nan, np.float32)
    dt = float(np.median(np.diff(ts)))
    if not (dt > 0 and abs(1.0 / dt - spec.rate_hz) <= RATE_TOLERANCE * spec.rate_hz):
        return np.full((spec.height, spec.width), np.nan, np.float32)
    db = spectrogram_db(x, spec.nperseg, spec.hop).astype(np.float32)
    cv2 = _opencv()
    img = cv2.resize(db, (spec.width, spec.height), interpolation=cv2.INTER_AREA)
    out: F32 = ((img - np.float32(spec.offset_db)) / np.float32(spec.scale_db)).astype(np.float32)
    return out.reshape(spec.height, spec.width)
