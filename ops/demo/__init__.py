"""The product's main job, `make demo`: a mixed fleet of worker processes through the real pipeline."""
