"""The official PyTorch release: its checkpoints -> safetensors (convert_torch, torch side) -> nbp-jax (official)."""
