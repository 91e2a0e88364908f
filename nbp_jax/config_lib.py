"""Shared config pieces: model sizes, tokenizer sizes, task presets, and validation.

Every file in `configs/` (a link to nbp_jax/configs, so that they are installed with the package) is a thin
`get_config()` over `task_config(task, size)`; nothing is copied between them. `apply_overrides` sets
`--config.x=y` fields, and a `model.size` / `tokenizer.size` override chooses that size's fields. A config is
checked once at start by `validate(config, mode)`, which raises `ConfigError` with a one-line message naming the
field and the fix.
"""

from __future__ import annotations

from collections.abc import Mapping
import math
import os
from typing import Any

import ml_collections

from nbp_jax import errors

MODES = ('train', 'train_tokenizer', 'prepare_data', 'tokenize', 'sample', 'eval', 'export', 'import', 'pipeline',
         'study')
ATTENTION_IMPLS = ('xla', 'cudnn', 'splash')  # model.attention
FIRST_BLOCK_MODES = ('bov', 'hybrid', 'none')  # nbp.first_block
# sample.temperature's floor: logits / T stays finite in float32 (below it, use sample.greedy for the likeliest code).
MIN_TEMPERATURE = 1e-6
EXPORT_PLATFORMS = ('cpu', 'cuda', 'rocm', 'tpu')  # export.platforms: jax.export's lowering targets

# Transformer sizes. The paper's three (docs/design.md) plus small ones for CPU tests, demo and benchmarks.
MODEL_SIZES = {
    'micro': dict(num_layers=2, num_heads=2, emb_dim=32),
    'tiny': dict(num_layers=4, num_heads=4, emb_dim=128),
    'small': dict(num_layers=8, num_heads=8, emb_dim=512),
    '100m': dict(num_layers=12, num_heads=12, emb_dim=768),
    '700m': dict(num_layers=24, num_heads=16, emb_dim=1536),
    '1b': dict(num_layers=24, num_heads=32, emb_dim=2048),
    '3b': dict(num_layers=32, num_heads=32, emb_dim=3072),
}

# Video tokenizer sizes. 'official' is the released MAGVIT-v2-style tokenizer (docs/design.md, 370.4M params):
# encoder stages of widths 128*(1,2,2,4), 4 residual units each, then 4 more at the widest; down-sampling
# (1,2,2), (2,2,2), (2,2,2) after the first three stages; the decoder mirrors it.
TOKENIZER_SIZES = {
    'micro': dict(channels=8, channel_multipliers=(1, 2, 2, 4), num_res_blocks=1, num_groups=4,
                  discriminator_channels=8),
    # The CPU demo's (docs/tokenizer_recipes.md): 4x down in space and time (17x32x32 -> 5x8x8 codes), no
    # residual units at full resolution, no normalisation (per-frame GroupNorm removes each frame's mean colour,
    # which this small net then fails to relearn within a CPU budget), 1000 codes (a head a CPU can train).
    'demo': dict(channels=16, channel_multipliers=(1, 1, 2), temporal_downsample=(True, True),
                 num_res_blocks=(0, 1, 1), num_mid_blocks=1, num_groups=8, norm='none', fsq_levels=(8, 5, 5, 5),
                 discriminator_channels=16),
    # The released architecture at a CPU size (8x down in space: 4x4 codes at 32x32; learns only the mean colour).
    'tiny': dict(channels=16, channel_multipliers=(1, 1, 2, 4), num_res_blocks=1, num_groups=8,
                 discriminator_channels=16),
    'official': dict(channels=128, channel_multipliers=(1, 2, 2, 4), num_res_blocks=4, num_groups=32),
}

# Learning rates of the released K600 scripts, per size.
K600_LEARNING_RATES = {'700m': 1e-3, '1b': 5e-4, '3b': 2e-4}

MESH_AXES = ('data', 'fsdp', 'tensor')

