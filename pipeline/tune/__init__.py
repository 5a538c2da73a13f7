"""Ray Tune sweeps: the search space (``space``), one trial (``trial``), the results table and best
experiment (``results``), and the sweep driver (``driver``). ``python -m pipeline.tune`` runs ``__main__``."""
