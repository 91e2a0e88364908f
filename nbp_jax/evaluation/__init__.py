"""Evaluation: FVD with the Kinetics-400 I3D, the class-accuracy classifier, the UCF-101 / K600 protocols (their
PSNR/SSIM/LPIPS: nbp_jax.image_metrics)."""
