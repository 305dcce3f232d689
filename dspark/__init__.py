"""dspark: confidence-scheduled speculative decoding with semi-autoregressive drafting (DSpark).

Layout (one concept per module):
    dspark.models      target runner (decoder, paged KV cache, checkpoint loading), model families
    dspark.drafters    the drafter interface and drafters (n-gram prompt lookup so far)
    dspark.decoding    sampling (temperature / top-k / top-p) and lossless verification
    dspark.engine      the generation loop (plain and speculative decoding, per-round statistics)
"""

__version__ = "0.1.0"
