"""``parity explain``: name the likely porting mistake at a divergence, from a catalog of known ones.

The catalog (:mod:`parity.explain.catalog`) lists mistakes as hypotheses, each tested on the
diverging layer: on the captured tensors alone, by re-running the reference sublayer on the port's
own inputs with one change (:mod:`parity.explain.sublayer`), or by re-running a schedule with a
patch. Each candidate is judged by the layer's own rules (:mod:`parity.explain.judge`); the ones
that bring the layer within its limits explain it, ranked. :mod:`parity.explain.run` puts it
together for a live run (``report.json``'s ``explanation``) and for a report folder. Advice only.
"""
