"""The generation loop: plain and speculative decoding over the target runner."""
