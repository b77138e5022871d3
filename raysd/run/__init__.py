"""The run directory, Ray-free: :class:`~raysd.run.rundir.Run` (layout, cached split metas, the
fingerprint and claim of an output), the manifest, results.json, the report, verify, export and
the run lock."""
