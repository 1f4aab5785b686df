"""The trainer: a LLaMA-style GPT with pluggable RoPE spectra, run from a spec.json.

Importing this package (and train.contract, train.spectra, train.presets, train.data.registry)
must not import torch: the control plane reads them.
"""
