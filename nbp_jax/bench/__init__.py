r"""Benchmarks that measure things side by side in one run and print ratios, all in this package.

  python -m nbp_jax.bench generate --config=configs/bench_cpu.py     # NBP vs NTP generation (bench/generation.py)
  python -m nbp_jax.bench tokenizer --config=configs/demo.py         # encode/decode throughput (bench/tokenizer.py)
  python -m nbp_jax.bench train --config=configs/k600_700m.py        # the train step, MFU (bench/train.py)
  python -m nbp_jax.bench fvd --config=configs/demo.py               # I3D feature throughput (bench/fvd.py)
  python -m nbp_jax.bench generate_torch --config=configs/bench_cpu.py  # vs a PyTorch loop (bench/torch_reference.py)
  python -m nbp_jax.bench train_torch --config=configs/bench_cpu.py     # vs a PyTorch training step (the same)

Each prints a machine-readable last line (key=value ...) and times with nbp_jax.timing (compilation excluded), as
`Generator.generation_speed` does.
"""

# benchmark name -> 'module:function' taking the config.
BENCHMARKS = {
    'generate': 'nbp_jax.bench.generation:run',
    'tokenizer': 'nbp_jax.bench.tokenizer:run',
    'train': 'nbp_jax.bench.train:run',
    'fvd': 'nbp_jax.bench.fvd:run',
    'generate_torch': 'nbp_jax.bench.torch_reference:run',
    'train_torch': 'nbp_jax.bench.torch_reference:run_train',
}
# Earlier releases and the issues call the generation benchmark `decode`.
ALIASES = {'decode': 'generate'}
