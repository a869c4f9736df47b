"""Unit conversions for register maps: ``convert = "degF->degC"`` on a register.

Every conversion in the table is affine (``y = a * x + b``), so it folds into a register's
``scale``/``offset`` at build time and decoding stays one multiply-add per value. It applies
after scale and offset: ``value = (raw * scale + offset) * a + b``.
"""

from __future__ import annotations

#: ``"from->to"`` → ``(a, b)`` with ``to = a * from + b``. Factors are exact by definition
#: (NIST SP 811 appendix B) except where noted.
CONVERSIONS: dict[str, tuple[float, float]] = {
    "degF->degC": (5.0 / 9.0, -32.0 * 5.0 / 9.0),
    "degC->degF": (9.0 / 5.0, 32.0),
    "K->degC": (1.0, -273.15),
    "degC->K": (1.0, 273.15),
    "bar->Pa": (1e5, 0.0),
    "bar->kPa": (100.0, 0.0),
    "mbar->Pa": (100.0, 0.0),
    "psi->kPa": (6.894757293168361, 0.0),
    "psi->bar": (0.06894757293168361, 0.0),
    "kPa->Pa": (1000.0, 0.0),
    "MPa->bar": (10.0, 0.0),
    "inch->mm": (25.4, 0.0),
    "mm->inch": (1.0 / 25.4, 0.0),
    "ft->m": (0.3048, 0.0),
    "in/s->mm/s": (25.4, 0.0),
    "g->m/s2": (9.80665, 0.0),
    "rpm->Hz": (1.0 / 60.0, 0.0),
    "Hz->rpm": (60.0, 0.0),
    "gal/min->l/min": (3.785411784, 0.0),
    "lbf->N": (4.4482216152605, 0.0),
    "lbf.ft->N.m": (1.3558179483314004, 0.0),
    "hp->kW": (0.745699871582270, 0.0),
    "W->kW": (0.001, 0.0),
    "mA->A": (0.001, 0.0),
    "percent->ratio": (0.01, 0.0),
}


class UnknownConversion(ValueError):
    """A ``convert`` name that is not in :data:`CONVERSIONS`."""


def conversion(name: str) -> tuple[float, float]:
    """``(a, b)`` of a conversion; ``""`` is the identity. Raises :class:`UnknownConversion`."""
    if not name:
        return 1.0, 0.0
    try:
        return CONVERSIONS[name]
    except KeyError:
        raise UnknownConversion(
            f"unknown conversion {name!r} (known: {', '.join(sorted(CONVERSIONS))})"
        ) from None


def convert(value: float, name: str) -> float:
    """Apply one conversion to a scalar (for tests and one-off use; decoders fold it)."""
    a, b = conversion(name)
    return a * value + b
