"""Every stage of the demo's pipeline at the smallest size that runs them all, in about two minutes on a 2-core CPU:
a check that an install (or a change) works end to end, not a result (nothing learns in 2 steps). 9 frames at 16x16
-> 3x4x4 codes, a tokenizer trained from scratch (the bundled one is for 17x32x32 clips), one-layer transformers with
blocks of half a latent row (1x1x2) against next-token prediction. The test suite's shared pipeline is this config.

  python -m nbp_jax.main --config=configs/smoke.py --workdir=/tmp/smoke --mode=pipeline
"""

from nbp_jax import config_lib

# The demo's fields this config changes (tests/conftest.py passes them as --config.x=y flags on configs/demo.py).
OVERRIDES = {
    'data.num_frames': 9, 'data.resolution': 16,
    'data.synthetic.num_train': 8, 'data.synthetic.num_val': 4, 'data.batch_size': 4,
    'tokenizer.channels': 8, 'tokenizer.discriminator_channels': 8, 'tokenizer.pretrained': '',
    'tokenizer.num_steps': 2, 'tokenizer.batch_size': 4, 'tokenizer.num_samples': 2,
    'model.num_layers': 1, 'model.num_heads': 2, 'model.emb_dim': 32,
    'nbp.block_shape': (1, 1, 2), 'nbp.context_frames': 5,
    'train.num_steps': 2, 'train.log_every': 1, 'train.eval_every': 2,
    'train.checkpoint_every': 2, 'train.num_eval_batches': 1,
    'sample.num_samples': 4, 'sample.batch_size': 4,
    # Evaluation in two batches of two: tests/test_multihost.py has two processes take one each.
    'eval.num_samples': 4, 'eval.batch_size': 2, 'eval.fvd_num_frames': 9,
    'eval.num_video_files': 2, 'eval.classifier_steps': 5,
}


def get_config():
  return config_lib.apply_overrides(config_lib.task_config('demo', 'tiny'), OVERRIDES)
