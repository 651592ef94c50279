"""Triton kernels of pyoptim, one module per op family. Installed as ``pyoptim.triton_kernels``
(a top-level ``triton_kernels`` would collide with Triton's own package of that name). Importing
a family module imports triton; the modules import nothing from pyoptim."""
