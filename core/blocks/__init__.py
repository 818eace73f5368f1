"""Building blocks that plugins share: per-image random numbers (``rng``), data sets (``data``),
generation-order helpers (``orders``), the sampler chain (``sampling``), speculative decoding
(``speculative``), quantisers (``quantize``), convolutional autoencoders (``convnet``,
``autoencoder``, ``tokenizer_train``). Imports only :mod:`tokenloom.contract`.
"""