# Logical parameter/activation axis -> mesh axes. FSDP shards every large parameter along `embed`; tensor
# parallelism splits heads and the MLP; the batch is split over both data and fsdp.
DEFAULT_AXIS_RULES = (
    ('batch', ('data', 'fsdp')),
    ('embed', 'fsdp'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('kv', None),
    ('vocab', 'tensor'),
    ('length', None),
    ('layers', None),
    ('conv_in', None),
    ('conv_out', 'fsdp'),
)


class ConfigError(errors.UserError, ValueError):
  """A config field is wrong; the message names the field and the fix."""


def model_config(size: str) -> ml_collections.ConfigDict:
  """Transformer hyperparameters (official architecture: pre-LN, q/k/v with bias, GELU MLP 4d)."""
  if size not in MODEL_SIZES:
    raise ConfigError(f'model.size={size!r} is unknown; pick one of {", ".join(MODEL_SIZES)}.')
  c = ml_collections.ConfigDict()
  c.size = size
  c.update(MODEL_SIZES[size])
  c.mlp_ratio = 4
  c.dropout = 0.1
  c.max_positions = 5120
  # 'xla' (materialised mask, works everywhere), 'cudnn' (jax.nn.dot_product_attention), 'splash' (TPU Pallas).
  c.attention = 'xla'
  # Compute dtype; parameters and optimizer state stay float32. 'auto' = bfloat16 on accelerators, float32 on CPU.
  c.dtype = 'auto'
  c.param_dtype = 'float32'
  c.remat = False
  c.scan_layers = True  # nn.scan over layers: one compiled layer body (fast compile for 32 layers)
  # Initial pos_emb: 'zeros' (the release) or 'grid' (sinusoids of each position's latent (t, h, w); the same
  # parameter, so checkpoints, import and export do not change).
  c.pos_emb_init = 'zeros'
  return c


def tokenizer_config(size: str) -> ml_collections.ConfigDict:
  """Video tokenizer hyperparameters (causal 3D CNN + FSQ)."""
  if size not in TOKENIZER_SIZES:
    raise ConfigError(f'tokenizer.size={size!r} is unknown; pick one of {", ".join(TOKENIZER_SIZES)}.')
  c = ml_collections.ConfigDict()
  c.size = size
  # Per stage: down-sample time by 2 after this stage? (space is halved after every stage but the last).
  c.temporal_downsample = (False, True, True)
  c.kernel_size = 3
  c.fsq_levels = (8, 8, 8, 5, 5, 5)
  c.norm = 'group'  # 'group' (GroupNorm per frame, the release) or 'none'
  c.update(TOKENIZER_SIZES[size])
  # Residual units per stage: an int for every stage, or a tuple with one count per stage.
  c.num_mid_blocks = c.get('num_mid_blocks', c.num_res_blocks)
  c.checkpoint = ''  # the workdir of a trained tokenizer (holding checkpoints/), used by tokenize/sample/eval
  # --mode=train_tokenizer starts from this finished tokenizer workdir instead of training ('demo' = the bundled one).
  c.pretrained = ''
  # Training (`--mode=train_tokenizer`).
  c.recon_loss = 'l1'
  c.recon_weight = 1.0
  c.perceptual_weight = 0.1
  c.adversarial_weight = 0.1
  c.discriminator_start_step = 5000
  c.discriminator_channels = c.get('discriminator_channels', 64)  # sizes may set it
  c.discriminator_layers = 3
  c.adaptive_weight = True  # VQGAN-style ratio of gradient norms at the last decoder layer
  c.lecam_weight = 0.0
  c.lecam_decay = 0.999  # EMA of the discriminator's mean logits, for LeCam
  c.dtype = 'auto'  # compute dtype; 'auto' = bfloat16 on accelerators, float32 on CPU
  c.conv_impl = 'auto'  # '3d' convs, or '2d' (sum over time taps; 2-4x faster on CPU); 'auto' = '2d' on CPU only
  c.remat = False  # recompute residual units in the backward pass (the official size at batch 64 needs it)
  # Both optimizers: AdamW, linear warmup then cosine to 0 over num_steps (the discriminator's from its start step).
  c.lr = 1e-4
  c.discriminator_lr = 1e-4
  c.b1 = 0.5
  c.b2 = 0.9
  c.weight_decay = 1e-4  # on conv kernels only
  c.grad_clip = 1.0  # per network
  c.warmup_steps = 1000
  c.num_steps = 100_000
  c.batch_size = 64
  c.grad_accum_steps = 1  # micro-batches per optimizer step (batch_size must be a multiple)
  c.num_samples = 4  # held-out clips reconstructed side by side (mp4 + PNG grid) at train.sample_every and the end
  c.tokenize_batch_size = 16  # --mode=tokenize: clips encoded at once per host
  return c


def default_config() -> ml_collections.ConfigDict:
  """Fields shared by every task; `task_config` fills in the task and size."""
  c = ml_collections.ConfigDict()
  c.name = 'default'
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.source = 'synthetic'  # 'synthetic', 'ucf101' or 'k600'
  c.data.raw_dir = ''  # the user's own folder of videos, read by --mode=prepare_data
  c.data.dir = ''  # prepared array_record dataset; '' = WORKDIR/data
  c.data.tokenized_dir = ''  # pre-tokenized codes (--mode=tokenize); '' = WORKDIR/tokens
  c.data.use_tokenized = True  # False: encode clips with the tokenizer on the fly at every step
  c.data.num_frames = 17
  c.data.resolution = 128
  c.data.fps = 16
  c.data.num_classes = 0  # 0 = unconditional
  c.data.batch_size = 64  # global, over all hosts
  c.data.worker_count = 0  # grain worker processes per host (0 = in-process)
  # prepare_data: clips cut from each video, evenly spaced from its first frame; <= 0 = every non-overlapping clip.
  c.data.clips_per_video = 1
  c.data.prepare_workers = 0  # prepare_data: videos decoded in parallel (0 = one per CPU core)
  c.data.eval_split = ''  # split the trainer evaluates on; '' = 'validation' if prepared, else 'test'
  c.data.synthetic = ml_collections.ConfigDict()
  c.data.synthetic.num_train = 512
  c.data.synthetic.num_val = 64
  c.data.synthetic.num_classes = 4
  c.data.synthetic.seed = 0

  c.tokenizer = tokenizer_config('official')
  c.model = model_config('tiny')

  c.nbp = ml_collections.ConfigDict()
  c.nbp.block_shape = (1, 1, 16)  # (t, h, w) tokens of one block; (1, 1, 1) is next-token prediction
  c.nbp.condition = 'none'  # 'class' (a class-label prefix) or 'none'
  c.nbp.first_block = 'none'  # 'bov' (a begin-of-video block), 'hybrid' (token by token) or 'none'
  c.nbp.context_frames = 0  # video frames given at sampling time (frame prediction); 0 = generate all
  c.nbp.cond_drop_prob = 0.0  # class prefix replaced by a learned null embedding (for classifier-free guidance)
  # Token ids: 'native' (codes, then BOV, placeholders, class ids) or the released checkpoints' 'official_k600'
  # / 'official_ucf' (BOV 0, placeholders 1..15, text ids + 16, codes + 32016).
  c.nbp.id_layout = 'native'
  # official_ucf only: per class, the 8 LLaMA-2 token ids of its name (unshifted); written by --mode=import.
  c.nbp.class_prefix_ids = ()

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 10_000
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.weight_decay = 0.01  # on the weights of linear maps only (trainer.weight_decay_mask)
  c.optim.grad_clip = 1.0
  c.optim.grad_accum_steps = 1

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 100_000
  c.train.log_every = 50
  c.train.eval_every = 1000
  c.train.num_eval_batches = 8
  c.train.checkpoint_every = 1000
  c.train.keep_checkpoints = 3
  c.train.sample_every = 5000
  c.train.peak_tflops = 0.0  # per-device peak for the MFU estimate; 0 = look up the device kind
  c.train.profile_steps = 0  # >0: a jax.profiler trace of this many steps (after the compiled first) in WORKDIR/profile
  c.train.bench_steps = 10  # python -m nbp_jax.bench train: timed steps after bench_warmup
  c.train.bench_warmup = 2

  c.sample = ml_collections.ConfigDict()
  c.sample.num_samples = 16
  c.sample.batch_size = 8
  c.sample.temperature = 1.0
  c.sample.top_k = 16000
  c.sample.top_p = 0.9
  c.sample.cfg_scale = 1.0  # 1.0 = no guidance
  c.sample.greedy = False
  # Long videos: N = 1 + 4k frames (0 = one clip of data.num_frames). Longer than a clip, generation slides a window:
  # the last `window_context_frames` latent frames (0 = the model's context latent frames, at least one block deep)
  # are the next window's context, at positions 0.. again.
  c.sample.num_frames = 0
  c.sample.window_context_frames = 0
  # Frame prediction from your own videos: comma-separated video files and/or folders of them. Sample i continues
  # video i % (number of videos) from its first nbp.context_frames frames (at data.fps, squashed to
  # data.resolution). '' = the held-out clips of the run's prepared dataset.
  c.sample.context_videos = ''
  # The checkpoint --mode=sample and --mode=eval load: 'latest', 'best' (the lowest validation loss; the trainer keeps
  # it beside the last train.keep_checkpoints) or a step number.
  c.sample.checkpoint = 'latest'

  c.eval = ml_collections.ConfigDict()
  c.eval.num_samples = 10_000
  c.eval.batch_size = 16
  c.eval.fvd_num_frames = 16  # the release scores the first 16 of 17 frames
  c.eval.fvd_resize = 0  # resize to this square size before the I3D resize (64 for K600); 0 = keep
  c.eval.protocols = 'auto'  # comma-separated from class, frame_prediction, reconstruction; auto = what fits
  # Which of the run protocols score FVD (comma-separated, or 'all'); the others keep their per-video metrics. On a
  # CPU the I3D network costs more than everything else an evaluation does.
  c.eval.fvd_protocols = 'all'
  c.eval.num_video_files = 4  # samples written as mp4/gif (and in the grid) per protocol
  # 'frame_prediction' protocol: decode greedily (the most likely code at every place) instead of sampling as
  # sample.* says. PSNR/SSIM score one continuation against the truth, so they reward the likeliest one; FVD, which
  # scores the spread of samples, should keep sampling (the release's numbers sample).
  c.eval.frame_prediction_greedy = False
  # 'class' protocol: steps of the class-accuracy classifier trained on the real train clips; 0 = no accuracy.
  c.eval.classifier_steps = 300

  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (-1, 1, 1)  # (data, fsdp, tensor); -1 = the remaining devices
  c.mesh.axis_rules = DEFAULT_AXIS_RULES

  # --mode=export writes WORKDIR/export/: params.safetensors (+ tokenizer.safetensors), generate.stablehlo + .json.
  c.export = ml_collections.ConfigDict()
  c.export.dtype = 'float32'  # of the safetensors files: 'float32', 'bfloat16' or 'float16'
  c.export.stablehlo = True  # also serialize the generation function (jax.export)
  c.export.batch_size = 0  # fixed batch of the exported function; 0 = sample.batch_size
  c.export.context_frames = -1  # video frames given to the exported function; -1 = nbp.context_frames
  c.export.embed_params = False  # bake the weights into generate.stablehlo (small models) instead of inputs
  c.export.platforms = ()  # e.g. ('cpu', 'cuda', 'tpu'); () = the current backend
  c.export.checkpoint = 'latest'  # which checkpoint to export: 'latest', 'best' or a step number (sample.checkpoint)
  # --mode=import: the official PyTorch release -> an orbax workdir (nbp_jax/interop/official.py).
  c.import_ = ml_collections.ConfigDict()
  c.import_.checkpoint = ''  # official transformer: Lightning .ckpt, or its .safetensors from interop.convert_torch
  c.import_.tokenizer_checkpoint = ''  # magvit2_*.pt or its .safetensors; written to WORKDIR/tokenizer
  c.import_.llama_tokenizer = ''  # LLaMA-2 tokenizer.model, for the UCF-101 class prompts (needs sentencepiece)
  c.import_.class_ids = ''  # JSON of precomputed class prompt ids (instead of llama_tokenizer)
  c.import_.class_names = ''  # classInd.txt or one class folder name per line; '' = data.raw_dir's classInd.txt
  c.import_.ignore_prefixes = ('first_stage_model.',)  # state-dict keys skipped by the transformer import
  c.import_.allow_pickle = False  # torch.load(weights_only=False): runs the file's pickle code; trusted files only
  return c


def task_config(task: str, size: str) -> ml_collections.ConfigDict:
  """A paper preset: task in {'ucf101', 'k600', 'demo'} at a model size from MODEL_SIZES."""
  c = default_config()
  c.name = f'{task}_{size}'
  c.model = model_config(size)
  if size == '3b':
    # FSDP over every device: 3B params with fp32 Adam state are ~45 GB, a whole copy per device with data
    # parallelism alone. The same on one device; batches still split over all of them.
    c.mesh.shape = (1, -1, 1)
  if task == 'ucf101':
    # Class-conditional generation; official hybrid start (first row token by token): 95 steps per clip.
    c.data.source = 'ucf101'
    c.data.fps = 8
    c.data.num_classes = 101
    c.data.batch_size = 256
    c.nbp.condition = 'class'
    c.nbp.first_block = 'hybrid'
    # nbp-jax's choice, not the release's: its null-class embedding is an untrained buffer and the paper reports no
    # guidance; 10% dropped prefixes train one, so that --config.sample.cfg_scale works (sampling default 1 = off).
    c.nbp.cond_drop_prob = 0.1
    c.optim.lr = 6e-4
    c.optim.warmup_steps = 5_000
    c.train.num_steps = 100_000
    c.eval.num_samples = 10_000
  elif task == 'k600':
    # Trained unconditionally from the first token; at test time 5 frames (2 latent frames) are given.
    c.data.source = 'k600'
    c.data.fps = 16
    c.data.batch_size = 64
    c.nbp.condition = 'none'
    c.nbp.first_block = 'none'
    c.nbp.context_frames = 5
    c.optim.lr = K600_LEARNING_RATES.get(size, 1e-3)
    c.optim.warmup_steps = 10_000
    # 77 epochs of ~392k clips at batch 64 (the paper's main result).
    c.train.num_steps = 470_000
    c.eval.num_samples = 50_000
    c.eval.fvd_resize = 64
  elif task in ('demo', 'study'):
    # Everything small, on synthetic videos, on CPU in minutes: 17x32x32 clips -> 5x8x8 codes of 1000 values.
    c.data.source = 'synthetic'
    c.data.num_frames = 17
    c.data.resolution = 32
    c.data.fps = 8
    c.data.num_classes = 4
    c.data.batch_size = 16
    c.data.synthetic.num_train = 1024
    c.data.synthetic.num_val = 64
    c.data.synthetic.num_classes = 4
    c.tokenizer = tokenizer_config('demo')
    # Start from the tokenizer bundled in nbp_jax/assets/demo_tokenizer, made by --mode=train_tokenizer in two runs
    # (its README has both commands): 3000 steps on L1 (a 3000-step cosine), then resumed to 7000 on L2 (the tail of
    # a 7000-step cosine; PSNR is a squared error), about 105 min of this 2-core CPU in all.
    # --config.tokenizer.pretrained='' trains this config from scratch instead (7000 steps on L2; not measured).
    c.tokenizer.pretrained = 'demo'
    c.tokenizer.batch_size = 8
    c.tokenizer.num_steps = 7000
    c.tokenizer.recon_loss = 'l2'
    c.tokenizer.warmup_steps = 50
    c.tokenizer.lr = 1e-3
    c.tokenizer.b1 = 0.9
    c.tokenizer.b2 = 0.99
    # No GAN phase: on CPU it doubles the step time, and over a few thousand steps reconstruction matters more than
    # the sharpness the adversarial loss buys late in a long run.
    c.tokenizer.discriminator_start_step = 10**9  # never
    c.tokenizer.perceptual_weight = 0.0
    # One latent row: 40 steps per clip instead of 320. The demo uses frames (below); the study its own shapes.
    c.nbp.block_shape = (1, 1, 8)
    c.nbp.condition = 'class'
    c.nbp.first_block = 'bov'
    c.nbp.context_frames = 5
    c.nbp.cond_drop_prob = 0.1
    c.model.dropout = 0.0
    # The transformer's recipe, the demo's and the study's alike. Measured on this CPU (README, the demo's
    # settings): at a fixed ~7 minutes per model, 2000 steps of 4 clips at lr 3e-3 on 4096 clips beat 500 of 16 at
    # 1e-3 on 1024 (NBP val loss 3.48 vs 4.21, frame-prediction PSNR 17.8 vs 17.2): the model is far from its
    # critical batch, and 1024 clips overfit.
    c.data.synthetic.num_train = 4096
    c.data.batch_size = 4
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 50
    # Session 14 (docs/demo_transformer_settings.md): the position embeddings start as sinusoids of each
    # position's latent (t, h, w) instead of zeros (val loss 3.92 -> 3.77 at 2000 steps, frame prediction
    # +0.4 dB, class accuracy 0.45 -> 0.55), and unrolled layers with 512 positions (the clip needs 385) make a
    # step 0.143 -> 0.116 s, which pays for 2500 steps (frame prediction 19.27 dB, class accuracy 0.63). 3000
    # steps score a little higher (19.50, 0.73) but the whole demo then took 19.1 min on a slow day of this CPU.
    c.model.pos_emb_init = 'grid'
    c.model.scan_layers = False
    c.model.max_positions = 512
    c.train.num_steps = 2500
    c.train.log_every = 20
    c.train.eval_every = 1000
    c.train.num_eval_batches = 2
    c.train.checkpoint_every = 1000
    c.train.sample_every = 0
    c.sample.num_samples = 8
    c.sample.batch_size = 8
    c.sample.top_k = 0
    c.sample.top_p = 0.9
    # PSNR/SSIM score one continuation against the truth: greedy decoding gives the likeliest (19.5 vs 18.9 dB
    # sampled at top-p 0.9, same model); class samples keep sampling.
    c.eval.frame_prediction_greedy = True
    # Class accuracy over 32 samples has a standard error of ~0.09 (steps of 0.03); 64 halve its variance for
    # about a minute more of evaluation per model.
    c.eval.num_samples = 64
    c.eval.batch_size = 8
    # The demo's table needs the class-conditional FVD only; I3D on the predicted and reconstructed clips as well
    # would add about 2.5 of its 20 minutes. The study keeps the frame-prediction FVD of its table.
    c.eval.fvd_protocols = 'class' if task == 'demo' else 'class,frame_prediction'
    if task == 'demo':
      # Frame blocks (one latent frame, 64 tokens): 3 decode steps per predicted clip instead of 24 for rows. In
      # session 13's demo run they beat the row 1x1x8 on class accuracy (0.58 vs 0.44), frame prediction (18.2 vs
      # 17.4 dB) and one-clip decode speed-up over NTP (2.2x vs 1.1x), as the block-size study (docs/study.md) found
      # at its budget; class FVD is worse (1528 vs 1393). Each token predicts the one at its place a latent frame on,
      # so "the previous frame's code" is the model's easiest guess.
      c.nbp.block_shape = (1, 8, 8)
    if task == 'study':
      # --mode=study (nbp_jax/study.py): the demo's data, tokenizer and transformer recipe, one run per block shape
      # and seed. The latent grid is 5x8x8, so blocks with t > 1 other than whole clips cannot tile it: the non-row
      # shapes are 1x2x4 (vs the row 1x1x8) and 1x4x4 (vs two rows, 1x2x8).
      c.study = ml_collections.ConfigDict()
      c.study.block_shapes = ((1, 1, 1), (1, 1, 4), (1, 1, 8), (1, 2, 4), (1, 2, 8), (1, 4, 4), (1, 8, 8))
      c.study.seeds = (0, 1)
  else:
    raise ConfigError(f'task {task!r} is unknown; pick one of ucf101, k600, demo, study.')
  return c


# --------------------------------------------------------------------------------------------------------------
# Overrides (`--config.x=y`) and the bundled config files.

# The fields `model.size` / `tokenizer.size` choose: what their size tables set (num_mid_blocks follows
# num_res_blocks).
_SIZE_FIELDS = {
    'model': frozenset(k for fields in MODEL_SIZES.values() for k in fields),
    'tokenizer': frozenset(k for fields in TOKENIZER_SIZES.values() for k in fields) | {'num_mid_blocks'},
}
_SECTION_BUILDERS = {'model': model_config, 'tokenizer': tokenizer_config}

# configs/ of the checkout is a link to this folder, so the bundled configs are there once installed too.
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs')


# Sections that say how a trained model is sampled and evaluated, not what was trained: fields added to them since a
# run saved its config take their defaults (and can be set with --config.x=y) when the run is read back.
RUNTIME_SECTIONS = ('sample', 'eval', 'export')


def with_new_runtime_fields(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` (a saved run's) with the RUNTIME_SECTIONS fields it lacks set to default_config()'s; changed in place."""
  defaults = default_config()
  for section in RUNTIME_SECTIONS:
    if section in config:
      for name, value in defaults[section].items():
        if name not in config[section]:
          config[section][name] = value
  return config


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """Sets dotted fields ({'model.size': '3b', 'model.num_layers': 4}) as `--config.x=y` does, then lets a size
  choose its section: an overridden `model.size` or `tokenizer.size` sets the fields of that size's table
  (MODEL_SIZES, TOKENIZER_SIZES), except the fields overridden too, which win in any order. The section's other
  fields (dropout, dtype, ...) and the task's fields (e.g. the K600 learning rate of the preset's own size) stay:
  `--config=configs/k600.py:3b` is the paper's whole preset at another size. main.py passes its --config.x=y flags
  here; notebooks and tests build configs the same way. Unknown fields raise KeyError naming them; an unknown size
  raises ConfigError naming the valid ones. Returns `config`, changed in place."""
  for path, value in overrides.items():
    *parents, name = path.split('.')
    node = config
    for i, p in enumerate(parents):
      if p not in node:
        raise KeyError(f'config has no field {".".join(parents[:i + 1])!r} (from override {path!r}).')
      node = node[p]
    if name not in node:
      raise KeyError(f'config has no field {path!r}; see nbp_jax/config_lib.py for the fields.')
    node[name] = tuple(value) if isinstance(value, list) else value
  for section, build in _SECTION_BUILDERS.items():
    if f'{section}.size' not in overrides:
      continue
    old = config[section]
    kept = {k: v for k, v in old.items() if k not in _SIZE_FIELDS[section] or f'{section}.{k}' in overrides}
    # A new section rather than field by field: sizes may differ in a field's type (num_res_blocks int or tuple).
    resized = ml_collections.ConfigDict({**build(old.size).to_dict(), **kept})
    if config.is_locked:
      resized.lock()
    config[section] = resized
  return config


def config_file(spec: str) -> str:
  """A --config value as a path: an existing file as given, else a bundled config by name: `k600_3b`, `k600:3b`,
  or `configs/k600.py:3b` outside the checkout, each the file of that name in CONFIG_DIR. Raises ConfigError naming
  the bundled configs when neither exists. `:ARG` is kept: it is get_config's argument."""
  path, sep, arg = spec.partition(':')
  if os.path.isfile(path):
    return spec
  name = os.path.basename(path)
  bundled = os.path.join(CONFIG_DIR, name if name.endswith('.py') else name + '.py')
  if os.path.dirname(path) in ('', 'configs') and os.path.isfile(bundled):
    return bundled + sep + arg
  names = sorted(f[:-3] for f in os.listdir(CONFIG_DIR) if f.endswith('.py'))
  raise ConfigError(f'--config={spec}: {path} is not a file, nor the name of a bundled config ({", ".join(names)}).')


# --------------------------------------------------------------------------------------------------------------
# Derived quantities (one place, so stages agree).


def temporal_factor(tok: ml_collections.ConfigDict) -> int:
  """Frames per latent frame after the first (2 per temporal downsampling: 4 for 17 -> 5)."""
  return 2 ** sum(bool(x) for x in tok.temporal_downsample)


def spatial_factor(tok: ml_collections.ConfigDict) -> int:
  """Pixels per latent cell along H and W (2 per encoder stage: 8 for 128 -> 16)."""
  return 2 ** len(tok.temporal_downsample)


def latent_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """(t, h, w) of the code grid for the configured clip: 17x128x128 -> (5, 16, 16)."""
  ft, fs = temporal_factor(config.tokenizer), spatial_factor(config.tokenizer)
  t = 1 + (config.data.num_frames - 1) // ft
  return (t, config.data.resolution // fs, config.data.resolution // fs)


def codebook_size(tok: ml_collections.ConfigDict) -> int:
  """Codes of the tokenizer config's FSQ (the product of fsq_levels: 64,000 for 8,8,8,5,5,5)."""
  return math.prod(tok.fsq_levels)


def rollout_frames(config: ml_collections.ConfigDict) -> int:
  """Video frames `--mode=sample` generates: sample.num_frames, or one clip (data.num_frames)."""
  return int(config.sample.get('num_frames', 0)) or int(config.data.num_frames)


def window_context_frames(config: ml_collections.ConfigDict) -> int:
  """Latent frames a sliding window keeps as the next window's context (sample.window_context_frames, default the
  model's context latent frames, at least one block deep)."""
  c = int(config.sample.get('window_context_frames', 0))
  return c or max(context_latent_frames(config), int(config.nbp.block_shape[0]))


def context_latent_frames(config: ml_collections.ConfigDict) -> int:
  """Latent frames covered by `nbp.context_frames` video frames (5 frames -> 2 latent frames)."""
  n = config.nbp.context_frames
  return 0 if n <= 0 else 1 + (n - 1) // temporal_factor(config.tokenizer)


def context_video_frames(config: ml_collections.ConfigDict) -> int:
  """Video frames the context latent frames encode (5 for K600's 2; the frames past them up to nbp.context_frames
  change no code: the tokenizer is causal)."""
  t = context_latent_frames(config)
  return 0 if t == 0 else 1 + temporal_factor(config.tokenizer) * (t - 1)


def resolve_dtype(name: str, platform: str | None = None) -> str:
  """'auto' -> 'bfloat16' on accelerators, 'float32' on CPU."""
  if name != 'auto':
    return name
  if platform is None:
    import jax  # pylint: disable=g-import-not-at-top
    platform = jax.default_backend()
  return 'float32' if platform == 'cpu' else 'bfloat16'


# --------------------------------------------------------------------------------------------------------------
# Validation.


def _require(cond: bool, message: str) -> None:
  if not cond:
    raise ConfigError(message)


# What each mode uses, so that a mode is never refused for a setting it does not read (prepare_data only cuts clips).
TOKENIZER_MODES = ('train_tokenizer', 'tokenize', 'train', 'sample', 'eval', 'export', 'import', 'pipeline', 'study')
TRANSFORMER_MODES = ('train', 'sample', 'eval', 'export', 'import', 'pipeline', 'study')


# I3D reduces time 8-fold before a 2-frame pooling: an FVD needs clips of at least this many frames.
I3D_MIN_FRAMES = 9


def check_sampling(sample: Mapping[str, Any]) -> None:
  """Checks sampling settings (config.sample's, or Generator's overrides of them); ConfigError names the field."""
  _require(sample['temperature'] >= MIN_TEMPERATURE,
           f'sample.temperature={sample["temperature"]} must be >= {MIN_TEMPERATURE} (1 = the model\'s distribution; '
           'for the likeliest code use --config.sample.greedy=True).')
  _require(0 < sample['top_p'] <= 1, f'sample.top_p={sample["top_p"]} must be in (0, 1] (1 = off).')
  _require(int(sample['top_k']) == sample['top_k'] and sample['top_k'] >= 0,
           f'sample.top_k={sample["top_k"]} must be a whole number >= 0 (0 = off).')
  _require(sample['cfg_scale'] >= 0, f'sample.cfg_scale={sample["cfg_scale"]} must be >= 0 (1 = no guidance).')


def validate(config: ml_collections.ConfigDict, mode: str = 'train') -> None:
  """Checks the config once at start for what `mode` uses; raises ConfigError naming the field and the fix."""
  _require(mode in MODES, f'--mode={mode!r} is unknown; pick one of {", ".join(MODES)}.')
  m, tok, d, nbp = config.model, config.tokenizer, config.data, config.nbp

  ft, fs = temporal_factor(tok), spatial_factor(tok)
  _require((d.num_frames - 1) % ft == 0,
           f'data.num_frames={d.num_frames} is not 1 + a multiple of {ft}; use e.g. {1 + ft * 4} frames.')
  _require(d.resolution > 0 and d.resolution % fs == 0,
           f'data.resolution={d.resolution} is not a positive multiple of {fs}; use e.g. 128.')
  _require(d.fps > 0, f'data.fps={d.fps} must be > 0 (the frame rate clips are cut at, e.g. 8).')
  _require(d.source in ('synthetic', 'ucf101', 'k600'),
           f"data.source={d.source!r} is unknown; pick 'synthetic', 'ucf101' or 'k600'.")
  _require(d.batch_size > 0, f'data.batch_size={d.batch_size} must be positive.')
  needs_raw = mode == 'prepare_data' and d.source != 'synthetic'
  if needs_raw:
    _require(bool(d.raw_dir), f'data.raw_dir is empty; pass --config.data.raw_dir=/path/to/your/{d.source} folder.')
    _require(os.path.exists(d.raw_dir),
             f'data.raw_dir={d.raw_dir!r} does not exist; point --config.data.raw_dir at your local '
             f'{d.source} folder (this project never downloads datasets).')
    _require(os.path.isdir(d.raw_dir), f'data.raw_dir={d.raw_dir!r} is a file, not a folder; point it at the '
             f'folder that holds your {d.source} videos.')
  _require(mode != 'prepare_data' or d.source != 'synthetic' or not d.get('raw_dir', ''),
           f"data.raw_dir={d.raw_dir!r} is set but data.source='synthetic' generates its clips and reads no "
           "folder; add --config.data.source=ucf101 or k600 (or drop data.raw_dir).")
  if mode not in TOKENIZER_MODES:
    return

  _require(len(tok.fsq_levels) > 0 and all(int(l) >= 2 for l in tok.fsq_levels),
           f'tokenizer.fsq_levels={tuple(tok.fsq_levels)} must be levels of at least 2 (a level of 1 divides by 0).')
  _require(int(tok.get('tokenize_batch_size', 1)) >= 1,
           f'tokenizer.tokenize_batch_size={tok.get("tokenize_batch_size")} must be >= 1.')
  _require(tok.get('norm', 'group') in ('group', 'none'),
           f"tokenizer.norm={tok.get('norm')!r} is unknown; pick 'group' (the release) or 'none'.")
  blocks = tok.num_res_blocks
  _require(isinstance(blocks, int) or len(blocks) == len(tok.channel_multipliers),
           f'tokenizer.num_res_blocks={blocks} needs one count per stage ({len(tok.channel_multipliers)} stages, '
           'tokenizer.channel_multipliers) or a single int.')
  _require(len(tok.channel_multipliers) == len(tok.temporal_downsample) + 1,
           f'tokenizer.channel_multipliers has {len(tok.channel_multipliers)} stages but '
           f'tokenizer.temporal_downsample describes {len(tok.temporal_downsample)} down-samplings; '
           'give one more multiplier than down-samplings.')
  for i, mult in enumerate(tok.channel_multipliers):
    _require(tok.get('norm', 'group') != 'group' or (tok.channels * mult) % tok.num_groups == 0,
             f'tokenizer.num_groups={tok.num_groups} does not divide stage {i} width {tok.channels * mult}; '
             'change tokenizer.num_groups or tokenizer.channels.')
  if mode in ('train_tokenizer', 'pipeline', 'study'):
    accum = int(tok.get('grad_accum_steps', 1))
    _require(accum >= 1, f'tokenizer.grad_accum_steps={accum} must be >= 1 (1 = no accumulation).')
    _require(tok.batch_size >= 1 and tok.batch_size % accum == 0,
             f'tokenizer.batch_size={tok.batch_size} must be a positive multiple of tokenizer.grad_accum_steps={accum} '
             '(each optimizer step averages that many equal micro-batches).')
  mesh = tuple(config.mesh.shape)
  _require(len(mesh) == len(MESH_AXES) and sum(1 for x in mesh if x == -1) <= 1
           and all(x == -1 or x > 0 for x in mesh),
           f'mesh.shape={mesh} must give 3 positive sizes for {MESH_AXES} with at most one -1.')
  for rule in config.mesh.get('axis_rules', DEFAULT_AXIS_RULES):
    targets = rule[1] if isinstance(rule[1], (tuple, list)) else (rule[1],)
    unknown = [t for t in targets if t is not None and t not in MESH_AXES]
    _require(not unknown, f'mesh.axis_rules maps {rule[0]!r} to {unknown[0] if unknown else ""!r}, which is not a '
             f'mesh axis; use {", ".join(MESH_AXES)} or None.')
  if mode not in TRANSFORMER_MODES:
    return

  _require(m.emb_dim % m.num_heads == 0,
           f'model.num_heads={m.num_heads} does not divide model.emb_dim={m.emb_dim}; '
           f'choose heads that divide the width (e.g. {_divisors_near(m.emb_dim, m.num_heads)}).')
  _require(0.0 <= m.dropout < 1.0, f'model.dropout={m.dropout} must be in [0, 1).')
  _require(m.attention in ATTENTION_IMPLS,
           f"model.attention={m.attention!r} is unknown; pick one of {', '.join(map(repr, ATTENTION_IMPLS))}.")
  _require(m.get('pos_emb_init', 'zeros') in ('zeros', 'grid'),
           f"model.pos_emb_init={m.get('pos_emb_init')!r} is unknown; pick 'zeros' (the release) or 'grid'.")
  _require(m.dtype in ('auto', 'float32', 'bfloat16'),
           f"model.dtype={m.dtype!r} is unknown; pick 'auto', 'float32' or 'bfloat16'.")
  _require(m.param_dtype in ('float32', 'bfloat16'),
           f"model.param_dtype={m.param_dtype!r} is unknown; pick 'float32' (the optimizer's state too) or 'bfloat16'.")
  grid = latent_shape(config)
  block = tuple(nbp.block_shape)
  _require(len(block) == 3 and all(b > 0 for b in block),
           f'nbp.block_shape={block} must be three positive ints (t, h, w), e.g. (1, 1, 16).')
  # The study trains study.block_shapes instead (checked below).
  _require(mode == 'study' or all(g % b == 0 for g, b in zip(grid, block)),
           f'nbp.block_shape={block} does not tile the latent grid {grid} '
           f'(data.num_frames={d.num_frames}, data.resolution={d.resolution}); '
           f'each of (t, h, w) must divide the grid, e.g. (1, 1, {grid[2]}) or (1, {grid[1]}, {grid[2]}).')
  if mode == 'study':
    _require('study' in config, '--mode=study needs a config.study section; use --config=configs/study.py.')
    _require(len(config.study.seeds) > 0 and len(config.study.block_shapes) > 0,
             'study.block_shapes and study.seeds must each name at least one entry.')
    shapes, seeds = [tuple(s) for s in config.study.block_shapes], list(config.study.seeds)
    _require(len(set(shapes)) == len(shapes) and len(set(seeds)) == len(seeds),
             f'study.block_shapes={tuple(shapes)} and study.seeds={tuple(seeds)} must not repeat an entry (a repeat '
             'is one run counted twice).')
    for shape in config.study.block_shapes:
      _require(len(shape) == 3 and all(b > 0 for b in shape) and all(g % b == 0 for g, b in zip(grid, shape)),
               f'study.block_shapes has {tuple(shape)}, which does not tile the latent grid {grid}; each of '
               '(t, h, w) must divide the grid.')
  _require(nbp.condition in ('class', 'none'), f"nbp.condition={nbp.condition!r} must be 'class' or 'none'.")
  _require(nbp.condition == 'none' or d.num_classes > 0,
           "nbp.condition='class' needs data.num_classes > 0; set it or use nbp.condition='none'.")
  _require(nbp.condition == 'none' or d.source != 'synthetic' or d.synthetic.num_classes == d.num_classes,
           f'data.num_classes={d.num_classes} but the synthetic videos have data.synthetic.num_classes='
           f'{d.synthetic.num_classes} classes; set both to the same number (e.g. '
           f'--config.data.synthetic.num_classes={d.num_classes}).')
  _require(nbp.first_block in FIRST_BLOCK_MODES,
           f"nbp.first_block={nbp.first_block!r} must be one of {', '.join(map(repr, FIRST_BLOCK_MODES))}.")
  _require(0.0 <= nbp.cond_drop_prob < 1.0, f'nbp.cond_drop_prob={nbp.cond_drop_prob} must be in [0, 1).')
  sample = config.sample
  check_sampling(sample)
  for field in ('sample.checkpoint', 'export.checkpoint'):
    section, name = field.split('.')
    which = str(config[section].get(name, 'latest'))
    _require(which in ('latest', 'best') or which.isdigit(),
             f"{field}={which!r} is unknown; pick 'latest', 'best' (the lowest validation loss) or a step number.")
  export = config.export
  _require(int(export.batch_size) >= 0, f'export.batch_size={export.batch_size} must be >= 0 (0 = sample.batch_size).')
  unknown = [p for p in export.platforms if p not in EXPORT_PLATFORMS]
  if unknown:
    hint = " (jax's name for NVIDIA GPUs is 'cuda')" if 'gpu' in unknown else ''
    raise ConfigError(f'export.platforms has {unknown[0]!r}{hint}; pick from {", ".join(EXPORT_PLATFORMS)}.')
  _require(sample.num_samples >= 1 and sample.batch_size >= 1,
           f'sample.num_samples={sample.num_samples} and sample.batch_size={sample.batch_size} must be >= 1.')
  _require(not sample.get('context_videos', '') or nbp.context_frames > 0,
           f'sample.context_videos={sample.get("context_videos")!r} gives frames to continue, but this model '
           'predicts no frames from given ones (nbp.context_frames=0): it generates from its class or from nothing; '
           'drop sample.context_videos.')
  if mode in ('eval', 'pipeline', 'study'):
    ev = config.eval
    _require(ev.batch_size >= 1, f'eval.batch_size={ev.batch_size} must be >= 1.')
    _require(ev.num_samples >= 1, f'eval.num_samples={ev.num_samples} must be >= 1.')
    _require(ev.get('num_video_files', 0) >= 0, f'eval.num_video_files={ev.num_video_files} must be >= 0.')
    if ev.get('fvd_protocols', 'all'):
      _require(I3D_MIN_FRAMES <= ev.fvd_num_frames <= d.num_frames,
               f'eval.fvd_num_frames={ev.fvd_num_frames} must be from {I3D_MIN_FRAMES} (I3D pools 8 frames into one, '
               f'then two) to the {d.num_frames} frames of a clip (data.num_frames); '
               + (f'use --config.eval.fvd_num_frames={min(16, d.num_frames)}.' if d.num_frames >= I3D_MIN_FRAMES else
                  "these clips are too short for an FVD: score none with --config.eval.fvd_protocols=''."))
      _require(ev.fvd_resize >= 0, f'eval.fvd_resize={ev.fvd_resize} must be >= 0 (0 = no resize before I3D).')
    _require(ev.num_samples >= 2 or not ev.get('fvd_protocols', 'all'),
             f'eval.num_samples={ev.num_samples}: an FVD needs at least 2 clips a set (thousands to compare with '
             "published ones); raise it, or score no FVD with --config.eval.fvd_protocols=''.")
  if mode in ('train', 'pipeline', 'study'):
    _require(config.optim.lr > 0, f'optim.lr={config.optim.lr} must be > 0.')
    o, t = config.optim, config.train
    _require(0 <= o.b1 < 1 and 0 <= o.b2 < 1, f'optim.b1={o.b1} and optim.b2={o.b2} must be in [0, 1).')
    for field in ('optim.weight_decay', 'optim.grad_clip', 'optim.warmup_steps', 'train.eval_every',
                  'train.checkpoint_every', 'train.sample_every', 'train.num_eval_batches', 'train.log_every'):
      section, name = field.split('.')
      value = config[section].get(name, 0)
      _require(value >= 0, f'{field}={value} must be >= 0 (0 = off).')
    _require(t.get('keep_checkpoints', 1) >= 1, f'train.keep_checkpoints={t.get("keep_checkpoints")} must be >= 1.')
    accum = int(config.optim.grad_accum_steps)
    _require(accum >= 1, f'optim.grad_accum_steps={accum} must be >= 1 (1 = no accumulation).')
    _require(d.batch_size % accum == 0,
             f'data.batch_size={d.batch_size} must be a multiple of optim.grad_accum_steps={accum} (each optimizer '
             'step averages that many equal micro-batches).')
    _require(config.train.num_steps >= 1, f'train.num_steps={config.train.num_steps} must be >= 1.')
  ctx = context_latent_frames(config)
  _require(ctx < grid[0], f'nbp.context_frames={nbp.context_frames} leaves no latent frame to generate '
           f'(grid has {grid[0]}); use fewer context frames.')
  _require(ctx % block[0] == 0, f'nbp.context_frames={nbp.context_frames} covers {ctx} latent frames, '
           f'not a whole number of blocks of nbp.block_shape[0]={block[0]}; change one of them.')
  _require(nbp.context_frames <= 0 or (nbp.context_frames - 1) % ft == 0,
           f'nbp.context_frames={nbp.context_frames} is not 1 + a multiple of {ft}: the tokenizer encodes the first '
           f'frame alone, then {ft} at a time, so the frames past the last whole latent frame would not be given but '
           f'generated; use {context_video_frames(config) or 1}' + (
               f' or {context_video_frames(config) + ft}.' if context_video_frames(config) else '.'))
  frames = rollout_frames(config)
  _require(frames >= d.num_frames, f'sample.num_frames={config.sample.num_frames} is shorter than a clip '
           f'(data.num_frames={d.num_frames}): sampling makes whole clips, or rollouts longer than one; use 0 (one '
           'clip) or more frames.')
  _require(frames >= 1 and (frames - 1) % ft == 0,
           f'sample.num_frames={config.sample.num_frames} is not 1 + a multiple of {ft} (the tokenizer makes one '
           f'latent frame of the first frame, then one of every {ft}); use e.g. {1 + ft * 16} (0 = one clip).')
  if frames > d.num_frames:
    window = window_context_frames(config)
    _require(0 < window < grid[0] and window % block[0] == 0,
             f'sample.window_context_frames={window} leaves no room to generate in a window of {grid[0]} latent '
             f'frames (or is not a multiple of nbp.block_shape[0]={block[0]}); keep between {block[0]} and '
             f'{grid[0] - block[0]} latent frames as context.')
  if mode == 'train' and d.source != 'synthetic' and d.dir:
    _require(os.path.isdir(d.dir), f'data.dir={d.dir!r} does not exist; run --mode=prepare_data first or fix the path.')


def _divisors_near(width: int, heads: int) -> str:
  divs = [h for h in range(1, width + 1) if width % h == 0 and h <= 4 * max(heads, 1)]
  divs.sort(key=lambda h: abs(h - heads))
  return ', '.join(str(h) for h in sorted(divs[:3]))


# --------------------------------------------------------------------------------------------------------------
# The command lines' --config flag (nbp_jax.main and nbp_jax.bench).


def config_flag_index(argv: list[str]) -> int | None:
  """Index in argv of the --config value (`--config=X` or `--config X`), or None when --config is not given."""
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      return i
    if arg == '--config' and i + 1 < len(argv):
      return i + 1
  return None


def with_config_file(argv: list[str]) -> list[str]:
  """argv with the --config value as a path (config_file: a bundled config by name, e.g. `k600:3b`); ConfigError
  when it names nothing."""
  i = config_flag_index(argv)
  if i is None:
    return argv
  prefix = '--config=' if argv[i].startswith('--config=') else ''
  return [*argv[:i], prefix + config_file(argv[i].removeprefix('--config=')), *argv[i + 1:]]


def last_overrides_only(argv: list[str]) -> list[str]:
  """argv with each --config.x=y given once, the last value (config_flags appends a tuple field's repeats, so
  `--config.nbp.block_shape=(1,1,2) --config.nbp.block_shape=(1,1,1)` became a 6-tuple; scalars keep the last)."""
  last = {arg.split('=', 1)[0]: i for i, arg in enumerate(argv) if arg.startswith('--config.') and '=' in arg}
  return [arg for i, arg in enumerate(argv)
          if not (arg.startswith('--config.') and '=' in arg) or last[arg.split('=', 1)[0]] == i]
