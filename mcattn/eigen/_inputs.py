"""Input checks of eigen reconstruction beyond those of every method."""

from ..errors import ShapeError

__all__ = ["check_plan_fits"]


def check_plan_fits(inp, plan):
    """Raise :class:`ShapeError` unless the canonical inputs ``inp`` fit ``plan``'s basis
    (its key count, ``Nq = n`` for a position-centred basis, one head per per-head basis)."""
    if inp.nk != plan.length:
        raise ShapeError(f"the basis describes rows of {plan.length} keys; k has {inp.nk} keys "
                         f"(shape {tuple(inp.batch_shape) + tuple(inp.k.shape[-2:])})")
    if plan.positional and inp.nq != plan.length:
        raise ShapeError(f"a position-centred basis needs Nq = n = {plan.length} queries; got {inp.nq}")
    if plan.num_heads > 1 and (not inp.batch_shape or inp.batch_shape[-1] != plan.num_heads):
        raise ShapeError(f"{plan.num_heads} per-head bases need inputs [..., H={plan.num_heads}, N, d]; "
                         f"got batch dims {inp.batch_shape}")
