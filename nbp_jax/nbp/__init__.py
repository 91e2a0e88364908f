"""Next-block prediction: block layouts, the block-causal transformer, its objective and block decoding.

  spec = spec_from_config(config)                    # static: transformer sizes + BlockLayout + Vocab
  params = train.init_params(spec, rng)              # logically-partitioned params
  loss, metrics = train.loss_fn(spec, params, batch, rng)
  codes = decode.generate(spec, params, rng, Sampling(top_k=16000, top_p=0.9), labels=labels)
"""

from nbp_jax.nbp.layout import BlockLayout, DecodePlan, LayoutError, Vocab
from nbp_jax.nbp.sampling import Sampling
from nbp_jax.nbp.spec import Spec, spec_from_config
from nbp_jax.nbp.transformer import KVCache, Transformer, TransformerConfig, init_cache

__all__ = ['BlockLayout', 'DecodePlan', 'LayoutError', 'Vocab', 'Sampling', 'Spec', 'spec_from_config', 'KVCache',
           'Transformer', 'TransformerConfig', 'init_cache']
