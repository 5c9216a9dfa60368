"""Operation counts and the energy model shared by every method.

A count is an :class:`OpCounts`: a frozen mapping from an operation kind to how many
times it was done. Kinds name the precision and the operation:

=================  =====================================================================
``fp32_mul``       floating-point multiply (a multiply-add counts one mul and one add)
``fp32_add``       floating-point add or subtract
``fp32_div``       floating-point divide or reciprocal
``fp32_exp``       one exponential
``fp32_cmp``       one comparison / max
``int32_add`` ...  integer ops by width: ``int32``, ``int8``, ``int4`` with ``_add``/``_mul``
``rng``            one 32-bit random word drawn (Philox), for sampling methods
``search_step``    one step of a binary search (a compare and a load)
``select``         a 32-bit word passed on or dropped by one control bit (a gated add input)
``bit_xor64``      XOR of two 64-bit words
``popcount64``     number of set bits of a 64-bit word
=================  =====================================================================

Float work is counted as fp32 whatever the array dtype: the counts describe the
method's arithmetic (the models mcattn serves run in fp32 or lower), and a float64 run
does the same operations in a wider format.

Energy
------
:data:`HOROWITZ_45NM_PJ` is the per-operation energy table of M. Horowitz, "Computing's
energy problem (and what we can do about it)", ISSCC 2014, 45 nm, in picojoules:
fp32 add 0.9, fp32 mul 3.7, fp16 add 0.4, fp16 mul 1.1, int32 add 0.1, int32 mul 3.1,
int8 add 0.03, int8 mul 0.2. The paper gives no figure for divide, exp, compare, 4-bit
arithmetic or random numbers; mcattn's conventions (stated so they can be replaced):

* ``fp32_div``: priced as a multiply (a reciprocal then multiplies, 3.7 pJ);
* ``fp32_exp``: the degree-7 polynomial mcattn's CPU kernel evaluates plus its range
  reduction, 8 mul + 9 add = 37.7 pJ;
* ``fp32_cmp``: priced as an fp32 add (0.9 pJ);
* ``int4_add``/``int4_mul``: half of the int8 figures (0.015 / 0.1 pJ);
* ``rng``: a Philox-4x32-10 call is 10 rounds of two 32x32 multiplies and a few xors;
  per 32-bit word that is 5 int32 mul + 5 int32 add = 16 pJ;
* ``search_step``: an int32 compare (0.1 pJ); memory traffic is not modelled.
* ``select`` (E-Att's selective projection): priced as an int32 add (0.1 pJ). A 32-bit
  2:1 select is 32 AND/multiplexer gates; an int32 adder has 32 full adders of several
  gates each, so this is an upper bound (the table has no gate-level figure);
* ``bit_xor64``: an int32 add (0.1 pJ), an upper bound on the same argument (64 XOR
  gates; the 32 full adders of an int32 add hold two XORs each);
* ``popcount64``: an adder tree (32 1-bit, 16 2-bit, 8 3-bit, 4 4-bit, 2 5-bit and one
  6-bit add: 120 full-adder bits), priced as 120/32 int32 adds = 0.375 pJ.

Pass your own table (a dict of the same keys) to :func:`energy_pj` to price differently.
"""

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

__all__ = ["OpCounts", "HOROWITZ_45NM_PJ", "energy_pj", "CallInfo"]

HOROWITZ_45NM_PJ = MappingProxyType(
    {
        "fp32_add": 0.9,
        "fp32_mul": 3.7,
        "fp16_add": 0.4,
        "fp16_mul": 1.1,
        "int32_add": 0.1,
        "int32_mul": 3.1,
        "int8_add": 0.03,
        "int8_mul": 0.2,
        # mcattn conventions (see the module docstring)
        "fp32_div": 3.7,
        "fp32_exp": 8 * 3.7 + 9 * 0.9,
        "fp32_cmp": 0.9,
        "int4_add": 0.015,
        "int4_mul": 0.1,
        "rng": 5 * 3.1 + 5 * 0.1,
        "search_step": 0.1,
        "select": 0.1,
        "bit_xor64": 0.1,
        "popcount64": 120 / 32 * 0.1,
    }
)


