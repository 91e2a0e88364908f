"""Export of a trained run: safetensors weights and the whole generation as StableHLO (the import of the official
release is nbp_jax/interop).

  safetensors_io.py  param trees <-> one safetensors file with flat, per-layer names
  stablehlo.py       jax.export of the whole generation (prefill, block decoding, tokenizer decode)
  bundle.py          --mode=export: a workdir -> WORKDIR/export/{params,tokenizer}.safetensors, generate.stablehlo
  run_generate.py    copied beside them: runs generate.stablehlo with JAX alone (no nbp_jax, no Flax)
"""
