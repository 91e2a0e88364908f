"""Evaluation: FVD with the Kinetics-400 I3D, PSNR/SSIM/LPIPS, and the UCF-101 / K600 protocols."""
