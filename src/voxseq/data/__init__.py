"""Data: preprocessing, manifests, dataset adapters, the voxel cache and synthetic phantoms."""
