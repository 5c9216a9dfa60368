"""Exception types raised by mcattn.

Every error message names the argument at fault, what was expected and what came.
The classes derive from the built-in exception a user would expect (``ValueError``
for bad values and shapes, ``TypeError`` for bad dtypes), so ``except ValueError``
keeps working in code that does not know about mcattn.
"""

__all__ = [
    "McattnError",
    "ShapeError",
    "DTypeError",
    "NonFiniteError",
    "BackendError",
    "GradientNotSupportedError",
    "SampleFileError",
    "PlanFileError",
    "ConfigError",
]


class McattnError(Exception):
    """Base class of every error raised on purpose by mcattn."""


class ShapeError(McattnError, ValueError):
    """An argument's shape does not fit the others (or the documented layout)."""


class DTypeError(McattnError, TypeError):
    """An argument has a dtype mcattn cannot compute in (integers, complex, mixed)."""


class NonFiniteError(McattnError, ValueError):
    """An input holds NaN or Inf while ``check_finite=True``."""


class BackendError(McattnError, ValueError):
    """No backend can run the call, or the backend asked for cannot.

    Attributes
    ----------
    reasons : dict[str, list[str]]
        For each backend that was considered, why it cannot run these inputs.
    """

    def __init__(self, message, reasons=None):
        self.reasons = dict(reasons or {})
        if self.reasons:
            lines = [message]
            for name, why in self.reasons.items():
                lines.append(f"  {name}: " + "; ".join(why))
            message = "\n".join(lines)
        super().__init__(message)


class GradientNotSupportedError(McattnError, TypeError):
    """A framework tensor that requires grad reached a function with no autograd rule."""


class SampleFileError(McattnError, ValueError):
    """A real-attention sample file is missing, unreadable or not in mcattn's format."""


class PlanFileError(McattnError, ValueError):
    """An attention plan file is missing, unreadable, or not a valid ``mcattn-plan-v1``."""


class ConfigError(McattnError, ValueError):
    """A value in :mod:`mcattn.config` cannot be used (e.g. more GPU threads per block
    than a compiled kernel allows)."""
