"""Interop: import of the official PyTorch release, export to safetensors and StableHLO.

  official.py        --mode=import: official .ckpt / magvit2 .pt (or their safetensors) -> an orbax workdir
  convert_torch.py   run where torch is installed: .ckpt / .pt -> .safetensors (no JAX needed)
  safetensors_io.py  param trees <-> one safetensors file with flat, per-layer names
  stablehlo.py       jax.export of the whole generation (prefill, block decoding, tokenizer decode)
  bundle.py          --mode=export: a workdir -> WORKDIR/export/{params,tokenizer}.safetensors, generate.stablehlo

Kept free of imports so that `python -m nbp_jax.interop.convert_torch` runs in an environment without JAX.
"""
