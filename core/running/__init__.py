"""Running experiments: one run (``pipeline``), composition checks (``pipeline_check``), grids and
ablations (``grid``, ``ablation``, ``reports``), tokenizer fitting (``tokenizer_fit``) and the
command line (``cli``). The top layer: nothing below imports it.
"""
