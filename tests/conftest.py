"""Test-session setup shared by every test.

* Without a CUDA GPU, numba.cuda kernels run in Numba's CPU simulator: the variable must
  be set before Numba is first imported, which is why it is set here, at collection.
  With a GPU the same tests run on the device.
* OPENBLAS_* variables of the machine are left as they are.
"""

import os
import shutil


def _gpu_present():
    return os.path.exists("/dev/nvidia0") and shutil.which("nvidia-smi") is not None


GPU_PRESENT = _gpu_present()
if not GPU_PRESENT:
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

if not GPU_PRESENT:
    import sys

    if "numba" in sys.modules:
        from numba import config as _numba_config

        if not _numba_config.ENABLE_CUDASIM:
            raise RuntimeError(
                "Numba was imported before tests/conftest.py could enable the CUDA simulator "
                "(a pytest plugin or option imported it); set NUMBA_ENABLE_CUDASIM=1 yourself"
            )
