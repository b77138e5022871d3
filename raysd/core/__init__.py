"""Ray-free computation in plain PyTorch: models, schedulers, the guided sampler, the generator,
the diffusion and CAS trainers, the search space and trial logic, the sample plan, imaging.

Nothing here imports Ray or touches files: the data formats are in :mod:`raysd.data`, the run
directory in :mod:`raysd.run`, the Ray wiring in :mod:`raysd.stages`.
"""
