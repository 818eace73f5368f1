"""Running experiments: one run (``pipeline``: its stages; ``cache``: the stage keys and the one
content hash; ``generation``: the micro-batch loop; ``images``: the grid writer; ``results``: the
results files and the number format; ``machine``: device and peak memory), composition checks
(``pipeline_check``), grids and ablations (``grid``, ``ablation``, ``reports``), tokenizer fitting
(``tokenizer_fit``) and the command line (``cli``). The top layer: nothing below imports it.
"""
