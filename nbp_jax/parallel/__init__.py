"""Device mesh, logical-axis shardings and multi-host setup (one place, so every stage shards the same way)."""

from nbp_jax.parallel.distributed import gather
from nbp_jax.parallel.distributed import initialize_distributed
from nbp_jax.parallel.distributed import is_primary
from nbp_jax.parallel.distributed import on_primary
from nbp_jax.parallel.distributed import share
from nbp_jax.parallel.distributed import sync
from nbp_jax.parallel.mesh import create_mesh
from nbp_jax.parallel.mesh import mesh_from_config
from nbp_jax.parallel.sharding import batch_sharding
from nbp_jax.parallel.sharding import logical_shardings
from nbp_jax.parallel.sharding import make_global_batch
from nbp_jax.parallel.sharding import match_shardings
from nbp_jax.parallel.sharding import normalize_rules
from nbp_jax.parallel.sharding import per_device_bytes
from nbp_jax.parallel.sharding import process_data_shard
from nbp_jax.parallel.sharding import replicated
