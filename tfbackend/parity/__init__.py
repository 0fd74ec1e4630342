"""`tfbackend run`: build the wrapped model per rank and compare its logits with plain HF."""
