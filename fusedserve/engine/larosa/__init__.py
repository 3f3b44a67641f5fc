"""LaRoSA (layerwise rotated sparse activations): the offline builder and the runtime half.

Offline: `fusedserve larosa calibrate` (cli.py) -> calibrate.py (per-layer PCA rotations from real text, corpus.py)
-> absorb.py (rotations folded into the weights, residual adapters) -> sensitivity.py (each layer's and module's
top-k error, measured on the rotated weights) -> a model folder with a "larosa" manifest entry (per-layer, per-module
sparsity allocated by sparsity.py). Runtime: runtime.larosa_linear_factory(model_dir) gives the engine
top-k sparse linears (kernels/sparse_linear.py). Importing this package imports nothing heavy.
"""
