"""ROT pooling operators: options and the weight table (``params.py``), the one router
(``route.py``), the torch path (``torch/``) and the Triton kernels (``triton/``)."""
