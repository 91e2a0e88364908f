"""Video tokenizer: causal 3D CNN encoder/decoder with FSQ (video <-> codes), its losses and training task."""

from nbp_jax.tokenizer.model import Tokenizer, TokenizerSpec, decode, encode, init_params, make_model, param_counts
