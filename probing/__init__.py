"""Scripts run once per (model, dataset): ``python -m probing.activations`` writes ``stat.pkl``,
``python -m probing.noise_prop`` writes ``noise_prop.pkl``. Both are thin wrappers of
:mod:`cimstat.activation_stats` and :mod:`cimstat.noise_propagation`."""
