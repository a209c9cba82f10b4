"""Fused, chunked token statistics over the vocabulary (log p, entropy, soft cross-entropy) and their autograd:
the lowest layer, which imports nothing else of the package."""
