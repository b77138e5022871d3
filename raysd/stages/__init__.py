"""The stages: the only modules that import Ray. Each is a thin adapter that wires the Ray-free
core (:mod:`raysd.core`), data formats (:mod:`raysd.data`) and run directory (:mod:`raysd.run`)
into Ray Train, Ray Tune and Ray Data: ``cluster`` (connection, device, resources), ``prepare``,
``train``, ``search``, ``generate``, ``evaluate``."""
