"""Triton kernels of pyoptim, one module per op family. Installed as ``pyoptim.triton_kernels``
(a top-level ``triton_kernels`` would collide with Triton's own package of that name). Importing
a family module imports triton. Host helpers shared by the families live in ``_common.py``. Of
pyoptim itself the modules import only ``pyoptim._util`` (``acc_dtype``, ``pair``,
``memory_format``), through ``_common``, which re-exports them: one accumulation-dtype rule for
the reference, the Triton kernels and (as ``acc_dtype`` in ``csrc/checks.h``) the C++ kernels."""
