"""Next-block prediction: block layouts, the block-causal transformer, its objective and block decoding.

  spec = spec_from_config(config)                    # static: transformer sizes + BlockLayout + Vocab
  params = train.init_params(spec, rng)              # logically-partitioned params
  loss, metrics = train.loss_fn(spec, params, batch, rng)
  codes = generation.generate(spec, params, rng, Sampling(top_k=16000, top_p=0.9), labels=labels)
"""

from nbp_jax.nbp.layout import BlockLayout
from nbp_jax.nbp.layout import DecodePlan
from nbp_jax.nbp.layout import LayoutError
from nbp_jax.nbp.layout import Vocab
from nbp_jax.nbp.sampling import Sampling
from nbp_jax.nbp.spec import Spec
from nbp_jax.nbp.spec import spec_from_config
from nbp_jax.nbp.transformer import KVCache
from nbp_jax.nbp.transformer import Transformer
from nbp_jax.nbp.transformer import TransformerConfig
from nbp_jax.nbp.transformer import init_cache

__all__ = ['BlockLayout', 'DecodePlan', 'LayoutError', 'Vocab', 'Sampling', 'Spec', 'spec_from_config', 'KVCache',
           'Transformer', 'TransformerConfig', 'init_cache']