@dataclass(frozen=True)
class OpCounts(Mapping):
    """Operation counts by kind; add them, scale them, price them.

    Parameters
    ----------
    counts : mapping of str to int
        Kind (see the module docstring) to count. Zero counts are dropped.
    """

    counts: Mapping = field(default_factory=dict)

    def __post_init__(self):
        clean = {}
        for kind, n in dict(self.counts).items():
            n = int(n)
            if n < 0:
                raise ValueError(f"operation count {kind} is negative ({n})")
            if n:
                clean[kind] = n
        object.__setattr__(self, "counts", MappingProxyType(dict(sorted(clean.items()))))

    def __getitem__(self, kind):
        return self.counts.get(kind, 0)

    def __iter__(self):
        return iter(self.counts)

    def __len__(self):
        return len(self.counts)

    def __add__(self, other):
        if not isinstance(other, OpCounts):
            return NotImplemented
        merged = dict(self.counts)
        for kind, n in other.counts.items():
            merged[kind] = merged.get(kind, 0) + n
        return OpCounts(merged)

    def __mul__(self, factor):
        return OpCounts({k: n * int(factor) for k, n in self.counts.items()})

    __rmul__ = __mul__

    @property
    def total(self):
        """Every operation, of any kind."""
        return sum(self.counts.values())

    @property
    def flops(self):
        """Floating-point operations (every ``fp*`` kind, an exp counting one)."""
        return sum(n for k, n in self.counts.items() if k.startswith("fp"))

    @property
    def multiplies(self):
        """Multiplications of any precision (the figure energy papers focus on)."""
        return sum(n for k, n in self.counts.items() if k.endswith("_mul"))

    def energy_pj(self, table=None):
        """Energy in picojoules under ``table`` (default :data:`HOROWITZ_45NM_PJ`)."""
        return energy_pj(self, table)

    def __repr__(self):
        inner = ", ".join(f"{k}={n:,}" for k, n in self.counts.items())
        return f"OpCounts({inner})"


def energy_pj(ops, table=None):
    """Price operation counts with a per-operation energy table.

    Parameters
    ----------
    ops : OpCounts or mapping of str to int
    table : mapping of str to float, optional
        Picojoules per operation; default :data:`HOROWITZ_45NM_PJ`.

    Returns
    -------
    float
        Energy in picojoules.

    Raises
    ------
    KeyError
        ``ops`` holds a kind the table does not price (named in the message).
    """
    table = HOROWITZ_45NM_PJ if table is None else table
    missing = [k for k in ops if k not in table]
    if missing:
        raise KeyError(f"the energy table has no price for {missing}")
    return float(sum(n * table[k] for k, n in ops.items()))


@dataclass(frozen=True)
class CallInfo:
    """What one call did, returned with ``return_info=True``.

    Attributes
    ----------
    method : str
        ``"exact"``, ``"mca"``, ``"rfa"``, ...
    backend : str
        The backend that ran it.
    ops : OpCounts
        Operations the call performed.
    dense_ops : OpCounts
        Operations exact attention needs for the same shapes and masks (masked
        key/query pairs are free for it too, so padding does not flatter a method).
    """

    method: str
    backend: str
    ops: OpCounts
    dense_ops: OpCounts

    @property
    def posterior(self):
        """The call's a-posteriori error bound (:class:`mcattn.posterior.PosteriorBound`), or None.

        A method that has one keeps it in a ``posterior_source`` field: the bound itself, or
        a function computing it on first access (then cached), so that ``return_info=True``
        does not pay for a bound nobody reads (docs/bounds.md gives each bound's cost).
        """
        source = getattr(self, "posterior_source", None)
        if callable(source):
            source = source()
            object.__setattr__(self, "posterior_source", source)  # frozen: cache it once
        return source

    @property
    def ops_ratio(self):
        """``ops.total / dense_ops.total`` (1.0 for exact attention)."""
        return self.ops.total / self.dense_ops.total if self.dense_ops.total else float("nan")

    @property
    def energy_ratio(self):
        """Energy of the call over the energy of exact attention (default table)."""
        dense = self.dense_ops.energy_pj()
        return self.ops.energy_pj() / dense if dense else float("nan")
