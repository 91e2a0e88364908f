"""Video tokenizer: causal 3D CNN encoder/decoder with FSQ (video <-> codes), its losses and training task."""

from nbp_jax.tokenizer.model import Tokenizer
from nbp_jax.tokenizer.model import TokenizerSpec
from nbp_jax.tokenizer.model import decode
from nbp_jax.tokenizer.model import encode
from nbp_jax.tokenizer.model import init_params
from nbp_jax.tokenizer.model import make_model
from nbp_jax.tokenizer.model import param_counts
